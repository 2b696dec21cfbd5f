"""`zkunlearn bench ...`: the benchmarks, each writing its JSON (and tables) under `bench/results/`.

Every command imports its benchmark lazily; the benchmarks' code lives in `bench/`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

bench_app = typer.Typer(help="Benchmarks that write bench/results/*.json.")

# Wide enough for tables when the output is a file or a CI log.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

RESULTS = Path("bench/results")
ALL_TASKS = "vit,mlp,code-lm"

# Options the unlearning commands share.
Tasks = Annotated[str, typer.Option(help="comma-separated tasks among vit, mlp, code-lm")]
Seeds = Annotated[int, typer.Option(help="how many consecutive seeds")]
SeedOffset = Annotated[int, typer.Option(help="first seed (e.g. only held-out seeds past the tuning ones)")]
Quick = Annotated[bool, typer.Option(help="small budgets (tests, smoke runs)")]
Workers = Annotated[int | None, typer.Option(help="seed processes at once (default: the cores)")]


@bench_app.command("proofs")
def bench_proofs(
    out: Annotated[Path, typer.Option(help="results JSON")] = Path("bench/results/proofs.json"),
    workers: Annotated[int, typer.Option(help="parallel proving processes")] = 2,
    memory_limit_mb: Annotated[int, typer.Option(help="resident-memory cap per proving worker")] = 8192,
) -> None:
    """Proof cost per circuit shape (setup, prove, verify, RSS, bytes) and one real multi-proof deletion."""
    from zkunlearn.bench.proofs import run_proofs_bench

    result = run_proofs_bench(out, workers=workers, memory_limit_mb=memory_limit_mb)
    console.print_json(json.dumps(result))


@bench_app.command("exact-proofs")
def bench_exact_proofs(
    out: Annotated[Path, typer.Option(help="results JSON")] = Path("bench/results/proofs_exact.json"),
    block: Annotated[int, typer.Option(help="weights per Group-OBS block")] = 64,
    m: Annotated[int, typer.Option(help="committed factor rows per block")] = 16,
    lam: Annotated[float, typer.Option(help="damping (made dyadic by the spec)")] = 0.001,
    batch: Annotated[int, typer.Option(help="blocks per proof")] = 8,
    proofs: Annotated[int, typer.Option(help="proofs in the throughput run")] = 6,
    workers: Annotated[int, typer.Option(help="parallel proving processes")] = 2,
) -> None:
    """The exact Group-OBS relation beside the fixed-point one (rows, seconds, memory, bytes, throughput)."""
    from zkunlearn.bench.exact import run_exact_bench

    result = run_exact_bench(out, block=block, m=m, lam=lam, batch=batch, proofs=proofs, workers=workers)
    console.print_json(json.dumps(result))


@bench_app.command("vit-deletion")
def bench_vit_deletion(
    out: Annotated[Path, typer.Option(help="results JSON")] = Path("bench/results/vit_deletion.json"),
    seed: Annotated[int, typer.Option(help="ViT task seed (12-23: held out from every choice)")] = 12,
    batch: Annotated[
        int | None,
        typer.Option(
            help="blocks per proof (default: the certified configuration's, 4); a layer whose blocks it does "
            "not divide is proven with its last batch padded by zero blocks"
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="parallel proving processes")] = 2,
    memory_limit_mb: Annotated[int, typer.Option(help="resident-memory cap per proving worker")] = 1024,
) -> None:
    """The ViT benchmark's deletion at its certified rank and damping, enrolled, proven and verified."""
    import tempfile

    from zkunlearn.bench.vit_exact import measure_vit_exact_deletion

    with tempfile.TemporaryDirectory(prefix="zkvit-") as tmp:
        result = measure_vit_exact_deletion(
            Path(tmp), seed=seed, batch=batch, workers=workers, memory_limit_mb=memory_limit_mb
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result))


@bench_app.command("certified-recovery")
def bench_certified_recovery(
    out: Annotated[Path, typer.Option(help="results JSON")] = Path(
        "bench/results/vit_certified_recovery.json"
    ),
    first_seed: Annotated[int, typer.Option(help="first ViT seed (12-23: held out from every choice)")] = 12,
    seeds: Annotated[int, typer.Option(help="how many consecutive seeds")] = 12,
    ranks: Annotated[str, typer.Option(help="comma-separated committed factor ranks m")] = "16,32",
    lam: Annotated[float | None, typer.Option(help="damping (default: the benchmark's)")] = None,
) -> None:
    """Recovery of the exact Group-OBS configuration the proofs certify, on the ViT benchmark's seeds."""
    from zkunlearn.bench.vit_exact import evaluate_certified

    result = evaluate_certified(
        seeds=range(first_seed, first_seed + seeds), ranks=[int(r) for r in ranks.split(",")], lam=lam
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result["summary"]))


