"""Masks whose proof cost fits a budget: concentrate the deletion in few proof batches.

Proving cost grows with the weights of every *touched* batch (a batch is the fixed group of Fisher
blocks one proof covers, the last one of a layer padded with zero blocks, see
:mod:`zkunlearn.proofs.layout`), not with the number of masked
weights. An unstructured mask over a 64k-weight layer touches every block; this selection ranks
batches by their total score, keeps the best ``max_batches``, and masks the top ``density`` of each
block inside them, so every masked block keeps unmasked weights for Group-OBS to compensate with
(a fully masked block has nothing left to compensate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.proofs.layout import DeletionError, LayerLayout, layer_layout

from zkunlearn.errors import MalformedError

__all__ = ["BudgetError", "block_cap", "select_within_budget"]


@dataclass(frozen=True)
class _Layout:
    block: int
    batch: int

    @property
    def batch_weights(self) -> int:
        return self.block * self.batch


class BudgetError(MalformedError):
    """The budget cannot be met with the given layer shapes."""


_CAP_TOLERANCE = 1e-9


def block_cap(density: float, block_size: int) -> int:
    """How many weights of a ``block_size`` block a ``density`` cap lets a mask take (at least one).

    ``floor(density * block_size)`` in floats loses a whole weight whenever the product lands a hair
    under an integer (``0.29 * 100 == 28.999999999999996``), so a cap written as 29 % of 100 would take 28.
    The product's rounding error is relative (a few ulps), so a relative tolerance far above it and far
    below one weight absorbs it; exact ``Fraction`` arithmetic would not help, since the float ``0.29`` is
    itself below 29/100. This is the one definition both block selections (``select_blocks`` and
    ``select_within_budget``) use, so their caps cannot drift apart.
    """
    product = density * block_size
    return max(1, math.floor(product + abs(product) * _CAP_TOLERANCE))


def select_within_budget(
    scores: Mapping[str, npt.ArrayLike],
    *,
    block_size: int,
    batch: int,
    max_batches: int,
    density: float,
) -> Mask:
    """Top ``max_batches`` batches by total score; inside them the top ``density`` of each block."""
    if max_batches < 1 or batch < 1 or block_size < 1:
        raise BudgetError("block_size, batch and max_batches must be >= 1")
    if not 0.0 < density < 1.0:
        raise BudgetError(
            f"density must be in (0, 1) so blocks keep weights to compensate with, got {density}"
        )
    per_block = block_cap(density, block_size)
    candidates: list[tuple[float, str, int]] = []
    flat_scores: dict[str, npt.NDArray[np.float64]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    rule = _Layout(block_size, batch)
    layouts: dict[str, LayerLayout] = {}
    for name, value in scores.items():
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise BudgetError(f"scores of {name} are not all finite")
        try:
            layouts[name] = layout = layer_layout(name, arr.size, rule)
        except DeletionError as exc:
            raise BudgetError(str(exc)) from exc
        flat_scores[name], shapes[name] = arr.reshape(-1), tuple(arr.shape)
        blocks = arr.reshape(-1, block_size)
        top = -np.sort(-blocks, axis=1)[:, :per_block].sum(axis=1)  # what masking inside the block removes
        for b, total in enumerate(layout.pad(top).sum(axis=1)):  # padding blocks score 0
            candidates.append((float(total), name, b))
    candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
    chosen: dict[str, dict[int, tuple[int, ...]]] = {name: {} for name in scores}
    for _total, name, b in candidates[:max_batches]:
        for blk in range(b * batch, b * batch + layouts[name].real_blocks(b)):
            values = flat_scores[name][blk * block_size : (blk + 1) * block_size]
            offsets = np.argsort(-values, kind="stable")[:per_block]
            chosen[name][blk] = tuple(sorted(int(o) for o in offsets))
    layers = tuple(
        LayerMask(name, shapes[name], block_size, blocks) for name, blocks in chosen.items() if blocks
    )
    return Mask(layers)
