"""Group-OBS compensation: zero the masked weights of each block and move the others to make up for it.

Per block with weights ``theta`` (B,), masked set ``S``, unmasked set ``U`` and damped empirical Fisher
``F = lam*I + G^T G / m`` (``G`` is ``m x B``), ZK-APEX's update is

    delta = -F^{-1}[:, S] (F^{-1}[S, S])^{-1} theta_S,

the minimiser of ``delta^T F delta / 2`` subject to ``delta_S = -theta_S``. Its KKT conditions give the
same ``delta`` without ever inverting ``F``:

    delta_S = -theta_S,   (F delta)_U = 0   =>   delta_U = F_UU^{-1} G_U^T G_S theta_S / m.

With the push-through identity ``(lam I + G_U^T G_U/m)^{-1} G_U^T = G_U^T (lam I + G_U G_U^T/m)^{-1}``:

    w = (m*lam*I + G_U G_U^T)^{-1} G_S theta_S     (m x m, SPD),     delta_U = G_U^T w.

So the update is one SPD solve of size ``min(m, |U|)`` per block (Woodbury when ``m < |U|``, ``F_UU``
itself otherwise), ``delta_S = -theta_S`` holds exactly (bit for bit, ``theta_after_S == 0``), and ``w``
is the row-space witness a circuit can check cheaply: ``delta_U = G_U^T w`` and
``w = -(G delta) / (m*lam)`` (one holds by construction, the other to float64 round-off). The paper's
formula inverts ``F`` and then a block of the inverse, compounding the first inverse's error; here no
inverse is formed.

Blocks are solved in batches: touched blocks are sorted by ``|U|``, chunked, their ``U`` columns gathered
(zero-padded to the chunk's largest ``|U|``; padded rows of the system are identity rows), and each
chunk is one stacked Cholesky plus two batched triangular solves in float64.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from zkunlearn.circuits.mask import LayerMask
from zkunlearn.client.fisher_factors import BlockFactors

from zkunlearn.errors import MalformedError

__all__ = [
    "BlockUpdate",
    "GroupObsError",
    "apply_group_obs",
    "apply_mask_only",
    "single_threaded_blas",
    "solve_block",
    "solve_blocks",
]

F64 = npt.NDArray[np.float64]
# float64 entries per batched chunk of blocks (~64 MB per temporary): bounds peak memory for any m, B.
_CHUNK_ENTRIES = 1 << 23


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run NumPy's BLAS on one thread for the duration.

    The solver issues thousands of tiny stacked products; OpenBLAS's threads cannot speed those up, and on
    a loaded machine (an edge device, a shared CI box) they thrash: a 64x128x64 product measured 70x
    slower with 2 threads under load than with 1. threadpoolctl ships with scikit-learn; without it this
    is a no-op.
    """
    try:
        tpc: Any = importlib.import_module("threadpoolctl")
    except ImportError:  # pragma: no cover - scikit-learn always brings it
        yield
        return
    with tpc.threadpool_limits(limits=1, user_api="blas"):
        yield


class GroupObsError(MalformedError):
    """Group-OBS inputs are malformed (shapes, non-finite values, bad damping, masked index out of range)."""


@dataclass
class BlockUpdate:
    """One block's result: new weights, the change, and the witness ``w`` with ``delta_U = G_U^T w``."""

    theta_after: F64
    delta: F64
    w: F64


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not (math.isfinite(lam) and lam > 0.0):
        raise GroupObsError(f"damping lam must be a positive finite number, got {lam}")
    return lam


def _masked_indicator(masked: npt.ArrayLike, size: int) -> npt.NDArray[np.bool_]:
    arr = np.asarray(masked)
    if arr.dtype == np.bool_:
        if arr.shape != (size,):
            raise GroupObsError(f"boolean mask must have shape ({size},), got {arr.shape}")
        return arr.copy()
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise GroupObsError(f"masked indices must be integers or a boolean mask, got dtype {arr.dtype}")
    idx = arr.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise GroupObsError(f"masked index out of range for a block of {size} weights: {idx.tolist()}")
    if np.unique(idx).size != idx.size:
        raise GroupObsError("masked indices contain duplicates")
    out = np.zeros(size, dtype=bool)
    out[idx] = True
    return out


