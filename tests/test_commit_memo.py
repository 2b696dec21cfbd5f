"""Mask commitments prepared at issue: the memo's hits are the values a fresh computation gives, misses
compute once, failures are not kept, the memo stays bounded, and a preparation that cannot be done is
left to verification (``docs/decisions/mask-commitments-at-issue.md``; the end-to-end check that the
provider's verification uses what it prepared is in ``test_e2e_exact.py``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zkunlearn.proofs.backend import EzklBackend
from zkunlearn.proofs.commit_memo import CommitmentMemo, commitment_key
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.fixedpoint import int_to_felt
from zkunlearn.provider.verification import EzklVerifier


def counting(value: str) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def compute() -> str:
        calls.append(1)
        return value

    return calls, compute


def test_a_key_is_computed_once_then_served() -> None:
    memo = CommitmentMemo()
    calls, compute = counting("point")
    assert memo.get(b"k", compute) == "point"
    assert memo.get(b"k", compute) == "point"
    assert (len(calls), memo.misses, memo.hits) == (1, 1, 1)


def test_the_least_recently_used_key_is_evicted_at_capacity() -> None:
    memo = CommitmentMemo(capacity=2)
    memo.get(b"a", lambda: "A")
    memo.get(b"b", lambda: "B")
    memo.get(b"a", lambda: "A")  # a is now the most recent
    memo.get(b"c", lambda: "C")  # evicts b
    assert len(memo) == 2
    calls, compute = counting("B")
    memo.get(b"b", compute)
    assert calls == [1]
    calls, compute = counting("C")
    memo.get(b"c", compute)
    assert calls == []


def test_a_failed_computation_is_not_kept() -> None:
    memo = CommitmentMemo()

    def broken() -> str:
        raise RuntimeError("kzg failed")

    with pytest.raises(RuntimeError, match="kzg failed"):
        memo.get(b"k", broken)
    assert len(memo) == 0
    assert memo.get(b"k", lambda: "point") == "point"


def test_concurrent_callers_of_one_key_share_one_computation() -> None:
    memo = CommitmentMemo()
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow() -> str:
        calls.append(1)
        started.set()
        release.wait(30)
        return "point"

    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(memo.get(b"k", slow)))
    first.start()
    assert started.wait(30)
    others = [threading.Thread(target=lambda: results.append(memo.get(b"k", slow))) for _ in range(4)]
    for t in others:
        t.start()
    release.set()
    for t in (first, *others):
        t.join(30)
    assert results == ["point"] * 5
    assert calls == [1]


def test_waiters_on_a_failed_computation_see_its_error() -> None:
    memo = CommitmentMemo()
    started, release = threading.Event(), threading.Event()

    def failing() -> str:
        started.set()
        release.wait(30)
        raise RuntimeError("kzg failed")

    errors: list[str] = []

    def call() -> None:
        try:
            memo.get(b"k", failing)
        except RuntimeError as exc:
            errors.append(str(exc))

    first = threading.Thread(target=call)
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=call)
    second.start()
    release.set()
    for t in (first, second):
        t.join(30)
    assert errors == ["kzg failed", "kzg failed"]


@given(
    st.lists(st.text(max_size=8), max_size=6),
    st.lists(st.text(max_size=8), max_size=6),
    st.sampled_from(["vk", "vk2"]),
)
def test_keys_differ_whenever_the_files_or_the_elements_differ(a: list[str], b: list[str], vk: str) -> None:
    key_a = commitment_key(a, Path("vk"), Path("s"), Path("srs"))
    key_b = commitment_key(b, Path(vk), Path("s"), Path("srs"))
    assert (key_a == key_b) == (a == b and vk == "vk")


@pytest.mark.ezkl
def test_a_memoised_commitment_is_what_ezkl_computes_and_other_elements_are_not_served(
    exact_published: DeletionCircuits,
) -> None:
    assert exact_published.exact is not None
    arts = exact_published.exact[1]
    files = (arts.vk, arts.settings, arts.srs.path)
    memo = CommitmentMemo()
    cached, fresh = EzklBackend(commit_memo=memo), EzklBackend()
    felts = [int_to_felt(v) for v in (3, 0, 1, 7)]
    other = [int_to_felt(v) for v in (3, 0, 1, 8)]
    first = cached.commit(felts, *files)
    assert cached.commit(felts, *files) == first == fresh.commit(felts, *files)
    assert (memo.misses, memo.hits) == (1, 1)
    assert cached.commit(other, *files) == fresh.commit(other, *files) != first
    assert memo.misses == 2


def test_a_request_the_verifier_cannot_prepare_is_logged_and_left_to_verification(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = EzklVerifier({"m1": tmp_path / "no-circuits"})
    try:
        verifier.prepare("m1", 3, b"request", b"not a mask")
        verifier.prepare("unknown-model", 3, b"request", b"not a mask")
        verifier.prepared()
        assert len(verifier.commit_memo) == 0
        assert sum("request not prepared" in r.getMessage() for r in caplog.records) == 2
    finally:
        verifier.close()
    verifier.prepare("m1", 3, b"request", b"not a mask")  # closed: nothing queued, nothing raised
