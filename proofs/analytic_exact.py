"""The exact analytic head: spec, integer Gram state, honest witnesses, thresholds and tensors.

:mod:`zkunlearn.circuits.analytic_exact` defines the relation; this module fixes what the client, the
provider and the auditor agree on around it. The derivation is in ``docs/protocol.md`` ("Exact
analytic head"); in short, with ``A' = M'_xx + gamma_q I``, ``B' = M'_xy`` and ``W* = A'^-1 B'``:

* the honest ``W_q`` is ``2**w W*`` rounded (refined against exact integer residuals, so within
  ``1/2 + SOLVE_ALLOWANCE`` of it), hence ``|R|_F <= Lambda sqrt(d k) (1/2 + SOLVE_ALLOWANCE)`` with
  ``Lambda`` the published bound on ``A'``'s largest eigenvalue;
* the honest ``L`` is ``2**l chol(M' + eta_q I)`` rounded, hence
  ``|E|_F <= 2**(l+1) sqrt(T) delta + delta**2`` (``T`` bounds the trace, ``delta = |rounding|_F``);
* ``l`` is the least for which that bound is at most ``2**(2l) gamma_q / 4``: any accepted ``M'`` is then
  ``>= -gamma_q / 2``, so ``A' >= gamma_q / 2`` and any accepted ``W_q`` lies within
  ``2 |R|_F / gamma_q`` of ``2**w W*`` (:meth:`ExactAnalyticSpec.slack_bound`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt
from zkunlearn.circuits import analytic_exact as relation
from zkunlearn.proofs.exact import IntArray, field_blinding, signed_outputs
from zkunlearn.proofs.fixedpoint import FIELD_MODULUS, FixedPointError, int_to_felt

__all__ = [
    "SOLVE_ALLOWANCE",
    "AnalyticOutputs",
    "ExactAnalyticSpec",
    "IntArray",
    "blinding_row",
    "enrollment_binding",
    "factor_of",
    "gram",
    "quantise_rows",
    "reference_outputs",
    "ridge_weights",
    "row_tensor",
    "signed_outputs",
    "z_binding",
    "z_tensor",
]

SOLVE_ALLOWANCE = 2.0**-8
"""How far past 1/2 grid step the honest ``W_q`` may sit from ``2**w W*`` (the SDK refuses beyond)."""

ENROLLMENT_DIGEST = hashlib.sha256(b"zkunlearn/analytic-exact/enrollment/v1").digest()
"""The request digest an enrollment proof's (all-zero) forget rows are bound to."""


def _pow2_at_least(value: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1.0))))


@dataclass(frozen=True)
class AnalyticOutputs:
    """A proof's public outputs: ``eq`` (must be all 0), ``sum R**2`` and ``sum E**2``."""

    eq: tuple[int, ...]
    r_sq: int
    e_sq: int