@bench_app.command("exact-batches")
def bench_exact_batches(
    batches: Annotated[
        str, typer.Option(help="comma-separated blocks per proof, run one after the other")
    ] = "2,4,8",
    blocks: Annotated[int, typer.Option(help="blocks' worth of proofs sampled per batch size")] = 32,
    workers: Annotated[int, typer.Option(help="proving processes")] = 2,
    out: Annotated[Path, typer.Option(help="JSON to write")] = Path("bench/results/exact_batches.json"),
) -> None:
    """Blocks per exact Group-OBS proof side by side: the ViT deletion's layout and a sample's costs."""
    from zkunlearn.bench.exact_batches import run_batch_comparison

    result = run_batch_comparison(
        out, batches=[int(b) for b in batches.split(",")], blocks=blocks, workers=workers
    )
    console.print_json(json.dumps(result["projected"]))


@bench_app.command("fuzz")
def bench_fuzz(
    scale: Annotated[int, typer.Option(help="multiplier of every fuzz target's example bound")] = 10,
    out: Annotated[Path | None, typer.Option(help="JSON to write (default bench/results/fuzz.json)")] = None,
) -> None:
    """Run the fuzz tests at a larger scale and record how many inputs each target tried."""
    from zkunlearn.bench.fuzz_report import DEFAULT_OUT, run_fuzz_report

    raise typer.Exit(code=run_fuzz_report(scale, out or DEFAULT_OUT))


