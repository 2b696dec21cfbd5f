"""Mask structure against forgetting, recovery and proof cost: unstructured, block-sparse and neuron masks.

A proof's cost grows with the weights of every *touched* Group-OBS block, not with the masked weights
(``provider/proof_budget.py``), and an unstructured mask over 40 % of a layer touches nearly every block.
A block-sparse mask (``provider.masks.select_blocks``) packs the same budget into few blocks, each
masked at most to ``density``; a neuron mask takes whole rows (scored by activation importance). What
that buys and costs is measured here on the benchmark's own cached models, curvature and damping
(``bench.unlearning_data.prepare`` / ``SETTINGS``), the ``disjoint`` variant, per seed:

* **touched blocks**: the share of the targeted layers' blocks the mask touches (the proof's size);
* **efficacy**: the global model's forget accuracy after masking, beside retrain-from-scratch's;
* **mask cost** and **Group-OBS recovery** of the personalized model (recovery only where the mask
  costs >= 5 points, as in the main table).

A block masked whole (``density = 1``, and every neuron mask on layers whose rows are one block) leaves
Group-OBS no unmasked weight to compensate with, so there Group-OBS is mask-only by construction; the
table shows by how much a density cap buys that back.

    zkunlearn bench unlearning-structures --tasks vit --seeds 12 --workers 2 --out a/vit/u.json
    zkunlearn bench unlearning-structures --tasks mlp --seeds 3 --workers 2 --out a/mlp/u.json
    zkunlearn bench unlearning-structures --tasks code-lm --seeds 4 --workers 2 --out a/lm/u.json
    zkunlearn bench unlearning-structures-merge a/*/unlearning_structures.json   # into bench/results
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zkunlearn.bench.threads import one_thread_per_job
from zkunlearn.bench.unlearning_data import prepare
from zkunlearn.bench.unlearning_masks import dense_masks, make_mask
from zkunlearn.bench.unlearning_methods import client_fisher_data, compensated_copy
from zkunlearn.bench.unlearning_metrics import split_accuracy
from zkunlearn.bench.unlearning_records import write_study
from zkunlearn.bench.unlearning_runner import run_per_seed
from zkunlearn.bench.unlearning_settings import RESULTS, SETTINGS, MaskSpec

# (structure, density) pairs compared; densities below the mask fraction cannot hold the budget and
# are reported as infeasible rather than silently filled elsewhere.
STRUCTURES: tuple[tuple[str, float, int], ...] = (
    ("unstructured", 1.0, 0),
    ("unstructured", 1.0, 1),
    ("block", 1.0, 1),
    ("block", 0.875, 1),
    ("block", 0.75, 1),
    ("block", 0.625, 1),
    ("block", 0.5, 1),
    ("block", 0.75, 0),
    ("block", 0.625, 0),
    ("neuron", 1.0, 0),
)
"""(structure, density, head_rows) compared: ``head_rows=1`` removes the classifier head's forget-class row
whole outside the budget (``MaskSpec.head_rows``); 0 lets the head's blocks compete for the budget (and
be capped like the others). On a task without a head in the mask each (structure, density) runs once."""


def fractions_for(task: str) -> tuple[float, ...]:
    """The benchmark's mask fraction and a smaller one, where block packing saves the most."""
    return (0.16, SETTINGS[task].mask.fraction)


