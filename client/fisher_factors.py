"""The curvature's factored form: per-block factors normalised to unit mean diagonal (``BlockFactors``),
built from gradient rows or per-block Gram matrices, and fitted to the ``m`` rows a circuit commits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.fft  # type: ignore[import-untyped]

from zkunlearn.errors import MalformedError

__all__ = ["BlockFactors", "FisherError", "factors_from_gradients", "factors_from_gram", "fit_rows"]


class FisherError(MalformedError):
    """Per-sample gradients or Fisher factors cannot be formed from these inputs."""


@dataclass
class BlockFactors:
    """Normalised per-block gradient factors of one layer.

    ``factors[k]`` is the ``m x B`` factor of block ``k``; the last block is zero-padded past ``numel``
    (padded columns carry no gradient, so they never couple to real weights); ``apply_group_obs`` refuses
    factors whose padding is not zero.
    """

    layer: str
    block_size: int
    factors: npt.NDArray[np.float64]
    scale: float
    shape: tuple[int, ...] = ()

    @property
    def n_blocks(self) -> int:
        return int(self.factors.shape[0])

    @property
    def m(self) -> int:
        return int(self.factors.shape[1])

    def fisher(self, block: int, lam: float) -> npt.NDArray[np.float64]:
        """The dense ``B x B`` block Fisher; for tests and references only (that is the memory we avoid)."""
        g = self.factors[block]
        out: npt.NDArray[np.float64] = lam * np.eye(self.block_size) + g.T @ g / self.m
        return out


def factors_from_gram(
    layer: str, gram: npt.NDArray[np.float64], rows: int, shape: tuple[int, ...]
) -> BlockFactors:
    """Normalised ``B``-row factors from per-block Gram matrices ``G_b^T G_b`` of ``rows`` gradient rows.

    ``R_b = sqrt(Lambda) V^T`` from ``eigh`` has ``R_b^T R_b = G_b^T G_b``; rescaled so ``R^T R / B``
    has unit mean diagonal, it gives the same normalised Fisher as the ``rows``-row factor would.
    """
    n_blocks, block_size, _ = gram.shape
    numel = math.prod(shape)
    if not np.isfinite(gram).all():
        raise FisherError(f"per-sample gradients of {layer!r} contain NaN or inf")
    diag = np.diagonal(gram, axis1=1, axis2=2).reshape(-1)[:numel]
    scale = float(diag.sum() / (rows * numel))
    if not scale > 0.0 or not math.isfinite(scale):
        raise FisherError(f"per-sample gradients of {layer!r} are all zero: the Fisher is degenerate")
    eigval, eigvec = np.linalg.eigh(gram)
    factors = np.sqrt(np.clip(eigval, 0.0, None))[:, :, None] * eigvec.transpose(0, 2, 1)
    factors *= math.sqrt(block_size / (rows * scale))
    tail = numel - (n_blocks - 1) * block_size
    factors[-1][:, tail:] = 0.0  # padding carries no gradient; eigh leaves round-off there
    return BlockFactors(layer=layer, block_size=block_size, factors=factors, scale=scale, shape=shape)


def factors_from_gradients(
    layer: str, flat: npt.NDArray[np.floating[Any]], block_size: int, shape: tuple[int, ...] | None = None
) -> BlockFactors:
    """Split ``(m, numel)`` per-sample gradients (float32 or float64) into normalised float64 factors."""
    if flat.ndim != 2 or flat.shape[0] == 0 or flat.shape[1] == 0:
        raise FisherError(f"gradients must be a non-empty (m, numel) array, got shape {flat.shape}")
    if block_size <= 0:
        raise FisherError(f"block size must be positive, got {block_size}")
    if not np.isfinite(flat).all():
        raise FisherError(f"per-sample gradients of {layer!r} contain NaN or inf")
    m, numel = flat.shape
    scale = float(np.einsum("ij,ij->", flat, flat, dtype=np.float64) / (m * numel))
    if not scale > 0.0 or not math.isfinite(scale):
        raise FisherError(f"per-sample gradients of {layer!r} are all zero: the Fisher is degenerate")
    n_blocks, n_full = -(-numel // block_size), numel // block_size
    # Written straight into the (n_blocks, m, B) layout: one float64 copy of G, not three.
    factors = np.zeros((n_blocks, m, block_size), dtype=np.float64)
    inv = 1.0 / math.sqrt(scale)
    view = factors.transpose(1, 0, 2)  # (m, n_blocks, B), a view
    np.multiply(flat[:, : n_full * block_size].reshape(m, n_full, block_size), inv, out=view[:, :n_full, :])
    if n_full < n_blocks:
        np.multiply(flat[:, n_full * block_size :], inv, out=view[:, n_full, : numel - n_full * block_size])
    return BlockFactors(
        layer=layer, block_size=block_size, factors=factors, scale=scale, shape=shape or (numel,)
    )


def fit_rows(
    factors: npt.NDArray[np.float64], m: int, *, numel: int | None = None
) -> npt.NDArray[np.float64]:
    """Exactly ``m`` rows per block, as the circuit's shape fixes.

    With more samples than rows, each block's factor is replaced by its best rank-``m`` approximation
    in the sense that matters, ``G^T G`` (truncated SVD: ``Sigma_m V_m^T``): the top-``m`` curvature
    directions of *all* the client's samples, where keeping the first ``m`` samples would discard most
    of them. With fewer samples, zero rows are added (they add nothing to ``G^T G``). The relation's
    ``1/m`` is a fixed rescaling that the unit-mean-diagonal normalisation (recomputed here) absorbs.

    The rows are then mixed by an orthonormal ``m x m`` matrix (DCT-II), which leaves ``G^T G`` -- the
    curvature, all the relation sees -- unchanged to rounding. Truncated SVD puts a block's top direction
    in one row, so that row and its products with an update carry the block's whole magnitude; mixed,
    each row carries a share of it. The circuit's fixed-point range and the provider's published
    ``g_bound`` cap those magnitudes, and a heavily curved block (a classifier's forgotten class row
    measured on shifted images, in the ViT demo) overflowed them unmixed.

    ``numel``: the layer's weight count when its last block is short (``BlockFactors.shape``). The
    mean diagonal is over real weights, as ``factors_from_gradients`` normalises; averaging over the
    zero padding too would shrink it by ``numel / (n_blocks * B)`` and so quietly change what ``lam``
    means for such a layer. Default: every column is a weight (layers whose size is a multiple of the
    block, which the SDK's circuits require).
    """
    if factors.ndim != 3 or factors.shape[0] == 0 or factors.shape[2] == 0:
        raise FisherError(f"factors must be a non-empty (n_blocks, rows, B) array, got shape {factors.shape}")
    if m < 1:
        raise FisherError(f"the circuit's row count m must be positive, got {m}")
    n_blocks, rows, block = factors.shape
    columns = n_blocks * block
    if numel is None:
        numel = columns
    elif isinstance(numel, bool) or not isinstance(numel, int | np.integer):
        raise FisherError(f"numel must be an integer, got {type(numel).__name__}")
    elif not columns - block < numel <= columns:
        raise FisherError(f"numel {numel} does not fit {n_blocks} blocks of {block} weights")
    tail = int(numel) - (n_blocks - 1) * block
    if tail < block and np.any(factors[-1][:, tail:]):
        raise FisherError(f"factor columns past numel {numel} are not zero (the last block's padding)")
    if rows > m:
        _u, sigma, vt = np.linalg.svd(factors, full_matrices=False)  # batched over blocks
        out = np.zeros((n_blocks, m, block))
        keep = min(m, sigma.shape[1])
        out[:, :keep] = sigma[:, :keep, None] * vt[:, :keep, :]
    else:
        out = np.zeros((n_blocks, m, block))
        out[:, :rows] = factors
    out[-1][:, tail:] = 0.0  # padding stays exactly zero; the SVD could leave round-off there
    # The mean over all n_blocks * B columns, rescaled to the real ones (the padding adds nothing to
    # the sum); written so that a layer without padding normalises bit for bit as before.
    mean_diag = float(np.mean(np.sum(out * out, axis=1)) / m) * (columns / int(numel))
    if not mean_diag > 0:
        raise FisherError("the Fisher factor is zero: no gradient information on the targeted layers")
    mixing = scipy.fft.dct(np.eye(m), norm="ortho", axis=0)  # orthonormal: mixing.T @ mixing = I
    fitted: npt.NDArray[np.float64] = np.einsum("ij,njb->nib", mixing, out) / np.sqrt(mean_diag)
    return fitted
