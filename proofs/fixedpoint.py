"""Fixed-point conventions shared by prover and verifier: quantisation, blinding, tolerances.

Why this matters: ezkl works on integers ``round(x * 2**scale)``. With raw model magnitudes
(weights ~0.05, gradients ~0.01) every product underflows and every residual is exactly zero: a
blind check. So blocks are normalised first (G to unit mean diagonal of ``G^T G / m``, theta by a
power of two to about unit spread, see :func:`theta_exponent`), and tolerances are *derived* from
the quantisation step and magnitude bounds, never picked by eye.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from zkunlearn.errors import MalformedError

FIELD_MODULUS = 0x30644E72E131A029B85045B68181585D2833E84879B9709143E1F593F0000001
"""BN254 scalar field order (Halo2/ezkl's field)."""

BLIND_BITS = 23
"""Bits of randomness per blinding element: exact in float32 and far inside the input range check."""

FloatArray = npt.NDArray[np.float64]


class FixedPointError(MalformedError):
    """A value does not fit the fixed-point format the circuit expects."""


def quantise(x: npt.ArrayLike, scale: int) -> npt.NDArray[np.int64]:
    """Integers ``round(x * 2**scale)``, refusing magnitudes that would overflow int64 or float32.

    NaN must be refused explicitly: it compares false with any bound, and ``rint(nan)`` casts to
    ``INT64_MIN``, which would be committed as a huge negative value without complaint.
    """
    arr = np.asarray(x, dtype=np.float64) * float(2**scale)
    if not np.isfinite(arr).all():
        raise FixedPointError(f"non-finite value (NaN or infinity) cannot be encoded at scale {scale}")
    if arr.size and float(np.max(np.abs(arr))) >= 2.0**52:
        raise FixedPointError(f"value too large for scale {scale}: max {float(np.max(np.abs(arr))):.3g}")
    return np.rint(arr).astype(np.int64)


def dequantise(q: npt.ArrayLike, scale: int) -> FloatArray:
    return np.asarray(q, dtype=np.float64) / float(2**scale)


def int_to_felt(v: int) -> str:
    """ezkl's felt encoding: 32-byte little-endian hex of ``v mod p``."""
    return (int(v) % FIELD_MODULUS).to_bytes(32, "little").hex()


def felt_to_int(felt: str) -> int:
    """Signed integer of a felt (values above p/2 are negative)."""
    v = int.from_bytes(bytes.fromhex(felt), "little")
    if v >= FIELD_MODULUS:
        raise FixedPointError(f"felt {felt[:16]}... is not reduced modulo the field order")
    return v - FIELD_MODULUS if v > FIELD_MODULUS // 2 else v


def felts(values: npt.ArrayLike, scale: int) -> list[str]:
    """Flattened (row-major) felts of a tensor, as ezkl orders a committed input."""
    return [int_to_felt(int(v)) for v in quantise(values, scale).ravel()]


def normalise_factor(g: npt.ArrayLike) -> tuple[FloatArray, float]:
    """``G / c`` with unit mean diagonal of ``G^T G / m``; returns the scaled factor and ``c``."""
    gm = np.asarray(g, dtype=np.float64)
    if gm.ndim != 2:
        raise FixedPointError(f"G must be 2-D (m x B), got shape {gm.shape}")
    mean_diag = float(np.mean(np.sum(gm * gm, axis=0)) / gm.shape[0])
    if not mean_diag > 0:
        raise FixedPointError("G is zero: the Fisher factor carries no information")
    c = math.sqrt(mean_diag)
    return gm / c, c


def theta_exponent(theta: npt.ArrayLike, max_abs: float | None = None) -> int:
    """Power-of-two exponent ``e`` so that ``theta * 2**e`` has standard deviation in [0.5, 1), lowered
    further (a bit of precision per step) until no entry exceeds ``max_abs`` when one is given: a
    heavy-tailed layer must still fit a circuit's published magnitude bound."""
    values = np.asarray(theta, dtype=np.float64)
    std = float(np.std(values))
    exponent = -math.floor(math.log2(std)) - 1 if std > 0 else 0
    if max_abs is not None and values.size:
        if not (math.isfinite(max_abs) and max_abs > 0 and np.isfinite(values).all()):
            raise FixedPointError("theta_exponent needs finite values and a positive finite max_abs")
        peak = float(np.max(np.abs(values)))
        while peak * 2.0**exponent > max_abs:
            exponent -= 1
    return exponent


def random_blinding(n: int, scale: int) -> FloatArray:
    """``n`` uniformly random blinding elements (``BLIND_BITS`` bits each) as floats at ``scale``."""
    half = 1 << (BLIND_BITS - 1)
    ints = [secrets.randbelow(2 * half) - half for _ in range(n)]
    return dequantise(ints, scale)


def request_binding(digest: bytes, n: int, scale: int) -> FloatArray:
    """Deterministic elements derived from a request digest: they make the mask commitment request-bound."""
    if len(digest) < 16:
        raise FixedPointError("request digest must be at least 16 bytes")
    half = 1 << (BLIND_BITS - 1)
    out = []
    for i in range(n):
        h = hashlib.sha256(b"zkunlearn/request-binding/v1" + i.to_bytes(4, "big") + digest).digest()
        out.append(int.from_bytes(h[:8], "big") % (2 * half) - half)
    return dequantise(out, scale)


@dataclass(frozen=True)
class GroupObsTolerance:
    """Per-residual acceptance thresholds (in real units at the circuit's output scale)."""

    mask: float
    kkt: float
    row: float

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.mask, self.kkt, self.row)


