"""The load harness end to end at small scale, with SIGKILLed replicas (synthetic proofs, real otherwise).

Real provider processes, real gRPC, the real edge SDK with its own stores, a real SQLite file or
PostgreSQL server; only the proofs are digests (``DigestVerifier``) so the harness runs in seconds.
The headline figures with genuine ezkl proofs come from ``zkunlearn bench load`` (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from zkunlearn.bench.load import LoadSettings, run_load
from zkunlearn.bench.load_report import render_markdown

from zkunlearn.cli import app

pytestmark = pytest.mark.grpc


def _check(record: dict[str, object], clients: int) -> None:
    assert record["requests"] == clients
    assert record["receipts_acked"] == clients, record["session_errors"]
    assert record["receipts_found"] == clients
    assert record["lost"] == 0
    assert record["duplicated"] == 0
    assert record["wrong_verdicts"] == 0
    assert record["sessions_failed"] == 0, record["session_errors"]
    assert record["ledger_size"] == clients
    assert record["log_checked_by_clients"] == clients
    assert record["audit"]["ok"], record["audit"]  # type: ignore[index]


def test_two_replicas_on_postgres_survive_sigkills_without_losing_a_receipt(
    tmp_path: Path, postgres_url: str
) -> None:
    settings = LoadSettings(
        clients=40, replicas=2, backend="postgres", mode="synthetic", concurrency=12, kill_every_s=2.0, seed=3
    )
    record = run_load(settings, work=tmp_path, progress=False)
    _check(record, 40)
    assert record["kills"]  # a restart blocks the fault loop, so how many fit depends on the machine
    assert record["rpc_latency_ms"]["SubmitProof"]["n"] >= 40  # type: ignore[index]


def test_one_replica_on_sqlite_killed_and_restarted(tmp_path: Path) -> None:
    settings = LoadSettings(
        clients=30, replicas=1, backend="sqlite", mode="synthetic", concurrency=10, kill_every_s=1.5, seed=1
    )
    record = run_load(settings, work=tmp_path, progress=False)
    _check(record, 30)
    assert record["kills"]
    table = render_markdown([record])
    assert "| 30 | 1 | sqlite |" in table


def test_cli_writes_results_and_the_table(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ["bench", "load", "--clients", "12", "--mode", "synthetic", "--concurrency", "6"]
    args += ["--out", str(out)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    (record,) = json.loads(out.read_text())
    for key in ("clients", "replicas", "backend", "requests", "receipts_acked", "receipts_found", "lost",
                "duplicated", "rpc_latency_ms", "verifications_per_s"):  # fmt: skip
        assert key in record
    assert record["rpc_latency_ms"]["Enroll"]["p99"] >= record["rpc_latency_ms"]["Enroll"]["p50"] > 0
    assert out.with_suffix(".md").read_text().startswith("| clients |")
    refused = CliRunner().invoke(app, [*args, "--replicas", "1,2", "--backend", "sqlite,sqlite,postgres"])
    assert refused.exit_code == 2
    assert "one backend, or one per replica count" in refused.output


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--mode", "honest", "--mode must be one of real-honest, real, synthetic"),
     ("--backend", "mysql", "--backend takes sqlite or postgres, got 'mysql'"),
     ("--replicas", "two", "--replicas takes comma-separated counts, got 'two'")],
)  # fmt: skip
def test_cli_refuses_an_unknown_mode_backend_or_count_by_name(
    tmp_path: Path, option: str, value: str, named: str
) -> None:
    done = CliRunner().invoke(app, ["bench", "load", option, value, "--out", str(tmp_path / "load.json")])
    assert done.exit_code == 2
    assert named in done.output
    assert "Traceback" not in done.output
    assert not (tmp_path / "load.json").exists()


def test_real_mode_refuses_a_template_folder_without_a_finished_demo_run(tmp_path: Path) -> None:
    """No replica starts and nothing is written: the error names the folder and what it lacks."""
    unfinished = tmp_path / "demo-report"
    (unfinished / "work").mkdir(parents=True)
    (unfinished / "work" / "provider.db").write_bytes(b"")  # a demo stopped before its report
    out = tmp_path / "load.json"
    args = ["bench", "load", "--mode", "real", "--clients", "2", "--template-dir", str(unfinished)]
    done = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert done.exit_code == 2, done.output
    said = " ".join(done.output.split())  # rich wraps long lines at spaces
    assert f"{unfinished} holds no finished demo run (no report.json, work/provider.toml)" in said
    assert "Traceback" not in done.output
    assert not out.exists()


def test_a_replica_whose_port_was_taken_before_its_first_start_moves_to_another(tmp_path: Path) -> None:
    """free_port only says a port *was* free: another process can take it before the provider binds."""
    import socket

    from zkunlearn.bench.load_replicas import make_replicas
    from zkunlearn.bench.load_world import synthetic_world

    world = synthetic_world(tmp_path)
    (replica,) = make_replicas(tmp_path, world, str(tmp_path / "p.db"), 1, 0)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", replica.port))
    squatter.listen()
    taken = replica.port
    try:
        replica.start()
        assert replica.port != taken
        assert f"127.0.0.1:{replica.port}" in replica.config.read_text()
        assert int(replica.config.with_suffix(".port").read_text()) == replica.port
    finally:
        replica.stop()
        squatter.close()


@pytest.mark.ezkl
def test_real_honest_clients_are_accepted_and_forgers_rejected_through_kills_and_a_database_restart(
    tmp_path: Path, postgres_url: str
) -> None:
    """Every client proves its own two deletions with real ezkl proofs (the exact analytic head); two of
    six forge their second answer. Replicas are SIGKILLed and PostgreSQL restarted during the run."""
    settings = LoadSettings(
        clients=6,
        replicas=2,
        backend="postgres",
        mode="real-honest",
        concurrency=6,
        kill_every_s=3.0,
        forge_fraction=1 / 3,
        seed=5,
    )
    record = run_load(settings, work=tmp_path, progress=False)
    assert record["sessions_failed"] == 0, record["session_errors"]
    assert record["requests"] == 12
    assert record["lost"] == 0
    assert record["duplicated"] == 0
    assert record["wrong_verdicts"] == 0
    assert record["verdicts"] == {"accepted": 10, "rejected": 2}
    honest = record["honest"]
    assert honest["clients_with_expected_verdicts"] == 6, honest  # type: ignore[index]
    assert honest["chains_intact"] == 6  # type: ignore[index]
    per_client = honest["per_client"]  # type: ignore[index]
    assert (
        sorted(per_client.values())
        == [  # type: ignore[union-attr]
            "accepted,accepted / accepted,accepted"
        ]
        * 4
        + ["accepted,rejected / accepted,rejected"] * 2
    )
    assert honest["known_heads_audited"] == 6  # type: ignore[index]
    assert record["audit"]["ok"], record["audit"]  # type: ignore[index]
    assert any("postgres_restart" in k for k in record["kills"])  # type: ignore[union-attr]
    assert all("holding_job" in k for k in record["kills"] if "replica" in k)  # type: ignore[union-attr]
    assert record["machine_load_1min"]["samples"] >= 1  # type: ignore[index]
    assert record["provider_core_s_per_verdict"] > 0  # type: ignore[operator]
