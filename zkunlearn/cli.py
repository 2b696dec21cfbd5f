"""The `zkunlearn` command line: one entry point for provider, client, auditor, demo and benchmarks.

Each subcommand imports its part lazily so that `zkunlearn --help` stays fast and the auditor
runs where only the proofs package is usable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from zkunlearn import operator_cli

app = typer.Typer(
    name="zkunlearn",
    help="Verifiable machine unlearning for edge models (Group-OBS and analytic updates, ezkl/Halo2 proofs).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
provider_app = typer.Typer(help="Run and administer the provider (gRPC server, deletion requests, ledger).")
client_app = typer.Typer(help="Drive an edge client: enroll, apply deletions, prove and submit.")
audit_app = typer.Typer(help="Verify an exported bundle offline: proofs, receipts and the Merkle log.")
bench_app = typer.Typer(help="Benchmarks that write bench/results/*.json.")
app.add_typer(provider_app, name="provider")
app.add_typer(client_app, name="client")
app.add_typer(audit_app, name="audit")
app.add_typer(bench_app, name="bench")
operator_cli.register(provider_app)

# Wide enough for the demo's summary table when the output is a file or a CI log.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


@provider_app.command("serve")
def provider_serve(
    config: Annotated[Path | None, typer.Option(help="TOML config file (see docs/protocol.md)")] = None,
    listen: Annotated[str | None, typer.Option(help="host:port to listen on (overrides the config)")] = None,
    port_file: Annotated[Path | None, typer.Option(help="write the bound port here once serving")] = None,
) -> None:
    """Start the provider's gRPC server; SIGINT/SIGTERM shut it down gracefully."""
    from zkunlearn.provider.server import serve_command

    raise typer.Exit(code=serve_command(config, listen, port_file))


@provider_app.command("worker")
def provider_worker(
    config: Annotated[Path | None, typer.Option(help="the provider's TOML config (same database)")] = None,
    replica_id: Annotated[str | None, typer.Option(help="stable name of this worker's leases")] = None,
) -> None:
    """Verify submissions from the shared database without serving RPCs; scale verification out."""
    from zkunlearn.provider.server import run_worker_command

    raise typer.Exit(code=run_worker_command(config, replica_id))


