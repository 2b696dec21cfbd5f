"""The provider's deletion mask for a prepared (task, seed), and the mask-recipe sweep (how much each
recipe makes the global model forget) behind the settings' default mask."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from zkunlearn.bench.unlearning_data import Prepared
from zkunlearn.bench.unlearning_metrics import Views, logits, masked_forget_acc
from zkunlearn.bench.unlearning_settings import SETTINGS, MaskSpec


def _subsample(pair: tuple[Tensor, Tensor], n: int, seed: int) -> tuple[Tensor, Tensor]:
    if pair[0].shape[0] <= n:
        return pair
    idx = torch.randperm(pair[0].shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return pair[0][idx], pair[1][idx]


def mask_spec_for(spec: MaskSpec, deletion: str) -> MaskSpec:
    """The task's mask recipe for a deletion: a sample-level request removes no head row (the classes
    stay), so the head shares the fraction's budget there."""
    if deletion in ("samples", "person") and spec.head_rows:
        return MaskSpec(spec.score, spec.fraction, spec.structure, spec.density, head_rows=0)
    return spec


def make_mask(prep: Prepared, spec: MaskSpec, block_size: int, n_samples: int) -> Any:
    """The provider's deletion mask, computed on the global model from the forget set (the named samples)
    and a retain proxy; no whole head row for a sample-level deletion (``mask_spec_for``)."""
    spec = mask_spec_for(spec, prep.deletion)
    from zkunlearn.provider.masks import compute_mask

    from zkunlearn.tasks.train import cross_entropy

    extra = SETTINGS[prep.task].extra_layers
    return compute_mask(
        prep.global_model,
        list(prep.layers),
        forget=_subsample(prep.provider_forget, n_samples, prep.seed),
        retain=_subsample(prep.provider_retain, n_samples, prep.seed + 1),
        loss_fn=cross_entropy,
        score=spec.score,
        fraction=spec.fraction,
        block_size=block_size,
        structure=spec.structure,
        seed=prep.seed,
        density=spec.density,
        class_rows={name: spec.head_rows for name in extra} if spec.head_rows else None,
    )


def dense_masks(mask: Any, layers: Sequence[str]) -> dict[str, Tensor]:
    return {name: torch.as_tensor(mask.dense(name)) for name in layers}


SWEEP: tuple[MaskSpec, ...] = tuple(
    MaskSpec(score, fraction, structure)
    for score, structure in (
        ("zkapex", "unstructured"),
        ("fisher-ratio", "unstructured"),
        ("fisher-ratio", "block"),
        ("fisher-ratio", "neuron"),
        ("salun", "unstructured"),
        ("random", "unstructured"),
    )
    for fraction in (0.04, 0.16, 0.32)
)


# The LM's masks cost seconds of per-sample gradients each: its sweep keeps the informative recipes.
SWEEP_LM: tuple[MaskSpec, ...] = tuple(
    MaskSpec(score, fraction) for score in ("fisher-ratio", "random") for fraction in (0.16, 0.32, 0.5)
)


def mask_sweep(prep: Prepared, block_size: int, n_samples: int) -> list[dict[str, Any]]:
    """How much each mask recipe makes the *global* model forget, with and without the head.

    This is the measurement behind the default mask: a mask must bring the global model's forget
    accuracy near the retrained model's before compensation quality means anything.
    """
    from zkunlearn.tasks.metrics import accuracy
    from zkunlearn.tasks.train import masked_copy

    views: Views = next(iter(prep.variants.values()))["views"]
    retrain_forget = masked_forget_acc(prep.gold_global, {}, views)
    own = tuple(n for n in prep.layers if n not in SETTINGS[prep.task].extra_layers)
    layer_sets = {"own": own, "own+extra": prep.layers} if own != prep.layers else {"own": own}
    rows = []
    for label, layers in layer_sets.items():
        sub = copy.copy(prep)
        sub.layers = layers
        for spec in SWEEP_LM if prep.task == "code-lm" else SWEEP:
            dense = dense_masks(make_mask(sub, spec, block_size, n_samples), layers)
            masked = masked_copy(prep.global_model, dense)
            rows.append(
                {
                    "task": prep.task,
                    "seed": prep.seed,
                    "layers": label,
                    "score": spec.score,
                    "structure": spec.structure,
                    "fraction": spec.fraction,
                    "masked_forget_acc": accuracy(logits(masked, views.forget_test[0]), views.forget_test[1]),
                    "masked_retain_acc": accuracy(logits(masked, views.retain_test[0]), views.retain_test[1]),
                    "retrain_forget_acc": retrain_forget,
                }
            )
    return rows
