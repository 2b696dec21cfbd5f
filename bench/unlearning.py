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
the grids in ``bench/results/unlearning_*tuning.md``); the per-seed table in ``unlearning.md`` marks
those seeds and gives the mean recovery over the held-out ones separately. Which run produced which
stored rows, and what else ran beside it, is in ``bench/results/unlearning.provenance.md``.
``group-obs-certified`` is the configuration the exact proofs certify (``SETTINGS[task].certified``);
``group-obs`` is the unproven full-rank update at the task's own damping.
``--structures`` (``bench/unlearning_structures.py``) compares mask structures: touched blocks,
efficacy and Group-OBS recovery. ``unlearning_masks.*``, the mask-recipe sweep, is kept from an earlier run
on a 16-core machine, on the models trained there (it measures the global model only), except its
code-LM rows (the latest code-LM run). ``--diagnose`` runs
``bench/unlearning_diagnosis.py``: where the unrecovered accuracy is lost, layer by layer, and what
curvatures no client could commit before a request would give (upper bounds for a better G).

The benchmark's parts live beside this command line: ``unlearning_settings`` (tasks, methods,
``SETTINGS``), ``unlearning_data`` (``prepare``), ``unlearning_masks``, ``unlearning_methods``,
``unlearning_metrics``, ``unlearning_runner`` (``run_job`` and the process pool), ``unlearning_records``
(aggregation, tables, plots) and ``unlearning_tuning`` (``--tune``).
"""

from __future__ import annotations

import argparse
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
from zkunlearn.bench.unlearning_settings import RESULTS, SETTINGS, TASKS, TUNING_SEEDS
from zkunlearn.bench.unlearning_tuning import tuning_sweep

# The command line, and the building blocks other benchmarks take from the benchmark's entry module.
__all__ = [
    "SETTINGS",
    "client_fisher_data",
    "evaluate",
    "group_obs",
    "main",
    "make_mask",
    "measured",
    "prepare",
]


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
        "--deletions",
        default=None,
        help="image tasks: comma-separated deletions among class,samples,person (default: class; "
        "the code LM always deletes its slice)",
    )
    parser.add_argument(
        "--skip-methods",
        default="",
        help="comma-separated methods not to run (group-obs-certified, the fine-tunes, analytic)",
    )
    parser.add_argument(
        "--no-naive", action="store_true", help="skip the explicit-inverse reference solve (naive/ours)"
    )
    parser.add_argument(
        "--variants", default=None, help="comma-separated variants to run (default: each deletion's all)"
    )
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
            deletions=tuple(args.deletions.split(",")) if args.deletions else None,
            variants=tuple(args.variants.split(",")) if args.variants else None,
            compare_naive=not args.no_naive,
            skip=frozenset(m for m in args.skip_methods.split(",") if m),
        )
    print(render_markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
