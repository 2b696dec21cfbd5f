"""The exact-integer Group-OBS relation: spec, quantisation, thresholds, reference outputs, tensors.

:mod:`zkunlearn.circuits.group_obs_exact` defines the relation; this module fixes everything the
client, the provider and the auditor must agree on around it. The error analysis behind the
thresholds is in ``docs/protocol.md`` ("Exact Group-OBS relation"); in short, in the block's
normalised units (``theta * 2**e`` of unit spread, ``G`` of unit mean diagonal over the layer):

* the honest client solves Group-OBS exactly (float64) from the committed integers and rounds
  ``theta'`` to ``2**-theta_bits`` and ``w`` to ``2**-w_bits``; masked weights are exactly 0;
* ``|r_w| <= m lam sqrt(m) 2**(-w_bits-1) + ||G||_F sqrt(B) 2**(-theta_bits-1) + eta`` and
  ``|r_row| <= sqrt(B) 2**(-theta_bits-1) + ||G||_F sqrt(m) 2**(-w_bits-1) + eta`` (2-norms; ``eta``
  covers the float solve, which the SDK checks), with ``||G||_F`` the block's own, proven at enrollment
  together with every entry of ``G`` below ``2**g_range_bits``;
* any accepted ``theta'`` differs from the exact Group-OBS solution by at most
  ``|r_w| / (2 sqrt(m lam)) + |r_row|`` in 2-norm (:meth:`ExactGroupObsSpec.slack_bound`).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from zkunlearn.circuits import group_obs_exact as exact_relation
from zkunlearn.proofs.fixedpoint import FIELD_MODULUS, FixedPointError, int_to_felt

IntArray = npt.NDArray[np.object_]
"""Arrays of Python ints: exact at any magnitude the relation forms."""

MIN_G_RANGE_BITS, MAX_G_RANGE_BITS = 8, 13
"""``G``'s range table has ``2**g_range_bits`` rows, which must fit the circuits' domain (at least 2**12
rows here, so small shapes keep small logrows) and leave ``G`` a useful grid."""

SOLVE_ALLOWANCE_STEPS = 2.0**-8
"""The float solve's residual the thresholds allow, in grid steps of ``theta`` (the SDK refuses to prove
from a solve whose float residuals exceed it)."""


def _field_int(value: int) -> int:
    """A felt's signed value (above p/2 is negative)."""
    return value - FIELD_MODULUS if value > FIELD_MODULUS // 2 else value


