"""Load benchmark: many simulated edge clients against real provider processes over loopback gRPC.

Each simulated client is the real edge SDK (``EdgeClient`` with its own key and SQLite store) that
enrolls, watches for its deletion request, submits, waits for its signed receipt and checks the
log (inclusion and consistency proofs). Three modes:

- ``real-honest`` (the command's default): every client proves its own two deletions
  (:mod:`zkunlearn.bench.load_honest`: the exact analytic head, real ezkl proofs, a share of clients
  forging their second answer), so the accept path runs at load with genuine proofs; with PostgreSQL
  the server itself is restarted once mid-run.
- ``real``: genuine ezkl proofs of the exact kinds made by a quick demo's honest clients, replayed
  (:mod:`zkunlearn.bench.load_world`: exact Group-OBS, kind 3, and the exact analytic head, kind 4).
  Each simulated client enrolls with the template's commitments and enrollment proofs (verified with
  ezkl at every Enroll, and accepted: an enrollment proof is about the committed tensors, not about
  who sends it) and replays the template's deletion proofs. A deletion proof is bound to the request
  it answers (the request digest is a public input), so a simulated client replaying it answers
  *another* request: every real-mode submission must be rejected, after a full ezkl verification
  (``proof_invalid_for_expected_commitments``). Half of them also claim a new value for one
  after-commitment: where the template's answer leaves one as enrolled (exact Group-OBS: a batch the
  mask does not touch), that one, refused by the pre-check before any proof is read (``commitment``);
  else (the analytic head) a proven one, refused by ezkl. Each rejection must carry its expected
  reason (``wrong_reasons``). This measures real verification throughput (enrollment and deletion
  proofs) and the reject path at scale; making 1,000 request-bound proofs would take hours of
  proving on this machine.
- ``synthetic``: a digest "proof" checked by :class:`.load_world.DigestVerifier` (valid unless
  tampered), so the accepting path (verdict, the client's new commitments, receipts) is exercised at
  the same scale without ezkl.

Every request the operator issues must end with exactly one receipt in the log and every receipt a
client acknowledged must be found there afterwards, also when ``kill_every_s`` SIGKILLs a random
provider replica during the run and restarts it; the log is then exported and audited offline.

    zkunlearn bench load --clients 200 --replicas 2 --backend postgres --kill-every-s 20
    zkunlearn bench load --mode real --clients 1000 --replicas 1 --backend sqlite
    zkunlearn bench load --mode synthetic --clients 1000 --replicas 2 --backend postgres
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from zkunlearn.proofs.backend import point_from_tag

from .load_honest import HonestSession, honest_session, honest_world, machine_load_sampler, plan_client
from .load_replicas import make_replicas
from .load_timing import RpcTimer, percentiles
from .load_world import (
    REPLAY_REASON,
    UNTOUCHED_CHANGED_REASON,
    Template,
    digest_checker,
    real_world,
    synthetic_world,
)

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("real-honest", "real", "synthetic")


@dataclass
class SessionResult:
    client_id: str
    request_id: str = ""
    expected: str = ""
    verdict: str = ""
    leaf_index: int = -1
    receipt: bytes = b""
    log_size_checked: int = 0
    error: str = ""
    seconds: float = 0.0
    enrolled: bool = False
    expected_reason: str = ""  # real mode: the reason code the rejection must carry


def _tamper_target(template: Template) -> tuple[int, str] | None:
    """Which after-commitment a tampered replay changes, and the reason code its refusal must carry:
    one the request leaves untouched (the template's answer kept it as enrolled; refused by the
    pre-check), else the first (a proven one; refused by ezkl). ``None`` with nothing to change."""
    enrolled = {(c["name"], c["block"]): c["point_hex"] for c in template.commitments}
    for index, c in enumerate(template.after):
        if enrolled.get((c["name"], c["block"])) == c["point_hex"]:
            return index, UNTOUCHED_CHANGED_REASON
    return (0, REPLAY_REASON) if template.after else None


class _ReplayProver:
    def __init__(self, template: Template, invalid: bool) -> None:
        self.template, self.invalid = template, invalid

    def prove(self, request: Any) -> Any:
        from zkunlearn.client.sdk import Commitment, UpdateResult

        after = [dict(c) for c in self.template.after]
        target = _tamper_target(self.template) if self.invalid else None
        if target is not None:  # claim another updated state than the one proven: it must be refused
            index = target[0]
            after[index] = {**after[index], "point_hex": point_from_tag(b"load-tampered")}
        return UpdateResult([Commitment.from_json(c) for c in after], list(self.template.proofs))


@dataclass
class LoadSettings:
    clients: int = 1000
    replicas: int = 1
    backend: str = "sqlite"
    mode: str = "real-honest"
    concurrency: int = 48
    invalid_fraction: float = 0.1
    verify_workers: int = 2
    kill_every_s: float = 0.0
    time_limit_s: float = 1800.0
    seed: int = 0
    audit: bool = True
    forge_fraction: float = 0.2  # real-honest: clients that forge their second answer
    restart_postgres: bool = True  # postgres backend: restart the server once, mid-run
    template_dir: Path | None = None  # real: the demo run to replay (default: a cached quick demo)


def run_load(settings: LoadSettings, work: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one load test and return its record (see the module docstring for what is checked)."""
    from rich.progress import Progress
    from zkunlearn.circuits.mask import Mask
    from zkunlearn.client.sdk import Commitment, EdgeClient
    from zkunlearn.client.store import ClientStore
    from zkunlearn.client.transport import ChannelConfig, Transport
    from zkunlearn.provider.models import decode_forget
    from zkunlearn.provider.server import load_signer
    from zkunlearn.provider.service import ProviderService, ServiceConfig
    from zkunlearn.provider.state import open_state

    if settings.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {settings.mode!r}")
    if settings.backend not in ("sqlite", "postgres"):
        raise ValueError(f"backend must be sqlite or postgres, got {settings.backend!r}")
    rng = random.Random(settings.seed)
    with ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zku-load-")))
        work.mkdir(parents=True, exist_ok=True)
        world: Any
        if settings.mode == "real-honest":
            world = honest_world(work)
        elif settings.mode == "synthetic":
            world = synthetic_world(work)
        else:
            world = real_world(work, settings.template_dir)
        restart_postgres: Callable[[], None] | None = None
        if settings.backend == "postgres":
            from .postgres import create_database, postgres_cluster

            cluster = stack.enter_context(postgres_cluster())
            state_url = create_database(cluster.url, "zkunlearn_load")
            if settings.restart_postgres:
                restart_postgres = cluster.restart
        else:
            state_url = str(work / "provider.db")
        replicas = make_replicas(work, world, state_url, settings.replicas, settings.verify_workers)
        for r in replicas:
            r.start()
            stack.callback(r.stop)
        signer = load_signer(world.key_file)
        operator = ProviderService(
            open_state(state_url), signer, _Refuse(), ServiceConfig(verify_workers=0, replica_id="operator")
        )
        stack.callback(operator.state.close)
        timer = RpcTimer()
        kills: list[dict[str, Any]] = []
        stop_faults = threading.Event()
        # Set when a third of the sessions are done: the first kill comes no later, so a run faster than
        # one kill interval (an idle machine, few clients) is still killed with sessions in flight.
        a_third_done = threading.Event()

        def faults() -> None:
            while True:
                wake = stop_faults if kills else a_third_done
                wake.wait(settings.kill_every_s * rng.uniform(0.5, 1.5))
                if stop_faults.is_set():
                    break
                # Prefer a replica whose verification worker holds a job: killing it mid-verification
                # is the fault that must cost a lease, never a verdict.
                holding = {
                    (s.claimed_by or "").split("/")[0]
                    for s in operator.state.pending_submissions()
                    if s.claimed_by
                }
                victim = rng.choice([r for r in replicas if r.name in holding] or replicas)
                victim.kill()
                kills.append(
                    {
                        "replica": victim.name,
                        "holding_job": victim.name in holding,
                        "at_s": round(time.monotonic() - started, 2),
                    }
                )
                victim.start()
                if restart_postgres is not None and len(kills) == 2:  # once, between two replica kills
                    restart_postgres()
                    kills.append({"postgres_restart": True, "at_s": round(time.monotonic() - started, 2)})

        sessions: list[HonestSession] = []
        load_samples: list[float] = []

        def honest(i: int) -> list[SessionResult]:
            plan = plan_client(world, np.random.default_rng(settings.seed * 100_003 + i), forge=i in forgers)
            target = f"127.0.0.1:{replicas[i % len(replicas)].port}"
            done = honest_session(i, world, plan, target, operator, signer.public_bytes(), [timer], work)
            sessions.append(done)
            return [
                SessionResult(
                    done.client_id,
                    d.request_id,
                    d.expected,
                    d.verdict,
                    d.leaf_index,
                    d.receipt,
                    done.log_size_checked,
                    done.error,
                    done.seconds / 2,
                    done.enrolled,
                )
                for d in done.deletions
            ]

        forgers = set(
            np.random.default_rng(settings.seed)
            .choice(settings.clients, size=round(settings.forge_fraction * settings.clients), replace=False)
            .tolist()
        )

        def session(i: int) -> list[SessionResult]:
            if world.mode == "real-honest":
                return honest(i)
            return [single(i)]

        def single(i: int) -> SessionResult:
            template = world.templates[i % len(world.templates)]
            # Drawn per client (not from the shared generator the sessions race for): a seed says which.
            tamper_rng = random.Random(settings.seed * 100_003 + i)
            invalid = tamper_rng.random() < (0.5 if world.mode == "real" else settings.invalid_fraction)
            cid = f"load-{i:05d}"
            # Real proofs answer the template's request, not this one: the provider must refuse them all.
            expected = "rejected" if invalid or world.mode == "real" else "accepted"
            result = SessionResult(cid, expected=expected)
            if world.mode == "real":
                tamper = _tamper_target(template) if invalid else None
                result.expected_reason = tamper[1] if tamper else REPLAY_REASON
            t0 = time.perf_counter()
            target = f"127.0.0.1:{replicas[i % len(replicas)].port}"
            # Devices retry for minutes (budget, not attempt count): a replica restarts in seconds under load.
            channel = ChannelConfig(target, call_timeout_s=120, retry_attempts=10_000, retry_budget_s=300)
            transport = Transport(channel, [timer])
            client = EdgeClient(
                transport,
                ClientStore(work / "clients" / f"{cid}.db"),
                _ReplayProver(template, invalid),
                provider_public_key=signer.public_bytes(),
                receipt_wait_s=600,
            )
            try:
                commitments = [Commitment.from_json(c) for c in template.commitments]
                client.enroll(
                    cid,
                    template.model_id,
                    template.layers,
                    template.update_kind,
                    commitments,
                    template.enrollment_proofs,
                )
                result.enrolled = True
                features, labels = decode_forget(template.forget)
                request = operator.create_request(
                    cid, Mask.from_bytes(template.mask), forget_features=features, forget_labels=labels
                )
                result.request_id = request.request_id
                outcomes = client.watch(max_requests=1, reconnect_budget_s=300)
                if outcomes:
                    result.verdict = outcomes[0].status
                    result.leaf_index = -1 if outcomes[0].leaf_index is None else outcomes[0].leaf_index
                    applied = client.store.applied(request.request_id)
                    result.receipt = applied.receipt_canonical if applied else b""
                result.log_size_checked = client.verify_log()
            except Exception as exc:  # counted and reported: a failed session is a finding, not a crash
                result.error = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                client.close()
                client.store.close()
                result.seconds = time.perf_counter() - t0
            return result

        started = time.monotonic()
        stop_sampling = threading.Event()
        sampler = threading.Thread(
            target=machine_load_sampler, args=(stop_sampling, load_samples), daemon=True
        )
        sampler.start()
        fault_thread = None
        if settings.kill_every_s > 0:
            fault_thread = threading.Thread(target=faults, daemon=True)
            fault_thread.start()
        results: list[SessionResult] = []
        with (
            Progress(disable=not progress) as bar,
            ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="sim") as pool,
        ):
            task = bar.add_task(
                f"{settings.clients} clients -> {settings.replicas} replica(s) on {settings.backend}",
                total=settings.clients,
            )
            futures = [pool.submit(session, i) for i in range(settings.clients)]
            for fut in as_completed(futures):
                results.extend(fut.result())
                bar.advance(task)
                if 3 * len(results) >= settings.clients:
                    a_third_done.set()
                if time.monotonic() - started > settings.time_limit_s:
                    for f in futures:
                        f.cancel()
                    break
        wall = time.monotonic() - started
        stop_sampling.set()
        sampler.join(30)
        stop_faults.set()
        a_third_done.set()
        if fault_thread is not None:
            fault_thread.join(60)
        for r in replicas:
            r.stop()
        record = _tally(settings, results, operator.state, timer, wall, kills)
        provider_cpu = sum(r.cpu_s for r in replicas)
        record["provider_cpu_s"] = round(provider_cpu, 1)
        record["provider_core_s_per_verdict"] = (
            round(provider_cpu / record["ledger_size"], 3) if record["ledger_size"] else None
        )
        record["machine_load_1min"] = {
            "samples": len(load_samples),
            "mean": round(sum(load_samples) / max(1, len(load_samples)), 2),
            "max": max(load_samples, default=0.0),
            "cpus": os.cpu_count(),
        }
        heads: list[tuple[str, Any]] = []
        if world.mode == "real-honest":
            record["honest"] = _honest_summary(sessions, len(forgers))
            heads = [(s.client_id, s.known_head) for s in sessions if s.known_head is not None]
        if settings.audit:
            record["audit"] = _audit(work, replicas[0].config, signer.public_bytes(), world.mode, heads)
        operator.close()
        return record