@dataclass(frozen=True)
class ExactAnalyticSpec:
    """What the provider publishes for exact analytic proofs of one head.

    ``d`` features, ``k`` outputs, up to ``n_u`` forget rows per proof; features quantised to
    ``2**-feature_bits`` within ``x_bound`` and targets within ``y_bound``; at most ``n_max`` learned
    rows; ridge penalty ``gamma`` (``gamma * 4**feature_bits`` must be an integer); head entries within
    ``w_bound`` at ``2**-w_bits``; range checks of ``decomp_legs`` limbs of base ``decomp_base``.
    """

    d: int
    k: int
    n_u: int
    gamma: float = 1.0
    feature_bits: int = 8
    x_bound: float = 4.0
    y_bound: float = 1.0
    n_max: int = 1 << 16
    w_bits: int = 40
    w_bound: float = 64.0
    decomp_base: int = 1024
    decomp_legs: int = 5

    def __post_init__(self) -> None:
        if min(self.d, self.k, self.n_u, self.n_max) < 1:
            raise ValueError(
                f"d, k, n_u, n_max must be >= 1 (got {self.d}, {self.k}, {self.n_u}, {self.n_max})"
            )
        scaled = self.gamma * 4.0**self.feature_bits
        if not (math.isfinite(scaled) and scaled >= 4 and scaled == round(scaled)):
            raise ValueError(
                f"gamma * 4**feature_bits = {scaled} must be an integer >= 4: the Gram is an integer "
                "matrix at that scale and the certificate's margin is a quarter of it"
            )
        for name, bound in (("x_bound", self.x_bound), ("y_bound", self.y_bound), ("w_bound", self.w_bound)):
            if not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"{name} must be positive and finite, got {bound}")
        self.relation()  # refuses constants the decomposition cannot hold
        worst = self.worst_case_outputs()
        if max(worst) >= FIELD_MODULUS // 2:
            raise ValueError(
                f"sums of squares could reach 2**{math.log2(max(worst)):.0f}, past half the field: "
                "fewer legs or smaller scales"
            )

    # -- scales and bounds ----------------------------------------------------------------------

    @property
    def n(self) -> int:
        return self.d + self.k

    @property
    def gamma_q(self) -> int:
        return round(self.gamma * 4.0**self.feature_bits)

    @property
    def eta_q(self) -> int:
        """The certificate's margin: ``M' + eta_q I`` is factored, so an exact Gram is never singular."""
        return self.gamma_q // 4

    @property
    def max_constant(self) -> int:
        """With input range checks off, ezkl range-checks the circuit's constants with the decomposition."""
        return int(self.decomp_base**self.decomp_legs) // 2

    @property
    def row_bound(self) -> int:
        """Largest ``|z|`` entry of a quantised row."""
        return math.floor(max(self.x_bound, self.y_bound) * 2.0**self.feature_bits)

    @property
    def m_offset(self) -> int:
        """At least the largest ``|M|`` entry of an honest Gram (``n_max`` rows at the row bound); offsets
        are powers of two, so that they reach the float32 graph exactly."""
        return _pow2_at_least(self.n_max * self.row_bound**2)

    @property
    def w_offset(self) -> int:
        return _pow2_at_least(self.w_bound * 2**self.w_bits)

    @property
    def trace_bound(self) -> int:
        """``T``: bound on ``tr(M' + eta_q I)`` of an honest state."""
        per_row = (
            self.d * (self.x_bound * 2.0**self.feature_bits) ** 2
            + self.k * (self.y_bound * 2.0**self.feature_bits) ** 2
        )
        return math.ceil(self.n_max * per_row) + self.n * self.eta_q

    @property
    def eigen_bound(self) -> int:
        """``Lambda``: bound on the largest eigenvalue of an honest ``A' = M'_xx + gamma_q I``."""
        return math.ceil(self.n_max * self.d * (self.x_bound * 2.0**self.feature_bits) ** 2) + self.gamma_q

    @cached_property
    def l_bits(self) -> int:
        """The factor's scale: least ``l`` whose honest ``|E|_F`` bound is ``<= 2**(2l) gamma_q / 4``."""
        for bits in range(0, 64):
            if self._e_bound(bits) <= 4.0**bits * self.gamma_q / 4:
                return bits
        raise ValueError("no factor scale certifies this spec: raise gamma or lower n_max")

    @property
    def l_offset(self) -> int:
        return _pow2_at_least(2**self.l_bits * math.sqrt(self.m_offset + self.eta_q) + 1)

    def _e_bound(self, bits: int) -> float:
        delta = 0.5 * math.sqrt(self.n * (self.n + 1) / 2)  # rounding of a lower-triangular factor
        float_solve = 4.0**bits * (self.n + 1) * 2.0**-45 * self.trace_bound
        return 2.0 ** (bits + 1) * math.sqrt(self.trace_bound) * delta + delta**2 + float_solve

    # -- thresholds -----------------------------------------------------------------------------

    @property
    def r_bound(self) -> float:
        """Honest ``|R|_F`` bound (docs/protocol.md)."""
        return self.eigen_bound * math.sqrt(self.d * self.k) * (0.5 + SOLVE_ALLOWANCE)

    @property
    def r_threshold(self) -> int:
        return math.ceil(self.r_bound**2 * (1 + 1e-9))

    @property
    def e_threshold(self) -> int:
        return math.ceil(self._e_bound(self.l_bits) ** 2 * (1 + 1e-9))

    def slack_bound(self) -> float:
        """Largest ``|W' - W*|_F`` (head units) of any accepted ``W'``: ``2 |R|_F / (gamma_q 2**w)``."""
        return 2.0 * self.r_bound / (self.gamma_q * 2.0**self.w_bits)

    def worst_case_outputs(self) -> tuple[int, int]:
        """Largest ``sum R**2`` and ``sum E**2`` any range-checked witness can form (must stay below p/2,
        so that a sum of squares is the integer it looks like)."""
        reach = 2 * self.decomp_base**self.decomp_legs  # |X + K| < base**legs, so |X| < that + K
        m_new = reach + self.n_u * self.row_bound**2
        r = self.d * (m_new + self.gamma_q) * reach + 2**self.w_bits * m_new
        e = 4**self.l_bits * (m_new + self.eta_q) + self.n * reach**2
        return self.d * self.k * r * r, self.n * self.n * e * e

    def relation(self) -> relation.AnalyticExactCheck:
        return relation.AnalyticExactCheck(
            self.d,
            self.k,
            self.n_u,
            gamma_q=self.gamma_q,
            eta_q=self.eta_q,
            w_bits=self.w_bits,
            l_bits=self.l_bits,
            m_offset=self.m_offset,
            w_offset=self.w_offset,
            l_offset=self.l_offset,
            max_constant=self.max_constant,
        )

    @property
    def n_outputs(self) -> int:
        return self.n * self.n + 2

    def decode(self, instances: Sequence[str]) -> AnalyticOutputs:
        values = signed_outputs(instances)
        if len(values) != self.n_outputs:
            raise FixedPointError(f"expected {self.n_outputs} public outputs, got {len(values)}")
        return AnalyticOutputs(tuple(values[:-2]), values[-2], values[-1])