def measure_structures(task: str, seed: int, quick: bool = False) -> list[dict[str, Any]]:
    """One row per (structure, density, fraction) for one seed's disjoint variant."""
    from zkunlearn.client.fisher import layer_factors
    from zkunlearn.provider.masks import MaskSelectionError

    from zkunlearn.tasks.train import cross_entropy, masked_copy

    one_thread_per_job()
    s = SETTINGS[task]
    prep = prepare(task, seed, quick)
    v = prep.variants["disjoint"]
    pers = v["personalized"]
    views = v["views"]
    data, exclude = client_fisher_data(
        v["client_train"], v["client_forget_mask"], s.fisher_draws(quick), s.fisher_shift
    )
    factors = layer_factors(
        pers, list(prep.layers), data[0], data[1], cross_entropy, s.block_size, exclude,
        curvature=s.curvature, reconstruction_weight=s.reconstruction_weight,  # type: ignore[arg-type]
    )  # fmt: skip
    personal = split_accuracy(pers, views.personal_test)
    retrain_forget = split_accuracy(prep.gold_global, views.forget_test)
    rows: list[dict[str, Any]] = []
    # Without a head in the mask, head_rows means nothing: each (structure, density) is measured once.
    configs = dict.fromkeys((st, d, h if s.extra_layers else 0) for st, d, h in STRUCTURES)
    for fraction in fractions_for(task):
        for structure, density, head_rows in configs:
            base = {
                "task": task, "seed": seed, "variant": "disjoint", "score": s.mask.score,
                "structure": structure, "density": density, "head_rows": head_rows,
                "fraction": fraction,
                "block_size": s.block_size, "curvature": s.curvature, "lam": s.lam,
                "reconstruction_weight": s.reconstruction_weight,
            }  # fmt: skip
            spec = MaskSpec(s.mask.score, fraction, structure, density, head_rows)
            try:
                mask = make_mask(prep, spec, s.block_size, s.mask_samples)
            except MaskSelectionError as exc:
                rows.append({**base, "infeasible": str(exc)})
                continue
            dense = dense_masks(mask, prep.layers)
            touched = sum(len(mask.layer(n).blocks) for n in prep.layers)
            total = sum(mask.layer(n).n_blocks for n in prep.layers)
            masked_acc = split_accuracy(masked_copy(pers, dense), views.personal_test)
            compensated = compensated_copy(pers, factors, {n: mask.layer(n) for n in prep.layers}, s.lam)
            obs_acc = split_accuracy(compensated, views.personal_test)
            cost = personal - masked_acc
            rows.append(
                {
                    **base,
                    "touched_blocks": touched,
                    "total_blocks": total,
                    "masked_weights": mask.masked_count(),
                    "masked_global_forget_acc": split_accuracy(
                        masked_copy(prep.global_model, dense), views.forget_test
                    ),
                    "retrain_forget_acc": retrain_forget,
                    "personalized": personal,
                    "mask_only": masked_acc,
                    "group_obs": obs_acc,
                    "group_obs_forget_acc": split_accuracy(compensated, views.forget_test),
                    "mask_cost": cost,
                    "recovery": (obs_acc - masked_acc) / cost if cost > 0 else None,
                }
            )
    return rows


