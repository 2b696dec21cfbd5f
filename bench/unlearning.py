"""Unlearning benchmark: Group-OBS (alone and with the output refit) against mask-only, mask + fine-tune,
analytic and retrain-from-scratch.

For each task and seed: train the provider's global model (and the gold model without the forget set),
compute the provider's deletion mask on the global model, personalize both on the client's data, then
apply every method to the client's personalized model and measure forgetting, utility and MIA. Seeds
run as separate single-threaded processes, so the wall time shrinks with the cores available while the
CPU time stays what one thread would spend.

    python -m bench.unlearning --seeds 3 --workers 2
    python -m bench.unlearning --finalize bench/results/unlearning_seeds.json   # re-render tables
    python -m bench.unlearning --tasks vit --seeds 6 --no-sweep --out a/vit.json   # one run per task ...
    python -m bench.unlearning --finalize a/vit_seeds.json a/lm_seeds.json      # ... merged into one table

    python -m bench.unlearning --tune --tasks vit --curvatures empirical,ggn --fractions 0.24,0.32,0.40

Hyperparameters (``SETTINGS``) were tuned on ``TUNING_SEEDS`` only, with ``tuning_sweep`` (``--tune``;
the curvature x damping x mask-fraction grid in ``bench/results/unlearning_fisher_tuning.md`` and
``unlearning_fisher_lm_tuning.md``, the earlier block-size / sample-count grid in
``unlearning_tuning.md``); the per-seed table in ``unlearning.md`` marks those seeds and gives the
mean recovery over the held-out ones separately. The committed ``unlearning*.json`` merge, via
``--finalize``, runs on the 2-core box (Python 3.11, torch CPU, single-threaded jobs; nothing else
running for the ViT and MLP rows, while the code-LM rows shared the box with other jobs, so their
update times, peak memory and naive/ours ratios are not comparable with the others): MLP seeds 0-2
(not tuned) from a run that started from an empty model cache (``--no-sweep``),
ViT seeds 0-11 re-run on 2026-12-03 on the same cached models with the shifted curvature inputs, plus
the pre-registered seeds 12-23 trained then (``--no-sweep``, nothing else running), and code LM
seeds 0-3 (0 tuning; client slice tkinter) re-run on 2026-12-02 on the same cached models, with the
reconstruction term in its curvature (with its mask sweep), plus seeds 4-11 (pre-registered,
``--no-sweep``) in the same run.
``--structures`` (``bench/unlearning_structures.py``) compares mask structures: touched blocks,
efficacy and Group-OBS recovery. ``unlearning_masks.*``, the mask-recipe sweep, is kept from an earlier run
on a 16-core machine, on the models trained there (it measures the global model only), except its
code-LM rows (the latest code-LM run). ``--diagnose`` runs
``bench/unlearning_diagnosis.py``: where the unrecovered accuracy is lost, layer by layer, and what
curvatures no client could commit before a request would give (upper bounds for a better G).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.progress import track
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"
T = TypeVar("T")
TASKS = ("vit", "mlp", "code-lm")
METHODS = (
    "personalized", "mask-only", "group-obs", "group-obs-refit", "support-finetune", "layers-finetune",
    "mask-finetune", "analytic", "retrain",
)  # fmt: skip
# Methods whose recovery is reported: the provable one, the same followed by the output refit (provable
# for ReLU layers), the fine-tune of exactly the weights Group-OBS may change (the unmasked weights of
# the blocks the mask touches), the fine-tune of the masked layers' unmasked weights (a wider support:
# blocks the mask leaves alone too), and the unrestricted fine-tune (the utility reference).
RECOVERING = ("group-obs", "group-obs-refit", "support-finetune", "layers-finetune", "mask-finetune")


def task_methods(task: str) -> tuple[str, ...]:
    """The methods ``run_job`` reports for ``task``: no refit where the task's setting has none (the MLP's
    masked layer feeds its masked head), no analytic head on the language model."""
    skip = {"group-obs-refit"} if SETTINGS[task].refit_lam is None else set()
    if task == "code-lm":
        skip.add("analytic")
    return tuple(m for m in METHODS if m not in skip)


# What an update reports about itself beside the metrics (absent where it does not apply).
_UPDATE_FIELDS = ("update_s", "peak_rss_mb", "naive_over_ours", "naive_max_diff", "refit_error_ratio")
# What `evaluate` measures of a model.
_METRIC_FIELDS = ("forget_acc", "forget_acc_client", "retain_acc", "personal_acc", "mia", "mia_svc")


@dataclass(frozen=True)
class MaskSpec:
    score: str
    fraction: float
    structure: str = "unstructured"
    # The "block" structure's cap on each touched block (provider.masks.select_blocks); 1 = whole blocks.
    density: float = 1.0
    # Rows of each extra layer (the classifier head, rows = classes) removed whole by neuron score, outside
    # the fraction's budget (provider.masks.compute_mask's class_rows); 0 = the head shares the budget.
    head_rows: int = 0


@dataclass(frozen=True)
class TaskSettings:
    """Training budgets and unlearning hyperparameters of one task (chosen by measurement, see docs)."""

    epochs: int
    lr: float
    personal_epochs: int
    personal_lr: float
    finetune_epochs: int
    block_size: int
    lam: float
    mask: MaskSpec
    batch_size: int = 128
    fisher_samples: int = 1024
    mask_samples: int = 512
    quick_epochs: int = 2
    # Masked besides the model's own targets: the image classifiers' head, whose forget-class row is
    # what lets any mask remove the class (fc1-only masks do not; see the mask sweep).
    extra_layers: tuple[str, ...] = ()
    # The client's curvature (client/fisher.py): "ggn" for classifiers, "empirical" where the exact GGN
    # is out of reach (the LM's 64 positions x 260 classes per window).
    curvature: str = "empirical"
    # Weight of the masked layers' reconstruction curvature added to it (client/fisher.py: I (x) E[x x^T],
    # an activation-space trust region); 0 = the loss curvature alone.
    reconstruction_weight: float = 0.0
    # Pixels by which copies of the client's images are moved (four directions) and added to the inputs
    # of its label-free curvature (client.fisher.shifted_copies); 0 = the images alone.
    fisher_shift: int = 0
    # Epochs of the support-restricted fine-tune (enough for it to level off; see the docs' table).
    support_epochs: int = 20
    # Relative ridge of the output refit after Group-OBS (client/refit.py); None where the layer after
    # the masked one is itself masked (the MLP's fc2 feeds the masked head), so no refit applies.
    refit_lam: float | None = None
    # Rows of the masked layer's inputs the refit fits: the ``n`` the protocol commits at enrollment
    # (``client.refit.committed_rows``), so the figure is the one a proof can back; None fits every row.
    refit_rows: int | None = None


# Seeds the hyperparameters in SETTINGS were chosen on; every other seed is held out. The per-seed table
# marks them, so a reader can compare held-out recoveries with the tuned ones.
# The ViT's mask, curvature and damping were chosen on seeds 0-2, but its ``fisher_shift`` was chosen
# looking at seeds 0-11, so only the pre-registered 12-23 are held out from every choice.
TUNING_SEEDS: dict[str, tuple[int, ...]] = {"vit": tuple(range(12)), "code-lm": (0,), "mlp": ()}

SETTINGS: dict[str, TaskSettings] = {
    "vit": TaskSettings(
        epochs=40,
        lr=2e-3,
        personal_epochs=40,
        personal_lr=1e-3,
        finetune_epochs=5,
        block_size=64,
        # Gauss-Newton curvature, lam on its plateau (1e-4..1e-3 within 1 point on the tuning seeds; the
        # largest, best conditioned): 89.8 % mean recovery vs 83.1 % for the empirical Fisher at the
        # earlier lam 0.02 and 87.9 % at its best lam (bench/results/unlearning_fisher_tuning.md).
        lam=0.001,
        curvature="ggn",
        # 40 % of the fc1 weights packed into blocks masked at most to 5/8 (a whole block leaves Group-OBS
        # nothing to compensate with), and the head's forget-class row removed whole outside the budget.
        # Chosen on the tuning seeds 0-2 (bench/results/unlearning_structures.md; criterion: a mask that
        # forgets, then the least personal accuracy lost after Group-OBS, then the fewest touched blocks):
        # 0.20 points lost against 0.70 for the earlier unstructured 40 % (global top over fc1 + head),
        # touching 64 % of the blocks instead of 90 %. 0.40 itself was set for the unstructured mask, so
        # that it costs >= 5 points on every tuning seed (recovery is undefined below).
        mask=MaskSpec("fisher-ratio", 0.40, "block", density=0.625, head_rows=1),
        extra_layers=("head.weight",),
        # The GGN also on the client's images moved by one pixel in four directions (label-free, so no
        # labels are invented). NOT chosen on the tuning seeds alone: a scratch run on seeds 0-11 (the
        # 10 whose mask costs >= 5) compared 1-pixel shifts, +-10 degree rotations and Gaussian noise
        # (sigma 0.1) against none: 91.4 / 90.7 / 84.7 / 89.2 % recovery (shift: +2.1 points paired,
        # spread 10.5 -> 7.2). Seeds 12-17 are pre-registered here, before they are trained or run, to
        # confirm it on seeds that played no part in the choice. They gave 86.9 % on the 4 whose mask
        # costs >= 5 (54.5 / 93.0 / 102.4 / 97.9; the shift raised personal accuracy on 5 of the 6),
        # too few to settle it, so seeds 18-23 are pre-registered too, before they are trained or run.
        # Outcome on 12-23 (8 seeds with cost >= 5): 86.7 %; paired with and without the copies, personal
        # accuracy +0.22 +- 0.58 points (8 up, 3 down): kept because that mean is positive (a rule
        # decided before seeds 18-23 ran, not written down in advance).
        fisher_shift=1,
        # Chosen on the tuning seeds 0-2 from 0.003 / 0.01 / 0.03 / 0.1 (99.4 / 99.1 / 100.3 / 99.5 %
        # recovery; a scratch grid, docs/benchmarks.md): the result is flat over that range.
        refit_lam=0.03,
        # 256 committed rows (of ~9,000 tokens): the largest power of two whose GELU refit of one fc2
        # stays within one circuit's 2**26 rows (~55 M, docs/benchmarks.md).
        refit_rows=256,
    ),
    "mlp": TaskSettings(
        epochs=30,
        lr=1e-3,
        personal_epochs=10,
        personal_lr=3e-4,
        finetune_epochs=5,
        block_size=128,
        lam=0.02,
        mask=MaskSpec("fisher-ratio", 0.32),
        extra_layers=("head.weight",),
        curvature="ggn",
    ),
    "code-lm": TaskSettings(
        epochs=4,
        lr=3e-3,
        personal_epochs=4,
        personal_lr=1e-3,
        finetune_epochs=2,
        block_size=256,
        # Sampled-label Fisher (81.7 % recovery on the tuning seed vs 79.6 / 78.8 for the empirical Fisher
        # at lam 0.03 / 0.1 on earlier models, bench/results/unlearning_fisher_lm_tuning.md) plus 0.3 x the
        # reconstruction curvature, at the largest lam within 1 point of the best on the tuning seed
        # (bench/results/unlearning_reconstruction_lm_tuning.md). The LM's first fc1 carries most of the
        # mask's cost, and a fine-tune of its own unmasked weights recovers all of it (diagnosis), so
        # there the curvature, not the block-local relation, is what Group-OBS lacked.
        lam=0.003,
        curvature="fisher",
        reconstruction_weight=0.3,
        mask=MaskSpec("fisher-ratio", 0.32),
        batch_size=64,
        # Every client window (1,500): m = 1,500 >= 4B recovered 0.79 vs 0.78 at m = 1,024 (tuning seed 0).
        fisher_samples=1500,
        mask_samples=256,
        # Tuning seed 0 from 0.01 / 0.03 / 0.1: 97.6 / 96.9 / 96.9 % recovery (scratch grid, docs).
        refit_lam=0.01,
        # As the ViT: 256 committed rows (of ~96,000 token rows), within one circuit's reach.
        refit_rows=256,
    ),
}


# --------------------------------------------------------------------------------------------- helpers
@contextmanager
def measured() -> Iterator[dict[str, float]]:
    """Wall time and peak process RSS (sampled every 5 ms) of the enclosed block."""
    import psutil

    proc = psutil.Process()
    out = {"seconds": 0.0, "peak_rss_mb": proc.memory_info().rss / 2**20}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak_rss_mb"] = max(out["peak_rss_mb"], proc.memory_info().rss / 2**20)
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
        stop.set()
        thread.join()
        out["peak_rss_mb"] = max(out["peak_rss_mb"], proc.memory_info().rss / 2**20)


@dataclass
class Views:
    """What the metrics look at, in one shape for image and code tasks."""

    forget_test: tuple[Tensor, Tensor]  # forget class/slice, held out, provider domain (the deleted data's)
    forget_client: tuple[Tensor, Tensor]  # forget class, held out, client domain (the prose slice for code)
    retain_test: tuple[Tensor, Tensor]  # provider domain, other classes / code
    personal_test: tuple[Tensor, Tensor]  # client domain, other classes / tkinter
    mia_members: tuple[Tensor, Tensor]
    mia_nonmembers: tuple[Tensor, Tensor]
    mia_forget: tuple[Tensor, Tensor]


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    from zkunlearn.tasks.train import predict

    return predict(model, x, batch_size=256)


def evaluate(model: nn.Module, views: Views, seed: int) -> dict[str, float]:
    from zkunlearn.tasks.metrics import accuracy, mia_efficacy

    out = {
        "forget_acc": accuracy(_logits(model, views.forget_test[0]), views.forget_test[1]),
        "forget_acc_client": accuracy(_logits(model, views.forget_client[0]), views.forget_client[1]),
        "retain_acc": accuracy(_logits(model, views.retain_test[0]), views.retain_test[1]),
        "personal_acc": accuracy(_logits(model, views.personal_test[0]), views.personal_test[1]),
    }
    pairs = [
        (_logits(model, v[0]), v[1]) for v in (views.mia_members, views.mia_nonmembers, views.mia_forget)
    ]
    mia = mia_efficacy(pairs[0], pairs[1], pairs[2], seed=seed)
    out["mia"] = mia.loss_lr
    out["mia_svc"] = mia.conf_svc
    return out


@dataclass
class Prepared:
    """One (task, seed): data, models and their training budgets, independent of the variant."""

    task: str
    seed: int
    make: Callable[[], nn.Module]
    layers: tuple[str, ...]  # parameter names of the masked weights
    global_model: nn.Module
    gold_global: nn.Module
    global_train_s: float
    gold_train_s: float
    provider_forget: tuple[Tensor, Tensor]
    provider_retain: tuple[Tensor, Tensor]
    variants: dict[str, dict[str, Any]]


def _timed_train(
    make: Callable[[], nn.Module],
    spec: Mapping[str, Any],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    start_from: nn.Module | None = None,
) -> tuple[nn.Module, float]:
    """Train through the cache; the time is the recorded training time even on a cache hit."""
    from zkunlearn.tasks.train import cache_dir, cache_key, train_cached

    full = {**spec, "epochs": epochs, "lr": lr, "seed": seed, "batch_size": batch_size}
    meta = cache_dir() / f"{cache_key(full)}.json"
    start = time.perf_counter()
    model = train_cached(
        make, spec, x, y, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size, start_from=start_from
    )
    took = time.perf_counter() - start
    if meta.exists():
        took = float(json.loads(meta.read_text())["train_s"])
    else:
        meta.write_text(json.dumps({"train_s": took}))
    return model, took


def prepare(task: str, seed: int, quick: bool) -> Prepared:
    from zkunlearn.tasks import models
    from zkunlearn.tasks.code import make_code_task
    from zkunlearn.tasks.data import make_image_task

    s = SETTINGS[task]
    epochs = s.quick_epochs if quick else s.epochs
    pepochs = s.quick_epochs if quick else s.personal_epochs
    make: Callable[[], nn.Module]
    if task in ("vit", "mlp"):
        disjoint = make_image_task(seed, "disjoint")
        overlap = make_image_task(seed, "overlap")
        if task == "vit":
            cfg_v = models.ViTConfig()
            make, cfg = (lambda: models.ViT(cfg_v)), cfg_v.as_dict()
        else:
            cfg_m = models.MLPConfig()
            make, cfg = (lambda: models.MLP(cfg_m)), cfg_m.as_dict()
        data_spec = {"data": "mnist5k", "split_seed": seed, "forget_class": disjoint.forget_class}
        fc = disjoint.forget_class
        provider = (disjoint.provider_train.x, disjoint.provider_train.y)
        retain = (disjoint.retain.x, disjoint.retain.y)
        forget = (disjoint.forget.x, disjoint.forget.y)
        variants_src: dict[str, Any] = {"disjoint": disjoint, "overlap": overlap}
    elif task == "code-lm":
        import sys

        cfg_c = models.CodeLMConfig()
        make, cfg = (lambda: models.CodeLM(cfg_c)), cfg_c.as_dict()
        disjoint_c = make_code_task(seed, "disjoint", context=cfg_c.context)
        overlap_c = make_code_task(seed, "overlap", context=cfg_c.context)
        data_spec = {"data": "stdlib", "python": list(sys.version_info[:2]), "split_seed": seed}
        provider = (disjoint_c.provider_train.x, disjoint_c.provider_train.y)
        retain = (disjoint_c.retain.x, disjoint_c.retain.y)
        forget = (disjoint_c.forget.x, disjoint_c.forget.y)
        variants_src = {"disjoint": disjoint_c, "overlap": overlap_c}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    base = {"model": cfg, **data_spec, "quick": quick}
    global_model, global_s = _timed_train(
        make, {**base, "role": "global"}, *provider,
        epochs=epochs, lr=s.lr, seed=seed, batch_size=s.batch_size,
    )  # fmt: skip
    gold_global, gold_s = _timed_train(
        make, {**base, "role": "retrain"}, *retain,
        epochs=epochs, lr=s.lr, seed=seed, batch_size=s.batch_size,
    )  # fmt: skip
    own = tuple(f"{name}.weight" for name in global_model.masked_layers)  # type: ignore[union-attr]
    layers = own + s.extra_layers
    variants: dict[str, dict[str, Any]] = {}
    for variant, src in variants_src.items():
        if task == "code-lm":
            client_train = (src.client_train.x, src.client_train.y)
            client_forget_mask = src.client_is_forget
            after = (src.client_after_request.x, src.client_after_request.y)
            views = Views(
                forget_test=(src.forget_test.x, src.forget_test.y),
                forget_client=(src.forget_test.x, src.forget_test.y),
                retain_test=(src.code_test.x, src.code_test.y),
                personal_test=(src.client_test.x, src.client_test.y),
                mia_members=(src.retain.x[:500], src.retain.y[:500]),
                mia_nonmembers=(src.code_test.x, src.code_test.y),
                mia_forget=(src.forget.x[:500], src.forget.y[:500]),
            )
        else:
            client_train = (src.client_train.x, src.client_train.y)
            client_forget_mask = src.client_train.y == fc
            after = (src.client_after_request.x, src.client_after_request.y)
            ptest, ctest = src.provider_test, src.client_test
            views = Views(
                forget_test=(ptest.of_class(fc).x, ptest.of_class(fc).y),
                forget_client=(ctest.of_class(fc).x, ctest.of_class(fc).y),
                retain_test=(ptest.without_class(fc).x, ptest.without_class(fc).y),
                personal_test=(ctest.without_class(fc).x, ctest.without_class(fc).y),
                mia_members=(src.retain.x, src.retain.y),
                mia_nonmembers=(ptest.without_class(fc).x, ptest.without_class(fc).y),
                mia_forget=(src.forget.x, src.forget.y),
            )
        personalized, _ = _timed_train(
            make, {**base, "role": "personalized", "variant": variant}, *client_train,
            epochs=pepochs, lr=s.personal_lr, seed=seed, batch_size=64, start_from=global_model,
        )  # fmt: skip
        gold, gold_personal_s = _timed_train(
            make, {**base, "role": "retrain-personalized", "variant": variant}, *after,
            epochs=pepochs, lr=s.personal_lr, seed=seed, batch_size=64, start_from=gold_global,
        )  # fmt: skip
        variants[variant] = {
            "src": src,
            "views": views,
            "client_train": client_train,
            "client_forget_mask": client_forget_mask,
            "after": after,
            "personalized": personalized,
            "gold": gold,
            "gold_s": gold_s + gold_personal_s,
        }
    return Prepared(
        task=task,
        seed=seed,
        make=make,
        layers=layers,
        global_model=global_model,
        gold_global=gold_global,
        global_train_s=global_s,
        gold_train_s=gold_s,
        provider_forget=forget,
        provider_retain=retain,
        variants=variants,
    )


def _subsample(pair: tuple[Tensor, Tensor], n: int, seed: int) -> tuple[Tensor, Tensor]:
    if pair[0].shape[0] <= n:
        return pair
    idx = torch.randperm(pair[0].shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return pair[0][idx], pair[1][idx]


def make_mask(prep: Prepared, spec: MaskSpec, block_size: int, n_samples: int) -> Any:
    """The provider's deletion mask, computed on the global model from the forget set and a retain proxy."""
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


