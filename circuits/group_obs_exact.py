"""The Group-OBS update as an exact-integer check relation, and its enrollment relation.

Every committed tensor is an integer tensor quantised outside the circuit (``theta`` and ``theta'`` at
``2**theta_bits``, ``G`` at ``2**g_bits``, ``w`` at ``2**w_bits``; ``lam = lam_num / 2**lam_shift``
exactly). The circuit runs at scale 0, so every product is exact in the field: nothing is rescaled
and nothing is rounded in the circuit. Per block, with ``D = Theta' - Theta``:

* ``R_w   = m lam_num 2**(g+t-w) W + 2**lam_shift G D``  -- ``2**(lam_shift+g+t) (m lam w + G delta)``;
* ``R_row = (1 - mask) (2**(g+w-t) D - G^T W)``          -- ``2**(g+w) (delta - G^T w)`` on kept weights.

Both vanish for the exact Group-OBS solution (``delta_U = G_U^T w``, ``m lam w + G delta = 0``,
``delta_S = -theta_S``); the honest client's only error is rounding ``theta'`` and ``w`` to their
grids, which :mod:`zkunlearn.proofs.exact` bounds. The public outputs per block are exact integers:

* ``sum(mask |Theta'|)``  -- must be 0: masked weights are exactly zero;
* ``sum(R_w^2)`` and ``sum(R_row^2)`` -- compared with thresholds derived from the rounding;
* ``sum(|Theta + theta_offset| - (Theta + theta_offset))`` -- must be 0: ``Theta`` is in range.

Range checks: the circuit is compiled with ezkl's input range checks off (they would cost most of
its rows), and checks the values it reads from ``theta``, ``theta'`` and ``w`` itself. ``|Theta'|`` is
computed by a decomposition into range-checked limbs, which bounds every entry of ``Theta'``; ``W``
enters the relation only as ``|W + w_offset| - w_offset``, which bounds it the same way and equals
``W`` for ``|W| <= w_offset``; a fourth output, ``sum(|Theta + theta_offset| - (Theta + theta_offset))``,
is 0 iff every ``Theta >= -theta_offset`` and its decomposition bounds ``Theta`` above. Without these
bounds a sum of squares could wrap modulo the field (e.g. with ``i**2 = -1``, a masked entry ``i``
beside a masked ``1`` sums to zero). ``G`` never changes, so the enrollment relation
(:class:`GroupObsEnrollmentCheck`) bounds it once, over the same commitment.

Trailing ``n_blind`` entries of every committed tensor (one extra row of ``G``) are ignored by the
relation: uniformly random field elements for hiding, or the request binding for ``mask``.
"""

from __future__ import annotations

import torch
from torch import nn

N_BLIND = 4
"""Trailing entries per committed tensor that the relation ignores (blinding / request binding)."""

MAX_CONSTANT = 2**29
"""Upper bound on the relation's constants: with input range checks off, ezkl range-checks constants
against the decomposition (base 1024, 3 limbs: below 2**30)."""


def _check_constant(name: str, value: int) -> None:
    """A constant must be exact in float32 (the ONNX graph's type) to reach the circuit unchanged."""
    if not 0 < value <= MAX_CONSTANT or int(torch.tensor(float(value), dtype=torch.float32).item()) != value:
        raise ValueError(
            f"constant {name} = {value} must be a float32-exact integer in (0, 2**29]: choose other scales"
        )


