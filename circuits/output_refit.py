"""The output refit as a *check* relation: normal equations instead of a solve, no inverse in the circuit.

The client's refit (``zkunlearn.client.refit``) re-solves the layer after a masked one, ``V = [W2 | b2]``,
by ridge regression towards the personalized outputs on its own data. A proof shows that the new ``V'``
is that regression's solution for committed inputs, all of them fixed before the request except the
proven Group-OBS output ``W1'``:

* ``z`` (``n x d_in``): the masked layer's inputs in the personalized model on the client's retained
  data, committed at enrollment *pre-scaled* by ``2**-e``, the exponent of the layer's Group-OBS
  ``theta`` (``W1 = theta 2**-e``, so ``z W1^T = (z 2**-e) theta^T``: the circuit needs no exponent);
* ``theta`` and ``theta'``: ``W1`` and ``W1'`` **in Group-OBS's own commitment layout**, one input per
  batch of ``batch`` blocks of ``block`` consecutive row-major weights, each row followed by its
  ``n_blind`` blinding elements. The verifier therefore binds them to the very commitments Group-OBS
  uses: the enrolled ``theta`` and the ``theta'`` the Group-OBS proofs accepted (a KZG commitment is
  the same in both circuits when they share logrows and SRS);
* ``b1``, ``V0 = [W2 | b2]``: the personalized bias and following layer (enrollment commitments).

One residual, reduced to its maximum absolute value (nothing else leaves the circuit):
``r_normal = V' (A + lam I) - (T^T H1 / n + lam V0)`` with ``H1 = [h_after, 1]``, ``A = H1^T H1 / n``,
``T = [h_before, 1] V0^T`` and ``lam = rel_lam * trace(A) / (hidden + 1)``: the ridge's stationarity,
i.e. ``V'`` *is* the refit (``A + lam I`` is SPD, so the solution is unique). A lie in any input moves
``A``, ``T`` or ``V'`` and shows here.

Every committed tensor carries blinding the relation ignores: a trailing row (``z``, ``b1``, ``V``) or,
for ``theta``, Group-OBS's ``n_blind`` trailing elements per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from zkunlearn.circuits.activations import ACTIVATIONS, Activation, activate

OUTPUT_NAMES = ("residual_max",)
RESIDUALS = ("normal_equations",)
N_BLIND = 4
"""Blinding elements after each ``theta`` row: Group-OBS's (``circuits.group_obs.N_BLIND``)."""


def input_names(n_batches: int) -> tuple[str, ...]:
    """Inputs in order: ``z``, the ``theta`` batches, ``b1``, the ``theta'`` batches, ``V0``, ``V'``."""
    return (
        "z",
        *(f"theta_before_{j}" for j in range(n_batches)),
        "b1",
        *(f"theta_after_{j}" for j in range(n_batches)),
        "v_before",
        "v_after",
    )