def group_obs_support(mask: Any, layers: Sequence[str]) -> dict[str, Tensor]:
    """The weights Group-OBS may change: the unmasked ones of the blocks the mask touches.

    A block the mask leaves alone gets no compensation (the Fisher is block-diagonal), so a fine-tune
    that may move it is not confined to Group-OBS's support.
    """
    out: dict[str, Tensor] = {}
    for name in layers:
        lm = mask.layer(name)
        touched = np.zeros(lm.n_blocks * lm.block_size, dtype=bool)
        for block in lm.blocks:
            touched[int(block) * lm.block_size : (int(block) + 1) * lm.block_size] = True
        dense = np.asarray(mask.dense(name), dtype=bool)
        out[name] = torch.as_tensor(touched[: dense.size].reshape(dense.shape) & ~dense)
    return out


def masked_forget_acc(model: nn.Module, dense: Mapping[str, Tensor], views: Views) -> float:
    from zkunlearn.tasks.metrics import accuracy
    from zkunlearn.tasks.train import masked_copy

    return accuracy(_logits(masked_copy(model, dense), views.forget_test[0]), views.forget_test[1])


def split_accuracy(model: nn.Module, split: tuple[Tensor, Tensor]) -> float:
    from zkunlearn.tasks.metrics import accuracy

    return accuracy(_logits(model, split[0]), split[1])


