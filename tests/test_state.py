"""One behavioural suite for every provider state backend: idempotency, replay refusal and atomicity."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from zkunlearn.provider.state import (
    VERDICT_ACCEPTED,
    VERDICT_PENDING,
    VERDICT_REJECTED,
    AlreadyAcceptedError,
    ClientRecord,
    ConflictError,
    InMemoryState,
    LeafRecord,
    NonceError,
    NotFoundError,
    PendingRequestsError,
    ProviderState,
    ReplacedEnrollment,
    RequestRecord,
    SqlState,
    StaleCommitmentsError,
    SubmissionRecord,
    TreeHeadRecord,
)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProviderState]:
    """One suite for every backend: a real PostgreSQL server on loopback for the `postgres` case."""
    st: ProviderState
    if request.param == "memory":
        st = InMemoryState()
    elif request.param == "sqlite":
        st = SqlState.sqlite(tmp_path / "p.db")
    else:
        st = SqlState(request.getfixturevalue("postgres_db_url"))
    yield st
    st.close()


def client(cid: str = "c1", key: bytes = b"k" * 32) -> ClientRecord:
    return ClientRecord(
        client_id=cid,
        public_key=key,
        model_id="m",
        layers=("fc1", "fc2"),
        update_kind=1,
        enrolled_commitments='[{"name":"theta"}]',
        current_commitments='[{"name":"theta"}]',
        enrollment_canonical=b"canon",
        enrollment_signature=b"sig",
        enrolled_ms=1,
    )


def req(rid: str, cid: str = "c1") -> RequestRecord:
    return RequestRecord(
        request_id=rid,
        client_id=cid,
        canonical=b"c-" + rid.encode(),
        signature=b"s",
        mask=b"ZKUM",
        forget=b"",
        issued_ms=10,
        expires_ms=1000,
    )


def sub(sid: str, rid: str, digest: str, cid: str = "c1") -> SubmissionRecord:
    return SubmissionRecord(
        submission_id=sid,
        request_id=rid,
        client_id=cid,
        content_digest=digest,
        proof_sha256="00" * 32,
        proof_sizes="[3]",
        proof=b"prf",
        after_commitments=f'[{{"name":"theta_after","sid":"{sid}"}}]',
        created_ms=20,
    )


def leaf(rid: str) -> LeafRecord:
    return LeafRecord(
        index=-1,
        leaf_hash=bytes(32),
        canonical=b"receipt-" + rid.encode(),
        signature=b"s",
        submission_id="",
        request_id=rid,
    )


def test_enrollment_is_idempotent_and_conflicts_are_refused(state: ProviderState) -> None:
    stored, created = state.add_client(client())
    assert created
    again, created = state.add_client(client())
    assert not created
    assert again == stored
    with pytest.raises(ConflictError, match="already enrolled"):
        state.add_client(client(key=b"x" * 32))
    assert state.get_client("c1") == stored
    assert state.get_client("nobody") is None


def test_a_rotation_replaces_the_enrollment_and_appends_its_leaf_only_from_the_named_one(
    state: ProviderState,
) -> None:
    state.add_client(client())
    named = hashlib.sha256(b"canon").hexdigest()
    rotated = dataclasses.replace(
        client(), enrollment_canonical=b"canon-2", current_commitments='[{"name":"fresh"}]'
    )
    rotation = dataclasses.replace(leaf(""), canonical=b"rotation", submission_id="re-enrollment/2")
    state.add_request(req("r1"))  # open until 1000
    with pytest.raises(PendingRequestsError, match="'r1'"):
        state.rotate_client(rotated, named, rotation, now_ms=999, refuse_pending=True)
    assert state.ledger_size() == 0
    assert state.replaced_enrollments("c1") == []
    stored, appended = state.rotate_client(rotated, named, rotation, now_ms=1001, refuse_pending=True)
    assert appended.index == 0
    assert state.get_client("c1") == stored == rotated
    # The replaced enrollment is kept as it stood, keyed by the leaf that replaced it.
    assert state.replaced_enrollments("c1") == [ReplacedEnrollment(0, client())]
    # A replay names the enrollment that is gone; an unknown client is refused too.
    with pytest.raises(ConflictError, match="no longer enrolled"):
        state.rotate_client(rotated, named, rotation, now_ms=1001, refuse_pending=False)
    with pytest.raises(NotFoundError):
        state.rotate_client(client("c9"), named, rotation, now_ms=1001, refuse_pending=False)
    assert state.ledger_size() == 1
    assert state.get_leaf(0) == appended
    assert state.replaced_enrollments("c9") == []


def test_every_replaced_enrollment_is_kept_in_log_order_and_an_interrupted_rotation_keeps_none(
    state: ProviderState,
) -> None:
    first = client()
    state.add_client(first)
    state.add_client(client("c2"))
    second = dataclasses.replace(first, enrollment_canonical=b"canon-2", current_commitments='["2"]')
    third = dataclasses.replace(first, enrollment_canonical=b"canon-3", enrollment_proofs=b'["ab"]')

    def rotate(to: ClientRecord, previous: ClientRecord, tag: str) -> LeafRecord:
        named = hashlib.sha256(previous.enrollment_canonical).hexdigest()
        rotation = dataclasses.replace(leaf(""), canonical=tag.encode(), submission_id=f"re-enrollment/{tag}")
        return state.rotate_client(to, named, rotation, now_ms=0, refuse_pending=False)[1]

    rotate(second, first, "a")
    state.add_request(req("r1"))
    state.add_submission(sub("s1", "r1", "d1"))
    state.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))  # leaf 1: the state moved on
    moved = state.get_client("c1")
    assert moved is not None

    def crash(step: str) -> None:
        raise RuntimeError(f"power cut at {step}")

    state.fault_hook = crash
    with pytest.raises(RuntimeError, match="leaf-appended"):
        rotate(third, moved, "b")
    state.fault_hook = None
    assert state.replaced_enrollments("c1") == [ReplacedEnrollment(0, first)]
    assert rotate(third, moved, "b").index == 2
    assert state.replaced_enrollments("c1") == [ReplacedEnrollment(0, first), ReplacedEnrollment(2, moved)]
    assert moved.current_commitments != second.current_commitments  # kept as it stood when replaced
    assert state.replaced_enrollments("c2") == []


def test_nonce_is_single_use_bound_to_client_and_expires(state: ProviderState) -> None:
    state.add_nonce("c1", b"n1", expires_ms=100)
    with pytest.raises(NonceError, match="another client"):
        state.consume_nonce("c2", b"n1", now_ms=50)
    state.consume_nonce("c1", b"n1", now_ms=50)
    with pytest.raises(NonceError, match="already used"):
        state.consume_nonce("c1", b"n1", now_ms=50)
    state.add_nonce("c1", b"n2", expires_ms=100)
    with pytest.raises(NonceError, match="expired"):
        state.consume_nonce("c1", b"n2", now_ms=101)
    with pytest.raises(NonceError, match="unknown"):
        state.consume_nonce("c1", b"never", now_ms=0)
    with pytest.raises(ConflictError):
        state.add_nonce("c1", b"n2", expires_ms=100)
    assert state.purge_nonces(now_ms=101) == 2
    with pytest.raises(NonceError, match="unknown"):
        state.consume_nonce("c1", b"n2", now_ms=0)


def test_concurrent_consumers_of_one_nonce_get_one_success(state: ProviderState) -> None:
    state.add_nonce("c1", b"race", expires_ms=10**12)
    wins: list[int] = []
    losses: list[str] = []
    barrier = threading.Barrier(6)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            state.consume_nonce("c1", b"race", now_ms=1)
            wins.append(i)
        except NonceError as exc:
            losses.append(str(exc))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert len(losses) == 5


def test_requests_get_per_client_cursors(state: ProviderState) -> None:
    state.add_client(client("c1"))
    state.add_client(client("c2"))
    assert state.add_request(req("r1")).cursor == 1
    assert state.add_request(req("r2")).cursor == 2
    assert state.add_request(req("q1", "c2")).cursor == 1
    with pytest.raises(ConflictError, match="already exists"):
        state.add_request(req("r1"))
    with pytest.raises(NotFoundError, match="unknown client"):
        state.add_request(req("z", "ghost"))
    assert [r.request_id for r in state.requests_after("c1", 0, 10)] == ["r1", "r2"]
    assert [r.request_id for r in state.requests_after("c1", 1, 10)] == ["r2"]
    assert [r.request_id for r in state.requests_after("c1", 0, 1)] == ["r1"]
    assert state.requests_after("c2", 1, 10) == []


def test_a_batch_of_requests_is_stored_whole_or_not_at_all(state: ProviderState) -> None:
    state.add_client(client("c1"))
    state.add_client(client("c2"))
    stored = state.add_requests([req("a1"), req("b1", "c2"), req("a2")])
    assert [(r.request_id, r.cursor) for r in stored] == [("a1", 1), ("b1", 1), ("a2", 2)]
    for bad in ([req("a3"), req("z", "ghost")], [req("a3"), req("a1")], [req("a3"), req("a3")]):
        with pytest.raises((ConflictError, NotFoundError)):
            state.add_requests(bad)
        assert state.get_request("a3") is None  # the good first record went with the bad one
    assert [r.request_id for r in state.requests_after("c1", 0, 10)] == ["a1", "a2"]
    assert state.add_request(req("a3")).cursor == 3


def test_clients_are_listed_by_model_in_id_order_and_counted(state: ProviderState) -> None:
    for cid, model in (("b", "m"), ("a", "m"), ("c", "other")):
        state.add_client(dataclasses.replace(client(cid), model_id=model))
    assert [c.client_id for c in state.list_clients()] == ["a", "b", "c"]
    assert [c.client_id for c in state.list_clients("m")] == ["a", "b"]
    assert [c.client_id for c in state.list_clients("m", after="a")] == ["b"]
    assert [c.client_id for c in state.list_clients(limit=2)] == ["a", "b"]
    assert state.list_clients("nobody") == []
    state.add_requests([req("r1", "a"), req("r2", "b")])
    state.add_submission(sub("s1", "r1", "d1", "a"))
    state.add_submission(sub("s2", "r2", "d2", "b"))
    state.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))
    summary = state.summary()
    assert (summary.clients, summary.requests, summary.answered_requests) == (3, 2, 1)
    verdicts = (summary.pending_submissions, summary.accepted_submissions, summary.rejected_submissions)
    assert verdicts == (1, 1, 0)
    assert summary.ledger_size == state.ledger_size() == 1


def _setup_request(state: ProviderState) -> None:
    state.add_client(client())
    state.add_request(req("r1"))


def test_identical_submission_is_idempotent_and_a_different_one_after_acceptance_is_refused(
    state: ProviderState,
) -> None:
    _setup_request(state)
    first, created = state.add_submission(sub("s1", "r1", "d1"))
    assert created
    assert first.verdict == VERDICT_PENDING
    again, created = state.add_submission(sub("s1-retry", "r1", "d1"))
    assert not created
    assert again.submission_id == "s1"
    with pytest.raises(NotFoundError):
        state.add_submission(sub("s9", "nope", "d9"))

    done, stored_leaf = state.finish_submission("s1", VERDICT_ACCEPTED, "ok", leaf("r1"))
    assert done.verdict == VERDICT_ACCEPTED
    assert done.leaf_index == 0
    assert stored_leaf.index == 0
    assert stored_leaf.submission_id == "s1"
    # Finishing twice (two workers) returns the stored result and appends nothing.
    twice, twice_leaf = state.finish_submission("s1", VERDICT_REJECTED, "late", leaf("r1"))
    assert twice.verdict == VERDICT_ACCEPTED
    assert twice_leaf == stored_leaf
    assert state.ledger_size() == 1

    request = state.get_request("r1")
    assert request is not None
    assert request.accepted_submission_id == "s1"
    cl = state.get_client("c1")
    assert cl is not None
    assert cl.current_commitments == sub("s1", "r1", "d1").after_commitments
    # The identical submission still answers with the first one; a new one is a replay.
    assert state.add_submission(sub("s1-again", "r1", "d1"))[0].submission_id == "s1"
    with pytest.raises(AlreadyAcceptedError, match="already answered"):
        state.add_submission(sub("s2", "r1", "d2"))


def test_rejected_submission_can_be_followed_by_a_new_one(state: ProviderState) -> None:
    _setup_request(state)
    state.add_submission(sub("s1", "r1", "d1"))
    state.finish_submission("s1", VERDICT_REJECTED, "bad proof", leaf("r1"))
    assert state.get_client("c1") == client()  # commitments untouched by a rejection
    state.add_submission(sub("s2", "r1", "d2"))
    assert [s.submission_id for s in state.pending_submissions()] == ["s2"]
    _done, lf = state.finish_submission("s2", VERDICT_ACCEPTED, "", leaf("r1"))
    assert lf.index == 1
    assert [s.submission_id for s in state.submissions_for("r1")] == ["s1", "s2"]
    assert state.pending_submissions() == []
    assert len(state.leaf_hashes()) == 2
    assert len(state.leaf_hashes(1)) == 1
    got = state.get_leaf(1)
    assert got is not None
    assert got.submission_id == "s2"
    assert state.get_leaf(2) is None


def test_two_accepted_answers_to_one_request_cannot_both_land(state: ProviderState) -> None:
    _setup_request(state)
    state.add_submission(sub("s1", "r1", "d1"))
    state.add_submission(sub("s2", "r1", "d2"))
    state.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))
    with pytest.raises(AlreadyAcceptedError):
        state.finish_submission("s2", VERDICT_ACCEPTED, "", leaf("r1"))
    # The failed transaction left no leaf and left s2 pending.
    assert state.ledger_size() == 1
    s2 = state.get_submission("s2")
    assert s2 is not None
    assert s2.verdict == VERDICT_PENDING


def test_an_answer_verified_against_a_state_that_moved_on_cannot_land(state: ProviderState) -> None:
    """Two open requests answered from the same state: once one is accepted, the other is stale."""
    _setup_request(state)
    state.add_request(req("r2"))
    enrolled = client().current_commitments
    state.add_submission(sub("s1", "r1", "d1"))
    state.add_submission(sub("s2", "r2", "d2"))
    state.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"), verified_against=enrolled)
    with pytest.raises(StaleCommitmentsError, match="changed while this answer was verified"):
        state.finish_submission("s2", VERDICT_ACCEPTED, "", leaf("r2"), verified_against=enrolled)
    # Nothing of the failed acceptance landed: no leaf, s2 pending, r2 open, r1's state kept.
    assert state.ledger_size() == 1
    s2 = state.get_submission("s2")
    assert s2 is not None
    assert s2.verdict == VERDICT_PENDING
    r2 = state.get_request("r2")
    assert r2 is not None
    assert r2.accepted_submission_id is None
    moved = state.get_client("c1")
    assert moved is not None
    assert moved.current_commitments == sub("s1", "r1", "d1").after_commitments
    # A rejection does not move the state, so it needs no check; an answer built on the new state lands.
    state.finish_submission("s2", VERDICT_REJECTED, "stale", leaf("r2"), verified_against=enrolled)
    state.add_submission(sub("s3", "r2", "d3"))
    state.finish_submission(
        "s3", VERDICT_ACCEPTED, "", leaf("r2"), verified_against=moved.current_commitments
    )
    final = state.get_client("c1")
    assert final is not None
    assert final.current_commitments == sub("s3", "r2", "d3").after_commitments


@pytest.mark.parametrize("step", ["leaf-appended", "submission-updated", "request-updated"])
def test_interrupted_finish_leaves_no_half_written_state(state: ProviderState, step: str) -> None:
    _setup_request(state)
    state.add_submission(sub("s1", "r1", "d1"))

    def boom(at: str) -> None:
        if at == step:
            raise RuntimeError(f"crash at {at}")

    state.fault_hook = boom
    with pytest.raises(RuntimeError, match="crash"):
        state.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))
    assert state.ledger_size() == 0
    s1 = state.get_submission("s1")
    assert s1 is not None
    assert s1.verdict == VERDICT_PENDING
    assert s1.leaf_index is None
    request = state.get_request("r1")
    assert request is not None
    assert request.accepted_submission_id is None
    assert state.get_client("c1") == client()
    state.fault_hook = None
    done, lf = state.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))
    assert done.verdict == VERDICT_ACCEPTED
    assert lf.index == 0


def test_tree_head_first_one_per_size_wins(state: ProviderState) -> None:
    a = TreeHeadRecord(size=3, root_hash=b"a" * 32, canonical=b"a", signature=b"sa")
    b = TreeHeadRecord(size=3, root_hash=b"b" * 32, canonical=b"b", signature=b"sb")
    assert state.add_tree_head(a) == a
    assert state.add_tree_head(b) == a
    assert state.get_tree_head(3) == a
    assert state.get_tree_head(4) is None


def test_sqlite_state_survives_reopen(tmp_path: Path) -> None:
    st = SqlState.sqlite(tmp_path / "p.db")
    _setup_request(st)
    st.add_submission(sub("s1", "r1", "d1"))
    st.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))
    st.close()
    again = SqlState.sqlite(tmp_path / "p.db")
    assert again.ledger_size() == 1
    assert again.add_request(req("r2")).cursor == 2
    again.close()


def test_sigkill_inside_a_sqlite_transaction_leaves_no_half_written_state(tmp_path: Path) -> None:
    """A real process death between the writes of one transaction, not a Python exception."""
    db = tmp_path / "p.db"
    st = SqlState.sqlite(db)
    _setup_request(st)
    st.add_submission(sub("s1", "r1", "d1"))
    st.close()
    script = textwrap.dedent(
        f"""
        import os, signal
        from zkunlearn.provider.state import SqlState, LeafRecord, VERDICT_ACCEPTED
        st = SqlState.sqlite({str(db)!r})
        def die(step):
            if step == "submission-updated":
                os.kill(os.getpid(), signal.SIGKILL)
        st.fault_hook = die
        leaf = LeafRecord(index=-1, leaf_hash=bytes(32), canonical=b"x", signature=b"s",
                          submission_id="", request_id="r1")
        st.finish_submission("s1", VERDICT_ACCEPTED, "", leaf)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    st = SqlState.sqlite(db)
    assert st.ledger_size() == 0
    s1 = st.get_submission("s1")
    assert s1 is not None
    assert s1.verdict == VERDICT_PENDING
    done, lf = st.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))
    assert lf.index == 0
    assert done.verdict == VERDICT_ACCEPTED
    st.close()
    assert os.path.exists(db)


