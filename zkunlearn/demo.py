"""The end-to-end demo: the main job a newcomer runs (`make demo`).

A provider process and several edge-client processes talk real gRPC over loopback. The provider
trains (or loads from cache) the global model, compiles the exact relations' circuits and generates its
own keys on a development SRS (INSECURE, labelled so), computes the benchmark's deletion mask (no proof
budget: every touched batch is proven), and signs one request per client. The Group-OBS clients enroll
with enrollment proofs and prove the exact Group-OBS relation (update kind 3), the analytic ones the
exact analytic relation (kind 4); the provider accepts no other kind. Honest clients apply, prove and
get accepted; a client that proves from another model than it enrolled (and, from the fourth client
on, one that slips an extra edit into the unmasked weights) is rejected by the proofs. The provider's
log is then exported and audited offline. Everything lands in ``demo-report/``: ``report.json``,
``report.png`` and the audit bundle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from zkunlearn.edge import Profile
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.scenario import Scenario

CLIENT_KINDS: list[tuple[str, str]] = [
    ("group-obs", "honest"),
    ("analytic", "honest"),
    ("group-obs", "other-model"),
    ("group-obs", "extra-edit"),
    ("group-obs", "honest"),
]


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
    )


def _wait_for(path: Path, process: subprocess.Popen[bytes], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {process.returncode}; see its log in the report folder"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not get ready within {timeout_s:.0f} s")
        time.sleep(0.2)


def run_demo(*, clients: int, quick: bool, report_dir: Path, console: Console) -> dict[str, Any]:
    if clients < 2:
        raise ValueError("the demo needs at least 2 clients (one honest Group-OBS and one dishonest)")
    started = time.monotonic()
    scenario = Scenario(quick=quick)
    report_dir = Path(report_dir)
    work = report_dir / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # Honest clients first, then the cheats; --clients 3 already includes one dishonest client.
    kinds = [CLIENT_KINDS[i % len(CLIENT_KINDS)] for i in range(clients)]
    kinds = sorted(kinds, key=lambda k: (k[1] != "honest", k[0] != "group-obs", CLIENT_KINDS.index(k)))
    processes: list[subprocess.Popen[bytes]] = []
    provider: subprocess.Popen[bytes] | None = None
    try:
        with _progress(console) as progress:
            step = progress.add_task("training or loading the global model", total=None)
            scenario.global_model()
            progress.update(step, description="global model ready", total=1, completed=1)
            step = progress.add_task("computing the benchmark's deletion mask (fisher-ratio)", total=None)
            mask = scenario.deletion_mask()
            covered = len(_touched(scenario, mask)) * scenario.exact_spec.batch_weights
            progress.update(
                step,
                description=f"mask: {mask.masked_count()} weights, {covered} covered by the proofs",
                total=1,
                completed=1,
            )
            step = progress.add_task("compiling circuits and generating keys (dev SRS: INSECURE)", total=None)
            circuits = DeletionCircuits.build(
                work / "circuits",
                group_obs=None,
                analytic=None,
                exact=scenario.exact_spec,
                analytic_exact=scenario.analytic_spec,
            )
            progress.update(step, description="circuits and verifying keys ready", total=1, completed=1)

            provider, public_key = _start_provider(work, scenario, circuits.directory)
            step = progress.add_task("personalizing and enrolling edge clients", total=len(kinds))
            profiles = []
            for i, (method, behaviour) in enumerate(kinds):
                profile = Profile(
                    client_id=f"c{i}-{behaviour}",
                    method=method,
                    behaviour=behaviour,
                    client_seed=100 + i,
                    provider=f"127.0.0.1:{(work / 'provider.port').read_text().strip()}",
                    provider_public_key=public_key.hex(),
                    state_dir=str(work / "clients" / f"c{i}"),
                    result_file=str(work / "clients" / f"c{i}.json"),
                    quick=quick,
                )
                Path(profile.state_dir).mkdir(parents=True, exist_ok=True)
                profile.save(work / "clients" / f"c{i}.profile.json")
                profiles.append(profile)
            for i in range(len(profiles)):
                log = (work / "clients" / f"c{i}.log").open("wb")
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "zkunlearn.cli",
                            "client",
                            "run",
                            "--profile",
                            str(work / "clients" / f"c{i}.profile.json"),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_env(),
                    )
                )
            for profile, process in zip(profiles, processes, strict=True):
                _wait_for(Path(profile.state_dir) / "enrolled", process, profile.client_id, 900)
                progress.advance(step)

            _issue_requests(work, scenario, mask, profiles)
            step = progress.add_task(
                "clients apply, prove and submit; provider verifies", total=len(profiles)
            )
            for profile, process in zip(profiles, processes, strict=True):
                _wait_for(Path(profile.result_file), process, profile.client_id, 1800)
                process.wait(timeout=120)
                progress.advance(step)
            stop_process(provider)
            provider = None
            step = progress.add_task("exporting the log and auditing it offline", total=None)
            audit = _export_and_audit(work, circuits.directory, public_key, report_dir)
            progress.update(step, total=1, completed=1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        if provider is not None:
            stop_process(provider)
    results = [json.loads(Path(p.result_file).read_text()) for p in profiles]
    mask_report = _mask_report(scenario, mask)
    report: dict[str, Any] = {
        "complete": True,
        "quick": quick,
        "model_id": scenario.model_id,
        "srs": "development SRS generated locally (INSECURE: proofs could be forged by whoever made it)",
        "relations": {
            "group-obs": "exact Group-OBS (update kind 3, group_obs_exact), with enrollment proofs",
            "analytic": "exact analytic head (update kind 4, analytic_exact), with an enrollment proof",
        },
        "mask": mask_report,
        "clients": [_client_row(r) for r in results],
        "audit": audit,
        "wall_s": round(time.monotonic() - started, 1),
    }
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, report_dir / "report.png")
    console.print(_table(report))
    m = mask_report
    console.print(
        f"proven: exact Group-OBS (kind 3) on the benchmark's mask over {', '.join(m['layers'])}: "
        f"{m['masked_weights']} masked, {m['covered_weights']} weights covered by "
        f"{m['proofs_per_group_obs_client']} proofs per client (blocks of {m['block']}, rank {m['rank_m']}); "
        "analytic heads: exact analytic (kind 4)",
        markup=False,
    )
    verdict = "OK" if audit["ok"] else "FAIL"
    console.print(f"audit: {verdict} ({audit['items_checked']} items, {len(audit['failures'])} failures)")
    console.print(
        f"report in {report_dir / 'report.json'}, plot in {report_dir / 'report.png'}", markup=False
    )
    _check_outcome(report)
    return report


def _touched(scenario: Scenario, mask: Any) -> list[tuple[str, int]]:
    from zkunlearn.proofs.deletion import touched_batches

    return touched_batches(mask, scenario.exact_spec)


def _mask_report(scenario: Scenario, mask: Any) -> dict[str, Any]:
    """What the Group-OBS proofs cover: the planned mask, whole (no proof budget)."""
    spec = scenario.exact_spec
    options, density, class_rows = scenario.mask_recipe
    batches = _touched(scenario, mask)
    return {
        "recipe": {
            "score": options.score,
            "fraction": options.fraction_ppm / 1e6,
            "structure": options.structure,
            "block_density": density,
            "head_rows_removed_whole": sum(class_rows.values()),
        },
        "layers": list(scenario.layers),
        "masked_weights": mask.masked_count(),
        "digest": mask.digest(),
        "block": spec.block,
        "blocks_per_proof": spec.batch,
        "rank_m": spec.m,
        "lam": spec.lam,
        "proofs_per_group_obs_client": len(batches),
        "covered_weights": len(batches) * spec.batch_weights,
    }


def _env() -> dict[str, str]:
    # One BLAS thread per process: the provider and every client share the machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start_provider(
    work: Path, scenario: Scenario, circuits_dir: Path
) -> tuple[subprocess.Popen[bytes], bytes]:
    from zkunlearn.proofs.statements import StatementSigner
    from zkunlearn.provider.publish import artifact_config_lines
    from zkunlearn.provider.server import load_signer

    signer = load_signer(work / "provider.key")
    operator = StatementSigner.generate()
    operator.save(work / "operator.key")
    config = work / "provider.toml"
    config.write_text(
        "\n".join(
            [
                'listen = "127.0.0.1:0"',
                f'state = "{work / "provider.db"}"',
                f'key_file = "{work / "provider.key"}"',
                'verifier = "zkunlearn.provider.verification:from_config"',
                "submit_wait_s = 0.0",
                "watch_poll_s = 0.3",
                "srs_insecure = true",
                *artifact_config_lines(scenario.model_id, circuits_dir),
                "[operator]",
                f'public_keys = ["{operator.public_bytes().hex()}"]',
                f'key_file = "{work / "operator.key"}"',
                f"[planners.{json.dumps(scenario.model_id)}]",
                'factory = "zkunlearn.scenario:demo_planner"',
                f"quick = {str(scenario.quick).lower()}",
                f"seed = {scenario.seed}",
                "",
            ]
        )
    )
    log = (work / "provider.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zkunlearn.cli",
            "provider",
            "serve",
            "--config",
            str(config),
            "--port-file",
            str(work / "provider.port"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    _wait_for(work / "provider.port", process, "provider", 120)
    return process, signer.public_bytes()


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM (a graceful provider stop), then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()


def _issue_requests(work: Path, scenario: Scenario, mask: Any, profiles: list[Profile]) -> None:
    """The operator's action, through the running provider's Operator service: the forget class for
    the Group-OBS clients, the learned samples' ids for the analytic ones."""
    from zkunlearn.provider.config import ProviderConfig
    from zkunlearn.provider.operator import DeletionOrder
    from zkunlearn.provider.operator_client import OperatorClient
    from zkunlearn.provider.planning import ForgetSelection, MaskOptions

    config = ProviderConfig.load(work / "provider.toml")
    port = (work / "provider.port").read_text().strip()
    by_method: dict[str, tuple[str, ...]] = {}
    for profile in profiles:
        by_method[profile.method] = (*by_method.get(profile.method, ()), profile.client_id)
    selections = {
        "group-obs": ForgetSelection(forget_class=scenario.task.forget_class),
        "analytic": ForgetSelection(sample_ids=tuple(scenario.contributed_sample_ids())),
    }
    with OperatorClient.from_config(config, target=f"127.0.0.1:{port}") as operator:
        for method, client_ids in by_method.items():
            order = DeletionOrder(scenario.model_id, client_ids, selections[method], MaskOptions())
            created = operator.create_requests(order)
            if method == "group-obs" and {r.mask_sha256 for r in created.requests} != {mask.digest()}:
                raise RuntimeError("the provider's mask differs from the one the demo reports")


