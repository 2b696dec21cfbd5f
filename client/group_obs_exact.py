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
    quantise_exact,
)
from zkunlearn.proofs.fixedpoint import FixedPointError


@dataclass(frozen=True)
class ExactUpdate:
    """One batch's rounded update and the exact public outputs its proof will show."""

    theta_after: IntArray  # (n, B) on 2**-theta_bits; masked entries exactly 0
    w: IntArray  # (n, m) on 2**-w_bits
    outputs: list[tuple[int, int, int]]


def g_fro_sq(g: IntArray) -> list[int]:
    """Each block's ``||G_q||_F^2`` (what its enrollment proof shows)."""
    return [sum(int(v) * int(v) for v in np.ravel(block)) for block in g]


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
    for i, ((kept, s_w, s_row), g_sq) in enumerate(zip(outputs, g_fro_sq(g), strict=True)):
        limit = spec.thresholds(g_sq)
        if kept != 0 or s_w > limit.w or s_row > limit.row:
            raise GroupObsError(
                f"block {i}: the rounded update's outputs ({kept}, {s_w}, {s_row}) exceed the thresholds "
                f"(0, {limit.w}, {limit.row}); it would be refused"
            )
    return ExactUpdate(theta_after, w_q, outputs)