# ------------------------------------------------------------------------------ verification job queue


def _pending(state: ProviderState, n: int) -> list[str]:
    _setup_request(state)
    ids = []
    for i in range(n):
        if i:
            state.add_request(req(f"r{i + 1}"))
        s = dataclasses.replace(sub(f"s{i}", f"r{i + 1}", f"d{i}"), created_ms=100 + i)
        state.add_submission(s)
        ids.append(s.submission_id)
    return ids


def test_claims_oldest_first_and_never_hands_a_leased_job_out_twice(state: ProviderState) -> None:
    ids = _pending(state, 3)
    first = state.claim_submissions("w1/", now_ms=1_000, lease_ms=500, limit=2)
    assert [s.submission_id for s in first] == ids[:2]
    assert all(s.claimed_by == "w1/" and s.lease_expires_ms == 1_500 and s.attempts == 1 for s in first)
    second = state.claim_submissions("w2/", now_ms=1_100, lease_ms=500, limit=5)
    assert [s.submission_id for s in second] == ids[2:]
    assert state.claim_submissions("w3/", now_ms=1_200, lease_ms=500, limit=5) == []


def test_an_expired_lease_is_claimed_again_and_counts_the_attempt(state: ProviderState) -> None:
    (sid,) = _pending(state, 1)
    assert state.claim_submissions("dead/", now_ms=1_000, lease_ms=100)[0].attempts == 1
    assert state.claim_submissions("w2/", now_ms=1_050, lease_ms=100) == []  # lease still running
    again = state.claim_submissions("w2/", now_ms=1_101, lease_ms=100)
    assert [(s.submission_id, s.claimed_by, s.attempts) for s in again] == [(sid, "w2/", 2)]


