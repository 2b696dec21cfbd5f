"""Running the unlearning benchmark: every method on one (task, seed), the (task, seed) jobs in
single-threaded processes, and a whole run kept on disk as it goes."""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.progress import track
from zkunlearn.bench.forgetting import FORGETTING_FIELDS, MiaReference
from zkunlearn.bench.threads import one_thread_per_job
from zkunlearn.bench.unlearning_data import prepare
from zkunlearn.bench.unlearning_masks import dense_masks, make_mask, mask_spec_for, mask_sweep
from zkunlearn.bench.unlearning_methods import (
    analytic_unlearn,
    group_obs,
    group_obs_certified,
    group_obs_support,
    output_refit,
    support_finetune,
)
from zkunlearn.bench.unlearning_metrics import Views, evaluate, masked_forget_acc, measured, split_accuracy
from zkunlearn.bench.unlearning_records import finalize
from zkunlearn.bench.unlearning_settings import RECOVERING, RESULTS, SETTINGS, TASKS, MaskSpec, task_methods

T = TypeVar("T")


# What an update reports about itself beside the metrics (absent where it does not apply).
_UPDATE_FIELDS = ("update_s", "peak_rss_mb", "naive_over_ours", "naive_max_diff", "refit_error_ratio")


# What `evaluate` measures of a model.
_METRIC_FIELDS = ("forget_acc", "forget_acc_client", "retain_acc", "personal_acc", *FORGETTING_FIELDS)


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
    deletion: str | None = None,
    variants: tuple[str, ...] | None = None,
    compare_naive: bool = True,
    skip: frozenset[str] = frozenset(),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every method on the variants (default: all) for one (task, deletion, seed); returns per-seed rows
    and mask-sweep rows. ``deletion`` defaults to the task's whole kind ("class" or the LM's "slice").

    ``mask_spec``, ``lam``, ``block_size``, ``fisher_samples``, ``curvature`` and
    ``reconstruction_weight`` override ``SETTINGS[task]`` for sweeps. Without ``compare_naive`` the
    explicit-inverse reference solve (``naive_over_ours``) is skipped. Methods in ``skip`` (the
    certified update, the fine-tunes, the analytic head: none the others depend on) are not run.
    """
    if skip & {"personalized", "mask-only", "group-obs", "retrain"}:
        raise ValueError(
            "personalized, mask-only, group-obs and retrain are needed by the others; not skippable"
        )
    from zkunlearn.tasks.metrics import recovery
    from zkunlearn.tasks.train import finetune_masked, masked_copy

    one_thread_per_job()
    s = SETTINGS[task]
    spec = mask_spec or s.mask
    lam = s.lam if lam is None else lam
    block = s.block_size if block_size is None else block_size
    m_fisher = s.fisher_draws(quick) if fisher_samples is None else fisher_samples
    curve = s.curvature if curvature is None else curvature
    recon = s.reconstruction_weight if reconstruction_weight is None else reconstruction_weight
    deletion = deletion or ("slice" if task == "code-lm" else "class")
    prep = prepare(task, seed, quick, deletion, variants)
    spec = mask_spec_for(spec, deletion)
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
    do_sweep = sweep and deletion in ("class", "slice") and (task != "code-lm" or seed == 0)
    sweep_rows = mask_sweep(prep, block, s.mask_samples) if do_sweep else []
    rows: list[dict[str, Any]] = []
    for variant, v in prep.variants.items():
        views: Views = v["views"]
        # The retrained model of the same seed is the membership attack's reference (bench/forgetting.py).
        ref = MiaReference.of(v["gold"], views.forgetting, seed)

        def measure(model: torch.nn.Module) -> dict[str, Any]:
            return evaluate(model, views, seed, ref)  # noqa: B023 (used within the iteration)

        results: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        results["personalized"] = (measure(v["personalized"]), {})
        masked = masked_copy(v["personalized"], dense)
        results["mask-only"] = (measure(masked), {"update_s": 0.0})
        if "head-row-only" in task_methods(task, deletion):
            head_only = copy.deepcopy(v["personalized"])
            with torch.no_grad():
                head_only.get_parameter("head.weight")[int(prep.provider_forget[1][0])] = 0.0
            results["head-row-only"] = (measure(head_only), {"update_s": 0.0})
        factors: dict[str, Any] = {}
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
            compare_naive=compare_naive,
            factors_out=factors,
        )
        if compare_naive:
            info["naive_over_ours"] = info["naive_s"] / max(info["solve_s"], 1e-9)
        results["group-obs"] = (measure(obs_model), info)
        if s.certified is not None and "group-obs-certified" not in skip:
            certified_model, cinfo = group_obs_certified(
                v["personalized"], mask, prep.layers, v["client_train"], v["client_forget_mask"],
                s.certified, block, n_samples=m_fisher, curvature=curve, reconstruction_weight=recon,
                fisher_shift=s.fisher_shift, factors=factors, factors_s=info["fisher_s"],
            )  # fmt: skip
            results["group-obs-certified"] = (measure(certified_model), cinfo)
        if s.refit_lam is not None:
            refit_model, rinfo = output_refit(
                v["personalized"], obs_model, prep.layers, v["client_train"], v["client_forget_mask"],
                s.refit_lam, n_samples=m_fisher, rows=s.refit_rows,
            )  # fmt: skip
            # The whole client update: Group-OBS (curvature + solves) and then the refit.
            rinfo["update_s"] += info["update_s"]
            rinfo["peak_rss_mb"] = max(rinfo["peak_rss_mb"], info["peak_rss_mb"])
            results["group-obs-refit"] = (measure(refit_model), rinfo)
        after = v["after"]
        if "mask-finetune" not in skip:
            with measured() as m:
                ft = finetune_masked(
                    v["personalized"], dense, after[0], after[1],
                    epochs=1 if quick else s.finetune_epochs, lr=s.personal_lr, seed=seed, batch_size=64,
                )  # fmt: skip
            results["mask-finetune"] = (
                measure(ft),
                {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]},
            )
        if "support-finetune" not in skip:
            results["support-finetune"] = support_finetune(prep, v, mask, dense, seed, quick, ref)
        if "layers-finetune" not in skip:
            with measured() as m:
                layers_ft = finetune_masked(
                    v["personalized"], dense, after[0], after[1],
                    epochs=1 if quick else s.support_epochs, lr=s.personal_lr, seed=seed, batch_size=64,
                    trainable=prep.layers,
                )  # fmt: skip
            results["layers-finetune"] = (
                measure(layers_ft),
                {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]},
            )
        if "analytic" in task_methods(task) and "analytic" not in skip:
            head_model, hinfo = analytic_unlearn(prep, v)
            results["analytic"] = (measure(head_model), hinfo)
        results["retrain"] = (measure(v["gold"]), {"update_s": v["gold_s"]})
        base_p = results["personalized"][0]["personal_acc"]
        base_m = results["mask-only"][0]["personal_acc"]
        gold_f = results["retrain"][0]["forget_acc"]
        for method, (metrics, extra) in results.items():
            certified = s.certified if method == "group-obs-certified" else None
            rec = None
            if method in RECOVERING:
                rec = recovery(base_p, base_m, metrics["personal_acc"])
            rows.append(
                {
                    "task": task,
                    "deletion": deletion,
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
                    # The certified row is the proven configuration: its own damping and factor rank.
                    "lam": certified.lam if certified else lam,
                    "certified_m": certified.m if certified else None,
                    "mask_efficacy": efficacy,
                    **metrics,
                    "forget_gap_vs_retrain": metrics["forget_acc"] - gold_f,
                    "recovery": rec,
                    **{k: extra[k] for k in _UPDATE_FIELDS if k in extra},
                    "train_s": {"global": prep.global_train_s, "retrain": prep.gold_train_s},
                }
            )
    return rows, sweep_rows


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


def _run_named_job(
    job: str,
    seed: int,
    *,
    quick: bool,
    sweep: bool,
    variants: tuple[str, ...] | None,
    compare_naive: bool,
    skip: frozenset[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``run_job`` for a ``task:deletion`` job name (picklable for the worker processes)."""
    task, deletion = job.split(":")
    return run_job(
        task, seed, quick, sweep=sweep, deletion=deletion, variants=variants, compare_naive=compare_naive,
        skip=skip,
    )  # fmt: skip


