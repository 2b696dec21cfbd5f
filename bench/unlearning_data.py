"""One (task, deletion, seed) of the unlearning benchmark prepared: its data and the global, retrained
and personalized models, trained through the model cache.

Deletions (``DELETIONS``): the image tasks delete a whole ``class`` of the provider's training data,
random ``samples`` (``SAMPLE_FRACTION`` of it) or one ``person`` (a k-means cluster of one class's
images, writer-like); the code LM deletes a ``slice`` of its corpus.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from zkunlearn.bench.forgetting import ForgettingViews, relearn_batch
from zkunlearn.bench.unlearning_metrics import Views
from zkunlearn.bench.unlearning_settings import SETTINGS, TASKS

DELETIONS = ("class", "samples", "person")
# Share of the provider's training data a "samples" request names; a "person" is one of
# PERSON_CLUSTERS k-means clusters of the forget class's images (about the same share).
SAMPLE_FRACTION = 0.02
PERSON_CLUSTERS = 5


@dataclass
class Prepared:
    """One (task, seed): data, models and their training budgets, independent of the variant."""

    task: str
    seed: int
    deletion: str  # "class", "samples", "person" (image tasks) or "slice" (code LM)
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


@dataclass(frozen=True)
class SampleRequest:
    """A sample-level deletion: which provider training samples it names, and held-out non-members of
    the same kind (for the membership attack)."""

    forget: Tensor  # bool over the provider's training samples
    heldout: Tensor  # bool over the provider's test samples


def sample_request(task: Any, deletion: str, seed: int) -> SampleRequest:
    """The samples a ``samples`` or ``person`` request names in an image task (a fixed draw per seed).

    ``samples``: ``SAMPLE_FRACTION`` of the provider's training data at random, against every test
    image. ``person``: the k-means cluster (on pixels, ``PERSON_CLUSTERS`` clusters of the forget
    class) of median size, against the test images of that class the same k-means assigns to it.
    """
    train, test = task.provider_train, task.provider_test
    n = len(train)
    if deletion == "samples":
        gen = torch.Generator().manual_seed(seed + 1_000_003)
        pick = torch.randperm(n, generator=gen)[: max(1, round(SAMPLE_FRACTION * n))]
        forget = torch.zeros(n, dtype=torch.bool)
        forget[pick] = True
        return SampleRequest(forget, torch.ones(len(test), dtype=torch.bool))
    if deletion != "person":
        raise ValueError(f"not a sample-level deletion: {deletion!r}; expected 'samples' or 'person'")
    from sklearn.cluster import KMeans

    fc = task.forget_class
    in_class = (train.y == fc).nonzero().squeeze(1)
    km = KMeans(n_clusters=PERSON_CLUSTERS, n_init=4, random_state=seed)
    labels = km.fit_predict(train.x[in_class].flatten(1).double().numpy())
    sizes = [(int((labels == c).sum()), c) for c in range(PERSON_CLUSTERS)]
    chosen = sorted(sizes)[PERSON_CLUSTERS // 2][1]
    forget = torch.zeros(n, dtype=torch.bool)
    forget[in_class[torch.as_tensor(labels == chosen)]] = True
    test_class = (test.y == fc).nonzero().squeeze(1)
    near = km.predict(test.x[test_class].flatten(1).double().numpy()) == chosen
    heldout = torch.zeros(len(test), dtype=torch.bool)
    # Too few held-out look-alikes for an AUC: every held-out image of the class instead.
    heldout[test_class[torch.as_tensor(near)] if int(near.sum()) >= 10 else test_class] = True
    return SampleRequest(forget, heldout)


def prepare(
    task: str, seed: int, quick: bool, deletion: str = "class", variants: tuple[str, ...] | None = None
) -> Prepared:
    """Data and models of one (task, deletion, seed), for ``variants`` (default: every variant the
    deletion has: disjoint and overlap for a class, disjoint alone for samples, whose client never holds
    provider samples)."""
    from zkunlearn.tasks import models
    from zkunlearn.tasks.code import make_code_task
    from zkunlearn.tasks.data import make_image_task

    s = SETTINGS[task]
    epochs = s.quick_epochs if quick else s.epochs
    pepochs = s.quick_epochs if quick else s.personal_epochs
    if (task == "code-lm") != (deletion == "slice"):
        expected = "'slice'" if task == "code-lm" else f"one of {DELETIONS}"
        raise ValueError(f"task {task!r} has no {deletion!r} deletion; expected {expected}")
    make: Callable[[], nn.Module]
    request: SampleRequest | None = None
    if task in ("vit", "mlp"):
        if task == "vit":
            cfg_v = models.ViTConfig()
            make, cfg = (lambda: models.ViT(cfg_v)), cfg_v.as_dict()
        else:
            cfg_m = models.MLPConfig()
            make, cfg = (lambda: models.MLP(cfg_m)), cfg_m.as_dict()
        if deletion == "class":
            variants_src: dict[str, Any] = {
                "disjoint": make_image_task(seed, "disjoint"),
                "overlap": make_image_task(seed, "overlap"),
            }
        else:
            # The same split, the client keeping every class: it holds none of the provider's samples.
            variants_src = {"disjoint": make_image_task(seed, "overlap", overlap_keep=1.0)}
        first = next(iter(variants_src.values()))
        fc = first.forget_class
        data_spec = {"data": "mnist5k", "split_seed": seed, "forget_class": fc}
        provider = (first.provider_train.x, first.provider_train.y)
        if deletion == "class":
            retain = (first.retain.x, first.retain.y)
            forget = (first.forget.x, first.forget.y)
        else:
            request = sample_request(first, deletion, seed)
            ptrain = first.provider_train
            retain = (ptrain.x[~request.forget], ptrain.y[~request.forget])
            forget = (ptrain.x[request.forget], ptrain.y[request.forget])
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
    if variants is not None:
        unknown = set(variants) - variants_src.keys()
        if unknown:
            raise ValueError(
                f"{deletion} deletion has no variant {sorted(unknown)}; it has {sorted(variants_src)}"
            )
        variants_src = {k: v for k, v in variants_src.items() if k in variants}
    base = {"model": cfg, **data_spec, "quick": quick}
    # The global model is the same whatever is deleted; everything after the request depends on it.
    after_base = base if deletion in ("class", "slice") else {**base, "deletion": deletion}
    global_model, global_s = _timed_train(
        make, {**base, "role": "global"}, *provider,
        epochs=epochs, lr=s.lr, seed=seed, batch_size=s.batch_size,
    )  # fmt: skip
    gold_global, gold_s = _timed_train(
        make, {**after_base, "role": "retrain"}, *retain,
        epochs=epochs, lr=s.lr, seed=seed, batch_size=s.batch_size,
    )  # fmt: skip
    own = tuple(f"{name}.weight" for name in global_model.masked_layers)  # type: ignore[union-attr]
    layers = own + s.extra_layers
    variants_out: dict[str, dict[str, Any]] = {}
    for variant, src in variants_src.items():
        client_train = (src.client_train.x, src.client_train.y)
        # A sample-level request names none of the client's data: it keeps all of it.
        after_split = src.client_train if request is not None else src.client_after_request
        after = (after_split.x, after_split.y)
        if task == "code-lm":
            client_forget_mask = src.client_is_forget
            forget_test = (src.forget_test.x, src.forget_test.y)
            views = Views(
                forget_test=forget_test,
                forget_client=forget_test,
                retain_test=(src.code_test.x, src.code_test.y),
                personal_test=(src.client_test.x, src.client_test.y),
                forgetting=ForgettingViews(
                    probe_client=None,
                    probe_provider=None,
                    probe_kind=None,
                    relearn_train=relearn_batch(forget, retain, seed),
                    relearn_check=forget_test,
                    mia_forget=(forget[0][:500], forget[1][:500]),
                    mia_heldout=forget_test,
                ),
            )
        else:
            ptest, ctest = src.provider_test, src.client_test
            if deletion == "class":
                client_forget_mask = src.client_train.y == fc
                forget_test = (ptest.of_class(fc).x, ptest.of_class(fc).y)
                forget_client = (ctest.of_class(fc).x, ctest.of_class(fc).y)
                retain_test = (ptest.without_class(fc).x, ptest.without_class(fc).y)
                personal_test = (ctest.without_class(fc).x, ctest.without_class(fc).y)
                heldout = forget_test
            else:
                assert request is not None
                client_forget_mask = torch.zeros(len(src.client_train), dtype=torch.bool)
                # The forget "accuracy" of a sample deletion is on the deleted training samples themselves
                # (a model that never saw them scores its test accuracy there); the client-domain view
                # is the client's test images of the classes they belong to.
                forget_test = forget
                keep = torch.isin(ctest.y, forget[1].unique())
                forget_client = (ctest.x[keep], ctest.y[keep])
                retain_test = (ptest.x, ptest.y)
                personal_test = (ctest.x, ctest.y)
                heldout = (ptest.x[request.heldout], ptest.y[request.heldout])
            views = Views(
                forget_test=forget_test,
                forget_client=forget_client,
                retain_test=retain_test,
                personal_test=personal_test,
                forgetting=ForgettingViews(
                    probe_client=(ctest.x, ctest.y),
                    probe_provider=(ptest.x, ptest.y),
                    probe_kind=None if deletion == "samples" else fc,
                    relearn_train=relearn_batch(forget, retain, seed),
                    relearn_check=forget_test if deletion == "class" else forget,
                    mia_forget=forget,
                    mia_heldout=heldout,
                ),
            )
        personalized, _ = _timed_train(
            make, {**after_base, "role": "personalized", "variant": variant}, *client_train,
            epochs=pepochs, lr=s.personal_lr, seed=seed, batch_size=64, start_from=global_model,
        )  # fmt: skip
        gold, gold_personal_s = _timed_train(
            make, {**after_base, "role": "retrain-personalized", "variant": variant}, *after,
            epochs=pepochs, lr=s.personal_lr, seed=seed, batch_size=64, start_from=gold_global,
        )  # fmt: skip
        variants_out[variant] = {
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
        deletion=deletion,
        make=make,
        layers=layers,
        global_model=global_model,
        gold_global=gold_global,
        global_train_s=global_s,
        gold_train_s=gold_s,
        provider_forget=forget,
        provider_retain=retain,
        variants=variants_out,
    )