def run_structures(
    tasks: Sequence[str],
    seeds: Sequence[int],
    out_path: Path | str = RESULTS / "unlearning_structures.json",
    *,
    quick: bool = False,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """Every (task, seed) in its own single-threaded process; writes the rows and the markdown."""
    rows: list[dict[str, Any]] = []
    run_per_seed(
        functools.partial(measure_structures, quick=quick), tasks, seeds, "mask structures", rows.extend,
        workers=workers,
    )  # fmt: skip
    write_study(rows, out_path, _row_order, render_structures_markdown, render_structures_plot)
    return rows


def _row_order(r: Mapping[str, Any]) -> tuple[Any, ...]:
    return (r["task"], r["fraction"], r["structure"], -r["density"], r["head_rows"], r["seed"])


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def render_structures_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per (task, fraction, structure, density): means over seeds, recovery where it applies."""
    from zkunlearn.tasks.metrics import RECOVERY_MIN_GAP, mean_std

    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in rows:
        key = (r["task"], r["fraction"], r["structure"], r["density"], r["head_rows"])
        groups.setdefault(key, []).append(r)
    lines = [
        "| task | fraction | structure | density | head | touched blocks % | masked global forget acc "
        "| retrain forget acc | mask cost (points) | lost after group-obs (points) | group-obs recovery (n) "
        "| pooled recovery | group-obs forget acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(values: Sequence[float | None]) -> str:
        stat = mean_std(values)
        if stat["mean"] is None:
            return "–"
        return f"{100 * float(stat['mean']):.1f} ± {100 * float(stat['std'] or 0):.1f}"

    order = {"unstructured": 0, "block": 1, "neuron": 2}
    for key in sorted(groups, key=lambda k: (k[0], k[1], order.get(k[2], 9), -k[4], -k[3])):
        task, fraction, structure, density, head_rows = key
        g = groups[key]
        density_txt = f"{density:g}" if structure == "block" else "–"
        head_txt = "forget-class row whole" if head_rows else "in the budget"
        if not SETTINGS[task].extra_layers:
            head_txt = "no head masked"
        head = f"| {task} | {fraction:.0%} | {structure} | {density_txt} | {head_txt} "
        if any("infeasible" in r for r in g):
            lines.append(head + "| infeasible: the cap cannot hold the budget | | | | | | | |")
            continue
        touched = [r["touched_blocks"] / r["total_blocks"] for r in g]
        counted = [r["recovery"] if r["mask_cost"] >= RECOVERY_MIN_GAP else None for r in g]
        n = sum(c is not None for c in counted)
        pers, mask, obs = (sum(r[k] for r in g) / len(g) for k in ("personalized", "mask_only", "group_obs"))
        pooled = (obs - mask) / (pers - mask) if pers - mask >= RECOVERY_MIN_GAP else None
        lines.append(
            head + f"| {ms(touched)} | {ms([r['masked_global_forget_acc'] for r in g])} "
            f"| {ms([r['retrain_forget_acc'] for r in g])} | {ms([r['mask_cost'] for r in g])} "
            f"| {ms([r['personalized'] - r['group_obs'] for r in g])} "
            f"| {ms(counted)} ({n}) | {_pct(pooled)} | {ms([r['group_obs_forget_acc'] for r in g])} |"
        )
    return "\n".join(lines) + "\n"


def render_structures_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Proof size against accuracy: touched blocks vs points lost after Group-OBS, one panel per task at
    its benchmark fraction; hollow markers are masks that do not forget (> 10 points above retrain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
        for r in rows:
            if r["task"] == task and r["fraction"] == SETTINGS[task].mask.fraction and "infeasible" not in r:
                groups.setdefault((r["structure"], r["density"], r["head_rows"]), []).append(r)
        for i, ((structure, density, head_rows), g) in enumerate(sorted(groups.items())):
            x = 100 * sum(r["touched_blocks"] / r["total_blocks"] for r in g) / len(g)
            y = 100 * sum(r["personalized"] - r["group_obs"] for r in g) / len(g)
            gap = sum(r["masked_global_forget_acc"] - r["retrain_forget_acc"] for r in g) / len(g)
            label = structure if structure != "block" else f"block {density:g}"
            if head_rows:
                label += ", head row whole"
            marker = {"unstructured": "o", "block": "s", "neuron": "^"}.get(structure, "x")
            if gap > 0.10:
                label += " (does not forget)"
            color = f"C{i % 10}"
            ax.scatter(
                [x], [y], marker=marker, s=50, label=label, edgecolors=color,
                facecolors="none" if gap > 0.10 else color,
            )  # fmt: skip
        ax.set_title(f"{task}: mask {SETTINGS[task].mask.fraction:.0%}")
        ax.set_xlabel("touched Group-OBS blocks (% of the targeted layers')")
        ax.set_ylabel("personal accuracy lost after Group-OBS (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(paths: Sequence[Path | str], out_path: Path | str = RESULTS / "unlearning_structures.json") -> str:
    """One table from several runs (one per task, each with its own seed count)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += json.loads(Path(path).read_text())
    return write_study(rows, out_path, _row_order, render_structures_markdown, render_structures_plot)