def _export_and_audit(work: Path, circuits_dir: Path, public_key: bytes, report_dir: Path) -> dict[str, Any]:
    from zkunlearn.proofs.audit import audit_bundle, report_json
    from zkunlearn.provider.export import export_from_config

    bundle = report_dir / "audit-bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    export_from_config(work / "provider.toml", bundle, circuits_dir=circuits_dir)
    report = audit_bundle(bundle, provider_public_key=public_key)
    data = report_json(report)
    return {
        "ok": bool(data["ok"]),
        "items_checked": int(data["items_checked"]),
        "failures": list(data["failures"]),
        "bundle": str(bundle),
    }


def _client_row(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "client_id",
        "method",
        "honest",
        "verdict",
        "reason",
        "forget_acc_before",
        "forget_acc_after",
        "personal_acc_before",
        "personal_acc_after",
        "retain_acc_before",
        "retain_acc_after",
        "probe_acc_before",
        "probe_acc_after",
        "mia_auc_before",
        "mia_auc_after",
        "prove_s",
        "proofs",
        "proof_bytes",
        "peak_rss_mb",
    )
    return {k: result.get(k) for k in keys}


def _table(report: dict[str, Any]) -> Table:
    table = Table(title=f"zkunlearn demo: {report['model_id']} ({report['wall_s']} s)")
    for column in (
        "client",
        "method",
        "honest",
        "forget acc",
        "probe acc",
        "MIA AUC",
        "personal acc",
        "prove s",
        "proof KB",
        "verdict",
    ):
        table.add_column(column)
    for c in report["clients"]:
        verdict = c["verdict"]
        colour = "green" if verdict == "accepted" else "red"
        table.add_row(
            escape(c["client_id"]),
            escape(c["method"]),
            "yes" if c["honest"] else "no",
            _before_after(c, "forget_acc"),
            _before_after(c, "probe_acc"),
            _before_after(c, "mia_auc"),
            _before_after(c, "personal_acc"),
            f"{c['prove_s']:.1f}",
            f"{c['proof_bytes'] / 1024:.1f}",
            f"[{colour}]{verdict}[/{colour}]"
            + (f": {escape(_short_reason(c['reason']))}" if verdict != "accepted" else ""),
        )
    return table