def test_finished_jobs_are_not_claimed(state: ProviderState) -> None:
    (sid,) = _pending(state, 1)
    state.claim_submissions("w1/", now_ms=1_000, lease_ms=100)
    state.finish_submission(sid, VERDICT_ACCEPTED, "", leaf("r1"))
    assert state.claim_submissions("w2/", now_ms=10_000, lease_ms=100) == []
    assert state.pending_submissions() == []


def test_release_claims_frees_only_the_named_replicas_leases(state: ProviderState) -> None:
    a, _b = _pending(state, 2)
    state.claim_submissions("replica-1/0/", now_ms=1_000, lease_ms=10_000, limit=1)
    state.claim_submissions("replica-10/0/", now_ms=1_000, lease_ms=10_000, limit=1)
    assert state.release_claims("replica-1/") == 1  # not replica-10's: prefixes end at the separator
    again = state.claim_submissions("w/", now_ms=1_001, lease_ms=10_000, limit=5)
    assert [s.submission_id for s in again] == [a]


def test_concurrent_workers_claim_disjoint_jobs(state: ProviderState) -> None:
    """Eight threads race to claim 40 jobs one at a time: every job is handed out exactly once."""
    ids = _pending(state, 40)
    got: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        while True:
            jobs = state.claim_submissions(f"w{n}/", now_ms=1_000, lease_ms=60_000, limit=1)
            if not jobs:
                return
            with lock:
                got.extend(j.submission_id for j in jobs)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(ids)


