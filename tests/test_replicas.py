"""Several provider replicas and stand-alone verification workers on one database.

Each replica is a full ProviderService (its own ledger mirror, its own workers) over the same SQL
state, as separate processes would be; the stand-alone worker runs as a real subprocess through
the CLI. What must hold: every job verified once, one dense log that every replica sees the same
way (same root for the same size, consistent heads), and a worker killed while holding a job
delays it by one lease only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from zkunlearn.proofs.statements import StatementSigner
from zkunlearn.proofs.transparency import leaf_hash, verify_consistency, verify_inclusion
from zkunlearn.provider.service import ProviderService, ServiceConfig
from zkunlearn.provider.state import VERDICT_ACCEPTED, VERDICT_PENDING, VERDICT_REJECTED, SqlState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS, FakeVerifier  # noqa: E402
from tests.test_service import Device, mask  # noqa: E402


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+pysqlite:///{tmp_path / 'shared.db'}"
    else:
        yield request.getfixturevalue("postgres_db_url")


def _replica(
    url: str, signer: StatementSigner, name: str, workers: int, delay_s: float = 0.0
) -> ProviderService:
    config = ServiceConfig(
        update_kinds=ALL_KINDS, replica_id=name, verify_workers=workers, verify_poll_s=0.05
    )
    return ProviderService(SqlState(url), signer, FakeVerifier(delay_s=delay_s), config)


def test_two_replicas_verify_each_job_once_and_agree_on_one_log(db_url: str) -> None:
    signer = StatementSigner.generate()
    a = _replica(db_url, signer, "replica-a", workers=2, delay_s=0.01)
    b = _replica(db_url, signer, "replica-b", workers=2, delay_s=0.01)
    replicas = (a, b)
    devices = [Device(replicas[i % 2], client_id=f"dev-{i}") for i in range(24)]
    for d in devices:
        d.enroll()
    subs: list[str] = []
    lock = threading.Lock()

    def client(i: int, d: Device) -> None:
        # Requests issued by one replica, the upload taken by the other, the verdict awaited on either.
        issuer, uploader = replicas[i % 2], replicas[(i + 1) % 2]
        r = issuer.create_request(d.client_id, mask())
        d.service = uploader
        after, proofs = d.proof(r.request_id, tamper=(i % 5 == 0))
        s = uploader.submit(d.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
        with lock:
            subs.append(s.submission_id)

    threads = [threading.Thread(target=client, args=(i, d)) for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    verdicts = {sid: a.wait(sid, 30).verdict for sid in subs}
    assert len(verdicts) == 24
    assert VERDICT_PENDING not in verdicts.values()
    assert sum(v == VERDICT_REJECTED for v in verdicts.values()) == 5  # the tampered ones, i % 5 == 0
    # Each job was verified by exactly one worker of one replica.
    jobs_a, jobs_b = a.verifier.jobs, b.verifier.jobs  # type: ignore[attr-defined]
    assert len(jobs_a) + len(jobs_b) == 24
    assert not set(jobs_a) & set(jobs_b)
    # One dense log, seen identically from both replicas.
    head_a, head_b = a.tree_head(), b.tree_head()
    assert head_a.size == head_b.size == 24
    assert head_a.root_hash == head_b.root_hash
    indexes = sorted(a.state.get_submission(sid).leaf_index for sid in subs)  # type: ignore[union-attr,type-var]
    assert indexes == list(range(24))
    for i in (0, 11, 23):
        lf = b.state.get_leaf(i)
        assert lf is not None
        verify_inclusion(leaf_hash(lf.canonical), i, 24, a.inclusion_proof(i, 24), head_b.root_hash)
    # A head signed earlier by one replica is consistent with the later one from the other.
    early = a.ledger.tree_head(10)
    verify_consistency(10, 24, early.root_hash, head_b.root_hash, b.consistency_proof(10, 24))
    for r in replicas:
        r.close()
        r.state.close()


def test_a_replica_that_verifies_nothing_hands_every_job_to_the_others(db_url: str) -> None:
    signer = StatementSigner.generate()
    front = _replica(db_url, signer, "front", workers=0)
    back = _replica(db_url, signer, "back", workers=1)
    d = Device(front)
    d.enroll()
    r = front.create_request(d.client_id, mask())
    after, proofs = d.proof(r.request_id)
    s = front.submit(d.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
    assert front.wait(s.submission_id, 20).verdict == VERDICT_ACCEPTED
    assert front.verifier.jobs == []  # type: ignore[attr-defined]
    assert back.verifier.jobs == [r.request_id]  # type: ignore[attr-defined]
    for x in (front, back):
        x.close()
        x.state.close()


def _worker_config(tmp: Path, url: str, key: Path) -> Path:
    cfg = tmp / "worker.toml"
    cfg.write_text(
        f'state = "{url}"\nkey_file = "{key}"\nverifier = "tests.fakes:make_verifier"\n'
        "[limits]\nverify_workers = 1\nverify_lease_s = 2.0\nverify_poll_s = 0.05\n"
    )
    return cfg


def _start_worker(cfg: Path, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "zkunlearn.cli", "provider", "worker"]
    return subprocess.Popen(
        [*command, "--config", str(cfg), "--replica-id", name],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_stand_alone_worker_process_verifies_and_a_killed_one_loses_only_its_lease(
    tmp_path: Path, postgres_db_url: str
) -> None:
    """A worker SIGKILLed mid-verification: after its lease (2 s) another worker finishes the job."""
    key = tmp_path / "provider.key"
    signer = StatementSigner.generate()
    signer.save(key)
    front = _replica(postgres_db_url, signer, "front", workers=0)
    d = Device(front)
    d.enroll()
    cfg = _worker_config(tmp_path, postgres_db_url, key)
    slow_flag = tmp_path / "slow"
    slow_flag.write_text("1")
    marker = tmp_path / "verifying"
    doomed = _start_worker(
        cfg, "doomed", {"ZKU_FAKE_VERIFY_SLOW_FILE": str(slow_flag), "ZKU_FAKE_VERIFY_MARKER": str(marker)}
    )
    try:
        r = front.create_request(d.client_id, mask())
        after, proofs = d.proof(r.request_id)
        s = front.submit(d.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), doomed.communicate(timeout=5)[0].decode()
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        held = front.state.get_submission(s.submission_id)
        assert held is not None
        assert (held.verdict, held.claimed_by, held.attempts) == (VERDICT_PENDING, "doomed/0/", 1)
        slow_flag.unlink()
        healthy = _start_worker(cfg, "healthy", {})
        try:
            done = front.wait(s.submission_id, 60)
            assert done.verdict == VERDICT_ACCEPTED
            assert (done.claimed_by, done.attempts) == ("healthy/0/", 2)
            assert front.tree_head().size == 1
        finally:
            healthy.send_signal(signal.SIGTERM)
            out = healthy.communicate(timeout=30)[0].decode()
        assert healthy.returncode == 0, out
    finally:
        if doomed.poll() is None:
            doomed.kill()
        front.close()
        front.state.close()


def test_a_job_that_keeps_killing_its_workers_is_finished_as_rejected(tmp_path: Path) -> None:
    """Three claims that never finished (the workers died): the next claim gives up with a reason."""
    signer = StatementSigner.generate()
    url = f"sqlite+pysqlite:///{tmp_path / 'p.db'}"
    front = _replica(url, signer, "front", workers=0)
    d = Device(front)
    d.enroll()
    r = front.create_request(d.client_id, mask())
    after, proofs = d.proof(r.request_id)
    s = front.submit(d.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
    for n in range(3):
        assert front.state.claim_submissions(f"dead-{n}/", now_ms=10 * n, lease_ms=1)  # expires at once
    back = _replica(url, signer, "back", workers=1)
    done = back.wait(s.submission_id, 20)
    assert done.verdict == VERDICT_REJECTED
    assert "did not complete in 3 attempts" in done.reason
    assert back.verifier.jobs == []  # type: ignore[attr-defined]
    assert back.tree_head().size == 1  # the give-up is a signed receipt in the log like any verdict
    for x in (front, back):
        x.close()
        x.state.close()


def test_a_verification_longer_than_the_lease_is_not_taken_twice(tmp_path: Path) -> None:
    """The worker extends its lease while verifying, so an idle replica never steals the job."""
    signer = StatementSigner.generate()
    url = f"sqlite+pysqlite:///{tmp_path / 'p.db'}"
    config = ServiceConfig(
        update_kinds=ALL_KINDS, replica_id="slow", verify_workers=1, verify_poll_s=0.05, verify_lease_s=0.3
    )
    slow = ProviderService(SqlState(url), signer, FakeVerifier(delay_s=1.5), config)
    d = Device(slow)
    d.enroll()
    r = slow.create_request(d.client_id, mask())
    after, proofs = d.proof(r.request_id)
    s = slow.submit(d.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
    deadline = time.monotonic() + 20
    while not slow.verifier.jobs and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.02)
    thief_config = ServiceConfig(
        update_kinds=ALL_KINDS, replica_id="idle", verify_workers=2, verify_poll_s=0.05, verify_lease_s=0.3
    )
    thief = ProviderService(SqlState(url), signer, FakeVerifier(), thief_config)
    done = thief.wait(s.submission_id, 20)
    assert done.verdict == VERDICT_ACCEPTED
    assert (done.claimed_by, done.attempts) == ("slow/0/", 1)
    assert thief.verifier.jobs == []  # type: ignore[attr-defined]
    for x in (slow, thief):
        x.close()
        x.state.close()
