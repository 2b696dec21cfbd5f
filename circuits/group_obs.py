"""The Group-OBS update as a *check* relation (no inverse in the circuit).

A client proves that, per block of ``B`` weights with gradient factor ``G`` (``m x B``, normalised
to unit mean diagonal so that ``lam`` is relative), the weights after the update ``theta'`` are the
Group-OBS solution for the masked set ``S`` given by ``mask``:

* ``r_mask = mask * theta'``                      -- masked weights are exactly zero;
* ``r_kkt  = (1 - mask) * (lam*delta + G^T (G delta) / m)``  -- the KKT stationarity on unmasked weights;
* ``r_row  = (1 - mask) * (delta - G^T w)``       -- the edit lies in the row space of ``G_U``.

``form="dual"`` replaces ``r_kkt`` by the m-sized ``r_w = m*lam*w + G delta``. With ``r_row = 0`` it
implies the KKT condition exactly (``(F delta)_U = G_U^T (lam w + G delta/m) = 0``) and additionally
pins ``w``; it costs ~30 % fewer circuit rows (B=16, m=8, 2 blocks: 6339 vs 9675 rows, k 13 vs 14;
B=64, m=16: 32339 vs 46947, k 15 vs 16). The default stays the stationarity form above, which is the
one exercised by the real-proof attack tests.

``r_row`` closes the null-space gap: an edit ``p`` with ``G_U p = 0`` changes ``r_kkt`` only by
``lam * p``, which is below tolerance in fixed point when ``lam`` is small, but it cannot be written
as ``G_U^T w``. ``w`` is the client's row-space witness (``w = -(G delta)/(m lam)`` when honest).

Only per-block maxima of ``|r|`` leave the circuit (shape ``(n_blocks, 3)``): the full residual
vector would reveal which coordinates are masked, and ``theta'`` itself is never an output.

Every committed input carries ``n_blind`` trailing elements that the relation ignores: they enter the
KZG commitment of the tensor (which is otherwise not hiding for low-entropy weights) but never the
residuals. For ``mask`` these trailing elements carry the request binding (derived from the signed
request's digest), so a proof made for another request has another mask commitment. ``G`` carries
its blinding as one extra trailing *row* (``m + 1`` rows), which keeps the reshape-free layout.
"""

from __future__ import annotations

import torch
from torch import nn

N_BLIND = 4
"""Trailing elements per committed tensor that the relation ignores (blinding / request binding)."""


class GroupObsCheck(nn.Module):
    """Residual maxima of the Group-OBS relation for a batch of blocks.

    Inputs (all ``float``; the trailing ``n_blind`` entries along the last axis are ignored):
    ``theta`` and ``theta_after`` ``(n, B + n_blind)``; ``g`` ``(n, m + 1, B)`` (last row = blinding);
    ``mask`` ``(n, B + n_blind)`` with 0/1 entries; ``w`` ``(n, m + n_blind)``.
    Output: ``(n, 3)`` = ``max|r_mask|, max|r_kkt|, max|r_row|`` per block (``r_w`` in the middle
    column when ``form="dual"``).
    """

    def __init__(self, block: int, m: int, lam: float, n_blind: int = N_BLIND, form: str = "kkt") -> None:
        super().__init__()
        if form not in ("kkt", "dual"):
            raise ValueError(f"form must be 'kkt' or 'dual', got {form!r}")
        self.form = form
        if block < 1 or m < 1 or n_blind < 0:
            raise ValueError(f"block, m must be >= 1 and n_blind >= 0 (got {block}, {m}, {n_blind})")
        if not lam > 0:
            raise ValueError(f"lam must be positive (got {lam})")
        self.block = block
        self.m = m
        self.lam = float(lam)
        self.n_blind = n_blind

    def residuals(
        self,
        theta: torch.Tensor,
        theta_after: torch.Tensor,
        g: torch.Tensor,
        mask: torch.Tensor,
        w: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three residual vectors (for tests and tolerance analysis; never a circuit output)."""
        b, m = self.block, self.m
        th = theta[:, :b]
        th2 = theta_after[:, :b]
        gm = g[:, :m, :]
        mk = mask[:, :b]
        wv = w[:, :m]
        keep = 1.0 - mk
        delta = th2 - th
        g_delta = torch.matmul(gm, delta.unsqueeze(-1))  # (n, m, 1)
        gt_w = torch.matmul(gm.transpose(1, 2), wv.unsqueeze(-1)).squeeze(-1)  # (n, B)
        r_mask = mk * th2
        if self.form == "dual":
            r_kkt = (m * self.lam) * wv + g_delta.squeeze(-1)
        else:
            gt_g_delta = torch.matmul(gm.transpose(1, 2), g_delta).squeeze(-1)  # (n, B)
            r_kkt = keep * (self.lam * delta + gt_g_delta * (1.0 / m))
        r_row = keep * (delta - gt_w)
        return r_mask, r_kkt, r_row

    def forward(
        self,
        theta: torch.Tensor,
        theta_after: torch.Tensor,
        g: torch.Tensor,
        mask: torch.Tensor,
        w: torch.Tensor,
    ) -> torch.Tensor:
        r_mask, r_kkt, r_row = self.residuals(theta, theta_after, g, mask, w)
        # Reduce along an axis: a scalar amax does not export through tract.
        return torch.stack(
            [
                torch.abs(r_mask).amax(dim=1),
                torch.abs(r_kkt).amax(dim=1),
                torch.abs(r_row).amax(dim=1),
            ],
            dim=1,
        )


def example_inputs(
    n_blocks: int, block: int, m: int, n_blind: int = N_BLIND
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape-correct zero inputs for tracing/export."""
    return (
        torch.zeros(n_blocks, block + n_blind),
        torch.zeros(n_blocks, block + n_blind),
        torch.zeros(n_blocks, m + 1, block),
        torch.zeros(n_blocks, block + n_blind),
        torch.zeros(n_blocks, m + n_blind),
    )


INPUT_NAMES = ("theta", "theta_after", "g", "mask", "w")
OUTPUT_NAMES = ("residual_max",)
