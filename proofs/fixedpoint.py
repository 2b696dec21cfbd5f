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

FIELD_MODULUS = 0x30644E72E131A029B85045B68181585D2833E84879B9709143E1F593F0000001
"""BN254 scalar field order (Halo2/ezkl's field)."""

BLIND_BITS = 23
"""Bits of randomness per blinding element: exact in float32 and far inside the input range check."""

FloatArray = npt.NDArray[np.float64]


class FixedPointError(ValueError):
    """A value does not fit the fixed-point format the circuit expects."""


def quantise(x: npt.ArrayLike, scale: int) -> npt.NDArray[np.int64]:
    """Integers ``round(x * 2**scale)``, refusing magnitudes that would overflow int64 or float32."""
    arr = np.asarray(x, dtype=np.float64) * float(2**scale)
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


def theta_exponent(theta: npt.ArrayLike) -> int:
    """Power-of-two exponent ``e`` so that ``theta * 2**e`` has standard deviation in [0.5, 1)."""
    std = float(np.std(np.asarray(theta, dtype=np.float64)))
    if not std > 0:
        return 0
    return -math.floor(math.log2(std)) - 1


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
) -> GroupObsTolerance:
    """Worst-case honest residuals from rounding, times ``safety``.

    Every input is rounded to ``q = 2**-input_scale`` (error <= q/2); each rescale adds q/2. With
    ``|theta|, |theta'| <= theta_bound``, ``|G| <= g_bound``, ``|w| <= w_bound``:
    ``e_delta = q``; ``e_Gd = B (g e_delta + 2 theta_bound q/2) + q``; ``|G delta| <= 2 B g theta_bound``;
    ``e_kkt = lam e_delta + g e_Gd + |G delta| q/2 + q`` (the ``1/m`` cancels the sum over m rows);
    ``e_row = e_delta + m (g q/2 + w q/2) + q``. ``r_mask`` is exact: its tolerance is 0.
    """
    if min(theta_bound, g_bound, w_bound) <= 0:
        raise FixedPointError("magnitude bounds must be positive")
    q = 2.0**-input_scale
    d_bound = 2.0 * theta_bound
    e_delta = q
    e_gd = block * (g_bound * e_delta + d_bound * q / 2) + q
    gd_bound = block * g_bound * d_bound
    e_kkt = lam * e_delta + g_bound * e_gd + gd_bound * q / 2 + q
    e_row = e_delta + m * (g_bound * q / 2 + w_bound * q / 2) + q
    return GroupObsTolerance(mask=0.0, kkt=safety * e_kkt, row=safety * e_row)


def analytic_tolerance(
    d: int, k: int, n_u: int, input_scale: int, *, bound: float, safety: float = 2.0
) -> tuple[float, float]:
    """Worst-case honest residuals ``(r_w, r_r)`` for the analytic relation, all magnitudes <= ``bound``.

    Each factor of a triple product carries rounding q/2; a product of length-L sums multiplies the
    error by ``L * bound``. ``r_w`` and ``r_r`` both have the form ``A - B - C X^T (X D)``.
    """
    q = 2.0**-input_scale
    inner = max(d, k)
    e1 = inner * (2 * bound * q / 2) + q  # X W' (or X R)
    v1 = inner * bound * bound + bound  # |X W' - Y|
    e2 = n_u * (bound * e1 + v1 * q / 2) + q  # X^T (.)
    v2 = n_u * bound * v1
    e3 = d * (bound * e2 + v2 * q / 2) + q  # R (.)
    tol = safety * (2 * q + e3)
    return tol, tol


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
