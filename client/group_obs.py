"""Group-OBS compensation: zero the masked weights of each block and move the others to make up for it.

Per block with weights ``theta`` (B,), masked set ``S``, unmasked set ``U`` and damped empirical Fisher
``F = lam*I + G^T G / m`` (``G`` is ``m x B``), ZK-APEX's update is

    delta = -F^{-1}[:, S] (F^{-1}[S, S])^{-1} theta_S,

the minimiser of ``delta^T F delta / 2`` subject to ``delta_S = -theta_S``. Its KKT conditions give the
same ``delta`` without ever inverting ``F``:

    delta_S = -theta_S,   (F delta)_U = 0   =>   delta_U = F_UU^{-1} G_U^T G_S theta_S / m.

With the push-through identity ``(lam I + G_U^T G_U/m)^{-1} G_U^T = G_U^T (lam I + G_U G_U^T/m)^{-1}``:

    w = (m*lam*I + G_U G_U^T)^{-1} G_S theta_S     (m x m, SPD),     delta_U = G_U^T w.

So the update is one SPD solve of size ``min(m, |U|)`` per block, ``delta_S = -theta_S`` holds exactly
(bit for bit, ``theta_after_S == 0``), and ``w`` is the row-space witness a circuit can check cheaply:
``delta_U = G_U^T w`` and ``w = -(G delta) / (m*lam)``. The explicit-inverse formula of the paper
squares the condition number (``F^{-1}[S,S]`` is inverted after ``F``); this form does not.

Blocks are solved in batches: every touched block becomes one slice of a stacked SPD system and
``torch.linalg.cholesky`` / ``torch.cholesky_solve`` factor them all at once in float64. Masked columns
are zeroed in ``G_U`` (and unmasked ones in ``G_S``), so blocks with different ``S`` share one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from zkunlearn.circuits.mask import LayerMask
from zkunlearn.client.fisher import BlockFactors

__all__ = [
    "BlockUpdate",
    "GroupObsError",
    "apply_group_obs",
    "apply_mask_only",
    "solve_block",
    "solve_blocks",
]

F64 = npt.NDArray[np.float64]
# Blocks per batched factorisation: bounds peak memory at ~chunk * max(m, B)^2 * 8 bytes.
_CHUNK = 256


class GroupObsError(ValueError):
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
    """Batched core: ``theta`` (n, B), ``G`` (n, m, B), boolean ``masked`` (n, B) -> (theta_after, delta, w).

    Picks the ``m x m`` witness system when ``m <= B`` and the ``B x B`` one on ``U`` otherwise (masked
    rows replaced by identity rows so all blocks share one shape); both give the same ``delta``.
    """
    lam = _check_lam(lam)
    th = np.asarray(theta, dtype=np.float64)
    g = np.asarray(G, dtype=np.float64)
    s = np.asarray(masked)
    if g.ndim != 3 or th.ndim != 2 or s.shape != th.shape or th.shape != (g.shape[0], g.shape[2]):
        raise GroupObsError(
            f"shape mismatch: theta {th.shape}, G {g.shape}, masked {s.shape} (want (n,B), (n,m,B), (n,B))"
        )
    if s.dtype != np.bool_:
        raise GroupObsError(f"batched mask must be boolean, got {s.dtype}")
    if g.shape[1] == 0:
        raise GroupObsError("G has no samples (m = 0)")
    if not np.isfinite(th).all():
        raise GroupObsError("weights contain NaN or inf")
    if not np.isfinite(g).all():
        raise GroupObsError("gradient factors contain NaN or inf")
    n, m = g.shape[0], g.shape[1]
    theta_after = th.copy()
    delta = np.zeros_like(th)
    w = np.zeros((n, m), dtype=np.float64)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        d, wk = _solve_chunk(th[sl], g[sl], s[sl], lam)
        delta[sl] = d
        w[sl] = wk
    theta_after += delta
    # delta_S = -theta_S is exact in floating point already (negation), this only makes it explicit.
    theta_after[s] = 0.0
    return theta_after, delta, w


def _solve_chunk(th: F64, g: F64, s: npt.NDArray[np.bool_], lam: float) -> tuple[F64, F64]:
    _, m, B = g.shape
    u = ~s
    tg = torch.from_numpy(g)
    tu = torch.from_numpy(u.astype(np.float64))
    ts = torch.from_numpy(s.astype(np.float64))
    tth = torch.from_numpy(th)
    gu = tg * tu[:, None, :]  # G_U with masked columns zeroed
    rhs = torch.einsum("nmb,nb->nm", tg, ts * tth)  # G_S theta_S, (n, m)
    if m <= B:
        K = torch.bmm(gu, gu.transpose(1, 2))
        K.diagonal(dim1=1, dim2=2).add_(m * lam)
        wk = _spd_solve(K, rhs)
        d_u = torch.einsum("nmb,nm->nb", gu, wk)
    else:
        # F_UU on U, identity rows on S: (lam I + G_U^T G_U / m) restricted to U, decoupled elsewhere.
        A = torch.bmm(gu.transpose(1, 2), gu) / m
        A.diagonal(dim1=1, dim2=2).add_(lam * tu + ts)
        b = torch.einsum("nmb,nm->nb", gu, rhs) / m
        d_u = _spd_solve(A, b) * tu
        wk = None
    d = d_u - ts * tth
    if wk is None:
        wk = -torch.einsum("nmb,nb->nm", tg, d) / (m * lam)
    return cast(F64, d.numpy()), cast(F64, wk.numpy())


def _spd_solve(A: Tensor, b: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        bad = int(torch.nonzero(info)[0, 0])
        raise GroupObsError(f"block system {bad} is not positive definite (lam too small for float64?)")
    return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


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
    flat = np.zeros(mask.n_blocks * B, dtype=np.float64)
    flat[:numel] = W.reshape(-1)
    blocks = np.asarray(mask.touched_blocks(), dtype=np.int64)
    out = flat.copy()
    updates: dict[int, BlockUpdate] = {}
    if blocks.size:
        theta = flat.reshape(-1, B)[blocks]
        s = np.zeros((blocks.size, B), dtype=bool)
        for i, k in enumerate(blocks):
            s[i, list(mask.blocks[int(k)])] = True
        after, delta, w = solve_blocks(theta, fa[blocks], s, lam)
        out.reshape(-1, B)[blocks] = after
        for i, k in enumerate(blocks):
            n_real = mask.block_length(int(k))
            updates[int(k)] = BlockUpdate(theta_after=after[i, :n_real], delta=delta[i, :n_real], w=w[i])
    return out[:numel].reshape(mask.shape), updates


def apply_mask_only(weight: npt.ArrayLike | Tensor, mask: LayerMask) -> F64:
    """Zero the masked weights without compensation: the 'mask only' baseline of the evaluation."""
    if isinstance(weight, Tensor):
        weight = weight.detach().cpu().to(torch.float64).numpy()
    W = np.array(weight, dtype=np.float64)
    if tuple(W.shape) != mask.shape:
        raise GroupObsError(f"weight shape {tuple(W.shape)} != mask shape {mask.shape} of {mask.layer!r}")
    W[mask.dense()] = 0.0
    return W