@provider_app.command("publish")
def provider_publish(
    model_id: Annotated[str, typer.Option(help="the model's id, as devices and deletion requests name it")],
    out: Annotated[Path, typer.Option(help="folder for the circuits (keys, settings, SRS, index)")] = Path(
        "circuits"
    ),
    block: Annotated[int, typer.Option(help="Group-OBS block size B (weights per block)")] = 64,
    rank: Annotated[int, typer.Option(help="rows m of each block's committed curvature factor")] = 16,
    batch: Annotated[int, typer.Option(help="blocks per proof")] = 8,
    lam: Annotated[float, typer.Option(help="damping of the certified update")] = 0.1,
    layer: Annotated[
        list[str] | None,
        typer.Option(help="NAME=WEIGHTS of a layer devices will enroll (checked; repeatable)"),
    ] = None,
    analytic_head: Annotated[
        str | None,
        typer.Option(help="also publish an exact analytic head: D,K,N_U (features, outputs, rows)"),
    ] = None,
    no_group_obs: Annotated[bool, typer.Option(help="publish the analytic head only")] = False,
) -> None:
    """Build a model's exact circuits and print the provider.toml lines that publish them."""
    from zkunlearn.errors import MalformedError
    from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
    from zkunlearn.proofs.exact import ExactGroupObsSpec
    from zkunlearn.provider.publish import publish_circuits

    try:
        sizes: dict[str, int] = {}
        for item in layer or []:
            name, sep, count = item.partition("=")
            if not sep or not name or not count.strip().isdigit():
                raise MalformedError(
                    f"--layer {item!r}: expected NAME=WEIGHTS, e.g. blocks.0.fc1.weight=65536"
                )
            sizes[name] = int(count)
        head = None
        if analytic_head is not None:
            parts = analytic_head.split(",")
            if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
                raise MalformedError(f"--analytic-head {analytic_head!r}: expected D,K,N_U, e.g. 8,10,4")
            head = ExactAnalyticSpec(*(int(p) for p in parts))
        spec = None if no_group_obs else ExactGroupObsSpec.from_lam(block, rank, batch, lam)
        published = publish_circuits(out, model_id, group_obs=spec, analytic=head, layers=sizes)
    except (MalformedError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    for name, batches in published.batches.items():
        console.print(f"# {name}: {batches} proof(s) per full deletion of the layer", markup=False)
    if published.insecure_srs:
        console.print(
            "# development SRS (INSECURE): put `srs_insecure = true` among provider.toml's top-level keys, "
            "or build with a ceremony SRS for production",
            markup=False,
        )
    print("\n".join(published.config_lines))


@provider_app.command("export")
def provider_export(
    config: Annotated[Path, typer.Option(help="the provider's TOML config")] = Path("provider.toml"),
    out: Annotated[Path, typer.Option(help="bundle folder to write")] = Path("audit-bundle"),
    circuits_dir: Annotated[
        Path | None, typer.Option(help="circuit artifacts folder (default: the config's [artifacts])")
    ] = None,
) -> None:
    """Write an audit bundle (log, tree heads, receipts, proofs, keys) for `zkunlearn audit verify`."""
    from zkunlearn.provider.export import BundleExportError, export_from_config
    from zkunlearn.provider.server import ConfigError

    try:
        written = export_from_config(config, out, circuits_dir=circuits_dir)
    except (BundleExportError, ConfigError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    console.print(f"audit bundle written to {written}", markup=False)


@client_app.command("run")
def client_run(
    profile: Annotated[Path, typer.Option(help="client profile JSON (scenario, provider, key, method)")],
) -> None:
    """Personalize, enroll, wait for a deletion request, apply it, prove and submit (demo scenario models).

    Your own model and data plug into the SDK directly: see docs/sdk.md.
    """
    from zkunlearn.edge import main as edge_main

    raise typer.Exit(code=edge_main(profile))


@audit_app.command("verify")
def audit_verify(
    bundle: Annotated[Path, typer.Argument(help="exported bundle folder")],
    json_output: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    provider_key: Annotated[
        str | None,
        typer.Option(help="pin the provider's Ed25519 public key (hex); else the bundle's is used"),
    ] = None,
    known_head: Annotated[
        list[Path] | None,
        typer.Option(
            help="a tree head you already hold (JSON: a signed head, or the client's {size, root}); "
            "the bundle's log must extend it, which is what reveals a truncated export (repeatable)"
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="ezkl processes verifying each submission's proofs")] = 2,
) -> None:
    """Re-verify every proof, receipt and log proof in a bundle offline; exit 0 only if all hold."""
    from zkunlearn.proofs.audit import main as audit_main

    raise typer.Exit(code=audit_main(bundle, json_output, provider_key, known_head or (), workers))


@app.command()
def demo(
    clients: Annotated[
        int,
        typer.Option(
            help="edge clients: honest Group-OBS, analytic, other-model cheat, extra-edit cheat, ..."
        ),
    ] = 3,
    quick: Annotated[bool, typer.Option(help="smallest shapes, for CI")] = False,
    report: Annotated[Path, typer.Option(help="report folder")] = Path("demo-report"),
) -> None:
    """Run the end-to-end deletion workflow on embedded defaults and write a report."""
    from zkunlearn.demo import run_demo

    run_demo(clients=clients, quick=quick, report_dir=report, console=console)


@bench_app.command("proofs")
def bench_proofs(
    out: Annotated[Path, typer.Option(help="results JSON")] = Path("bench/results/proofs.json"),
    workers: Annotated[int, typer.Option(help="parallel proving processes")] = 2,
    memory_limit_mb: Annotated[int, typer.Option(help="resident-memory cap per proving worker")] = 8192,
) -> None:
    """Proof cost per circuit shape (setup, prove, verify, RSS, bytes) and one real multi-proof deletion."""
    import json

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
    import json

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
            help="blocks per proof (default: the certified configuration's, 8); a layer whose blocks it does "
            "not divide is proven with its last batch padded by zero blocks"
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="parallel proving processes")] = 2,
    memory_limit_mb: Annotated[int, typer.Option(help="resident-memory cap per proving worker")] = 1024,
) -> None:
    """The ViT benchmark's deletion at its certified rank and damping, enrolled, proven and verified."""
    import json
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
    import json

    from zkunlearn.bench.vit_exact import evaluate_certified

    result = evaluate_certified(
        seeds=range(first_seed, first_seed + seeds), ranks=[int(r) for r in ranks.split(",")], lam=lam
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result["summary"]))


