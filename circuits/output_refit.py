"""The output refit as a *check* relation: normal equations instead of a solve, no inverse in the circuit.

The client's refit (``zkunlearn.client.refit``) re-solves the layer after a masked one, ``V = [W2 | b2]``,
by ridge regression towards the personalized outputs on its own data. A proof shows that the new ``V'``
is that regression's solution for committed inputs, all of them fixed before the request except the
proven Group-OBS output ``W1'``:

* ``z`` (``n x d_in``): the masked layer's inputs in the personalized model on the client's retained
  data, committed at enrollment like the curvature factor;
* ``W1``, ``b1``, ``V0 = [W2 | b2]``: the personalized weights (enrollment commitments);
* ``W1'``: the weights after Group-OBS (the Group-OBS proof's output commitment).

The hidden activations are *computed* in the circuit, ``h = act(z W^T + b1)`` for ``W1`` and ``W1'``,
with :mod:`zkunlearn.circuits.activations` (additions, products and ``|x|`` only; no lookup table, no
witness to bind): ReLU exactly, GELU within a certified ``7e-5``. The client's refit uses the same
functions, so it solves exactly the regression checked here.

One residual, reduced to its maximum absolute value (nothing else leaves the circuit):
``r_normal = V' (A + lam I) - (T^T H1 / n + lam V0)`` with ``H1 = [h_after, 1]``, ``A = H1^T H1 / n``,
``T = [h_before, 1] V0^T`` and ``lam = rel_lam * trace(A) / (hidden + 1)``: the ridge's stationarity,
i.e. ``V'`` *is* the refit (``A + lam I`` is SPD, so the solution is unique). A lie in any input moves
``A``, ``T`` or ``V'`` and shows here.

Every committed tensor carries one trailing row the relation ignores (blinding, as in
``circuits.group_obs``).
"""

from __future__ import annotations

import torch
from torch import nn
from zkunlearn.circuits.activations import ACTIVATIONS, Activation, activate

INPUT_NAMES = ("z", "w1_before", "b1", "w1_after", "v_before", "v_after")
OUTPUT_NAMES = ("residual_max",)
RESIDUALS = ("normal_equations",)


class OutputRefitCheck(nn.Module):
    """Residual maximum of the output-refit relation for one (masked, following) layer pair.

    Shapes (the trailing row of each is blinding): ``z`` ``(n + 1, d_in)``, ``w1_before`` and
    ``w1_after`` ``(hidden + 1, d_in)``, ``b1`` ``(2, hidden)`` (row 0 the bias), ``v_before`` and
    ``v_after`` ``(d_out + 1, hidden + 1)``. Output: ``(1, 1)``, the maximum of ``RESIDUALS``.
    """

    def __init__(
        self, n: int, d_in: int, hidden: int, d_out: int, rel_lam: float, activation: Activation = "relu"
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if min(n, d_in, hidden, d_out) < 1:
            raise ValueError(f"n, d_in, hidden, d_out must be >= 1 (got {n}, {d_in}, {hidden}, {d_out})")
        if not rel_lam > 0:
            raise ValueError(f"rel_lam must be positive (got {rel_lam})")
        self.n, self.d_in, self.hidden, self.d_out = n, d_in, hidden, d_out
        self.rel_lam = float(rel_lam)
        self.activation: Activation = activation
        # Constants, not ops: a ones column for the bias and ones vectors for sums (ReduceSum is not
        # in the checked op list; MatMul with ones is).
        self.register_buffer("ones_n", torch.ones(n, 1))
        self.register_buffer("ones_k", torch.ones(hidden + 1, 1))
        self.register_buffer("eye_k", torch.eye(hidden + 1))

    def residuals(
        self,
        z: torch.Tensor,
        w1_before: torch.Tensor,
        b1: torch.Tensor,
        w1_after: torch.Tensor,
        v_before: torch.Tensor,
        v_after: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The residual tensors in ``RESIDUALS`` order (for tests and tolerance analysis)."""
        n, hidden, d_out = self.n, self.hidden, self.d_out
        zz, bias = z[:n], b1[:1]
        v0, v1 = v_before[:d_out], v_after[:d_out]
        ones_n: torch.Tensor = self.ones_n  # type: ignore[assignment]
        ones_k: torch.Tensor = self.ones_k  # type: ignore[assignment]
        eye_k: torch.Tensor = self.eye_k  # type: ignore[assignment]
        h_before = activate(torch.matmul(zz, w1_before[:hidden].transpose(0, 1)) + bias, self.activation)
        h_after = activate(torch.matmul(zz, w1_after[:hidden].transpose(0, 1)) + bias, self.activation)
        h1 = torch.cat([h_after, ones_n], dim=1)  # (n, hidden + 1)
        target = torch.matmul(torch.cat([h_before, ones_n], dim=1), v0.transpose(0, 1))  # (n, d_out)
        gram = torch.matmul(h1.transpose(0, 1), h1) * (1.0 / n)
        trace = torch.matmul(torch.matmul(ones_k.transpose(0, 1), gram * eye_k), ones_k)  # (1, 1)
        lam = trace * (self.rel_lam / (hidden + 1))
        cross = torch.matmul(target.transpose(0, 1), h1) * (1.0 / n)
        return (torch.matmul(v1, gram) + lam * v1 - cross - lam * v0,)

    def forward(
        self,
        z: torch.Tensor,
        w1_before: torch.Tensor,
        b1: torch.Tensor,
        w1_after: torch.Tensor,
        v_before: torch.Tensor,
        v_after: torch.Tensor,
    ) -> torch.Tensor:
        parts = self.residuals(z, w1_before, b1, w1_after, v_before, v_after)
        # Reduce along axes only: a scalar amax does not export through tract.
        maxima = [torch.abs(r).amax(dim=1).amax(dim=0, keepdim=True) for r in parts]
        return torch.stack(maxima, dim=1)


def example_inputs(n: int, d_in: int, hidden: int, d_out: int) -> tuple[torch.Tensor, ...]:
    """Shape-correct zero inputs for tracing/export (one trailing blinding row each)."""
    return (
        torch.zeros(n + 1, d_in),
        torch.zeros(hidden + 1, d_in),
        torch.zeros(2, hidden),
        torch.zeros(hidden + 1, d_in),
        torch.zeros(d_out + 1, hidden + 1),
        torch.zeros(d_out + 1, hidden + 1),
    )
