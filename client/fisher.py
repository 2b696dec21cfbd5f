"""Per-sample gradients and the low-rank factors of the client's blockwise empirical Fisher.

Group-OBS needs, per block ``b`` of ``B`` weights, the damped empirical Fisher
``F_b = lam*I + G_b^T G_b / m`` where the rows of ``G_b`` are per-sample gradients restricted to the block.
On an edge device the ``B x B`` matrices (ZK-APEX: 5.4 GB for one ViT layer) are the wrong thing to
store, so only the factor ``G`` (``m x B`` per block) is kept and solvers work in the Woodbury form.

``G`` is normalised so the mean diagonal of ``G^T G / m`` over the layer is 1: ``lam`` then means the
same thing on every layer and model (methods.md: lam of 1e-2..1e-1 of the mean diagonal works, 1e-4
overshoots). The OBS update is invariant to scaling ``F``, so normalising changes nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["BlockFactors", "FisherError", "block_factors", "per_sample_gradients"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class FisherError(ValueError):
    """Per-sample gradients or Fisher factors cannot be formed from these inputs."""


@dataclass
class BlockFactors:
    """Normalised per-block gradient factors of one layer.

    ``factors[k]`` is the ``m x B`` factor of block ``k``; the last block is zero-padded past ``numel``
    (padded columns carry no gradient, so they never couple to real weights).
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


def per_sample_gradients(
    model: nn.Module,
    params: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """Gradient of ``loss_fn(model(x_i), y_i)`` w.r.t. each named parameter, for every sample ``i``.

    The model is evaluated in eval mode (dropout off, batch-norm statistics frozen) because the Fisher
    describes the deployed function, and vmap cannot batch train-mode batch-norm anyway. ``chunk_size``
    bounds the peak memory of the vmapped graph; results are the same for any chunking.
    """
    named = dict(model.named_parameters())
    missing = [p for p in params if p not in named]
    if missing:
        raise FisherError(f"model has no parameters {missing} (has {sorted(named)})")
    if not params:
        raise FisherError("no parameters requested")
    if inputs.shape[0] != targets.shape[0]:
        raise FisherError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    if inputs.shape[0] == 0:
        raise FisherError("no samples")
    wanted = {p: named[p].detach() for p in params}
    fixed = {k: v.detach() for k, v in named.items() if k not in wanted}
    fixed.update(dict(model.named_buffers()))

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **p}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    try:
        chunks: dict[str, list[Tensor]] = {p: [] for p in params}
        for start in range(0, inputs.shape[0], chunk_size):
            g = per_sample(wanted, inputs[start : start + chunk_size], targets[start : start + chunk_size])
            for p in params:
                chunks[p].append(g[p].detach())
    finally:
        model.train(was_training)
    return {p: torch.cat(v) for p, v in chunks.items()}


def block_factors(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    block_size: int,
    exclude: Tensor | npt.NDArray[np.bool_] | None = None,
) -> BlockFactors:
    """Per-block factors of the empirical Fisher of parameter ``layer`` on the client's samples.

    ``exclude`` marks samples to leave out (True = out). methods.md: when the client's Fisher includes
    samples of the forgotten class, compensation pushes the deleted behaviour straight back (forget
    accuracy 0.36 -> 0.65-0.84); leaving them out is what makes recovery without relearning possible.
    """
    if block_size <= 0:
        raise FisherError(f"block size must be positive, got {block_size}")
    if exclude is not None:
        keep = ~torch.as_tensor(exclude).to(torch.bool).reshape(-1)
        if keep.shape[0] != inputs.shape[0]:
            raise FisherError(f"exclude has {keep.shape[0]} entries for {inputs.shape[0]} samples")
        if not bool(keep.any()):
            raise FisherError("exclude leaves no samples for the Fisher")
        inputs, targets = inputs[keep], targets[keep]
    grads = per_sample_gradients(model, [layer], inputs, targets, loss_fn)[layer]
    shape = tuple(int(d) for d in grads.shape[1:])
    if grads.dtype not in (torch.float32, torch.float64):
        grads = grads.to(torch.float64)  # numpy has no bfloat16
    flat = grads.reshape(grads.shape[0], -1).numpy()  # cast to float64 while writing the factors
    return factors_from_gradients(layer, flat, block_size, shape)


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