class OutputRefitCheck(nn.Module):
    """Residual maximum of the output-refit relation for one (masked, following) layer pair.

    Shapes (the trailing row or elements of each are blinding): ``z`` ``(n + 1, d_in)``; each of the
    ``n_batches = hidden d_in / (batch block)`` ``theta`` and ``theta'`` inputs ``(batch, block +
    n_blind)``; ``b1`` ``(2, hidden)`` (row 0 the bias); ``v_before`` and ``v_after``
    ``(d_out + 1, hidden + 1)``. Output: ``(1, 1)``, the maximum of ``RESIDUALS``.
    """

    def __init__(
        self,
        n: int,
        d_in: int,
        hidden: int,
        d_out: int,
        rel_lam: float,
        activation: Activation = "relu",
        *,
        block: int | None = None,
        batch: int = 1,
        n_blind: int = N_BLIND,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if min(n, d_in, hidden, d_out) < 1:
            raise ValueError(f"n, d_in, hidden, d_out must be >= 1 (got {n}, {d_in}, {hidden}, {d_out})")
        if not rel_lam > 0:
            raise ValueError(f"rel_lam must be positive (got {rel_lam})")
        block = d_in if block is None else block
        if block < 1 or batch < 1 or n_blind < 0 or (hidden * d_in) % (block * batch):
            raise ValueError(
                f"{hidden} x {d_in} weights do not split into batches of {batch} blocks of {block}"
            )
        self.n, self.d_in, self.hidden, self.d_out = n, d_in, hidden, d_out
        self.block, self.batch, self.n_blind = block, batch, n_blind
        self.n_batches = hidden * d_in // (block * batch)
        self.rel_lam = float(rel_lam)
        self.activation: Activation = activation
        # Constants, not ops: a ones column for the bias and ones vectors for sums (ReduceSum is not
        # in the checked op list; MatMul with ones is).
        self.register_buffer("ones_n", torch.ones(n, 1))
        self.register_buffer("ones_k", torch.ones(hidden + 1, 1))
        self.register_buffer("eye_k", torch.eye(hidden + 1))

    def _weights(self, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(hidden, d_in)`` from the batches' weight columns (blinding dropped)."""
        rows = torch.cat([t[:, : self.block] for t in thetas], dim=0)
        if self.block == self.d_in:
            return rows
        return rows.reshape(self.hidden, self.d_in)

    def residuals(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The residual tensors in ``RESIDUALS`` order (for tests and tolerance analysis)."""
        nb = self.n_batches
        if len(inputs) != 2 * nb + 4:
            raise ValueError(f"expected {2 * nb + 4} inputs, got {len(inputs)}")
        z, b1 = inputs[0], inputs[1 + nb]
        w1_before, w1_after = self._weights(inputs[1 : 1 + nb]), self._weights(inputs[2 + nb : 2 + 2 * nb])
        v_before, v_after = inputs[-2], inputs[-1]
        n, hidden, d_out = self.n, self.hidden, self.d_out
        zz, bias = z[:n], b1[:1]
        v0, v1 = v_before[:d_out], v_after[:d_out]
        ones_n: torch.Tensor = self.ones_n  # type: ignore[assignment]
        ones_k: torch.Tensor = self.ones_k  # type: ignore[assignment]
        eye_k: torch.Tensor = self.eye_k  # type: ignore[assignment]
        h_before = activate(torch.matmul(zz, w1_before.transpose(0, 1)) + bias, self.activation)
        h_after = activate(torch.matmul(zz, w1_after.transpose(0, 1)) + bias, self.activation)
        h1 = torch.cat([h_after, ones_n], dim=1)  # (n, hidden + 1)
        target = torch.matmul(torch.cat([h_before, ones_n], dim=1), v0.transpose(0, 1))  # (n, d_out)
        gram = torch.matmul(h1.transpose(0, 1), h1) * (1.0 / n)
        trace = torch.matmul(torch.matmul(ones_k.transpose(0, 1), gram * eye_k), ones_k)  # (1, 1)
        lam = trace * (self.rel_lam / (hidden + 1))
        cross = torch.matmul(target.transpose(0, 1), h1) * (1.0 / n)
        return (torch.matmul(v1, gram) + lam * v1 - cross - lam * v0,)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        parts = self.residuals(*inputs)
        # Reduce along axes only: a scalar amax does not export through tract.
        maxima = [torch.abs(r).amax(dim=1).amax(dim=0, keepdim=True) for r in parts]
        return torch.stack(maxima, dim=1)

    def input_names(self) -> tuple[str, ...]:
        return input_names(self.n_batches)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Shape-correct zero inputs for tracing/export."""
        theta = [torch.zeros(self.batch, self.block + self.n_blind) for _ in range(self.n_batches)]
        return (
            torch.zeros(self.n + 1, self.d_in),
            *theta,
            torch.zeros(2, self.hidden),
            *[t.clone() for t in theta],
            torch.zeros(self.d_out + 1, self.hidden + 1),
            torch.zeros(self.d_out + 1, self.hidden + 1),
        )