def _before_after(client: dict[str, Any], key: str) -> str:
    """``before → after`` of a metric; "–" where it is not defined (the analytic head's probe)."""
    before, after = client.get(f"{key}_before"), client.get(f"{key}_after")
    if before is None or after is None:
        return "–"
    return f"{before:.2f} → {after:.2f}"


def _short_reason(reason: str) -> str:
    """The verifier's reason code (e.g. kkt_residual_above_tolerance) out of a longer explanation."""
    found = re.search(r"[a-z]+(?:_[a-z]+)+", reason)
    return found.group(0) if found else reason[:40]


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = report["clients"]
    names = [f"{c['client_id']}\n({c['method']})" for c in clients]
    x = np.arange(len(clients))
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(14, 4.5), width_ratios=(2, 1))
    metrics: tuple[tuple[str, str], ...] = (
        ("forget_acc", "forget acc"),
        ("probe_acc", "probe acc"),
        ("mia_auc", "MIA AUC"),
        ("personal_acc", "personal acc"),
    )
    width = 0.1
    for i, (key, label) in enumerate(metrics):
        offset = (2 * i - len(metrics)) * width
        for j, when in enumerate(("before", "after")):
            # An undefined value (the analytic head's probe) draws no bar.
            values = [np.nan if c.get(f"{key}_{when}") is None else c[f"{key}_{when}"] for c in clients]
            ax_acc.bar(
                x + offset + j * width,
                values,
                width,
                color=f"C{i}",
                alpha=0.4 if when == "before" else 1.0,
                label=label if when == "after" else None,
            )
    ax_acc.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax_acc.set_ylim(0, 1.15)
    ax_acc.set_ylabel("light: before, dark: after the deletion")
    ax_acc.set_title("forgetting and utility (MIA 0.5: no membership signal)", fontsize=10)
    ax_acc.legend(fontsize=7, ncol=4, loc="upper center")
    colours = ["tab:green" if c["verdict"] == "accepted" else "tab:red" for c in clients]
    ax_time.bar(x, [c["prove_s"] for c in clients], color=colours)
    ax_time.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax_time.set_ylabel("proving time (s)")
    ax_time.set_title("proof time (green: accepted, red: rejected)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_outcome(report: dict[str, Any]) -> None:
    """The demo's promise: honest accepted, dishonest rejected, audit OK. Anything else is a failure."""
    wrong = [c["client_id"] for c in report["clients"] if (c["verdict"] == "accepted") != bool(c["honest"])]
    if wrong or not report["audit"]["ok"]:
        raise RuntimeError(
            f"demo outcome wrong: unexpected verdicts for {wrong}; audit ok={report['audit']['ok']}"
        )
