"""Unlearning benchmark: Group-OBS (alone and with the output refit) against mask-only, mask + fine-tune,
analytic and retrain-from-scratch.

For each task and seed: train the provider's global model (and the gold model without the forget set),
compute the provider's deletion mask on the global model, personalize both on the client's data, then
apply every method to the client's personalized model and measure forgetting, utility and MIA. Seeds
run as separate single-threaded processes, so the wall time shrinks with the cores available while the
CPU time stays what one thread would spend.

    zkunlearn bench unlearning --seeds 3 --workers 2
    zkunlearn bench unlearning-finalize bench/results/unlearning_seeds.json      # re-render tables
    zkunlearn bench unlearning --tasks vit --seeds 6 --no-sweep --out a/vit.json  # one run per task ...
    zkunlearn bench unlearning-finalize a/vit_seeds.json a/lm_seeds.json         # ... merged into one table
    zkunlearn bench unlearning-tune --tasks vit --curvatures empirical,ggn --fractions 0.24,0.32,0.40

Hyperparameters (``SETTINGS``) were tuned on ``TUNING_SEEDS`` only, with ``tuning_sweep``
(``unlearning-tune``; the grids in ``bench/results/unlearning_*tuning.md``); the per-seed table in
``unlearning.md`` marks those seeds and gives the mean recovery over the held-out ones separately.
Which run produced which stored rows, and what else ran beside it, is in
``bench/results/unlearning.provenance.md``. ``group-obs-certified`` is the configuration the exact
proofs certify (``SETTINGS[task].certified``); ``group-obs`` is the unproven full-rank update at the
task's own damping. ``unlearning-structures`` (``bench/unlearning_structures.py``) compares mask
structures: touched blocks, efficacy and Group-OBS recovery. ``unlearning_masks.*``, the mask-recipe
sweep, measures the global model only. ``unlearning-diagnose`` runs ``bench/unlearning_diagnosis.py``:
where the unrecovered accuracy is lost, layer by layer, and what curvatures no client could commit
before a request would give (upper bounds for a better G). The command lines are in
``zkunlearn/bench_cli.py``; this module holds what they call.

The benchmark's parts live beside this module: ``unlearning_settings`` (tasks, methods,
``SETTINGS``), ``unlearning_data`` (``prepare``), ``unlearning_masks``, ``unlearning_methods``,
``unlearning_metrics``, ``unlearning_runner`` (``run_job`` and the process pool), ``unlearning_records``
(aggregation, tables, plots) and ``unlearning_tuning`` (``unlearning-tune``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zkunlearn.bench.unlearning_data import prepare
from zkunlearn.bench.unlearning_masks import make_mask
from zkunlearn.bench.unlearning_methods import client_fisher_data, group_obs
from zkunlearn.bench.unlearning_metrics import evaluate, measured
from zkunlearn.bench.unlearning_records import finalize, render_markdown, render_tuning_markdown
from zkunlearn.bench.unlearning_runner import add_support_finetune, run_unlearning_bench
from zkunlearn.bench.unlearning_settings import SETTINGS, TUNING_SEEDS
from zkunlearn.bench.unlearning_tuning import tuning_sweep

# The command line, and the building blocks other benchmarks take from the benchmark's entry module.
__all__ = [
    "SETTINGS",
    "add_support_rows",
    "client_fisher_data",
    "evaluate",
    "finalize_files",
    "group_obs",
    "make_mask",
    "measured",
    "prepare",
    "run_unlearning_bench",
    "split",
    "tune",
]


def split(text: str | None) -> list[str]:
    """A comma-separated command-line list (empty for ``None`` or "")."""
    return [v for v in (text or "").split(",") if v]


def finalize_files(paths: Sequence[Path], out: Path) -> str:
    """Rebuild the tables from stored ``<stem>_seeds.json`` files (merged, e.g. one run per task)."""
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    for path in paths:
        blob = json.loads(Path(path).read_text())
        rows.extend(blob["rows"])
        sweep_rows.extend(blob["sweep"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return render_markdown(finalize(rows, sweep_rows, out))


def add_support_rows(seeds_json: Path, tasks: Sequence[str], seeds: range, out: Path) -> str:
    """Add the support-confined fine-tune's rows to a stored ``<stem>_seeds.json`` in place (seeds run
    before that method existed), then rebuild the tables."""
    blob = json.loads(seeds_json.read_text())
    for task in tasks:
        blob["rows"].extend(add_support_finetune(blob["rows"], task, seeds))
    seeds_json.write_text(json.dumps(blob, indent=1) + "\n")
    return render_markdown(finalize(blob["rows"], blob["sweep"], out))


def tune(
    tasks: Sequence[str],
    out: Path,
    *,
    tune_seeds: Sequence[int] | None,
    fractions: Sequence[float] | None,
    blocks: Sequence[int] | None,
    lams: Sequence[float],
    curvatures: Sequence[str],
    ranks: Sequence[int],
    reconstruction_weights: Sequence[float] | None,
) -> str:
    """The tuning grid on each task's tuning seeds; writes ``<stem>_tuning.{json,md}`` beside ``out``.
    A grid axis left ``None`` takes the task's setting."""
    rows: list[dict[str, Any]] = []
    for task in tasks:
        st = SETTINGS[task]
        rows += tuning_sweep(
            task,
            list(tune_seeds) if tune_seeds else TUNING_SEEDS[task],
            list(fractions) if fractions else [st.mask.fraction],
            list(blocks) if blocks else [st.block_size],
            list(lams),
            curvatures=list(curvatures),
            ranks=list(ranks),
            reconstruction_weights=(
                list(reconstruction_weights) if reconstruction_weights else [st.reconstruction_weight]
            ),
        )
    stem = Path(out).with_suffix("")
    Path(f"{stem}_tuning.json").write_text(json.dumps(rows, indent=1) + "\n")
    markdown = render_tuning_markdown(rows)
    Path(f"{stem}_tuning.md").write_text(markdown)
    return markdown