def compensated_copy(
    model: nn.Module, factors: Mapping[str, Any], masks: Mapping[str, Any], lam: float
) -> nn.Module:
    """A copy of ``model`` with Group-OBS applied to each layer in ``masks`` (a ``LayerMask`` per name)."""
    from zkunlearn.client.group_obs import apply_group_obs

    out = copy.deepcopy(model)
    named = dict(out.named_parameters())
    for name, layer_mask in masks.items():
        new, _ = apply_group_obs(named[name].detach(), factors[name], layer_mask, lam)
        with torch.no_grad():
            named[name].copy_(torch.from_numpy(new).to(named[name].dtype))
    return out


def client_fisher_data(
    data: tuple[Tensor, Tensor], exclude: Tensor, n_samples: int, shift: int = 0
) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """The client samples its curvature is computed on: ``n_samples`` kept ones plus the excluded ones
    (``layer_factors`` drops those), a fixed draw so every update sees the same data; with ``shift``,
    followed by their copies moved that many pixels (``client.fisher.shifted_copies``)."""
    from zkunlearn.client.fisher import with_shifted_copies

    if data[0].shape[0] > n_samples + int(exclude.sum()):
        pick = torch.randperm(data[0].shape[0], generator=torch.Generator().manual_seed(0))
        pick = pick[: n_samples + int(exclude.sum())]
        data, exclude = (data[0][pick], data[1][pick]), exclude[pick]
    x, y, exclude = with_shifted_copies(data[0], data[1], exclude, shift)
    return (x, y), exclude