def _pow2(bits: int, what: str) -> int:
    if bits < 0:
        raise ValueError(f"{what}: the scales make a negative power of two (2**{bits})")
    return 1 << bits


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``(n, k), (n, k) -> (n,)`` as one batched MatMul."""
    return torch.matmul(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


class GroupObsExactCheck(nn.Module):
    """Per-block public outputs ``(n, 4)`` of the exact Group-OBS relation.

    Inputs (integers carried as floats for tracing; the trailing ``n_blind`` entries are ignored):
    ``theta``, ``theta_after`` ``(n, B + n_blind)``; ``g`` ``(n, m + 1, B)`` (last row: blinding);
    ``mask`` ``(n, B + n_blind)`` with 0/1 entries; ``w`` ``(n, m + n_blind)``.
    """

    def __init__(
        self,
        block: int,
        m: int,
        *,
        lam_num: int,
        lam_shift: int,
        theta_bits: int,
        g_bits: int,
        w_bits: int,
        w_offset: int,
        theta_offset: int,
        n_blind: int = N_BLIND,
    ) -> None:
        super().__init__()
        if block < 1 or m < 1 or n_blind < 0:
            raise ValueError(f"block, m must be >= 1 and n_blind >= 0 (got {block}, {m}, {n_blind})")
        if lam_num < 1 or lam_shift < 0:
            raise ValueError(f"lam = lam_num / 2**lam_shift must be positive (got {lam_num}, {lam_shift})")
        self.block, self.m, self.n_blind = block, m, n_blind
        self.c_w = m * lam_num * _pow2(g_bits + theta_bits - w_bits, "g_bits + theta_bits - w_bits")
        self.c_gd = _pow2(lam_shift, "lam_shift")
        self.c_d = _pow2(g_bits + w_bits - theta_bits, "g_bits + w_bits - theta_bits")
        self.w_offset = int(w_offset)
        self.theta_offset = int(theta_offset)
        for name, value in (
            ("c_w", self.c_w),
            ("c_gd", self.c_gd),
            ("c_d", self.c_d),
            ("w_offset", w_offset),
            ("theta_offset", theta_offset),
        ):
            _check_constant(name, value)

    def residuals(
        self,
        theta: torch.Tensor,
        theta_after: torch.Tensor,
        g: torch.Tensor,
        mask: torch.Tensor,
        w: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mask |Theta'|``, ``R_w`` and ``R_row`` (for tests; never a circuit output)."""
        b, m = self.block, self.m
        th2 = theta_after[:, :b]
        delta = th2 - theta[:, :b]
        gm = g[:, :m, :]
        mk = mask[:, :b]
        w_eff = torch.abs(w[:, :m] + self.w_offset) - self.w_offset
        g_delta = torch.matmul(gm, delta.unsqueeze(-1)).squeeze(-1)  # (n, m)
        r_w = self.c_w * w_eff + self.c_gd * g_delta
        gt_w = torch.matmul(gm.transpose(1, 2), w_eff.unsqueeze(-1)).squeeze(-1)  # (n, B)
        r_row = (1.0 - mk) * (self.c_d * delta - gt_w)
        return mk * torch.abs(th2), r_w, r_row

    def forward(
        self,
        theta: torch.Tensor,
        theta_after: torch.Tensor,
        g: torch.Tensor,
        mask: torch.Tensor,
        w: torch.Tensor,
    ) -> torch.Tensor:
        _kept, r_w, r_row = self.residuals(theta, theta_after, g, mask, w)
        b = self.block
        shifted = theta[:, :b] + self.theta_offset
        # Sums of products as one contraction each: ezkl accumulates them in one pass (a product then
        # a sum would lay out every term twice).
        return torch.stack(
            [
                _dot(mask[:, :b], torch.abs(theta_after[:, :b])),
                _dot(r_w, r_w),
                _dot(r_row, r_row),
                (torch.abs(shifted) - shifted).sum(dim=1),
            ],
            dim=1,
        )

    def example_inputs(self, n_blocks: int) -> tuple[torch.Tensor, ...]:
        b, m, nb = self.block, self.m, self.n_blind
        return (
            torch.zeros(n_blocks, b + nb),
            torch.zeros(n_blocks, b + nb),
            torch.zeros(n_blocks, m + 1, b),
            torch.zeros(n_blocks, b + nb),
            torch.zeros(n_blocks, m + nb),
        )


class GroupObsEnrollmentCheck(nn.Module):
    """Per-block public output ``(n, 1)``: ``||G||_F^2 = sum(|G|^2)`` over the enrolled ``G``, the same
    tensor (and so the same commitment) the deletion relation reads.

    ``|G|`` is computed by a decomposition into one range-checked limb, so the proof also shows every
    entry below the decomposition base (the circuit's ``decomp_base``, which the spec publishes). The
    verifier holds the norms to the published normalisation, which fixes what ``lam`` means and bounds
    the deletion thresholds.
    """

    def __init__(self, block: int, m: int, *, n_blind: int = N_BLIND) -> None:
        super().__init__()
        if block < 1 or m < 1 or n_blind < 0:
            raise ValueError(f"block, m must be >= 1 and n_blind >= 0 (got {block}, {m}, {n_blind})")
        self.block, self.m, self.n_blind = block, m, n_blind

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        g_abs = torch.abs(g[:, : self.m, :])
        return (g_abs * g_abs).sum(dim=(1, 2)).unsqueeze(1)

    def example_inputs(self, n_blocks: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(n_blocks, self.m + 1, self.block),)


INPUT_NAMES = ("theta", "theta_after", "g", "mask", "w")
ENROLLMENT_INPUT_NAMES = ("g",)
OUTPUT_NAMES = ("outputs",)