def group_obs_tolerance(
    block: int,
    m: int,
    lam: float,
    input_scale: int,
    *,
    theta_bound: float,
    g_bound: float,
    w_bound: float,
    safety: float = 2.0,
    worst_case: bool = False,
    form: str = "kkt",
) -> GroupObsTolerance:
    """Honest residuals from rounding, times ``safety``.

    ``q = 2**-input_scale``. Only what an honest client cannot make exact counts. ``theta`` and ``G``
    are committed on the grid at enrollment and the client solves with exactly those values, so they
    carry no error; its solution ``theta'`` and witness ``w`` are rounded to the grid (``q/2`` each);
    the constants ``lam`` and ``1/m`` are rounded to it (``q/2``); each rescale rounds (``q/2``).
    With ``|theta|, |theta'| <= theta_bound`` (``|delta| <= d = 2 theta_bound``), ``|G| <= g_bound``
    and ``|w| <= w_bound``, on the unmasked coordinates ``U`` where the residuals are read:

    * ``r_kkt = lam delta + G^T G delta / m`` is zero at the exact solution, so what is left is the
      curvature applied to the rounding ``e`` of ``theta'``: ``lam q/2 + g L(B) g q/2`` (``|G e| <=
      L(B) g q/2``, and ``G^T`` over ``m`` rows ``/ m`` at most multiplies by ``g``); ``lam``'s rounding
      times ``|delta|``: ``d q/2``; ``1/m``'s rounding (zero when ``m`` divides ``2**input_scale``) times
      ``|G^T G delta| = m lam |delta_U| <= m lam d`` (the exact solution's own stationarity); a
      rescale of ``G delta`` reaching the residual through ``G^T / m``: ``g q/2``; two more rescales.
    * ``r_row = delta - G^T w`` is zero at the exact solution (``w = -G delta / (m lam)``): ``theta'``'s
      rounding ``q/2``, ``w``'s through ``G^T``: ``L(m) g q/2``, two rescales.
    * ``form="dual"``, ``r_w = m lam w + G delta``: ``w``'s rounding ``m lam q/2``, the constant
      ``m lam``'s rounding times ``|w|``: ``w_bound q/2``, ``theta'``'s through ``G``: ``L(B) g q/2``,
      two rescales.

    ``r_mask`` is exact: its tolerance is 0. ``G`` and ``theta`` are not charged with input roundings
    (they are committed on the grid and the client solves with exactly those values); charging them
    would make the bound about 3.6x looser at the demo's spec, room for a client to move unmasked
    weights away from the committed relation's solution.

    A sum of ``L`` independent roundings bounded by ``c q/2`` is at most ``L c q/2`` (``worst_case``)
    but, being uniform, exceeds six standard deviations ``= 2 sqrt(3L) c q/2`` with probability
    below 1e-9; by default ``L`` is replaced by ``min(L, 2 sqrt(3L))``. This keeps the tolerance
    growing like ``sqrt(B)`` rather than ``B``, so a large block does not hide an attack.
    """
    if min(theta_bound, g_bound, w_bound) <= 0:
        raise FixedPointError("magnitude bounds must be positive")
    if form not in ("kkt", "dual"):
        raise FixedPointError(f"form must be 'kkt' or 'dual', got {form!r}")
    q = 2.0**-input_scale
    half = q / 2
    d_bound = 2.0 * theta_bound

    def terms(n: int) -> float:
        return float(n) if worst_case else min(float(n), 2.0 * math.sqrt(3.0 * n))

    inv_m_exact = (2**input_scale) % m == 0
    theta_rounding = terms(block) * g_bound * half  # |G e| for the rounding e of theta'
    if form == "dual":
        e_kkt = m * lam * half + w_bound * half + theta_rounding + 2 * half
    else:
        e_kkt = (
            lam * half
            + g_bound * theta_rounding
            + d_bound * half
            + (0.0 if inv_m_exact else m * lam * d_bound * half)
            + g_bound * half
            + 2 * half
        )
    e_row = half + terms(m) * g_bound * half + 2 * half
    return GroupObsTolerance(mask=0.0, kkt=safety * e_kkt, row=safety * e_row)


