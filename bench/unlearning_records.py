"""The unlearning benchmark's records: per-seed rows aggregated over seeds and written as JSON, markdown
tables and plots (the main table, the per-seed table, the mask sweep and the tuning grid)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from zkunlearn.bench.unlearning_settings import METHODS, RECOVERING, TUNING_SEEDS


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


_STAT_FIELDS = (
    "forget_acc", "forget_acc_client", "retain_acc", "personal_acc", "probe_acc", "probe_acc_provider",
    "relearn_steps", "mia_auc", "mia_auc_gap", "forget_gap_vs_retrain", "recovery", "update_s", "peak_rss_mb",
    "naive_over_ours", "sparsity",
)  # fmt: skip


# Fields whose mean over seeds also gets a 95 % Student-t interval (``<field>_ci95``).
_INTERVAL_FIELDS = (
    "forget_acc", "personal_acc", "retain_acc", "probe_acc", "probe_acc_provider", "relearn_steps", "mia_auc",
    "mia_auc_gap",
)  # fmt: skip


def deletion_of(row: Mapping[str, Any]) -> str:
    """A row's deletion kind; rows measured before the field existed deleted a class (a slice for the LM)."""
    return str(row.get("deletion") or ("slice" if row["task"] == "code-lm" else "class"))


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (task, deletion, variant, method); fields a method lacks are null."""
    from zkunlearn.tasks.metrics import mean_interval, mean_std, recovery

    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], deletion_of(row), row["variant"], row["method"]), []).append(row)
    out: list[dict[str, Any]] = []
    for (task, deletion, variant, method), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], METHODS.index(kv[0][3]))
    ):
        first = group[0]
        rec: dict[str, Any] = {
            "task": task,
            "deletion": deletion,
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
        for key in _INTERVAL_FIELDS:
            rec[f"{key}_ci95"] = mean_interval([r.get(key) for r in group])
        # Seeds whose paired bootstrap interval of the MIA gap to retrain covers 0 (retrain's level).
        gaps = [r for r in group if r.get("mia_auc_gap_low") is not None]
        rec["mia_at_retrain_seeds"] = (
            None if not gaps else sum(r["mia_auc_gap_low"] <= 0.0 <= r["mia_auc_gap_high"] for r in gaps)
        )
        rec["relearn_capped_seeds"] = sum(bool(r.get("relearn_capped")) for r in group)
        rec["recovery_pooled"] = None
        # The targets are on the mean over seeds; with ~10 points of spread per seed, how sure that mean is.
        rec["recovery_ci95"] = mean_interval([r.get("recovery") for r in group])
        out.append(rec)
        rec["mask_efficacy"] = {
            k: mean_std([r["mask_efficacy"][k] for r in group]) for k in first["mask_efficacy"]
        }
    # Recovery from seed-mean accuracies: per-seed recovery is None wherever that seed's mask cost < 5
    # points, so the per-seed mean can rest on one seed; the pooled ratio uses them all.
    means = {(r["task"], r["deletion"], r["variant"], r["method"]): r["personal_acc"]["mean"] for r in out}
    for rec_row in out:
        if rec_row["method"] in RECOVERING:
            tv = (rec_row["task"], rec_row["deletion"], rec_row["variant"])
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


def task_label(r: Mapping[str, Any]) -> str:
    """A record's task as the tables name it: the task, and the deletion where it is not the whole kind."""
    deletion = deletion_of(r)
    return r["task"] if deletion in ("class", "slice") else f"{r['task']} ({deletion})"