def test_concurrent_finishes_append_one_dense_log(state: ProviderState) -> None:
    """Many writers finishing different jobs at once: leaf indexes 0..n-1, each exactly once."""
    ids = _pending(state, 30)
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def writer(chunk: list[str]) -> None:
        barrier.wait()
        try:
            for sid in chunk:
                s = state.get_submission(sid)
                assert s is not None
                state.finish_submission(sid, VERDICT_REJECTED, "x", leaf(s.request_id))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(ids[n::6],)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert state.ledger_size() == 30
    indexes = sorted(s.leaf_index for s in (state.get_submission(i) for i in ids) if s is not None)
    assert indexes == list(range(30))
    assert {state.get_leaf(i).submission_id for i in range(30)} == set(ids)  # type: ignore[union-attr]
    assert len(state.leaf_hashes(30, start=10)) == 20


def test_dropped_database_connection_mid_transaction_leaves_nothing(postgres_db_url: str) -> None:
    """The server kills the writer's connection between two writes of the verdict transaction.

    PostgreSQL rolls the whole transaction back; the state must show no leaf, no verdict, no tip
    move, and the same call must then succeed on a fresh connection.
    """
    import sqlalchemy as sa

    st = SqlState(postgres_db_url, pool_pre_ping=True)
    _setup_request(st)
    st.add_submission(sub("s1", "r1", "d1"))
    killer = sa.create_engine(postgres_db_url)
    killed: list[int] = []

    def drop_connection(step: str) -> None:
        if step == "leaf-appended" and not killed:
            with killer.connect() as conn:
                pids = conn.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
                    )
                ).scalars()
                for pid in pids:
                    conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                    killed.append(pid)

    st.fault_hook = drop_connection
    done, lf = st.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))
    assert killed, "the fault was not injected"
    # The retried transaction is the only one that landed: exactly one leaf, at index 0.
    assert (lf.index, done.verdict) == (0, VERDICT_ACCEPTED)
    assert st.ledger_size() == 1
    assert st.get_request("r1").accepted_submission_id == "s1"  # type: ignore[union-attr]
    st.close()
    killer.dispose()


