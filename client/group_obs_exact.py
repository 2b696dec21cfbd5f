"""The honest client's side of the exact Group-OBS relation (:mod:`zkunlearn.proofs.exact`).

The update is solved in float64 from exactly the committed integers (``theta`` on ``2**-theta_bits``,
``G`` on ``2**-g_bits``, the published dyadic ``lam``), so the only error left is rounding ``theta'``
and ``w`` to their grids: the one the provider's thresholds allow. Before anything is proven the
client recomputes the circuit's exact outputs and refuses to prove if any exceeds its threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from zkunlearn.client.group_obs import GroupObsError, solve_blocks
from zkunlearn.proofs.exact import (
    SOLVE_ALLOWANCE_STEPS,
    ExactGroupObsSpec,
    IntArray,
    exact_outputs,
    g_fro_sq,
    quantise_exact,
)
from zkunlearn.proofs.fixedpoint import FixedPointError


@dataclass(frozen=True)
class ExactUpdate:
    """One batch's rounded update and the exact public outputs its proof will show."""

    theta_after: IntArray  # (n, B) on 2**-theta_bits; masked entries exactly 0
    w: IntArray  # (n, m) on 2**-w_bits
    outputs: list[tuple[int, int, int, int]]


def bounded_factor(g: npt.ArrayLike, bound: float, tolerance: float) -> npt.NDArray[np.float64]:
    """A layer's unit-mean-diagonal factor ``(..., m, B)`` with every ``|entry| <= bound``.

    Entries above the bound are clipped and the layer renormalised, until the largest fits; the factor
    stays a curvature of the committed values, so the relation holds for it exactly. Refuses (naming
    the bound) when clipping would move the mean diagonal by more than ``tolerance / 4``: a factor that
    concentrated needs a spec with a larger ``g_range_bits``.
    """
    out = np.asarray(g, dtype=np.float64)
    for _ in range(64):
        if float(np.max(np.abs(out), initial=0.0)) <= bound:
            break
        out = np.clip(out, -bound, bound)
        out = out / np.sqrt(float(np.mean(out * out)))
    out = np.clip(out, -bound, bound)
    drift = abs(float(np.mean(out * out)) - 1.0)
    if not drift <= tolerance / 4:
        raise GroupObsError(
            f"the curvature factor is too concentrated for |G| <= {bound:g}: clipping moves its mean "
            f"diagonal by {drift:.3g} (the provider accepts {tolerance:.3g}); the spec needs a larger "
            "g_range_bits"
        )
    return out


def exact_update(spec: ExactGroupObsSpec, theta: IntArray, g: IntArray, mask: npt.ArrayLike) -> ExactUpdate:
    """Group-OBS for a batch of committed blocks: ``theta`` ``(n, B)``, ``g`` ``(n, m, B)`` as integers."""
    th = np.asarray(theta, dtype=np.float64) / 2.0**spec.theta_bits
    gm = np.asarray(g, dtype=np.float64) / 2.0**spec.g_bits
    masked = np.asarray(mask).astype(bool)
    after, delta, w = solve_blocks(th, gm, masked, spec.lam)
    # The thresholds allow the float solve SOLVE_ALLOWANCE_STEPS grid steps of residual: check it.
    r_w = spec.m * spec.lam * w + np.einsum("nmb,nb->nm", gm, delta)
    r_row = np.where(masked, 0.0, delta - np.einsum("nmb,nm->nb", gm, w))
    allowance = SOLVE_ALLOWANCE_STEPS * 2.0**-spec.theta_bits
    worst = max(float(np.max(np.linalg.norm(r_w, axis=1))), float(np.max(np.linalg.norm(r_row, axis=1))))
    if not worst <= allowance:
        raise GroupObsError(
            f"the float solve leaves a residual of {worst:.3g}, above the {allowance:.3g} the thresholds "
            "allow: the committed factor is too ill-conditioned for this lam"
        )
    try:
        theta_after = quantise_exact(np.where(masked, 0.0, after), spec.theta_bits)
        w_q = quantise_exact(w, spec.w_bits, bound=spec.w_bound)
    except FixedPointError as exc:
        raise GroupObsError(f"the update does not fit the published spec: {exc}") from exc
    outputs = exact_outputs(spec, theta, theta_after, g, masked, w_q)
    for i, ((kept, s_w, s_row, below), g_sq) in enumerate(zip(outputs, g_fro_sq(g), strict=True)):
        limit = spec.thresholds(g_sq)
        if below != 0:
            raise GroupObsError(f"block {i}: a committed weight lies below -{spec.theta_bound} (normalised)")
        if kept != 0 or s_w > limit.w or s_row > limit.row:
            raise GroupObsError(
                f"block {i}: the rounded update's outputs ({kept}, {s_w}, {s_row}) exceed the thresholds "
                f"(0, {limit.w}, {limit.row}); it would be refused"
            )
    return ExactUpdate(theta_after, w_q, outputs)