def output_refit(
    personalized: nn.Module,
    compensated: nn.Module,
    layers: Sequence[str],
    data: tuple[Tensor, Tensor],
    exclude: Tensor,
    rel_lam: float,
    *,
    n_samples: int,
    rows: int | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Group-OBS's output refit (client/refit.py) on the same retained samples as its curvature, fitting
    ``rows`` committed rows of them (every row if ``None``)."""
    from zkunlearn.client.refit import RefitPair, apply_output_refit

    (x, _), out = client_fisher_data(data, exclude, n_samples)
    pairs = [RefitPair(*p) for p in personalized.refit_pairs]  # type: ignore[union-attr]
    with measured() as m:
        model, res = apply_output_refit(personalized, compensated, pairs, x[~out], rel_lam, layers, rows=rows)
    info = {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]}
    info["refit_error_ratio"] = float(
        np.mean([r.error_after / max(r.error_before, 1e-30) for r in res.values()])
    )
    return model, info


def group_obs(
    model: nn.Module,
    mask: Any,
    layers: Sequence[str],
    data: tuple[Tensor, Tensor],
    exclude: Tensor,
    lam: float,
    block_size: int,
    *,
    n_samples: int = 1024,
    compare_naive: bool = True,
    curvature: str = "empirical",
    reconstruction_weight: float = 0.0,
    fisher_shift: int = 0,
) -> tuple[nn.Module, dict[str, float]]:
    """Client-side compensation: Fisher factors without the forget-class samples, then batched solves."""
    from zkunlearn.client.fisher import layer_factors
    from zkunlearn.client.group_obs import apply_group_obs
    from zkunlearn.client.reference import naive_group_obs_explicit_inverse

    from zkunlearn.tasks.train import cross_entropy

    data, exclude = client_fisher_data(data, exclude, n_samples, fisher_shift)
    out = copy.deepcopy(model)
    named = dict(out.named_parameters())
    info = {"fisher_s": 0.0, "solve_s": 0.0, "naive_s": 0.0, "naive_max_diff": 0.0}
    with measured() as m:
        t0 = time.perf_counter()
        factors = layer_factors(
            model, list(layers), data[0], data[1], cross_entropy, block_size, exclude,
            curvature=curvature, reconstruction_weight=reconstruction_weight,  # type: ignore[arg-type]
        )  # fmt: skip
        t1 = time.perf_counter()
        info["fisher_s"] = t1 - t0
        for name in layers:
            new, _ = apply_group_obs(named[name].detach(), factors[name], mask.layer(name), lam)
            with torch.no_grad():
                named[name].copy_(torch.from_numpy(new).to(named[name].dtype))
        info["solve_s"] = time.perf_counter() - t1
    info["update_s"] = m["seconds"]
    info["peak_rss_mb"] = m["peak_rss_mb"]
    if compare_naive:
        for name in layers:
            t0 = time.perf_counter()
            ref = naive_group_obs_explicit_inverse(
                model.get_parameter(name).detach(), factors[name], mask.layer(name), lam
            )
            info["naive_s"] += time.perf_counter() - t0
            diff = float(np.max(np.abs(ref - named[name].detach().double().numpy())))
            info["naive_max_diff"] = max(info["naive_max_diff"], diff)
    return out, info


def analytic_unlearn(
    prep: Prepared, variant: dict[str, Any], gamma: float = 1.0
) -> tuple[nn.Module, dict[str, float]]:
    """ACU-style exact unlearning of a ridge head on the frozen global backbone.

    The head is learned on the provider's training set and the client's data, then the forget set (and,
    in the overlap variant, the client's forget-class samples) is unlearned in closed form. The backbone
    still carries whatever it learned from the forget set: only the head's unlearning is exact.
    """
    from zkunlearn.client.analytic import AnalyticHead

    backbone = copy.deepcopy(prep.global_model).eval()
    head_layer = backbone.get_submodule("head")
    if not isinstance(head_layer, nn.Linear):
        raise TypeError("the analytic baseline needs a model with a linear `head`")
    n_classes = head_layer.out_features

    def feats(x: Tensor) -> np.ndarray[Any, Any]:
        with torch.no_grad():
            f = torch.cat([backbone.features(x[i : i + 512]) for i in range(0, x.shape[0], 512)])  # type: ignore[operator]
        return np.concatenate([f.double().numpy(), np.ones((f.shape[0], 1))], axis=1)

    def onehot(y: Tensor) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any] = np.eye(n_classes)[y.numpy()]
        return out

    client_x, client_y = variant["client_train"]
    cf = variant["client_forget_mask"]
    px, py = prep.provider_retain
    fx, fy = prep.provider_forget
    head = AnalyticHead(feats(px[:1]).shape[1], n_classes, gamma)
    head.learn(feats(px), onehot(py))
    head.learn(feats(fx), onehot(fy))
    head.learn(feats(client_x), onehot(client_y))
    with measured() as m:
        head.unlearn(feats(fx), onehot(fy))
        if bool(cf.any()):
            head.unlearn(feats(client_x[cf]), onehot(client_y[cf]))

    weight = torch.from_numpy(head.W.T.copy()).float()

    class Headed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: Tensor) -> Tensor:
            f = self.backbone.features(x)  # type: ignore[operator]
            return torch.as_tensor(f @ weight[:, :-1].T + weight[:, -1])

    return Headed(), {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]}


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
                    "masked_forget_acc": accuracy(
                        _logits(masked, views.forget_test[0]), views.forget_test[1]
                    ),
                    "masked_retain_acc": accuracy(
                        _logits(masked, views.retain_test[0]), views.retain_test[1]
                    ),
                    "retrain_forget_acc": retrain_forget,
                }
            )
    return rows


def run_per_seed(
    measure: Callable[[str, int], T],
    tasks: Sequence[str],
    seeds: Sequence[int],
    desc: str,
    keep: Callable[[T], None],
    *,
    workers: int | None = None,
    tolerate_failures: bool = False,
) -> list[str]:
    """``keep(measure(task, seed))`` for every (task, seed) as each finishes, each in its own
    single-threaded process (the wall time shrinks with the cores, the CPU time stays one thread's).

    With ``tolerate_failures`` a failing job is reported and skipped rather than losing the others'
    results; the failures are returned.
    """
    jobs = [(t, seed) for t in tasks for seed in seeds]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    failures: list[str] = []
    if workers == 1:
        for t, seed in track(jobs, description=desc):
            keep(measure(t, seed))
        return failures
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(measure, t, seed): (t, seed) for t, seed in jobs}
        for fut in track(as_completed(futures), total=len(futures), description=desc):
            try:
                keep(fut.result())
            except Exception as exc:
                if not tolerate_failures:
                    raise
                failures.append(f"{futures[fut]}: {type(exc).__name__}: {exc}")
                print(f"job {futures[fut]} failed: {exc!r}", flush=True)
    return failures


def write_study(
    rows: list[dict[str, Any]],
    out_path: Path | str,
    order: Callable[[Mapping[str, Any]], Any],
    render_markdown: Callable[[Sequence[Mapping[str, Any]]], str],
    render_plot: Callable[[Sequence[Mapping[str, Any]], Path], None],
) -> str:
    """Sort a study's rows and write them as ``out_path`` (JSON) with its markdown and plot beside it;
    returns the markdown."""
    rows.sort(key=order)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rows, indent=1) + "\n")
    table = render_markdown(rows)
    out_path.with_suffix(".md").write_text(table)
    render_plot(rows, out_path.with_suffix(".png"))
    return table


# ------------------------------------------------------------------------------------------ one job
def run_job(
    task: str,
    seed: int,
    quick: bool,
    mask_spec: MaskSpec | None = None,
    lam: float | None = None,
    sweep: bool = True,
    *,
    block_size: int | None = None,
    fisher_samples: int | None = None,
    curvature: str | None = None,
    reconstruction_weight: float | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every method on both variants for one (task, seed); returns per-seed rows and mask-sweep rows.

    ``mask_spec``, ``lam``, ``block_size``, ``fisher_samples``, ``curvature`` and
    ``reconstruction_weight`` override ``SETTINGS[task]`` for sweeps.
    """
    from zkunlearn.tasks.metrics import recovery
    from zkunlearn.tasks.train import finetune_masked, masked_copy

    torch.set_num_threads(1)
    s = SETTINGS[task]
    spec = mask_spec or s.mask
    lam = s.lam if lam is None else lam
    block = s.block_size if block_size is None else block_size
    m_fisher = s.fisher_samples if fisher_samples is None else fisher_samples
    curve = s.curvature if curvature is None else curvature
    recon = s.reconstruction_weight if reconstruction_weight is None else reconstruction_weight
    prep = prepare(task, seed, quick)
    mask = make_mask(prep, spec, block, s.mask_samples)
    dense = dense_masks(mask, prep.layers)
    n_weights = sum(int(d.numel()) for d in dense.values())
    sparsity = sum(int(d.sum()) for d in dense.values()) / n_weights
    any_views = next(iter(prep.variants.values()))["views"]
    efficacy = {
        "global_forget_acc": masked_forget_acc(prep.global_model, {}, any_views),
        "masked_global_forget_acc": masked_forget_acc(prep.global_model, dense, any_views),
        "retrain_global_forget_acc": masked_forget_acc(prep.gold_global, {}, any_views),
    }
    efficacy["gap_to_retrain"] = efficacy["masked_global_forget_acc"] - efficacy["retrain_global_forget_acc"]
    # The LM's sweep costs a minute of per-sample gradients per seed: one seed shows the pattern.
    do_sweep = sweep and (task != "code-lm" or seed == 0)
    sweep_rows = mask_sweep(prep, block, s.mask_samples) if do_sweep else []
    rows: list[dict[str, Any]] = []
    for variant, v in prep.variants.items():
        views: Views = v["views"]
        results: dict[str, tuple[dict[str, float], dict[str, Any]]] = {}
        results["personalized"] = (evaluate(v["personalized"], views, seed), {})
        masked = masked_copy(v["personalized"], dense)
        results["mask-only"] = (evaluate(masked, views, seed), {"update_s": 0.0})
        obs_model, info = group_obs(
            v["personalized"],
            mask,
            prep.layers,
            v["client_train"],
            v["client_forget_mask"],
            lam,
            block,
            n_samples=m_fisher,
            curvature=curve,
            reconstruction_weight=recon,
            fisher_shift=s.fisher_shift,
        )
        info["naive_over_ours"] = info["naive_s"] / max(info["solve_s"], 1e-9)
        results["group-obs"] = (evaluate(obs_model, views, seed), info)
        if s.refit_lam is not None:
            refit_model, rinfo = output_refit(
                v["personalized"], obs_model, prep.layers, v["client_train"], v["client_forget_mask"],
                s.refit_lam, n_samples=m_fisher, rows=s.refit_rows,
            )  # fmt: skip
            # The whole client update: Group-OBS (curvature + solves) and then the refit.
            rinfo["update_s"] += info["update_s"]
            rinfo["peak_rss_mb"] = max(rinfo["peak_rss_mb"], info["peak_rss_mb"])
            results["group-obs-refit"] = (evaluate(refit_model, views, seed), rinfo)
        after = v["after"]
        with measured() as m:
            ft = finetune_masked(
                v["personalized"], dense, after[0], after[1],
                epochs=1 if quick else s.finetune_epochs, lr=s.personal_lr, seed=seed, batch_size=64,
            )  # fmt: skip
        results["mask-finetune"] = (
            evaluate(ft, views, seed),
            {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]},
        )
        results["support-finetune"] = support_finetune(prep, v, mask, dense, seed, quick)
        with measured() as m:
            layers_ft = finetune_masked(
                v["personalized"], dense, after[0], after[1],
                epochs=1 if quick else s.support_epochs, lr=s.personal_lr, seed=seed, batch_size=64,
                trainable=prep.layers,
            )  # fmt: skip
        results["layers-finetune"] = (
            evaluate(layers_ft, views, seed),
            {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]},
        )
        if "analytic" in task_methods(task):
            head_model, hinfo = analytic_unlearn(prep, v)
            results["analytic"] = (evaluate(head_model, views, seed), hinfo)
        results["retrain"] = (evaluate(v["gold"], views, seed), {"update_s": v["gold_s"]})
        base_p = results["personalized"][0]["personal_acc"]
        base_m = results["mask-only"][0]["personal_acc"]
        gold_f = results["retrain"][0]["forget_acc"]
        for method, (metrics, extra) in results.items():
            rec = None
            if method in RECOVERING:
                rec = recovery(base_p, base_m, metrics["personal_acc"])
            rows.append(
                {
                    "task": task,
                    "variant": variant,
                    "method": method,
                    "seed": seed,
                    "mask_score": spec.score,
                    "mask_fraction": spec.fraction,
                    "mask_structure": spec.structure,
                    "mask_density": spec.density,
                    "mask_head_rows": spec.head_rows,
                    "sparsity": sparsity,
                    "block_size": block,
                    "fisher_samples": m_fisher,
                    "curvature": curve,
                    "reconstruction_weight": recon,
                    "lam": lam,
                    "mask_efficacy": efficacy,
                    **metrics,
                    "forget_gap_vs_retrain": metrics["forget_acc"] - gold_f,
                    "recovery": rec,
                    **{k: extra[k] for k in _UPDATE_FIELDS if k in extra},
                    "train_s": {"global": prep.global_train_s, "retrain": prep.gold_train_s},
                }
            )
    return rows, sweep_rows


def support_finetune(
    prep: Prepared, v: Mapping[str, Any], mask: Any, dense: Mapping[str, Tensor], seed: int, quick: bool
) -> tuple[dict[str, float], dict[str, Any]]:
    """The fine-tune confined to Group-OBS's own support: what a gradient method finds there."""
    from zkunlearn.tasks.train import finetune_masked

    s = SETTINGS[prep.task]
    with measured() as m:
        model = finetune_masked(
            v["personalized"], dense, v["after"][0], v["after"][1],
            epochs=1 if quick else s.support_epochs, lr=s.personal_lr, seed=seed, batch_size=64,
            trainable=prep.layers, movable=group_obs_support(mask, prep.layers),
        )  # fmt: skip
    return evaluate(model, v["views"], seed), {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]}