def solve_blocks(
    theta: npt.ArrayLike, G: npt.ArrayLike, masked: npt.ArrayLike, lam: float
) -> tuple[F64, F64, F64]:
    """Batched core: ``theta`` (n, B), ``G`` (n, m, B), boolean ``masked`` (n, B) -> (after, delta, w)."""
    lam = _check_lam(lam)
    th = np.asarray(theta, dtype=np.float64)
    g = np.asarray(G, dtype=np.float64)
    s = np.asarray(masked)
    if g.ndim != 3 or th.ndim != 2 or s.shape != th.shape or th.shape != (g.shape[0], g.shape[2]):
        raise GroupObsError(
            f"shape mismatch: theta {th.shape}, G {g.shape}, masked {s.shape} (want (n,B), (n,m,B), (n,B))"
        )
    return _solve_rows(th, g, np.arange(g.shape[0]), s, lam)


def _solve_rows(
    th: F64, g_all: F64, rows: npt.NDArray[np.int64], s: npt.NDArray[np.bool_], lam: float
) -> tuple[F64, F64, F64]:
    """Solve blocks ``g_all[rows]`` without copying all of them at once (the factors can be GBs).

    Blocks are processed in order of their unmasked count so each chunk gathers only
    ``max |U|`` columns: a 90 %-masked block costs a tenth of a dense one, a fully masked block nothing.
    """
    if s.dtype != np.bool_:
        raise GroupObsError(f"batched mask must be boolean, got {s.dtype}")
    n, m, B = rows.size, g_all.shape[1], g_all.shape[2]
    if m == 0:
        raise GroupObsError("G has no samples (m = 0)")
    if not np.isfinite(th).all():
        raise GroupObsError("weights contain NaN or inf")
    theta_after = th.copy()
    delta = np.zeros_like(th)
    w = np.zeros((n, m), dtype=np.float64)
    order = np.argsort((~s).sum(axis=1), kind="stable")
    d_sys = min(m, B)
    chunk = max(1, _CHUNK_ENTRIES // max(d_sys * d_sys, m * B))
    with single_threaded_blas():
        for lo in range(0, n, chunk):
            sel = order[lo : lo + chunk]
            g = np.asarray(g_all[rows[sel]], dtype=np.float64)  # float32 factors are solved in float64
            if not np.isfinite(g).all():
                raise GroupObsError("gradient factors contain NaN or inf")
            d, wk = _solve_chunk(th[sel], g, s[sel], lam)
            delta[sel] = d
            w[sel] = wk
    theta_after += delta
    # delta_S = -theta_S is exact in floating point already (negation), this only makes it explicit.
    theta_after[s] = 0.0
    return theta_after, delta, w


def _solve_chunk(th: F64, g: F64, s: npt.NDArray[np.bool_], lam: float) -> tuple[F64, F64]:
    n, m, B = g.shape
    sf = s.astype(np.float64)
    rhs = (g @ (sf * th)[:, :, None])[:, :, 0]  # G_S theta_S, (n, m)
    n_u = (~s).sum(axis=1)
    wu = int(n_u.max())
    d = -sf * th
    if wu == 0:  # every weight of these blocks is masked: nothing to compensate with
        return d, rhs / (m * lam)
    # Column indices of U first (stable, so increasing), padded with masked columns that `valid` zeroes.
    uidx = np.argsort(s, axis=1, kind="stable")[:, :wu]
    valid = (np.arange(wu)[None, :] < n_u[:, None]).astype(np.float64)
    gu = np.take_along_axis(g, uidx[:, None, :], axis=2) * valid[:, None, :]  # (n, m, wu)
    wk: F64 | None
    if m <= wu:
        K = gu @ gu.transpose(0, 2, 1)
        K[:, np.arange(m), np.arange(m)] += m * lam
        wk = _spd_solve(K, rhs)
        d_u = (wk[:, None, :] @ gu)[:, 0, :]
    else:
        # F_UU (lam I + G_U^T G_U / m); padded columns get identity rows so they decouple and solve to 0.
        A = gu.transpose(0, 2, 1) @ gu / m
        A[:, np.arange(wu), np.arange(wu)] += lam * valid + (1.0 - valid)
        b = (rhs[:, None, :] @ gu)[:, 0, :] / m
        d_u = _spd_solve(A, b) * valid
        wk = None
    # uidx rows are distinct columns; padded slots point at masked columns and carry 0, added to -theta_S
    # there would be wrong, so scatter into a zero array first.
    scattered = np.zeros((n, B))
    np.put_along_axis(scattered, uidx, d_u, axis=1)
    d = d + scattered
    if wk is None:
        wk = -(g @ d[:, :, None])[:, :, 0] / (m * lam)
    return d, wk


def _spd_solve(A: F64, b: F64) -> F64:
    """Batched SPD solve: numpy's stacked Cholesky, then two batched triangular solves (no inverse)."""
    try:
        L = np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        _, info = torch.linalg.cholesky_ex(torch.from_numpy(A))
        bad = int(torch.nonzero(info)[0, 0]) if bool((info != 0).any()) else -1
        raise GroupObsError(
            f"block system {bad} of the batch is not positive definite (lam too small for float64?)"
        ) from None
    tL = torch.from_numpy(L)
    y = torch.linalg.solve_triangular(tL, torch.from_numpy(b)[:, :, None], upper=False)
    x = torch.linalg.solve_triangular(tL.mT, y, upper=True)
    return cast(F64, x[:, :, 0].numpy())


def solve_block(theta: npt.ArrayLike, G: npt.ArrayLike, masked: npt.ArrayLike, lam: float) -> BlockUpdate:
    """Group-OBS for one block. ``masked``: integer offsets or a boolean vector of length ``B``."""
    th = np.asarray(theta, dtype=np.float64)
    g = np.asarray(G, dtype=np.float64)
    if th.ndim != 1 or g.ndim != 2 or g.shape[1] != th.shape[0]:
        raise GroupObsError(f"shape mismatch: theta must be (B,) and G (m, B); got {th.shape} and {g.shape}")
    s = _masked_indicator(masked, th.shape[0])
    after, delta, w = solve_blocks(th[None], g[None], s[None], lam)
    return BlockUpdate(theta_after=after[0], delta=delta[0], w=w[0])


def apply_group_obs(
    weight: npt.ArrayLike | Tensor, factors: BlockFactors, mask: LayerMask, lam: float
) -> tuple[F64, dict[int, BlockUpdate]]:
    """Apply Group-OBS to one layer: only touched blocks are solved, all in batched float64 solves.

    Returns the new weight (float64, the weight's shape) and each touched block's ``BlockUpdate``
    (``theta_after``/``delta`` are trimmed to the block's real length for a short last block).
    """
    lam = _check_lam(lam)
    if isinstance(weight, Tensor):
        weight = weight.detach().cpu().to(torch.float64).numpy()
    W = np.asarray(weight, dtype=np.float64)
    if tuple(W.shape) != mask.shape:
        raise GroupObsError(f"weight shape {tuple(W.shape)} != mask shape {mask.shape} of {mask.layer!r}")
    if factors.block_size != mask.block_size:
        raise GroupObsError(f"factor block size {factors.block_size} != mask block size {mask.block_size}")
    if factors.layer != mask.layer:
        raise GroupObsError(f"factors are for layer {factors.layer!r}, mask for {mask.layer!r}")
    B = mask.block_size
    fa = np.asarray(factors.factors)
    if fa.ndim != 3 or fa.shape[0] != mask.n_blocks or fa.shape[2] != B:
        raise GroupObsError(f"factors shape {fa.shape} != (n_blocks={mask.n_blocks}, m, B={B})")
    if not np.isfinite(W).all():
        raise GroupObsError(f"weights of {mask.layer!r} contain NaN or inf")
    numel = mask.numel
    tail = numel - (mask.n_blocks - 1) * B
    if np.any(fa[-1][:, tail:]):
        # Refused, not zeroed: BlockFactors promises zero padding, so a non-zero value there means the
        # factor was built for another layout (or damaged). Solving with it would let the padding act as
        # extra free weights that absorb compensation; zeroing it here would silently solve against a
        # curvature other than the one the caller holds (and may have committed to).
        raise GroupObsError(
            f"factors of {mask.layer!r}: the last block's columns past its {tail} weights are not zero "
            "(padding carries no gradient)"
        )
    flat = np.zeros(mask.n_blocks * B, dtype=np.float64)
    flat[:numel] = W.reshape(-1)
    blocks, s = _block_indicators(mask)
    out = flat.copy()
    updates: dict[int, BlockUpdate] = {}
    if blocks.size:
        theta = flat.reshape(-1, B)[blocks]
        after, delta, w = _solve_rows(theta, fa, blocks, s, lam)
        out.reshape(-1, B)[blocks] = after
        for i, k in enumerate(blocks):
            n_real = mask.block_length(int(k))
            updates[int(k)] = BlockUpdate(theta_after=after[i, :n_real], delta=delta[i, :n_real], w=w[i])
    return out[:numel].reshape(mask.shape), updates


def _block_indicators(mask: LayerMask) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Touched block indices and their (n, B) masked indicators, re-checked here.

    ``LayerMask`` validates on construction, but its ``blocks`` dict is mutable; an offset past the
    block's end would silently land in the next block (or in the zero padding), so it is refused here.
    """
    B = mask.block_size
    keys = np.fromiter((int(k) for k in mask.blocks), dtype=np.int64, count=len(mask.blocks))
    if keys.size == 0:
        return keys, np.zeros((0, B), dtype=bool)
    if np.any(np.diff(keys) <= 0) or keys[0] < 0 or keys[-1] >= mask.n_blocks:
        raise GroupObsError(
            f"layer {mask.layer!r}: block indices must be sorted, unique and < {mask.n_blocks}"
        )
    counts = np.fromiter((len(mask.blocks[int(k)]) for k in keys), dtype=np.int64, count=keys.size)
    offs = np.fromiter(
        (int(o) for k in keys for o in mask.blocks[int(k)]), dtype=np.int64, count=int(counts.sum())
    )
    rows = np.repeat(np.arange(keys.size), counts)
    lengths = np.minimum(B, mask.numel - keys * B)
    if np.any(counts == 0) or np.any(offs < 0) or np.any(offs >= lengths[rows]):
        raise GroupObsError(f"layer {mask.layer!r}: masked offset out of range (or an empty block)")
    s = np.zeros((keys.size, B), dtype=bool)
    s[rows, offs] = True
    if int(s.sum()) != offs.size:
        raise GroupObsError(f"layer {mask.layer!r}: duplicate masked offsets")
    return keys, s


def apply_mask_only(weight: npt.ArrayLike | Tensor, mask: LayerMask) -> F64:
    """Zero the masked weights without compensation: the 'mask only' baseline of the evaluation."""
    if isinstance(weight, Tensor):
        weight = weight.detach().cpu().to(torch.float64).numpy()
    W = np.array(weight, dtype=np.float64)
    if tuple(W.shape) != mask.shape:
        raise GroupObsError(f"weight shape {tuple(W.shape)} != mask shape {mask.shape} of {mask.layer!r}")
    W[mask.dense()] = 0.0
    return W
