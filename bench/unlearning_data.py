"""One (task, seed) of the unlearning benchmark prepared: its data and the global, retrained and
personalized models, trained through the model cache."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from zkunlearn.bench.unlearning_metrics import Views
from zkunlearn.bench.unlearning_settings import SETTINGS, TASKS


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