class _Refuse:
    def verify(self, job: Any) -> Any:
        raise RuntimeError("the load generator's operator does not verify proofs")


def _tally(
    settings: LoadSettings,
    results: Sequence[SessionResult],
    state: Any,
    timer: RpcTimer,
    wall: float,
    kills: list[dict[str, Any]],
) -> dict[str, Any]:
    from zkunlearn.proofs.statements import SignedStatement
    from zkunlearn.provider.state import VERDICT_PENDING

    requests = [r for r in results if r.request_id]
    acked = [r for r in results if r.verdict in ("accepted", "rejected") and r.receipt]
    found = 0
    for r in acked:
        leaf = state.get_leaf(r.leaf_index)
        found += leaf is not None and leaf.canonical == r.receipt
    leaves_per_request: dict[str, int] = defaultdict(int)
    verified_ms, created_ms = [], []
    for index in range(state.ledger_size()):
        leaf = state.get_leaf(index)
        leaves_per_request[leaf.request_id] += 1
        verified_ms.append(
            int(SignedStatement.from_wire(leaf.canonical, leaf.signature).payload["verified_ms"])
        )
        sub = state.get_submission(leaf.submission_id)
        if sub is not None:
            created_ms.append(sub.created_ms)
    unanswered = 0
    reasons: dict[str, int] = defaultdict(int)
    other_reasons: list[str] = []
    claimed_again = 0
    for r in requests:
        subs = state.submissions_for(r.request_id)
        if not subs or all(s.verdict == VERDICT_PENDING for s in subs):
            unanswered += 1
        for s in subs:
            claimed_again += max(0, s.attempts - 1)
            code = _reason_code(s.reason)
            reasons[code] += 1
            if r.expected_reason and s.verdict != VERDICT_PENDING and code != r.expected_reason:
                other_reasons.append(f"{r.client_id}: expected {r.expected_reason}, got {s.reason[:120]}")
    lost = (len(acked) - found) + unanswered
    duplicated = sum(n - 1 for n in leaves_per_request.values() if n > 1)
    verdict_span_s = (max(verified_ms) - min(created_ms)) / 1000 if verified_ms and created_ms else 0.0
    wrong = [r for r in acked if r.verdict != r.expected]
    return {
        "clients": settings.clients,
        "replicas": settings.replicas,
        "backend": settings.backend,
        "mode": settings.mode,
        "concurrency": settings.concurrency,
        "verify_workers_per_replica": settings.verify_workers,
        "requests": len(requests),
        "receipts_acked": len(acked),
        "receipts_found": found,
        "lost": lost,
        "duplicated": duplicated,
        "wrong_verdicts": len(wrong),
        # real mode: rejections whose reason is not the one expected of the replay (module docstring)
        "wrong_reasons": len(other_reasons),
        "wrong_reason_examples": other_reasons[:5],
        "enrollments_accepted": len({r.client_id for r in results if r.enrolled}),
        "verdicts": {v: sum(r.verdict == v for r in acked) for v in ("accepted", "rejected")},
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "session_errors": sorted({r.error for r in results if r.error})[:10],
        "sessions_failed": sum(bool(r.error) for r in results),
        "ledger_size": state.ledger_size(),
        "rpc_latency_ms": {name: percentiles(v) for name, v in sorted(timer.ms.items())},
        "rpc_status_counts": {name: dict(codes) for name, codes in sorted(timer.codes.items())},
        "verifications": len(verified_ms),
        "verifications_per_s": round(len(verified_ms) / verdict_span_s, 2) if verdict_span_s else None,
        "session_s": percentiles([r.seconds for r in results]),
        "wall_s": round(wall, 1),
        "kills": kills,
        "jobs_claimed_again": claimed_again,
        "log_checked_by_clients": sum(r.log_size_checked > 0 for r in results),
    }