def run_unlearning_bench(
    out_path: Path | str = RESULTS / "unlearning.json",
    tasks: Sequence[str] = TASKS,
    seeds: int = 3,
    quick: bool = False,
    workers: int | None = None,
    sweep: bool = True,
    seed_offset: int = 0,
    deletions: Sequence[str] | None = None,
    variants: tuple[str, ...] | None = None,
    compare_naive: bool = True,
    skip: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Run every (task, seed) job, aggregate over seeds and write JSON, markdown and a plot beside it.

    Per-seed rows are written after every finished job (``<stem>_seeds.json``), so an interrupted run
    keeps what it measured; ``finalize`` rebuilds the tables from that file.
    """
    from zkunlearn.bench.unlearning_data import DELETIONS

    for t in tasks:
        if t not in SETTINGS:
            raise ValueError(f"unknown task {t!r}; expected some of {TASKS}")
    for d in deletions or ():
        if d not in DELETIONS:
            raise ValueError(f"unknown deletion {d!r}; expected some of {DELETIONS}")
    # A job is (task, deletion); the code LM deletes its slice whatever the image tasks delete.
    jobs = [f"{t}:{d}" for t in tasks for d in (("slice",) if t == "code-lm" else (deletions or ("class",)))]
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
        functools.partial(
            _run_named_job, quick=quick, sweep=sweep, variants=variants, compare_naive=compare_naive,
            skip=skip,
        ), jobs,
        range(seed_offset, seed_offset + seeds), "unlearning bench", keep,
        workers=workers, tolerate_failures=True,
    )  # fmt: skip
    if failures and not rows:
        raise RuntimeError("every benchmark job failed: " + "; ".join(failures))
    return finalize(rows, sweep_rows, out_path)