@bench_app.command("load")
def bench_load(
    clients: Annotated[
        int | None,
        typer.Option(
            help="simulated edge clients per run (default: 200 in real-honest, whose clients each prove "
            "two deletions; 1000 in the replaying modes)"
        ),
    ] = None,
    replicas: Annotated[str, typer.Option(help="comma-separated replica counts, one run each")] = "1",
    backend: Annotated[str, typer.Option(help="comma-separated backends (sqlite, postgres), one per run")] = (
        "sqlite"
    ),
    mode: Annotated[
        str,
        typer.Option(
            help="real-honest (the default: every client proves its own two deletions with real ezkl "
            "proofs, so the accept path is measured with genuine proofs: verdicts, commitment chains, "
            "receipts, a share of forgeries refused); real (replays a quick demo's genuine exact-kind "
            "enrollments and deletion proofs: every answer is bound to another request and must be "
            "refused, so it measures verification throughput and the reject path); synthetic (digest "
            "proofs, no ezkl: the service alone at scale)"
        ),
    ] = "real-honest",
    concurrency: Annotated[int, typer.Option(help="clients in flight at once")] = 48,
    invalid_fraction: Annotated[
        float, typer.Option(help="synthetic: share of clients submitting invalid proofs")
    ] = 0.1,
    forge_fraction: Annotated[
        float, typer.Option(help="real-honest: share of clients that forge their second answer")
    ] = 0.2,
    restart_postgres: Annotated[
        bool, typer.Option(help="postgres: restart the server once, mid-run (needs --kill-every-s)")
    ] = True,
    verify_workers: Annotated[int, typer.Option(help="verification threads per replica")] = 2,
    kill_every_s: Annotated[float, typer.Option(help="SIGKILL a random replica this often (0: never)")] = 0.0,
    time_limit_s: Annotated[float, typer.Option(help="stop issuing new sessions after this long")] = 1800.0,
    template_dir: Annotated[
        Path | None,
        typer.Option(
            help="real: a finished `zkunlearn demo --quick --report DIR` folder to replay "
            "(default: one quick demo run, made once and cached)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="results JSON (a .md table is written beside it)")] = Path(
        "bench/results/load.json"
    ),
    append: Annotated[bool, typer.Option(help="add to the runs already in --out")] = False,
) -> None:
    """Drive simulated edge clients (real SDK, real gRPC) against provider replicas; see --mode."""
    from zkunlearn.bench.load import MODES, LoadSettings, run_load
    from zkunlearn.bench.load_report import render_markdown, write_results
    from zkunlearn.bench.load_world import TemplateError

    if mode not in MODES:
        console.print(f"[red]error:[/red] --mode must be one of {', '.join(MODES)}, got {escape(mode)!r}")
        raise typer.Exit(code=2)
    unknown = [name for name in backend.split(",") if name not in ("sqlite", "postgres")]
    if unknown:
        console.print(f"[red]error:[/red] --backend takes sqlite or postgres, got {escape(unknown[0])!r}")
        raise typer.Exit(code=2)
    if clients is None:
        clients = 200 if mode == "real-honest" else 1000
    try:
        counts, backends = [int(r) for r in replicas.split(",")], backend.split(",")
    except ValueError:
        console.print(f"[red]error:[/red] --replicas takes comma-separated counts, got {escape(replicas)!r}")
        raise typer.Exit(code=2) from None
    if len(backends) == 1:
        backends = backends * len(counts)
    if len(backends) != len(counts):
        console.print("[red]error:[/red] give one backend, or one per replica count")
        raise typer.Exit(code=2)
    records = json.loads(out.read_text()) if append and out.exists() else []
    for count, name in zip(counts, backends, strict=True):
        settings = LoadSettings(
            clients=clients,
            replicas=count,
            backend=name,
            mode=mode,
            concurrency=concurrency,
            invalid_fraction=invalid_fraction,
            forge_fraction=forge_fraction,
            restart_postgres=restart_postgres,
            verify_workers=verify_workers,
            kill_every_s=kill_every_s,
            time_limit_s=time_limit_s,
            template_dir=template_dir,
        )
        try:
            records.append(run_load(settings))
        except TemplateError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(code=2) from exc
        write_results(records, out)
    console.print(render_markdown(records), markup=False)
    bad = [
        r
        for r in records
        if r["lost"]
        or r["duplicated"]
        or r["wrong_verdicts"]
        or r.get("wrong_reasons")
        or not r.get("audit", {}).get("ok", True)
    ]
    raise typer.Exit(code=1 if bad else 0)


@bench_app.command("unlearning")
def bench_unlearning(
    out: Annotated[Path, typer.Option(help="results JSON (tables and plot beside it)")] = RESULTS
    / "unlearning.json",
    tasks: Tasks = ALL_TASKS,
    seeds: Seeds = 3,
    seed_offset: SeedOffset = 0,
    quick: Quick = False,
    workers: Workers = None,
    sweep: Annotated[bool, typer.Option(help="run the mask-recipe sweep")] = True,
    deletions: Annotated[
        str | None,
        typer.Option(
            help="image tasks: comma-separated deletions among class, samples, person (default: class; "
            "the code LM always deletes its slice)"
        ),
    ] = None,
    skip_methods: Annotated[
        str,
        typer.Option(
            help="comma-separated methods not to run (group-obs-certified, the fine-tunes, analytic)"
        ),
    ] = "",
    naive: Annotated[bool, typer.Option(help="run the explicit-inverse reference solve (naive/ours)")] = True,
    variants: Annotated[
        str | None, typer.Option(help="comma-separated variants to run (default: each deletion's all)")
    ] = None,
) -> None:
    """Unlearning quality and update cost on the offline tasks, every method against retraining."""
    from zkunlearn.bench.unlearning import run_unlearning_bench, split
    from zkunlearn.bench.unlearning_records import render_markdown

    records = run_unlearning_bench(
        str(out),
        split(tasks),
        seeds,
        quick,
        workers,
        sweep,
        seed_offset=seed_offset,
        deletions=tuple(split(deletions)) or None,
        variants=tuple(split(variants)) or None,
        compare_naive=naive,
        skip=frozenset(split(skip_methods)),
    )
    console.print(render_markdown(records), markup=False)


@bench_app.command("unlearning-finalize")
def bench_unlearning_finalize(
    seeds_files: Annotated[
        list[Path],
        typer.Argument(help="<stem>_seeds.json files of earlier runs", exists=True, dir_okay=False),
    ],
    out: Annotated[Path, typer.Option(help="results JSON of the merged tables")] = RESULTS
    / "unlearning.json",
) -> None:
    """Rebuild the unlearning tables from stored per-seed rows (merged, e.g. one run per task)."""
    from zkunlearn.bench.unlearning import finalize_files

    console.print(finalize_files(seeds_files, out), markup=False)


@bench_app.command("unlearning-add-support-finetune")
def bench_unlearning_add_support(
    seeds_file: Annotated[
        Path,
        typer.Argument(help="a stored <stem>_seeds.json, extended in place", exists=True, dir_okay=False),
    ],
    tasks: Tasks = ALL_TASKS,
    seeds: Seeds = 3,
    seed_offset: SeedOffset = 0,
    out: Annotated[Path, typer.Option(help="results JSON of the rebuilt tables")] = RESULTS
    / "unlearning.json",
) -> None:
    """Add the support-confined fine-tune's rows to seeds run without it, then rebuild the tables."""
    from zkunlearn.bench.unlearning import add_support_rows, split

    console.print(
        add_support_rows(seeds_file, split(tasks), range(seed_offset, seed_offset + seeds), out), markup=False
    )


@bench_app.command("unlearning-tune")
def bench_unlearning_tune(
    tasks: Tasks = ALL_TASKS,
    out: Annotated[Path, typer.Option(help="writes <stem>_tuning.{json,md}")] = RESULTS / "unlearning.json",
    tune_seeds: Annotated[
        str | None, typer.Option(help="comma-separated seeds (default: the task's tuning seeds)")
    ] = None,
    curvatures: Annotated[str, typer.Option(help="comma-separated curvatures")] = "empirical,ggn",
    reconstruction_weights: Annotated[
        str | None,
        typer.Option(help="weights of the reconstruction term beside the curvature (default: setting)"),
    ] = None,
    lams: Annotated[str, typer.Option(help="comma-separated dampings")] = "0.001,0.005,0.02,0.1",
    fractions: Annotated[
        str | None, typer.Option(help="comma-separated mask fractions (default: setting)")
    ] = None,
    blocks: Annotated[str | None, typer.Option(help="comma-separated block sizes (default: setting)")] = None,
    ranks: Annotated[
        str, typer.Option(help="comma-separated factor ranks as proven (0: the whole factor)")
    ] = "0",
) -> None:
    """The hyperparameter grid on the tuning seeds only (the held-out seeds never choose a setting)."""
    from zkunlearn.bench.unlearning import split, tune

    def floats(text: str | None) -> list[float] | None:
        return [float(v) for v in split(text)] or None

    markdown = tune(
        split(tasks),
        out,
        tune_seeds=[int(v) for v in split(tune_seeds)] or None,
        fractions=floats(fractions),
        blocks=[int(v) for v in split(blocks)] or None,
        lams=[float(v) for v in split(lams)],
        curvatures=split(curvatures),
        ranks=[int(v) for v in split(ranks)],
        reconstruction_weights=floats(reconstruction_weights),
    )
    console.print(markdown, markup=False)


@bench_app.command("unlearning-diagnose")
def bench_unlearning_diagnose(
    tasks: Tasks = ALL_TASKS,
    seeds: Seeds = 3,
    seed_offset: SeedOffset = 0,
    quick: Quick = False,
    workers: Workers = None,
    out: Annotated[Path, typer.Option(help="results JSON")] = RESULTS / "unlearning_diagnosis.json",
) -> None:
    """Where Group-OBS loses accuracy, layer by layer, and curvature upper bounds for a better G."""
    from zkunlearn.bench.unlearning import split
    from zkunlearn.bench.unlearning_diagnosis import render_diagnosis_markdown, run_diagnosis

    seed_range = range(seed_offset, seed_offset + seeds)
    rows = run_diagnosis(split(tasks), seed_range, out, quick=quick, workers=workers)
    console.print(render_diagnosis_markdown(rows), markup=False)


@bench_app.command("unlearning-structures")
def bench_unlearning_structures(
    tasks: Tasks = ALL_TASKS,
    seeds: Seeds = 3,
    seed_offset: SeedOffset = 0,
    quick: Quick = False,
    workers: Workers = None,
    out: Annotated[Path, typer.Option(help="results JSON")] = RESULTS / "unlearning_structures.json",
) -> None:
    """Mask structure against touched blocks, efficacy and Group-OBS recovery."""
    from zkunlearn.bench.unlearning import split
    from zkunlearn.bench.unlearning_structures import render_structures_markdown, run_structures

    seed_range = range(seed_offset, seed_offset + seeds)
    rows = run_structures(split(tasks), seed_range, out, quick=quick, workers=workers)
    console.print(render_structures_markdown(rows), markup=False)


@bench_app.command("unlearning-structures-merge")
def bench_unlearning_structures_merge(
    runs: Annotated[
        list[Path],
        typer.Argument(help="unlearning_structures.json files of separate runs", exists=True, dir_okay=False),
    ],
    out: Annotated[Path, typer.Option(help="merged results JSON")] = RESULTS / "unlearning_structures.json",
) -> None:
    """Merge mask-structure runs (e.g. one per task) into one table."""
    from zkunlearn.bench.unlearning_structures import merge

    console.print(merge(runs, out), markup=False)