def _terms(n: int, worst_case: bool) -> float:
    """Effective count of independent roundings in a length-``n`` sum (see group_obs_tolerance)."""
    return float(n) if worst_case else min(float(n), 2.0 * math.sqrt(3.0 * n))


def analytic_tolerance(
    d: int,
    k: int,
    n_u: int,
    input_scale: int,
    *,
    r_bound: float,
    x_bound: float,
    w_bound: float,
    inner_bound: float,
    safety: float = 2.0,
    worst_case: bool = False,
) -> tuple[float, float]:
    """Honest residual bounds ``(r_w, r_r)`` of the analytic relation from rounding, times ``safety``.

    Entries: ``|R|, |R'| <= r_bound``, ``|X_u|, |Y_u| <= x_bound``, ``|W|, |W'| <= w_bound``, and the
    intermediates ``|X_u W' - Y_u|``, ``|X_u^T (.)|`` (and the ``R`` analogues) ``<= inner_bound``
    (declared with the enrolment). Both residuals have the form ``A - B - C X^T (X D)``; rounding
    errors propagate through the three products. ``worst_case``:
    ``e1 = d (x q/2 + v q/2) + q``; ``e2 = n_u (x e1 + inner q/2) + q``; ``e3 = d (r e2 + inner q/2) + q``.
    Default: the same recursion on variances (each rounding uniform, variance ``q^2/12``), and
    ``e3`` = six standard deviations. Tolerance ``safety (2 q + e3)``.
    Since ``r_w`` is ``(I + R X_u^T X_u) (W' - W'_honest)``, a head off by more than about this
    tolerance in any entry is refused; raise ``input_scale`` to tighten it.
    """
    if min(r_bound, x_bound, w_bound, inner_bound) <= 0:
        raise FixedPointError("magnitude bounds must be positive")
    q = 2.0**-input_scale
    out = []
    for v_bound in (w_bound, r_bound):
        if worst_case:
            e1 = d * (x_bound * q / 2 + v_bound * q / 2) + q
            e2 = n_u * (x_bound * e1 + inner_bound * q / 2) + q
            e3 = d * (r_bound * e2 + inner_bound * q / 2) + q
        else:
            # Propagate variances of independent uniform roundings (q^2/12 each), then take 6 sigma.
            u = q * q / 12.0
            v1 = d * (x_bound**2 + v_bound**2) * u + u
            v2 = n_u * (x_bound**2 * v1 + inner_bound**2 * u) + u
            v3 = d * (r_bound**2 * v2 + inner_bound**2 * u) + u
            e3 = 6.0 * math.sqrt(v3)
        out.append(safety * (2 * q + e3))
    return out[0], out[1]