def _reason_code(reason: str) -> str:
    """``"fc2.weight batch 49: proof_invalid_for_expected_commitments ..."`` ->
    ``"proof_invalid_for_expected_commitments"``; an accepted submission's ``""`` -> ``"ok"``."""
    code = re.sub(r"^[\w.]+ batch \d+: ", "", reason).split(" ")[0]
    return code[:80] or "ok"


def _honest_summary(sessions: Sequence[HonestSession], forgers: int) -> dict[str, Any]:
    """Per-client outcomes of a real-honest run: expected against observed verdicts, chains, proving."""
    mismatched = [
        s.client_id for s in sessions if [d.verdict for d in s.deletions] != [d.expected for d in s.deletions]
    ]
    prove = [s.prove_s for s in sessions if not s.error]
    return {
        "clients": len(sessions),
        "forging_clients": forgers,
        "deletions_per_client": 2,
        "clients_with_expected_verdicts": len(sessions) - len(mismatched),
        "clients_with_other_verdicts": mismatched[:20],
        # client id -> "expected verdicts / observed verdicts" of its two deletions, in order
        "per_client": {
            s.client_id: ",".join(d.expected for d in s.deletions)
            + " / "
            + ",".join(d.verdict or "none" for d in s.deletions)
            for s in sorted(sessions, key=lambda s: s.client_id)
        },
        "chains_intact": sum(s.chain_intact for s in sessions),
        "known_heads_audited": sum(s.known_head is not None for s in sessions),
        "last_proof_s": percentiles(prove),
    }


def _audit(
    work: Path, config: Path, public_key: bytes, mode: str, known_heads: Sequence[tuple[str, Any]] = ()
) -> dict[str, Any]:
    """Export the log and audit it offline (real modes: every proof re-verified with ezkl; every
    client's last verified tree head must be a prefix of the exported log)."""
    from zkunlearn.proofs.audit import audit_bundle, report_json
    from zkunlearn.provider.export import export_from_config

    bundle = work / "audit-bundle"
    # Synthetic proofs are digests, checked by the digest checker below: there are no circuits to export.
    export_from_config(config, bundle, without_circuits=mode == "synthetic")
    kwargs: dict[str, Any] = {}
    if mode == "synthetic":
        kwargs["proof_checker"] = digest_checker
    started = time.monotonic()
    report = report_json(
        audit_bundle(bundle, provider_public_key=public_key, known_heads=known_heads, **kwargs)
    )
    return {
        "ok": bool(report["ok"]),
        "items_checked": report.get("items_checked"),
        "failures": report.get("failures", [])[:5],
        "seconds": round(time.monotonic() - started, 1),
    }
