"""Slow, obviously correct float64 references for the fast solvers, and the naive baseline for benchmarks.

Nothing here is clever on purpose: each function writes the textbook system densely and hands it to
``np.linalg.solve``/``inv``, so a disagreement with the fast code points at the fast code.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from zkunlearn.circuits.activations import GELU_CLAMP, GELU_CORRECTION_COEFFS
from zkunlearn.circuits.mask import LayerMask
from zkunlearn.client.fisher_factors import BlockFactors
from zkunlearn.client.group_obs import single_threaded_blas

__all__ = [
    "naive_group_obs_explicit_inverse",
    "reference_apply_group_obs",
    "reference_group_obs",
    "reference_output_refit",
    "reference_ridge",
]

F64 = npt.NDArray[np.float64]


def reference_group_obs(theta: npt.ArrayLike, G: npt.ArrayLike, masked: npt.ArrayLike, lam: float) -> F64:
    """New block weights from the dense KKT system ``[[F, E_S], [E_S^T, 0]] [delta; mu] = [0; -theta_S]``."""
    th = np.asarray(theta, dtype=np.float64)
    g = np.asarray(G, dtype=np.float64)
    B, m = th.shape[0], g.shape[0]
    s = np.asarray(masked)
    S = np.flatnonzero(s) if s.dtype == np.bool_ else np.asarray(s, dtype=np.int64).reshape(-1)
    k = S.size
    F = lam * np.eye(B) + g.T @ g / m
    E = np.zeros((B, k))
    E[S, np.arange(k)] = 1.0
    kkt = np.block([[F, E], [E.T, np.zeros((k, k))]])
    rhs = np.concatenate([np.zeros(B), -th[S]])
    delta = np.linalg.solve(kkt, rhs)[:B]
    out: F64 = th + delta
    return out


def reference_apply_group_obs(
    weight: npt.ArrayLike | Tensor, factors: BlockFactors, mask: LayerMask, lam: float
) -> F64:
    """Layer-level reference: ``reference_group_obs`` block by block over the flattened weight."""
    W = _as_f64(weight)
    flat = W.reshape(-1).copy()
    B = mask.block_size
    for k, offsets in mask.blocks.items():
        n = mask.block_length(k)
        lo = k * B
        g = factors.factors[k][:, :n]
        flat[lo : lo + n] = reference_group_obs(flat[lo : lo + n], g, list(offsets), lam)
    return flat.reshape(W.shape)


def naive_group_obs_explicit_inverse(
    weight: npt.ArrayLike | Tensor, factors: BlockFactors, mask: LayerMask, lam: float
) -> F64:
    """ZK-APEX's formula as written, per block with dense inverses: the baseline the fast solver beats.

    ``delta = -F^{-1}[:, S] (F^{-1}[S, S])^{-1} theta_S`` with ``F = lam I + G^T G / m`` formed and inverted.
    """
    W = _as_f64(weight)
    flat = W.reshape(-1).copy()
    with single_threaded_blas():  # the same BLAS setting as the fast path: compare algorithms, not threads
        _naive_blocks(flat, factors, mask, lam)
    return flat.reshape(W.shape)


def _naive_blocks(flat: F64, factors: BlockFactors, mask: LayerMask, lam: float) -> None:
    B = mask.block_size
    for k, offsets in mask.blocks.items():
        n = mask.block_length(k)
        lo = k * B
        g = factors.factors[k][:, :n]
        S = np.asarray(offsets, dtype=np.int64)
        Finv = np.linalg.inv(lam * np.eye(n) + g.T @ g / g.shape[0])
        theta = flat[lo : lo + n]
        delta = -Finv[:, S] @ np.linalg.inv(Finv[np.ix_(S, S)]) @ theta[S]
        theta = theta + delta
        theta[S] = 0.0
        flat[lo : lo + n] = theta


def reference_ridge(X: npt.ArrayLike, Y: npt.ArrayLike, gamma: float) -> F64:
    """Ridge regression retrained from scratch: ``W = (X^T X + gamma I)^{-1} X^T Y``."""
    x = np.asarray(X, dtype=np.float64)
    y = np.asarray(Y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    out = np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ y)
    return np.asarray(out, dtype=np.float64)


def reference_output_refit(
    z: npt.ArrayLike,
    w1_before: npt.ArrayLike,
    b1: npt.ArrayLike,
    w1_after: npt.ArrayLike,
    w2: npt.ArrayLike,
    b2: npt.ArrayLike,
    activation: str,
    rel_lam: float,
) -> tuple[F64, F64]:
    """The output refit as one stacked least-squares problem ``[H1/sqrt(n); sqrt(lam) I] V^T =
    [T/sqrt(n); sqrt(lam) V0^T]`` solved by ``np.linalg.lstsq`` (SVD). GELU is the circuit's certified
    one (the update's definition), evaluated here with numpy's ``chebval`` rather than the circuit's
    Clenshaw loop in torch."""
    from numpy.polynomial import chebyshev

    def act(x: F64) -> F64:
        relu: F64 = np.maximum(x, 0.0)
        if activation == "relu":
            return relu
        t = 2.0 * np.minimum(np.abs(x), GELU_CLAMP) / GELU_CLAMP - 1.0
        out: F64 = relu - chebyshev.chebval(t, GELU_CORRECTION_COEFFS)
        return out

    zz = np.asarray(z, dtype=np.float64)
    v0 = np.hstack([np.asarray(w2, dtype=np.float64), np.asarray(b2, dtype=np.float64)[:, None]])
    bias1 = np.asarray(b1, dtype=np.float64)
    n = zz.shape[0]
    h1 = np.hstack([act(zz @ np.asarray(w1_after, dtype=np.float64).T + bias1), np.ones((n, 1))])
    target = np.hstack([act(zz @ np.asarray(w1_before, dtype=np.float64).T + bias1), np.ones((n, 1))]) @ v0.T
    lam = rel_lam * float(np.mean(np.sum(h1 * h1, axis=0) / n))
    k = h1.shape[1]
    lhs = np.vstack([h1 / np.sqrt(n), np.sqrt(lam) * np.eye(k)])
    rhs = np.vstack([target / np.sqrt(n), np.sqrt(lam) * v0.T])
    v = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
    return np.asarray(v[:, :-1]), np.asarray(v[:, -1])


def _as_f64(weight: npt.ArrayLike | Tensor) -> F64:
    if isinstance(weight, Tensor):
        weight = weight.detach().cpu().to(torch.float64).numpy()
    out: F64 = np.asarray(weight, dtype=np.float64)
    return out