def add_support_finetune(
    rows: Sequence[Mapping[str, Any]], task: str, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """Per-seed ``support-finetune`` rows for seeds measured before the method existed.

    Everything but the new fine-tune is taken from the stored rows of the same (task, variant, seed):
    the cached models and the deterministic mask are the same, so the recovery is on the stored
    personalized and mask-only accuracies.
    """
    from zkunlearn.tasks.metrics import recovery
    from zkunlearn.tasks.train import masked_copy

    stored = {(r["task"], r["variant"], int(r["seed"]), r["method"]): r for r in rows}
    s = SETTINGS[task]
    out: list[dict[str, Any]] = []
    for seed in seeds:
        prep = prepare(task, seed, quick=False)
        mask = make_mask(prep, s.mask, s.block_size, s.mask_samples)
        dense = dense_masks(mask, prep.layers)
        for variant, v in prep.variants.items():
            template = stored[(task, variant, seed, "layers-finetune")]
            base_p = stored[(task, variant, seed, "personalized")]["personal_acc"]
            base_m = stored[(task, variant, seed, "mask-only")]["personal_acc"]
            gold_f = stored[(task, variant, seed, "retrain")]["forget_acc"]
            masked_now = split_accuracy(masked_copy(v["personalized"], dense), v["views"].personal_test)
            if abs(masked_now - base_m) > 1e-9:
                raise RuntimeError(f"{task} seed {seed} {variant}: the mask is not the stored run's")
            support = group_obs_support(mask, prep.layers)
            if all(bool(torch.equal(support[n], ~dense[n].bool())) for n in prep.layers):
                # Every block touched: the support is the layers' unmasked weights, and nothing is put
                # back during the fine-tune, so it is the stored layers-finetune run (same seed, same data).
                metrics = {k: template[k] for k in template if k in _METRIC_FIELDS}
                extra = {k: template[k] for k in _UPDATE_FIELDS if k in template}
            else:
                metrics, extra = support_finetune(prep, v, mask, dense, seed, quick=False)
            out.append(
                {
                    **template,
                    "method": "support-finetune",
                    **metrics,
                    "forget_gap_vs_retrain": metrics["forget_acc"] - gold_f,
                    "recovery": recovery(base_p, base_m, metrics["personal_acc"]),
                    **{k: extra[k] for k in _UPDATE_FIELDS if k in extra},
                }
            )
            print(f"{task} seed {seed} {variant}: support-finetune recovery {out[-1]['recovery']}")
    return out


# ------------------------------------------------------------------------------------- aggregation
_STAT_FIELDS = (
    "forget_acc", "forget_acc_client", "retain_acc", "personal_acc", "mia", "mia_svc",
    "forget_gap_vs_retrain", "recovery", "update_s", "peak_rss_mb", "naive_over_ours", "sparsity",
)  # fmt: skip


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (task, variant, method); fields a method lacks are null."""
    from zkunlearn.tasks.metrics import mean_interval, mean_std, recovery

    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["variant"], row["method"]), []).append(row)
    out: list[dict[str, Any]] = []
    for (task, variant, method), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], METHODS.index(kv[0][2]))
    ):
        first = group[0]
        rec: dict[str, Any] = {
            "task": task,
            "variant": variant,
            "method": method,
            "mask_score": first["mask_score"],
            "mask_fraction": first["mask_fraction"],
            "mask_structure": first["mask_structure"],
            "mask_density": first.get("mask_density", 1.0),
            "mask_head_rows": first.get("mask_head_rows", 0),
            "block_size": first["block_size"],
            "lam": first["lam"],
            "seeds": sorted(r["seed"] for r in group),
        }
        for key in _STAT_FIELDS:
            vals = [r.get(key) for r in group]
            stat = mean_std(vals)
            rec[key] = None if stat["n"] == 0 else stat
        rec["recovery_pooled"] = None
        # The targets are on the mean over seeds; with ~10 points of spread per seed, how sure that mean is.
        rec["recovery_ci95"] = mean_interval([r.get("recovery") for r in group])
        out.append(rec)
        rec["mask_efficacy"] = {
            k: mean_std([r["mask_efficacy"][k] for r in group]) for k in first["mask_efficacy"]
        }
    # Recovery from seed-mean accuracies: per-seed recovery is None wherever that seed's mask cost < 5
    # points, so the per-seed mean can rest on one seed; the pooled ratio uses them all.
    means = {(r["task"], r["variant"], r["method"]): r["personal_acc"]["mean"] for r in out}
    for rec_row in out:
        if rec_row["method"] in RECOVERING:
            tv = (rec_row["task"], rec_row["variant"])
            pers, mask = means.get((*tv, "personalized")), means.get((*tv, "mask-only"))
            if pers is not None and mask is not None:
                rec_row["recovery_pooled"] = recovery(pers, mask, rec_row["personal_acc"]["mean"])
    return out


def _fmt(stat: Any, pct: bool = True, digits: int = 1) -> str:
    if stat is None or stat.get("mean") is None:
        return "–"
    scale = 100.0 if pct else 1.0
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _rec(stat: Any) -> str:
    return "–" if stat is None or stat.get("mean") is None else f"{_fmt(stat)} ({stat['n']})"


def _pooled(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}"


def _interval(ci: Mapping[str, float] | None) -> str:
    return "–" if ci is None else f"{ci['low'] * 100:.1f} – {ci['high'] * 100:.1f}"


def mask_label(r: Mapping[str, Any]) -> str:
    """A record's mask as the tables name it, e.g. ``fisher-ratio block 40% (<= 62.5% per block, head row
    whole)``."""
    label = f"{r['mask_score']} {r['mask_structure']} {r['mask_fraction']:.0%}"
    notes = []
    if r.get("mask_density", 1.0) < 1.0:
        notes.append(f"<= {100 * r['mask_density']:g}% per block")
    if r.get("mask_head_rows", 0):
        notes.append("head row whole")
    return f"{label} ({', '.join(notes)})" if notes else label


def render_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """The table for docs/benchmarks.md: accuracies in %, recovery in %, times in seconds."""
    lines = [
        "| task | variant | method | mask | forget acc | Δ forget vs retrain | personal acc | retain acc "
        "| MIA (LR) | recovery per seed (n) | recovery 95 % CI | recovery pooled | update s | peak RSS MB "
        "| naive/ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        mask = mask_label(r)
        lines.append(
            f"| {r['task']} | {r['variant']} | {r['method']} | {mask} | {_fmt(r['forget_acc'])} "
            f"| {_fmt(r['forget_gap_vs_retrain'])} | {_fmt(r['personal_acc'])} | {_fmt(r['retain_acc'])} "
            f"| {_fmt(r['mia'])} | {_rec(r['recovery'])} | {_interval(r.get('recovery_ci95'))} "
            f"| {_pooled(r.get('recovery_pooled'))} "
            f"| {_fmt(r['update_s'], False, 2)} "
            f"| {_fmt(r['peak_rss_mb'], False, 0)} | {_fmt(r['naive_over_ours'], False, 1)} |"
        )
    eff: dict[str, Any] = {}
    for r in records:
        eff.setdefault(r["task"], r["mask_efficacy"])
    lines.append("")
    lines.append("| task | global forget acc | after mask | retrain from scratch |")
    lines.append("|---|---|---|---|")
    for task, e in eff.items():
        lines.append(
            f"| {task} | {_fmt(e['global_forget_acc'])} | {_fmt(e['masked_global_forget_acc'])} "
            f"| {_fmt(e['retrain_global_forget_acc'])} |"
        )
    return "\n".join(lines) + "\n"


def render_plot(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Forget accuracy against personalization accuracy per method (disjoint variant), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in records if r["variant"] == "disjoint"]
    tasks = sorted({r["task"] for r in chosen})
    palette = plt.get_cmap("tab10")  # indexed by METHODS: a method keeps its colour in every panel
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        for r in (r for r in chosen if r["task"] == task):
            fx, px = r["forget_acc"], r["personal_acc"]
            ax.errorbar(
                px["mean"], fx["mean"], xerr=px["std"], yerr=fx["std"], fmt="o", capsize=3, label=r["method"],
                color=palette(METHODS.index(r["method"]) % 10),
            )  # fmt: skip
        ax.set_title(f"{task} (disjoint)")
        ax.set_xlabel("personalization accuracy")
        ax.set_ylabel("forget accuracy (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aggregate_sweep(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    from zkunlearn.tasks.metrics import mean_std

    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["layers"], r["score"], r["structure"], r["fraction"]), []).append(r)
    return [
        {
            "task": k[0],
            "layers": k[1],
            "score": k[2],
            "structure": k[3],
            "fraction": k[4],
            "seeds": sorted(r["seed"] for r in g),
            **{
                f: mean_std([r[f] for r in g])
                for f in ("masked_forget_acc", "masked_retain_acc", "retrain_forget_acc")
            },
        }
        for k, g in sorted(groups.items())
    ]


def render_sweep_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| task | layers | score | structure | fraction | global forget acc after mask | retain acc "
        "| retrain forget acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['task']} | {r['layers']} | {r['score']} | {r['structure']} | {r['fraction']:.0%} "
            f"| {_fmt(r['masked_forget_acc'])} | {_fmt(r['masked_retain_acc'])} "
            f"| {_fmt(r['retrain_forget_acc'])} |"
        )
    return "\n".join(lines) + "\n"


def render_seed_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per-seed mask cost and recoveries, tuning seeds marked, with the held-out seeds' mean recovery.

    The aggregate table averages recovery over the seeds where the mask cost >= 5 points; this one shows
    which seeds those were, so a mean cannot hide a seed, and whether it rests on seeds the settings were
    tuned on (``TUNING_SEEDS``).
    """
    from zkunlearn.tasks.metrics import mean_interval, mean_std

    by: dict[tuple[str, str, int], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["task"], r["variant"], r["seed"]), {})[r["method"]] = r
    lines = [
        "| task | variant | seed | tuning seed | mask cost (points) | masked global forget / retrain "
        "| personalized | mask-only | group-obs | " + " | ".join(f"recovery {m}" for m in RECOVERING) + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(RECOVERING),
    ]
    held: dict[tuple[str, str], dict[str, list[float | None]]] = {}
    for (task, variant, seed), meth in sorted(by.items()):
        if not {"personalized", "mask-only", "group-obs"} <= meth.keys():
            continue
        pers, mask, obs = (meth[k]["personal_acc"] for k in ("personalized", "mask-only", "group-obs"))
        eff = meth["group-obs"]["mask_efficacy"]
        tuned = seed in TUNING_SEEDS.get(task, ())
        recs = {m: meth[m]["recovery"] if m in meth else None for m in RECOVERING}
        if not tuned:
            h = held.setdefault((task, variant), {m: [] for m in RECOVERING})
            for m in RECOVERING:
                h[m].append(recs[m])
        lines.append(
            f"| {task} | {variant} | {seed} | {'yes' if tuned else 'no'} | {(pers - mask) * 100:.1f} "
            f"| {eff['masked_global_forget_acc'] * 100:.1f} / {eff['retrain_global_forget_acc'] * 100:.1f} "
            f"| {pers * 100:.1f} | {mask * 100:.1f} | {obs * 100:.1f} | "
            + " | ".join(_pooled(recs[m]) for m in RECOVERING)
            + " |"
        )
    lines += [
        "",
        "| task | variant | "
        + " | ".join(f"held-out seeds: recovery {m} (n) [95 % CI]" for m in RECOVERING)
        + " |",
        "|---|---|" + "---|" * len(RECOVERING),
    ]
    for (task, variant), h in sorted(held.items()):
        cells = (f"{_rec(mean_std(h[m]))} [{_interval(mean_interval(h[m]))}]" for m in RECOVERING)
        lines.append(f"| {task} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finalize(
    rows: Sequence[Mapping[str, Any]], sweep_rows: Sequence[Mapping[str, Any]], out_path: Path
) -> list[dict[str, Any]]:
    """Aggregate per-seed rows and write the JSON, the markdown tables and the plot."""
    records = aggregate(rows)
    out_path.write_text(json.dumps(records, indent=2) + "\n")
    out_path.with_suffix(".md").write_text(render_markdown(records) + "\n" + render_seed_markdown(rows))
    render_plot(records, out_path.with_suffix(".png"))
    if sweep_rows:
        sweep = aggregate_sweep(sweep_rows)
        out_path.with_name(out_path.stem + "_masks.json").write_text(json.dumps(sweep, indent=2) + "\n")
        out_path.with_name(out_path.stem + "_masks.md").write_text(render_sweep_markdown(sweep))
    return records