def quantise_exact(values: npt.ArrayLike, bits: int, bound: float | None = None) -> IntArray:
    """``round(values * 2**bits)`` as Python ints, refusing non-finite values and any ``|v| > bound``."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise FixedPointError("non-finite value (NaN or infinity) cannot be committed")
    if bound is not None and arr.size and float(np.max(np.abs(arr))) > bound:
        raise FixedPointError(f"|value| reaches {float(np.max(np.abs(arr))):.4g}, above the bound {bound}")
    scaled = np.rint(arr * 2.0**bits)
    if scaled.size and float(np.max(np.abs(scaled))) >= 2.0**62:
        raise FixedPointError(f"value too large for 2**{bits}")
    return np.vectorize(int, otypes=[object])(scaled) if scaled.size else scaled.astype(object)


def field_blinding(n: int) -> list[int]:
    """``n`` uniformly random field elements: the relation ignores them, they make commitments hiding."""
    return [secrets.randbelow(FIELD_MODULUS) for _ in range(n)]


def exact_request_binding(digest: bytes, n_blocks: int, n_blind: int) -> list[list[int]]:
    """The mask tensor's trailing field elements, derived from the signed request's digest."""
    if len(digest) < 16:
        raise FixedPointError("request digest must be at least 16 bytes")
    return [
        [
            int.from_bytes(
                hashlib.sha256(
                    b"zkunlearn/exact-request-binding/v1"
                    + b.to_bytes(4, "big")
                    + i.to_bytes(4, "big")
                    + digest
                ).digest(),
                "big",
            )
            % FIELD_MODULUS
            for i in range(n_blind)
        ]
        for b in range(n_blocks)
    ]


@dataclass(frozen=True)
class ExactThresholds:
    """Largest accepted ``sum(R_w^2)`` and ``sum(R_row^2)`` of one block (exact integers)."""

    w: int
    row: int


@dataclass(frozen=True)
class ExactGroupObsSpec:
    """What the provider publishes for exact Group-OBS proofs of one model's layers.

    ``lam = lam_num / 2**lam_shift`` exactly (:meth:`from_lam` picks it); ``theta_bound`` bounds the
    normalised weights from below and ``w_bound`` the row-space witness, both in every deletion proof;
    the enrollment proof bounds every committed entry of ``G`` below ``2**g_range_bits`` on its grid
    (``|G| <= g_bound``: one range-checked limb of that base); ``g_norm_tolerance`` is how far a layer's
    ``sum ||G||_F^2`` may sit from ``m * B * n_blocks`` (the unit mean diagonal that gives ``lam`` its
    meaning), relative.
    """

    block: int
    m: int
    batch: int
    lam_num: int
    lam_shift: int
    theta_bits: int = 20
    g_bits: int = 6
    g_range_bits: int = 11
    w_bits: int = 16
    theta_bound: float = 4.0
    w_bound: float = 4096.0
    g_norm_tolerance: float = 2.0**-6
    n_blind: int = exact_relation.N_BLIND

    def __post_init__(self) -> None:
        if min(self.block, self.m, self.batch) < 1:
            raise ValueError(f"block, m, batch must be >= 1 (got {self.block}, {self.m}, {self.batch})")
        if not MIN_G_RANGE_BITS <= self.g_range_bits <= MAX_G_RANGE_BITS:
            raise ValueError(
                f"g_range_bits must lie in [{MIN_G_RANGE_BITS}, {MAX_G_RANGE_BITS}] (one limb of the range "
                f"table), got {self.g_range_bits}"
            )
        if self.g_bound < 4.0:
            raise ValueError(
                f"|G| <= {self.g_bound} leaves no room for a unit-mean-diagonal factor: raise g_range_bits "
                f"or lower g_bits ({self.g_range_bits}, {self.g_bits})"
            )
        if not 0 < self.g_norm_tolerance < 1:
            raise ValueError(f"g_norm_tolerance must lie in (0, 1), got {self.g_norm_tolerance}")
        self.relation()  # refuses scales whose constants the circuit cannot hold
        self.enrollment_relation()

    @classmethod
    def from_lam(cls, block: int, m: int, batch: int, lam: float, **kwargs: Any) -> ExactGroupObsSpec:
        """The spec whose dyadic ``lam`` is closest to ``lam`` among those the circuit's constants hold."""
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be positive and finite, got {lam}")
        best: ExactGroupObsSpec | None = None
        for shift in range(0, 40):
            num = max(1, round(lam * 2**shift))
            try:
                spec = cls(block, m, batch, num, shift, **kwargs)
            except ValueError:
                continue
            if best is None or abs(spec.lam - lam) < abs(best.lam - lam):
                best = spec
        if best is None:
            raise ValueError(f"no dyadic lam near {lam} fits the circuit's constants at these scales")
        return best

    @property
    def lam(self) -> float:
        return self.lam_num / float(1 << self.lam_shift)

    @property
    def theta_offset(self) -> int:
        return int(self.theta_bound * 2**self.theta_bits)

    @property
    def g_bound(self) -> float:
        """Largest ``|G|`` an enrollment proof accepts (normalised units)."""
        return ((1 << self.g_range_bits) - 1) / 2.0**self.g_bits

    @property
    def w_offset(self) -> int:
        return int(self.w_bound * 2**self.w_bits)

    @property
    def batch_weights(self) -> int:
        return self.batch * self.block

    def relation(self) -> exact_relation.GroupObsExactCheck:
        return exact_relation.GroupObsExactCheck(
            self.block,
            self.m,
            lam_num=self.lam_num,
            lam_shift=self.lam_shift,
            theta_bits=self.theta_bits,
            g_bits=self.g_bits,
            w_bits=self.w_bits,
            w_offset=self.w_offset,
            theta_offset=self.theta_offset,
            n_blind=self.n_blind,
        )

    def enrollment_relation(self) -> exact_relation.GroupObsEnrollmentCheck:
        return exact_relation.GroupObsEnrollmentCheck(self.block, self.m, n_blind=self.n_blind)

    # -- thresholds -----------------------------------------------------------------------------

    def residual_bounds(self, g_fro_sq: int) -> tuple[float, float]:
        """Honest ``(|r_w|, |r_row|)`` 2-norm bounds in normalised units for a block whose committed
        ``||G_q||_F^2`` is ``g_fro_sq`` (docs/protocol.md)."""
        b, m, lam = self.block, self.m, self.lam
        g_fro = math.sqrt(max(int(g_fro_sq), 0)) / 2**self.g_bits
        half_t, half_w = 2.0 ** (-self.theta_bits - 1), 2.0 ** (-self.w_bits - 1)
        eta = SOLVE_ALLOWANCE_STEPS * 2.0**-self.theta_bits
        r_w = m * lam * math.sqrt(m) * half_w + g_fro * math.sqrt(b) * half_t + eta
        r_row = math.sqrt(b) * half_t + g_fro * math.sqrt(m) * half_w + eta
        return r_w, r_row

    def thresholds(self, g_fro_sq: int) -> ExactThresholds:
        r_w, r_row = self.residual_bounds(g_fro_sq)
        scale_w = 2.0 ** (self.lam_shift + self.g_bits + self.theta_bits)
        scale_row = 2.0 ** (self.g_bits + self.w_bits)
        return ExactThresholds(
            w=math.ceil((r_w * scale_w) ** 2 * (1 + 1e-9)),
            row=math.ceil((r_row * scale_row) ** 2 * (1 + 1e-9)),
        )

    def slack_bound(self, g_fro_sq: int) -> float:
        """Largest 2-norm by which an accepted ``theta'`` can differ from the exact Group-OBS solution of
        the committed block, in normalised units (``|r_w| / (2 sqrt(m lam)) + |r_row|``)."""
        r_w, r_row = self.residual_bounds(g_fro_sq)
        return r_w / (2.0 * math.sqrt(self.m * self.lam)) + r_row

    def normalisation_range(self, n_blocks: int) -> tuple[int, int]:
        """Accepted ``sum ||G_q||_F^2`` over a layer's ``n_blocks`` blocks (unit mean diagonal)."""
        centre = self.m * self.block * n_blocks * 4**self.g_bits
        return math.floor(centre * (1 - self.g_norm_tolerance)), math.ceil(
            centre * (1 + self.g_norm_tolerance)
        )