@bench_app.command("unlearning", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_unlearning(ctx: typer.Context) -> None:
    """Unlearning quality and update cost on the offline tasks (options: --tasks, --seeds, --quick, ...)."""
    from zkunlearn.bench.unlearning import main as unlearning_main

    raise typer.Exit(code=unlearning_main(list(ctx.args)))


@bench_app.command("exact-batches")
def bench_exact_batches(
    batches: Annotated[
        str, typer.Option(help="comma-separated blocks per proof, run one after the other")
    ] = ("2,8"),
    blocks: Annotated[int, typer.Option(help="blocks' worth of proofs sampled per batch size")] = 32,
    workers: Annotated[int, typer.Option(help="proving processes")] = 2,
    out: Annotated[Path, typer.Option(help="JSON to write")] = Path("bench/results/exact_batches.json"),
) -> None:
    """Blocks per exact Group-OBS proof side by side: the ViT deletion's layout and a sample's costs."""
    import json

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
    clients: Annotated[int, typer.Option(help="simulated edge clients per run")] = 1000,
    replicas: Annotated[str, typer.Option(help="comma-separated replica counts, one run each")] = "1",
    backend: Annotated[str, typer.Option(help="comma-separated backends (sqlite, postgres), one per run")] = (
        "sqlite"
    ),
    mode: Annotated[
        str,
        typer.Option(
            help="real (replayed ezkl proofs), real-honest (every client proves its own two deletions), "
            "or synthetic (digest proofs)"
        ),
    ] = "real",
    concurrency: Annotated[int, typer.Option(help="clients in flight at once")] = 48,
    invalid_fraction: Annotated[float, typer.Option(help="share of clients submitting invalid proofs")] = 0.1,
    forge_fraction: Annotated[
        float, typer.Option(help="real-honest: share of clients that forge their second answer")
    ] = 0.2,
    restart_postgres: Annotated[
        bool, typer.Option(help="postgres: restart the server once, mid-run (needs --kill-every-s)")
    ] = True,
    verify_workers: Annotated[int, typer.Option(help="verification threads per replica")] = 2,
    kill_every_s: Annotated[float, typer.Option(help="SIGKILL a random replica this often (0: never)")] = 0.0,
    time_limit_s: Annotated[float, typer.Option(help="stop issuing new sessions after this long")] = 1800.0,
    out: Annotated[Path, typer.Option(help="results JSON (a .md table is written beside it)")] = Path(
        "bench/results/load.json"
    ),
    append: Annotated[bool, typer.Option(help="add to the runs already in --out")] = False,
) -> None:
    """Drive simulated edge clients (real SDK, real gRPC, replayed proofs) against provider replicas."""
    import json

    from zkunlearn.bench.load import LoadSettings, run_load
    from zkunlearn.bench.load_report import render_markdown, write_results

    counts, backends = [int(r) for r in replicas.split(",")], backend.split(",")
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
        )
        records.append(run_load(settings))
        write_results(records, out)
    console.print(render_markdown(records), markup=False)
    bad = [
        r
        for r in records
        if r["lost"] or r["duplicated"] or r["wrong_verdicts"] or not r.get("audit", {}).get("ok", True)
    ]
    raise typer.Exit(code=1 if bad else 0)


def main() -> None:
    """Entry point: a failure is one clear line naming what went wrong, never a traceback.

    Set ZKUNLEARN_DEBUG=1 to see the traceback when reporting a bug.
    """
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        raise SystemExit(130) from None
    except Exception as error:
        if os.environ.get("ZKUNLEARN_DEBUG"):
            raise
        # The message may quote user input (paths, ids, file contents): never parse it as markup.
        console.print(f"[red]error:[/red] {type(error).__name__}: {escape(str(error))}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