# -- the honest client's integers -----------------------------------------------------------------


def _ints(values: npt.ArrayLike) -> IntArray:
    arr = np.asarray(values)
    return np.vectorize(int, otypes=[object])(arr) if arr.size else arr.astype(object)


def quantise_rows(spec: ExactAnalyticSpec, features: npt.ArrayLike, targets: npt.ArrayLike) -> IntArray:
    """Rows ``z = [round(x 2**f), round(y 2**f)]`` ``(n, d + k)``, refusing shapes, non-finite values and
    anything past ``x_bound`` / ``y_bound``. 1-D ``targets`` are class indices (one-hot targets)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if y.ndim == 1:
        if not np.all((y == np.round(y)) & (y >= 0) & (y < spec.k)):
            raise FixedPointError(f"1-D targets must be class indices in [0, {spec.k})")
        y = np.eye(spec.k)[y.astype(np.int64)]
    if x.ndim != 2 or x.shape[1] != spec.d or y.shape != (x.shape[0], spec.k):
        raise FixedPointError(
            f"rows must be (n, {spec.d}) features and (n, {spec.k}) targets; got {x.shape}, {y.shape}"
        )
    for name, v, bound in (("feature", x, spec.x_bound), ("target", y, spec.y_bound)):
        if not np.isfinite(v).all():
            raise FixedPointError(f"a {name} is not finite (NaN or infinity)")
        if v.size and float(np.max(np.abs(v))) > bound:
            raise FixedPointError(
                f"a {name} reaches {float(np.max(np.abs(v))):.4g}, past the published bound {bound}"
            )
    return _ints(np.rint(np.hstack([x, y]) * 2.0**spec.feature_bits))


def gram(z: IntArray) -> IntArray:
    """``Z^T Z`` exactly (Python ints)."""
    zz = np.asarray(z, dtype=object)
    return _ints(zz.T.dot(zz)) if zz.size else np.zeros((zz.shape[1], zz.shape[1]), dtype=object)


def ridge_weights(spec: ExactAnalyticSpec, m: IntArray) -> IntArray:
    """``W_q``: ``2**w A^-1 B`` rounded, refined against exact integer residuals until every entry is
    within ``1/2 + SOLVE_ALLOWANCE`` of the exact value; refuses a head past ``w_bound``."""
    d = spec.d
    a = _ints(np.asarray(m, dtype=object)[:d, :d] + spec.gamma_q * np.eye(d, dtype=np.int64).astype(object))
    b_scaled = np.asarray(m, dtype=object)[:d, d:] * (1 << spec.w_bits)
    a_f = a.astype(np.float64)
    try:
        w = _ints(np.rint(np.linalg.solve(a_f, b_scaled.astype(np.float64))))
        for _ in range(6):
            residual = _ints(a.dot(w) - b_scaled)
            offset = np.linalg.solve(a_f, residual.astype(np.float64))
            if float(np.max(np.abs(offset))) <= 0.5 + SOLVE_ALLOWANCE:
                break
            w = _ints(w - np.rint(offset))
        else:
            raise FixedPointError(
                "the ridge solve did not settle to the grid: the Gram is too ill-conditioned"
            )
    except np.linalg.LinAlgError as exc:
        raise FixedPointError(f"the ridge system is singular: {exc}") from exc
    if float(np.max(np.abs(w.astype(np.float64)))) > spec.w_bound * 2**spec.w_bits:
        raise FixedPointError(f"a head entry exceeds the published bound {spec.w_bound}")
    return w


def factor_of(spec: ExactAnalyticSpec, m_after: IntArray) -> IntArray:
    """``L_q = round(2**l chol(M' + eta_q I))``: the certificate that ``M'`` is positive semidefinite.

    Refuses a Gram that is not (the rows to forget were never learned, or not all of them)."""
    n = spec.n
    shifted = np.asarray(m_after, dtype=object).astype(np.float64) + spec.eta_q * np.eye(n)
    try:
        chol = np.linalg.cholesky(shifted)
    except np.linalg.LinAlgError as exc:
        raise FixedPointError(
            "the Gram after forgetting is not positive semidefinite: these rows were not all learned"
        ) from exc
    factor = _ints(np.rint(chol * 2.0**spec.l_bits))
    e = _ints(
        np.asarray(m_after, dtype=object) * (1 << (2 * spec.l_bits))
        + (spec.eta_q << (2 * spec.l_bits)) * np.eye(n, dtype=np.int64).astype(object)
        - factor.dot(factor.T)
    )
    if sum(int(v) * int(v) for v in e.ravel()) > spec.e_threshold:
        raise FixedPointError("the Gram after forgetting is too close to singular for the certificate")
    return factor


def reference_outputs(
    spec: ExactAnalyticSpec, m: IntArray, m_after: IntArray, w: IntArray, z: IntArray, factor: IntArray
) -> AnalyticOutputs:
    """The circuit's outputs in Python ints (inputs without their trailing row; ``z`` ``(n_u, N)``)."""
    rel = spec.relation()

    def eff(x: IntArray, k: int) -> IntArray:
        return _ints(
            np.vectorize(lambda v: abs(int(v) + k) - k, otypes=[object])(np.asarray(x, dtype=object))
        )

    zz = np.asarray(z, dtype=object)
    m_new = eff(m, rel.m_offset) - zz.T.dot(zz)
    eq = _ints(np.asarray(m_after, dtype=object) - m_new)
    d = spec.d
    a = m_new[:d, :d] + spec.gamma_q * np.eye(d, dtype=np.int64).astype(object)
    r = a.dot(eff(w, rel.w_offset)) - (1 << spec.w_bits) * m_new[:d, d:]
    f = eff(factor, rel.l_offset)
    e = (
        m_new * rel.l_scale
        + (rel.l_scale * spec.eta_q) * np.eye(spec.n, dtype=np.int64).astype(object)
        - f.dot(f.T)
    )
    return AnalyticOutputs(
        tuple(int(v) for v in eq.ravel()),
        sum(int(v) * int(v) for v in np.ravel(r)),
        sum(int(v) * int(v) for v in np.ravel(e)),
    )


# -- committed tensors ---------------------------------------------------------------------------


def row_tensor(values: IntArray, trailing: Sequence[int]) -> list[str]:
    """A committed matrix's felts, row-major, then its trailing row (blinding or binding)."""
    arr = np.asarray(values, dtype=object)
    if len(trailing) != arr.shape[1]:
        raise FixedPointError(f"trailing row has {len(trailing)} entries, the matrix {arr.shape[1]} columns")
    return [int_to_felt(int(v)) for v in arr.ravel()] + [int_to_felt(int(v)) for v in trailing]


def blinding_row(width: int) -> list[int]:
    return field_blinding(width)


def z_binding(digest: bytes, width: int) -> list[int]:
    """The forget rows' trailing row, derived from the signed request's digest."""
    if len(digest) < 16:
        raise FixedPointError("request digest must be at least 16 bytes")
    return [
        int.from_bytes(
            hashlib.sha256(
                b"zkunlearn/analytic-exact/request-binding/v1" + i.to_bytes(4, "big") + digest
            ).digest(),
            "big",
        )
        % FIELD_MODULUS
        for i in range(width)
    ]


def z_tensor(spec: ExactAnalyticSpec, rows: IntArray | None, digest: bytes) -> list[str]:
    """The forget rows zero-padded to ``n_u``, then the request binding (``rows=None``: none)."""
    z = np.zeros((spec.n_u, spec.n), dtype=object)
    if rows is not None:
        arr = np.asarray(rows, dtype=object)
        if arr.ndim != 2 or arr.shape[1] != spec.n or arr.shape[0] > spec.n_u:
            raise FixedPointError(f"forget rows must be (<= {spec.n_u}, {spec.n}), got {arr.shape}")
        z[: arr.shape[0]] = arr
    return row_tensor(z, z_binding(digest, spec.n))


def enrollment_binding() -> bytes:
    return ENROLLMENT_DIGEST
