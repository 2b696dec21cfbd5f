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
from zkunlearn.bench_cli import bench_app

app = typer.Typer(
    name="zkunlearn",
    help="Verifiable machine unlearning for edge models (Group-OBS and analytic updates, ezkl/Halo2 proofs).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
provider_app = typer.Typer(help="Run and administer the provider (gRPC server, deletion requests, ledger).")
client_app = typer.Typer(help="Drive an edge client: enroll, apply deletions, prove and submit.")
audit_app = typer.Typer(help="Verify an exported bundle offline: proofs, receipts and the Merkle log.")
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
    batch: Annotated[
        int, typer.Option(help="blocks per proof (why 4: docs/decisions/blocks-per-proof.md)")
    ] = 4,
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