def _ci(ci: Mapping[str, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    return "–" if ci is None else f"[{ci['low'] * scale:.{digits}f}, {ci['high'] * scale:.{digits}f}]"


def _mean_ci(r: Mapping[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    stat = r.get(key)
    if stat is None or stat.get("mean") is None:
        return "–"
    return f"{stat['mean'] * scale:.{digits}f} {_ci(r.get(key + '_ci95'), scale, digits)}"


def render_forgetting_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """Utility and forgetting against retrain per (task, deletion, variant, method): means over seeds with
    their 95 % interval; accuracies in %, relearn in steps, MIA as AUC."""
    lines = [
        "| task | deletion | variant | method | seeds | personal acc | forget acc "
        "| probe acc, client domain | probe acc, provider domain | relearn steps (capped seeds) | MIA AUC "
        "| MIA AUC − retrain's | seeds at retrain's MIA level |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        capped = r.get("relearn_capped_seeds") or 0
        at = r.get("mia_at_retrain_seeds")
        at_level = "–" if at is None else f"{at}/{len(r['seeds'])}"
        lines.append(
            f"| {r['task']} | {r.get('deletion', deletion_of(r))} | {r['variant']} | {r['method']} "
            f"| {len(r['seeds'])} | {_mean_ci(r, 'personal_acc')} | {_mean_ci(r, 'forget_acc')} "
            f"| {_mean_ci(r, 'probe_acc')} | {_mean_ci(r, 'probe_acc_provider')} "
            f"| {_mean_ci(r, 'relearn_steps', 1.0, 0)} ({capped}) "
            f"| {_mean_ci(r, 'mia_auc', 1.0, 3)} | {_mean_ci(r, 'mia_auc_gap', 1.0, 3)} "
            f"| {at_level} |"
        )
    return "\n".join(lines) + "\n"


def render_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """The table for docs/benchmarks.md: accuracies in %, recovery in %, times in seconds."""
    lines = [
        "| task | variant | method | mask | forget acc | Δ forget vs retrain | personal acc | retain acc "
        "| MIA AUC | recovery per seed (n) | recovery 95 % CI | recovery pooled | update s | peak RSS MB "
        "| naive/ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        mask = mask_label(r)
        lines.append(
            f"| {task_label(r)} | {r['variant']} | {r['method']} | {mask} | {_fmt(r['forget_acc'])} "
            f"| {_fmt(r['forget_gap_vs_retrain'])} | {_fmt(r['personal_acc'])} | {_fmt(r['retain_acc'])} "
            f"| {_fmt(r.get('mia_auc'), False, 3)} | {_rec(r['recovery'])} "
            f"| {_interval(r.get('recovery_ci95'))} "
            f"| {_pooled(r.get('recovery_pooled'))} "
            f"| {_fmt(r['update_s'], False, 2)} "
            f"| {_fmt(r['peak_rss_mb'], False, 0)} | {_fmt(r['naive_over_ours'], False, 1)} |"
        )
    eff: dict[str, Any] = {}
    for r in records:
        eff.setdefault(task_label(r), r["mask_efficacy"])
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
    """Per method (disjoint variant), one column per task and deletion: forget accuracy, the two probe
    accuracies and MIA AUC against personalization accuracy, each with retrain's level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in records if r["variant"] == "disjoint"]
    panels = sorted({task_label(r) for r in chosen})
    metrics = [
        ("forget_acc", "forget accuracy"),
        ("probe_acc", "probe accuracy, client domain"),
        ("probe_acc_provider", "probe accuracy, provider domain"),
        ("mia_auc", "MIA AUC, deleted vs held-out"),
    ]
    palette = plt.get_cmap("tab20")  # indexed by METHODS: a method keeps its colour in every panel
    ncol = max(1, len(panels))
    fig, axes = plt.subplots(len(metrics), ncol, figsize=(5 * ncol, 3.6 * len(metrics)), squeeze=False)
    for col, panel in enumerate(panels):
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for r in (r for r in chosen if task_label(r) == panel):
                fx, px = r.get(key), r["personal_acc"]
                if fx is None or fx.get("mean") is None:
                    continue
                ax.errorbar(
                    px["mean"], fx["mean"], xerr=px["std"], yerr=fx["std"], fmt="o", capsize=3,
                    label=r["method"], color=palette(METHODS.index(r["method"]) % 20),
                )  # fmt: skip
                if r["method"] == "retrain":
                    ax.axhline(fx["mean"], color="grey", linestyle="--", linewidth=1)
            ax.set_title(f"{panel} (disjoint)")
            ax.set_xlabel("personalization accuracy")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
        by.setdefault((task_label(r), r["variant"], r["seed"]), {})[r["method"]] = r
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
        tuned = seed in TUNING_SEEDS.get(task.split(" ")[0], ())
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


def finalize(
    rows: Sequence[Mapping[str, Any]], sweep_rows: Sequence[Mapping[str, Any]], out_path: Path
) -> list[dict[str, Any]]:
    """Aggregate per-seed rows and write the JSON, the markdown tables and the plot."""
    records = aggregate(rows)
    out_path.write_text(json.dumps(records, indent=2) + "\n")
    out_path.with_suffix(".md").write_text(
        render_forgetting_markdown(records)
        + "\n"
        + render_markdown(records)
        + "\n"
        + render_seed_markdown(rows)
    )
    render_plot(records, out_path.with_suffix(".png"))
    if sweep_rows:
        sweep = aggregate_sweep(sweep_rows)
        out_path.with_name(out_path.stem + "_masks.json").write_text(json.dumps(sweep, indent=2) + "\n")
        out_path.with_name(out_path.stem + "_masks.md").write_text(render_sweep_markdown(sweep))
    return records
