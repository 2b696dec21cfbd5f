"""The specs a provider publishes for the fixed-point relations: Group-OBS, the analytic head and the
output refit (shapes, fixed-point parameters and the magnitude bounds their tolerances derive from).

The exact relations' specs live beside their relations (:mod:`zkunlearn.proofs.exact`,
:mod:`zkunlearn.proofs.analytic_exact`).
"""

from __future__ import annotations

from dataclasses import dataclass

from zkunlearn.circuits import group_obs as group_obs_relation
from zkunlearn.circuits import output_refit as refit_relation
from zkunlearn.proofs.fixedpoint import (
    GroupObsTolerance,
    analytic_tolerance,
    group_obs_tolerance,
    output_refit_tolerance,
)
from zkunlearn.proofs.layout import DeletionError

__all__ = ["AnalyticSpec", "GroupObsSpec", "RefitSpec"]


@dataclass(frozen=True)
class GroupObsSpec:
    """Circuit shape and fixed-point parameters the provider publishes for Group-OBS clients."""

    block: int
    m: int
    batch: int
    lam: float
    theta_bound: float = 4.0
    g_bound: float = 8.0
    w_bound: float = 64.0
    n_blind: int = group_obs_relation.N_BLIND

    def tolerance(self, scale: int) -> GroupObsTolerance:
        return group_obs_tolerance(
            self.block,
            self.m,
            self.lam,
            scale,
            theta_bound=self.theta_bound,
            g_bound=self.g_bound,
            w_bound=self.w_bound,
        )

    @property
    def batch_weights(self) -> int:
        return self.batch * self.block

    def intermediate_bound(self) -> float:
        """The largest magnitude the relation forms before a rescale, for any inputs within the published
        bounds: ``G delta`` (``B g 2 theta``), ``G^T (G delta)`` (``m g`` times that) and ``G^T w``
        (``m g w``). The circuit must range-check it, or an honest in-bounds witness fails to decompose."""
        g_delta = self.block * self.g_bound * 2.0 * self.theta_bound
        return max(g_delta, self.m * self.g_bound * g_delta, self.m * self.g_bound * self.w_bound)

    def decomp_legs(self, scale: int, base: int) -> int:
        """Range-check legs (of ``base``) that hold :meth:`intermediate_bound` at twice the input scale,
        where products sit before ezkl rescales them."""
        need = self.intermediate_bound() * 2.0 ** (2 * scale)
        legs = 1
        while float(base) ** legs <= need:
            legs += 1
        return legs


@dataclass(frozen=True)
class AnalyticSpec:
    """Shape of the analytic head circuit: ``d`` features, ``k`` outputs, up to ``n_u`` forget samples."""

    d: int
    k: int
    n_u: int
    r_bound: float = 1.0
    x_bound: float = 4.0
    w_bound: float = 4.0
    inner_bound: float = 16.0

    def tolerance(self, scale: int) -> tuple[float, float]:
        return analytic_tolerance(
            self.d,
            self.k,
            self.n_u,
            scale,
            r_bound=self.r_bound,
            x_bound=self.x_bound,
            w_bound=self.w_bound,
            inner_bound=self.inner_bound,
        )


@dataclass(frozen=True)
class RefitSpec:
    """One output-refit pair the provider publishes: which layers, the circuit's shape, the ridge and
    the magnitude bounds its tolerance is derived from (set them from the global model's statistics:
    the tolerance is only as tight as they are)."""

    masked: str  # the masked weight, a Group-OBS layer, e.g. "fc1.weight"
    masked_bias: str | None  # its bias parameter ("fc1.bias"), or None for a layer without one
    following: str  # the linear module its activations feed, e.g. "fc2"
    n: int  # committed rows of the masked layer's inputs
    d_in: int
    hidden: int
    d_out: int
    rel_lam: float
    activation: str
    z_bound: float = 8.0
    w_bound: float = 8.0
    v_bound: float = 4.0
    h_bound: float = 8.0
    y_bound: float = 8.0

    def tolerance(self, scale: int) -> float:
        return output_refit_tolerance(
            self.n,
            self.hidden,
            self.rel_lam,
            scale,
            self.activation,
            v_bound=self.v_bound,
            h_bound=self.h_bound,
            y_bound=self.y_bound,
        )

    def relation(self, group_obs: GroupObsSpec) -> refit_relation.OutputRefitCheck:
        """The circuit, reading ``W1`` in ``group_obs``'s batch layout."""
        try:
            return refit_relation.OutputRefitCheck(
                self.n,
                self.d_in,
                self.hidden,
                self.d_out,
                self.rel_lam,
                self.activation,  # type: ignore[arg-type]
                block=group_obs.block,
                batch=group_obs.batch,
                n_blind=group_obs.n_blind,
            )
        except ValueError as exc:
            raise DeletionError(f"refit {self.masked} -> {self.following}: {exc}") from exc
