"""One behavioural suite for every provider state backend: idempotency, replay refusal and atomicity."""

from __future__ import annotations

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
    ProviderState,
    RequestRecord,
    SqlState,
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