def test_dropped_connection_without_retry_leaves_no_partial_state(postgres_db_url: str) -> None:
    """Same drop, but every attempt is killed: the call fails cleanly and nothing was written."""
    import sqlalchemy as sa
    from sqlalchemy.exc import DBAPIError

    st = SqlState(postgres_db_url, pool_pre_ping=True)
    st.reconnect_budget_s = 2.0  # every attempt is killed: retry for 2 s, not the server-restart minute
    _setup_request(st)
    st.add_submission(sub("s1", "r1", "d1"))
    killer = sa.create_engine(postgres_db_url)

    def drop_connection(step: str) -> None:
        if step == "submission-updated":
            with killer.connect() as conn:
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND state LIKE 'idle in transaction%'"
                    )
                )

    st.fault_hook = drop_connection
    with pytest.raises(DBAPIError):
        st.finish_submission("s1", VERDICT_ACCEPTED, "", leaf("r1"))
    st.fault_hook = None
    assert st.ledger_size() == 0
    assert st.get_leaf(0) is None
    s1 = st.get_submission("s1")
    assert s1 is not None
    assert (s1.verdict, s1.leaf_index) == (VERDICT_PENDING, None)
    assert st.get_request("r1").accepted_submission_id is None  # type: ignore[union-attr]
    st.close()
    killer.dispose()


def test_a_lease_is_extended_only_by_the_worker_holding_it(state: ProviderState) -> None:
    (sid,) = _pending(state, 1)
    state.claim_submissions("w1/", now_ms=1_000, lease_ms=100)
    assert not state.extend_lease(sid, "w2/", until_ms=10_000)  # not its job
    assert state.extend_lease(sid, "w1/", until_ms=10_000)
    assert state.claim_submissions("w2/", now_ms=5_000, lease_ms=100) == []  # still held
    state.finish_submission(sid, VERDICT_ACCEPTED, "", leaf("r1"))
    assert not state.extend_lease(sid, "w1/", until_ms=20_000)  # finished: nothing to hold