# -- reference computation (what the circuit computes, in Python ints) ---------------------------


def _matvec(a: IntArray, x: IntArray) -> IntArray:
    return np.array(
        [sum(int(a[i, j]) * int(x[j]) for j in range(a.shape[1])) for i in range(a.shape[0])], dtype=object
    )


def exact_outputs(
    spec: ExactGroupObsSpec,
    theta: IntArray,
    theta_after: IntArray,
    g: IntArray,
    mask: npt.ArrayLike,
    w: IntArray,
) -> list[tuple[int, int, int, int]]:
    """Per block ``(sum mask |Theta'|, sum R_w^2, sum R_row^2, sum(|Theta + K| - (Theta + K)))``,
    exactly as the circuit computes them (inputs without blinding: ``(n, B)``, ``(n, B)``,
    ``(n, m, B)``, ``(n, B)``, ``(n, m)``)."""
    rel = spec.relation()
    mk = np.asarray(mask).astype(bool)
    out = []
    for i in range(np.asarray(theta).shape[0]):
        delta = np.asarray(theta_after[i], dtype=object) - np.asarray(theta[i], dtype=object)
        w_eff = np.array([abs(int(v) + rel.w_offset) - rel.w_offset for v in w[i]], dtype=object)
        gi = np.asarray(g[i], dtype=object)
        r_w = rel.c_w * w_eff + rel.c_gd * _matvec(gi, delta)
        r_row = rel.c_d * delta - _matvec(gi.T, w_eff)
        kept = sum(abs(int(v)) for v, s in zip(theta_after[i], mk[i], strict=True) if s)
        shifted = [int(v) + spec.theta_offset for v in theta[i]]
        out.append(
            (
                int(kept),
                sum(int(v) * int(v) for v in r_w),
                sum(int(v) * int(v) for v, s in zip(r_row, mk[i], strict=True) if not s),
                sum(abs(v) - v for v in shifted),
            )
        )
    return out


def g_fro_sq(g: IntArray) -> list[int]:
    """Per block ``||G||_F^2``, as the enrollment circuit computes it."""
    return [sum(int(v) * int(v) for v in np.ravel(block)) for block in g]


# -- committed tensors ---------------------------------------------------------------------------


def _rows(values: IntArray, trailing: Sequence[Sequence[int]]) -> list[str]:
    out: list[str] = []
    for row, extra in zip(values, trailing, strict=True):
        out += [int_to_felt(int(v)) for v in row] + [int_to_felt(int(v)) for v in extra]
    return out


def theta_tensor(theta: IntArray, blinding: Sequence[Sequence[int]]) -> list[str]:
    return _rows(theta, blinding)


def g_tensor(g: IntArray, blinding: Sequence[Sequence[int]]) -> list[str]:
    """``(n, m + 1, B)``: each block's ``m`` rows, then its row of blinding."""
    out: list[str] = []
    for block, extra in zip(g, blinding, strict=True):
        out += [int_to_felt(int(v)) for v in np.ravel(block)] + [int_to_felt(int(v)) for v in extra]
    return out


def mask_tensor(mask: npt.ArrayLike, request_digest: bytes, n_blind: int) -> list[str]:
    mk = np.asarray(mask)
    if mk.ndim != 2 or not np.all((mk == 0) | (mk == 1)):
        raise FixedPointError(f"mask must be (n_blocks, B) with 0/1 entries, got shape {mk.shape}")
    binding = exact_request_binding(request_digest, mk.shape[0], n_blind)
    return _rows(mk.astype(int).astype(object), binding)


def signed_outputs(instances: Sequence[str]) -> list[int]:
    """The public outputs of an exact proof as signed ints (a negative one can only come from a wrap)."""
    return [_field_int(int.from_bytes(bytes.fromhex(f), "little")) for f in instances]