def tuning_sweep(
    task: str,
    seeds: Sequence[int],
    fractions: Sequence[float],
    block_sizes: Sequence[int],
    lams: Sequence[float],
    fisher_samples: Sequence[int] | None = None,
    variant: str = "disjoint",
    curvatures: Sequence[str] | None = None,
    ranks: Sequence[int] = (0,),
    quick: bool = False,
    reconstruction_weights: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Group-OBS recovery over a grid of curvature (with a reconstruction term of each weight) x mask
    fraction x block size x damping x Fisher samples.

    This is how ``SETTINGS`` were chosen (on ``TUNING_SEEDS`` only). It reuses one trained (cached) set
    of models per seed, one set of Fisher factors per (m, B) and one mask per (B, fraction), so a grid of
    a hundred points costs minutes, not a hundred benchmark jobs. Rows carry the mask cost, so a reader
    can apply the >= 5-point rule.
    """
    from zkunlearn.client.fisher import BlockFactors, fit_rows, layer_factors

    from zkunlearn.tasks.train import cross_entropy, masked_copy

    torch.set_num_threads(1)
    s = SETTINGS[task]
    rows: list[dict[str, Any]] = []
    for seed in track(seeds, description=f"tuning {task}"):
        prep = prepare(task, seed, quick=quick)
        v = prep.variants[variant]
        views: Views = v["views"]
        pers = v["personalized"]

        p_acc = split_accuracy(pers, views.personal_test)
        for m in fisher_samples or (s.fisher_samples,):
            data, excl = client_fisher_data(v["client_train"], v["client_forget_mask"], m, s.fisher_shift)
            grid = [
                (c, w, b)
                for c in curvatures or (s.curvature,)
                for w in reconstruction_weights or (s.reconstruction_weight,)
                for b in block_sizes
            ]
            for curvature, weight, block in grid:
                full = layer_factors(
                    pers, list(prep.layers), data[0], data[1], cross_entropy, block, excl,
                    curvature=curvature, reconstruction_weight=weight,  # type: ignore[arg-type]
                )  # fmt: skip
                # rank 0: the whole factor; otherwise its rank-r truncation, as a proof with m = r
                # commits it (client/unlearning.py enroll).
                truncated = {
                    rank: full if not rank else {
                        n: BlockFactors(
                            n, block, fit_rows(f.factors, rank, numel=math.prod(f.shape)), f.scale, f.shape
                        )
                        for n, f in full.items()
                    }
                    for rank in ranks
                }  # fmt: skip
                for fraction in fractions:
                    # The setting's mask at this fraction (its structure, per-block cap and head rows kept).
                    spec = dataclasses.replace(s.mask, fraction=fraction)
                    mask = make_mask(prep, spec, block, s.mask_samples)
                    dense = dense_masks(mask, prep.layers)
                    efficacy = split_accuracy(masked_copy(prep.global_model, dense), views.forget_test)
                    m_acc = split_accuracy(masked_copy(pers, dense), views.personal_test)
                    for rank, factors in truncated.items():
                        for lam in lams:
                            model = compensated_copy(
                                pers, factors, {n: mask.layer(n) for n in prep.layers}, lam
                            )
                            obs = split_accuracy(model, views.personal_test)
                            cost = p_acc - m_acc
                            rows.append(
                                {
                                    "task": task, "variant": variant, "seed": seed, "fraction": fraction,
                                    "block_size": block, "lam": lam, "fisher_samples": m,
                                    "curvature": curvature, "reconstruction_weight": weight,
                                    "rank": rank or None,
                                    "fisher_rows": int((~excl).sum()),
                                    "personalized": p_acc, "mask_only": m_acc, "group_obs": obs,
                                    "mask_cost": cost,
                                    "recovery": (obs - m_acc) / cost if cost > 0 else None,
                                    "group_obs_forget_acc": split_accuracy(model, views.forget_test),
                                    "masked_global_forget_acc": efficacy,
                                    "retrain_forget_acc": split_accuracy(prep.gold_global, views.forget_test),
                                }
                            )  # fmt: skip
    return rows


def render_tuning_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per grid point: per-seed mask cost and recovery, the mean over seeds costing >= 5 points.

    The main table's rule holds here too: a seed whose mask costs < 5 points shows no recovery, and the
    pooled figure needs the mean cost to reach 5 points (below it the ratio is noise).
    """
    from zkunlearn.tasks.metrics import RECOVERY_MIN_GAP, recovery

    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in rows:
        key = (
            r["task"], r.get("curvature", "empirical"), r.get("reconstruction_weight", 0.0),
            r.get("rank") or 0, r["fisher_samples"], r["block_size"], r["fraction"], r["lam"],
        )  # fmt: skip
        groups.setdefault(key, []).append(r)
    lines = [
        "| task | curvature | reconstruction weight | factor rank | m | B | fraction | lam | seeds "
        "| mask cost per seed (points) | recovery per seed | mean recovery, cost >= 5 (n) "
        "| pooled recovery |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gap = RECOVERY_MIN_GAP
    for (task, curvature, weight, rank, m, block, fraction, lam), g in sorted(groups.items()):
        ok = [r["recovery"] for r in g if r["mask_cost"] >= gap]
        pers, mask, obs = (sum(r[k] for r in g) / len(g) for k in ("personalized", "mask_only", "group_obs"))
        pooled = recovery(pers, mask, obs)
        lines.append(
            f"| {task} | {curvature} | {weight:g} | {rank or 'full'} | {m} | {block} | {fraction:.2f} "
            f"| {lam:g} "
            f"| {','.join(str(r['seed']) for r in g)} "
            f"| {' '.join('%.1f' % (r['mask_cost'] * 100) for r in g)} "
            f"| {' '.join(_pooled(r['recovery'] if r['mask_cost'] >= gap else None) for r in g)} "
            f"| {(_pooled(sum(ok) / len(ok)) + f' ({len(ok)})') if ok else '–'} | {_pooled(pooled)} |"
        )
    return "\n".join(lines) + "\n"


def run_unlearning_bench(
    out_path: Path | str = RESULTS / "unlearning.json",
    tasks: Sequence[str] = TASKS,
    seeds: int = 3,
    quick: bool = False,
    workers: int | None = None,
    sweep: bool = True,
    seed_offset: int = 0,
) -> list[dict[str, Any]]:
    """Run every (task, seed) job, aggregate over seeds and write JSON, markdown and a plot beside it.

    Per-seed rows are written after every finished job (``<stem>_seeds.json``), so an interrupted run
    keeps what it measured; ``finalize`` rebuilds the tables from that file.
    """
    for t in tasks:
        if t not in SETTINGS:
            raise ValueError(f"unknown task {t!r}; expected some of {TASKS}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seeds_path = out_path.with_name(out_path.stem + "_seeds.json")
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []

    def keep(result: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
        rows.extend(result[0])
        sweep_rows.extend(result[1])
        seeds_path.write_text(json.dumps({"rows": rows, "sweep": sweep_rows}, indent=1) + "\n")

    # One failing job (say, a missing corpus) must not throw away the others' results.
    failures = run_per_seed(
        functools.partial(run_job, quick=quick, sweep=sweep), tasks,
        range(seed_offset, seed_offset + seeds), "unlearning bench", keep,
        workers=workers, tolerate_failures=True,
    )  # fmt: skip
    if failures and not rows:
        raise RuntimeError("every benchmark job failed: " + "; ".join(failures))
    return finalize(rows, sweep_rows, out_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--out", default=str(RESULTS / "unlearning.json"))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="first seed (e.g. only held-out seeds past the tuning ones)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-sweep", action="store_true", help="skip the mask-recipe sweep")
    parser.add_argument(
        "--add-support-finetune",
        metavar="SEEDS_JSON",
        help="add the support-confined fine-tune's rows for --tasks and --seeds from --seed-offset to a "
        "stored <stem>_seeds.json (seeds run before the method existed), then rebuild the tables",
    )
    parser.add_argument(
        "--finalize",
        nargs="+",
        help="rebuild the tables from <stem>_seeds.json files (merged, e.g. one run per task) and exit",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="run the tuning grid (tuning_sweep) on the tuning seeds instead; writes <stem>_tuning.{json,md}",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="per-layer losses and curvature upper bounds (bench/unlearning_diagnosis.py) for --seeds seeds "
        "from --seed-offset; writes <out dir>/unlearning_diagnosis.{json,md}",
    )
    parser.add_argument(
        "--structures",
        action="store_true",
        help="mask structure vs touched blocks, efficacy and recovery (bench/unlearning_structures.py) for "
        "--seeds seeds from --seed-offset; writes <out dir>/unlearning_structures.{json,md}",
    )
    parser.add_argument("--curvatures", default="empirical,ggn", help="tuning grid: curvatures")
    parser.add_argument(
        "--reconstruction-weights",
        default=None,
        help="tuning grid: weights of the reconstruction term beside the curvature (default: setting)",
    )
    parser.add_argument("--lams", default="0.001,0.005,0.02,0.1", help="tuning grid: damping")
    parser.add_argument("--fractions", default=None, help="tuning grid: mask fractions (default: setting)")
    parser.add_argument("--blocks", default=None, help="tuning grid: block sizes (default: setting)")
    parser.add_argument(
        "--ranks", default="0", help="tuning grid: factor ranks as proven (0: the whole factor)"
    )
    parser.add_argument(
        "--tune-seeds",
        default=None,
        help="tuning grid: comma-separated seeds (default: the task's tuning seeds)",
    )
    args = parser.parse_args(argv)
    if args.diagnose:
        from zkunlearn.bench.unlearning_diagnosis import render_diagnosis_markdown, run_diagnosis

        diag_rows = run_diagnosis(
            args.tasks.split(","),
            range(args.seed_offset, args.seed_offset + args.seeds),
            Path(args.out).with_name("unlearning_diagnosis.json"),
            quick=args.quick,
            workers=args.workers,
        )
        print(render_diagnosis_markdown(diag_rows))
        return 0
    if args.structures:
        from zkunlearn.bench.unlearning_structures import render_structures_markdown, run_structures

        structure_rows = run_structures(
            args.tasks.split(","),
            range(args.seed_offset, args.seed_offset + args.seeds),
            Path(args.out).with_name("unlearning_structures.json"),
            quick=args.quick,
            workers=args.workers,
        )
        print(render_structures_markdown(structure_rows))
        return 0
    if args.tune:
        tuning_rows: list[dict[str, Any]] = []
        for task in args.tasks.split(","):
            st = SETTINGS[task]

            def floats(text: str | None, default: float) -> list[float]:
                return [float(v) for v in text.split(",")] if text else [default]

            tuning_rows += tuning_sweep(
                task,
                [int(v) for v in args.tune_seeds.split(",")] if args.tune_seeds else TUNING_SEEDS[task],
                floats(args.fractions, st.mask.fraction),
                [int(b) for b in floats(args.blocks, st.block_size)],
                floats(args.lams, st.lam),
                curvatures=args.curvatures.split(","),
                ranks=[int(r) for r in args.ranks.split(",")],
                reconstruction_weights=floats(args.reconstruction_weights, st.reconstruction_weight),
            )
        stem = Path(args.out).with_suffix("")
        Path(f"{stem}_tuning.json").write_text(json.dumps(tuning_rows, indent=1) + "\n")
        Path(f"{stem}_tuning.md").write_text(render_tuning_markdown(tuning_rows))
        print(render_tuning_markdown(tuning_rows))
        return 0
    if args.add_support_finetune:
        # Seeds measured before `support-finetune` existed: add its rows to the stored file in place.
        blob = json.loads(Path(args.add_support_finetune).read_text())
        for task in args.tasks.split(","):
            blob["rows"].extend(
                add_support_finetune(
                    blob["rows"], task, range(args.seed_offset, args.seed_offset + args.seeds)
                )
            )
        Path(args.add_support_finetune).write_text(json.dumps(blob, indent=1) + "\n")
        records = finalize(blob["rows"], blob["sweep"], Path(args.out))
        print(render_markdown(records))
        return 0
    if args.finalize:
        rows: list[dict[str, Any]] = []
        sweep_rows: list[dict[str, Any]] = []
        for path in args.finalize:
            blob = json.loads(Path(path).read_text())
            rows.extend(blob["rows"])
            sweep_rows.extend(blob["sweep"])
        records = finalize(rows, sweep_rows, Path(args.out))
    else:
        records = run_unlearning_bench(
            args.out,
            args.tasks.split(","),
            args.seeds,
            args.quick,
            args.workers,
            not args.no_sweep,
            seed_offset=args.seed_offset,
        )
    print(render_markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