def output_refit_tolerance(
    n: int,
    hidden: int,
    rel_lam: float,
    input_scale: int,
    activation: str,
    *,
    v_bound: float,
    h_bound: float,
    y_bound: float,
    safety: float = 2.0,
    worst_case: bool = False,
) -> float:
    """Honest bound on the output refit's normal-equation residual from rounding, times ``safety``.

    Entries: ``|V0|, |V'| <= v_bound``, hidden activations ``|h| <= h_bound`` and the personalized
    outputs ``|T| <= y_bound`` (declared with the enrolment, like Group-OBS's bounds). The client
    solves in float64 with the circuit's own activation, from exactly the committed values (``z``,
    ``W1``, ``W1'``, ``b1`` and ``V0`` are all on the grid), so neither the polynomial's approximation
    error nor any input rounding counts; only the circuit's own roundings (``q/2`` each,
    ``q = 2**-input_scale``) and the rounding of the client's ``V'`` do:

    * pre-activations ``p = z W^T + b`` are exact products; the activation's first rescale: ``e_p = q``;
    * ReLU ``(p + |p|) / 2`` is exact: ``e_h = e_p``. GELU adds its correction's error: through the
      clamp and ``t = 2 a / T - 1`` (``e_t = (2/T)(e_p + q/2) + T q/2 + q/2``, the last two from the
      rounded constant and the rescale), amplified at most ``T/2 * max|e'| = 1.25`` by the
      correction's slope, plus Clenshaw's own roundings: the product's at step ``k`` reaches the
      result through ``U_k(t)``, at most ``k + 1`` times, and each rounded coefficient through
      ``T_k(t)``, at most once (``sum_k (k + 1) q/2 + (N + 1) q/2``, worst case);
    * ``A = H1^T H1 / n``: ``e_A = 2 h e_h + q``; targets ``T = [h, 1] V0^T``:
      ``e_T = L(k) v e_h + q``; ``C = T^T H1 / n``: ``e_C = y e_h + h e_T + q``;
      ``lam = rel_lam tr(A) / k``: ``e_lam = rel_lam e_A + q`` (``k = hidden + 1``, ``h >= 1``
      because of the ones column);
    * ``r = V' (A + lam I) - C - lam V0``: ``e_r = L(k) (v e_A + h^2 q/2) + 2 (rel_lam h^2 q/2 +
      v e_lam) + e_C + q``.

    The inputs' own bounds (``RefitSpec.z_bound``, ``w_bound``) and ``d_in`` therefore no longer enter
    it; they still size the SDK's refusals. ``z``, ``W`` and ``V0`` are not charged with input
    roundings: the client solves from exactly the committed grid values (charging them would make the
    bound 8.6x looser for the e2e pair, 47x at the default ReLU bounds).

    ``L(n)`` is ``n`` when ``worst_case``, else ``min(n, 2 sqrt(3 n))`` (six standard deviations of a
    sum of uniform roundings, as in :func:`group_obs_tolerance`). The ``1/n`` constant's own rounding
    scales ``A``, ``C`` and ``lam`` alike, so it only rescales the residual. A refit off the ridge
    solution by ``D`` shows as ``D (A + lam I)``: with data of unit spread, anything much above this
    tolerance in any entry is refused.
    """
    from zkunlearn.circuits.activations import ACTIVATIONS, GELU_CLAMP, GELU_CORRECTION_COEFFS

    if activation not in ACTIVATIONS:
        raise FixedPointError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if min(v_bound, h_bound, y_bound) <= 0:
        raise FixedPointError("magnitude bounds must be positive")
    if min(n, hidden) < 1 or not rel_lam > 0:
        raise FixedPointError("n, hidden must be >= 1 and rel_lam positive")
    q = 2.0**-input_scale
    k = hidden + 1
    h = max(h_bound, 1.0)
    e_p = q
    e_h = e_p
    if activation == "gelu":
        clamp, degree = GELU_CLAMP, len(GELU_CORRECTION_COEFFS) - 1
        e_t = (2.0 / clamp) * (e_p + q / 2) + clamp * q / 2 + q / 2
        # A rounding of b_k reaches the result through U_k(t) (|U_k| <= k + 1); a rounded coefficient
        # through T_k(t) (|T_k| <= 1).
        clenshaw = sum(k + 1 for k in range(1, degree + 1)) * q / 2 + (degree + 1) * q / 2
        e_h += 1.25 * e_t + clenshaw
    e_a = 2 * h * e_h + q
    e_target = _terms(k, worst_case) * v_bound * e_h + q
    e_c = y_bound * e_h + h * e_target + q
    e_lam = rel_lam * e_a + q
    e_r = _terms(k, worst_case) * (v_bound * e_a + h * h * q / 2)
    e_r += 2 * (rel_lam * h * h * q / 2 + v_bound * e_lam) + e_c + q
    return safety * e_r


def group_obs_mask_rows(mask: npt.ArrayLike, request_digest: bytes, n_blind: int, scale: int) -> FloatArray:
    """The committed mask tensor ``(n, B + n_blind)``: 0/1 entries then the request-binding elements.

    Provider and client both build it this way; the provider computes its commitment itself, so the
    proof is bound to this exact mask *and* this request.
    """
    mk = np.asarray(mask, dtype=np.float64)
    if mk.ndim != 2:
        raise FixedPointError(f"mask must be (n_blocks, B), got shape {mk.shape}")
    if not np.all((mk == 0) | (mk == 1)):
        raise FixedPointError("mask entries must be 0 or 1")
    rows = [
        np.concatenate([mk[i], request_binding(request_digest + i.to_bytes(4, "big"), n_blind, scale)])
        for i in range(mk.shape[0])
    ]
    return np.stack(rows)
