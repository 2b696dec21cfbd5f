"""The provider's protocol logic without a network: enrollment, per-RPC auth, requests, submissions."""

from __future__ import annotations

import hashlib
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zkunlearn.circuits.mask import Mask
from zkunlearn.proofs.backend import point_from_tag
from zkunlearn.proofs.statements import (
    DOMAIN_ENROLLMENT,
    DOMAIN_RECEIPT,
    DOMAIN_RPC_AUTH,
    StatementSigner,
    check_tree_head,
)
from zkunlearn.proofs.transparency import leaf_hash, verify_consistency, verify_inclusion
from zkunlearn.proofs.verify_pool import VerifierCrashedError
from zkunlearn.provider.service import (
    AlreadyExistsError,
    AuthInput,
    CommitmentRef,
    EnrollmentInput,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundServiceError,
    PermissionDeniedError,
    ProviderService,
    ResourceExhaustedError,
    ServiceConfig,
    SubmissionHeader,
    TensorData,
    UnauthenticatedError,
)
from zkunlearn.provider.state import (
    VERDICT_ACCEPTED,
    VERDICT_PENDING,
    VERDICT_REJECTED,
    InMemoryState,
    ProviderState,
    SqlState,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fakes import ALL_KINDS, BLOCKS, FakeVerifier, _transcript, after_for

POINT = point_from_tag(b"many")
BEFORE = [
    CommitmentRef("theta", 0, point_from_tag(b"theta")),
    CommitmentRef("gradient_factor", 0, point_from_tag(b"g")),
]


def mask() -> Mask:
    dense = np.zeros((4, 8), dtype=bool)
    dense[1, 2] = dense[3, 7] = True
    return Mask.from_dense({"fc1": dense}, block_size=16)


class Device:
    """What a client does, written against the service API directly."""

    def __init__(self, service: ProviderService, client_id: str = "dev-1", kind: int = 1) -> None:
        self.service = service
        self.client_id = client_id
        self.kind = kind
        self.signer = StatementSigner.generate()

    def enrollment(self, **change: Any) -> EnrollmentInput:
        fields: dict[str, Any] = {
            "client_id": self.client_id,
            "public_key": self.signer.public_bytes().hex(),
            "model_id": "m1",
            "layers": ["fc1"],
            "update_kind": self.kind,
            "commitments": [c.to_json() for c in BEFORE],
        }
        st = self.signer.sign(DOMAIN_ENROLLMENT, fields)
        values: dict[str, Any] = {
            "version": 1,
            "client_id": self.client_id,
            "public_key": self.signer.public_bytes(),
            "model_id": "m1",
            "layers": ("fc1",),
            "update_kind": self.kind,
            "commitments": tuple(BEFORE),
            "canonical": st.canonical,
            "signature": st.signature,
        }
        values.update(change)
        return EnrollmentInput(**values)

    def enroll(self) -> None:
        self.service.enroll(self.enrollment())

    def auth(
        self, rpc: str, fields: dict[str, Any], signer: StatementSigner | None = None, as_id: str = ""
    ) -> AuthInput:
        nonce, _ = self.service.challenge(self.client_id)
        claimed = as_id or self.client_id
        st = (signer or self.signer).sign(
            DOMAIN_RPC_AUTH, {"client_id": claimed, "rpc": rpc, "nonce": nonce.hex(), **fields}
        )
        return AuthInput(claimed, nonce, st.canonical, st.signature)

    def proof(self, request_id: str, tamper: bool = False) -> tuple[list[CommitmentRef], list[bytes]]:
        req = self.service.state.get_request(request_id)
        assert req is not None
        client = self.service.state.get_client(self.client_id)
        assert client is not None
        import json

        before = json.loads(client.current_commitments)
        after = after_for(before, request_id)
        proofs = [_transcript(req.canonical, req.mask, before, after, i) for i in range(BLOCKS)]
        if tamper:
            proofs[1] = proofs[1][::-1]
        return [CommitmentRef(**c) for c in after], proofs

    def header(
        self, request_id: str, after: list[CommitmentRef], proofs: list[bytes], **change: Any
    ) -> SubmissionHeader:
        blob = b"".join(proofs)
        fields = {
            "request_id": request_id,
            "update_kind": self.kind,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "total_bytes": len(blob),
            "proof_sizes": [len(p) for p in proofs],
            "after_commitments": [c.to_json() for c in after],
        }
        auth = change.pop("auth", None) or self.auth("SubmitProof", fields)
        values: dict[str, Any] = {
            "version": 1,
            "request_id": request_id,
            "client_id": self.client_id,
            "update_kind": self.kind,
            "after_commitments": tuple(after),
            "proof_sizes": tuple(len(p) for p in proofs),
            "total_bytes": len(blob),
            "sha256": fields["sha256"],
            "auth": auth,
        }
        values.update(change)
        return SubmissionHeader(**values)

    def submit(self, request_id: str, tamper: bool = False) -> Any:
        after, proofs = self.proof(request_id, tamper)
        sub = self.service.submit(self.header(request_id, after, proofs), iter([b"".join(proofs)]))
        return self.service.wait(sub.submission_id, 10)


@pytest.fixture(params=["memory", "sqlite"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProviderState]:
    st: ProviderState = InMemoryState() if request.param == "memory" else SqlState.sqlite(tmp_path / "p.db")
    yield st
    st.close()


@pytest.fixture
def service(state: ProviderState) -> Iterator[ProviderService]:
    svc = ProviderService(
        state,
        StatementSigner.generate(),
        FakeVerifier(),
        # Tests here ask for many nonces at once; the challenge limits have their own test.
        ServiceConfig(
            update_kinds=ALL_KINDS, model_ids=("m1",), max_proof_bytes=4096, challenge_rate_per_subject=0.0
        ),
    )
    yield svc
    svc.close()


def test_full_cycle_gives_a_signed_receipt_in_a_verifiable_log(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    r1 = service.create_request(dev.client_id, mask())
    done = dev.submit(r1.request_id)
    assert done.verdict == VERDICT_ACCEPTED
    view = service.receipt(r1.request_id, dev.client_id)
    assert view.leaf is not None
    payload = service.signer.verifier().verify((view.leaf.canonical, view.leaf.signature), DOMAIN_RECEIPT)
    assert payload["verdict"] == "accepted"
    assert payload["before_commitments"] == [c.to_json() for c in BEFORE]
    head1 = check_tree_head(
        service.signer.verifier(), (service.tree_head().canonical, service.tree_head().signature)
    )
    # Second request starts from the first one's after-commitments.
    r2 = service.create_request(dev.client_id, mask())
    assert dev.submit(r2.request_id).verdict == VERDICT_ACCEPTED
    th = service.tree_head()
    head2 = check_tree_head(service.signer.verifier(), (th.canonical, th.signature))
    assert head2.size == 2
    verify_consistency(1, 2, head1.root, head2.root, service.consistency_proof(1, 2))
    leaf = service.receipt(r2.request_id, dev.client_id).leaf
    assert leaf is not None
    verify_inclusion(
        leaf_hash(leaf.canonical), leaf.index, 2, service.inclusion_proof(leaf.index, 2), head2.root
    )


def test_tampered_proof_is_rejected_with_a_receipt_and_a_retry_can_succeed(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    r = service.create_request(dev.client_id, mask())
    bad = dev.submit(r.request_id, tamper=True)
    assert bad.verdict == VERDICT_REJECTED
    assert "block 1" in bad.reason
    client = service.state.get_client(dev.client_id)
    assert client is not None
    assert client.current_commitments == client.enrolled_commitments
    assert dev.submit(r.request_id).verdict == VERDICT_ACCEPTED
    assert service.ledger.size == 2


def test_identical_resubmission_is_idempotent_and_a_different_one_is_refused(
    service: ProviderService,
) -> None:
    dev = Device(service)
    dev.enroll()
    r = service.create_request(dev.client_id, mask())
    after, proofs = dev.proof(r.request_id)
    first = service.wait(
        service.submit(dev.header(r.request_id, after, proofs), iter([b"".join(proofs)])).submission_id, 10
    )
    assert first.verdict == VERDICT_ACCEPTED
    # Same content under a fresh nonce (a client retrying after a lost response): the same submission.
    again = service.submit(dev.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
    assert again.submission_id == first.submission_id
    assert again.leaf_index == first.leaf_index
    assert service.ledger.size == 1
    # A different answer to an already answered request is refused.
    other = [p[::-1] for p in proofs]
    with pytest.raises(AlreadyExistsError, match="already answered"):
        service.submit(dev.header(r.request_id, after, other), iter([b"".join(other)]))


def test_replayed_auth_nonce_is_refused(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    r = service.create_request(dev.client_id, mask())
    after, proofs = dev.proof(r.request_id)
    header = dev.header(r.request_id, after, proofs)
    service.submit(header, iter([b"".join(proofs)]))
    with pytest.raises(UnauthenticatedError, match="already used"):
        service.submit(header, iter([b"".join(proofs)]))


def test_auth_with_wrong_key_or_other_clients_id_is_refused(service: ProviderService) -> None:
    alice, mallory = Device(service, "alice"), Device(service, "mallory")
    alice.enroll()
    mallory.enroll()
    r = service.create_request("alice", mask())
    fields = {"after_cursor": 0}
    client = service.authenticate(alice.auth("WatchRequests", fields), "WatchRequests", fields)
    assert client.client_id == "alice"
    with pytest.raises(UnauthenticatedError, match=r"enrolled for .alice"):
        service.authenticate(
            alice.auth("WatchRequests", fields, signer=mallory.signer), "WatchRequests", fields
        )
    # Mallory signs as herself but presents Alice's nonce under Alice's name: the signature is Mallory's.
    nonce, _ = service.challenge("alice")
    st = mallory.signer.sign(
        DOMAIN_RPC_AUTH, {"client_id": "alice", "rpc": "WatchRequests", "nonce": nonce.hex(), **fields}
    )
    with pytest.raises(UnauthenticatedError):
        service.authenticate(AuthInput("alice", nonce, st.canonical, st.signature), "WatchRequests", fields)
    # Mallory authenticates as herself and submits for Alice's request.
    after, proofs = mallory.proof(r.request_id)
    with pytest.raises(PermissionDeniedError, match="another client"):
        service.submit(mallory.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
    # Auth for one RPC cannot be used on another, nor with other call fields.
    with pytest.raises(PermissionDeniedError, match="not 'PollRequests'"):
        service.authenticate(alice.auth("WatchRequests", fields), "PollRequests", fields)
    with pytest.raises(PermissionDeniedError, match="after_cursor"):
        service.authenticate(alice.auth("WatchRequests", fields), "WatchRequests", {"after_cursor": 5})


def test_expired_request_cannot_be_answered(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    r = service.create_request(dev.client_id, mask(), ttl_s=-1)
    after, proofs = dev.proof(r.request_id)
    with pytest.raises(FailedPreconditionError, match="expired"):
        service.submit(dev.header(r.request_id, after, proofs), iter([b"".join(proofs)]))


def test_upload_limits_and_integrity(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    r = service.create_request(dev.client_id, mask())
    after, proofs = dev.proof(r.request_id)
    blob = b"".join(proofs)
    with pytest.raises(InvalidInputError, match="truncated"):
        service.submit(dev.header(r.request_id, after, proofs), iter([blob[:10]]))
    with pytest.raises(InvalidInputError, match="longer than"):
        service.submit(dev.header(r.request_id, after, proofs), iter([blob, b"x"]))
    with pytest.raises(InvalidInputError, match="sha256"):
        service.submit(dev.header(r.request_id, after, proofs), iter([bytes(len(blob))]))
    big = [b"x" * 5000]
    with pytest.raises(ResourceExhaustedError, match="exceeds the limit"):
        service.submit(dev.header(r.request_id, after, big), iter(big))
    with pytest.raises(InvalidInputError, match="sum to total_bytes"):
        service.submit(dev.header(r.request_id, after, proofs, proof_sizes=(1, 2)), iter([blob]))
    with pytest.raises(NotFoundServiceError, match="unknown request"):
        service.submit(dev.header("nope", after, proofs), iter([blob]))
    with pytest.raises(InvalidInputError, match="point must be 64 lower-case hex"):
        service.submit(
            dev.header(r.request_id, [CommitmentRef("theta_after", 0, "XYZ")], proofs), iter([blob])
        )
    with pytest.raises(InvalidInputError, match="not a point of BN254"):
        service.submit(
            dev.header(r.request_id, [CommitmentRef("theta_after", 0, "ab" * 32)], proofs), iter([blob])
        )
    assert service.state.submissions_for(r.request_id) == []
    assert dev.submit(r.request_id).verdict == VERDICT_ACCEPTED


def test_commitment_lists_that_would_make_a_receipt_unsignable_are_refused(
    service: ProviderService,
) -> None:
    """Attack: enroll (or answer with) so many commitments that the receipt exceeds the statement limit.

    The receipt carries both lists; had they been accepted, signing it would fail on every attempt and
    the job would be retried for ever at the head of the queue, holding up every other client's.
    """
    dev = Device(service)
    many = tuple(CommitmentRef(f"t{i:063d}", i, POINT) for i in range(30_000))  # ~4.4 MB
    with pytest.raises(ResourceExhaustedError, match="keeps a receipt signable"):
        service.enroll(dev.enrollment(commitments=many))
    assert service.state.get_client(dev.client_id) is None
    dev.enroll()
    r = service.create_request(dev.client_id, mask())
    after, proofs = dev.proof(r.request_id)
    extra = [*after, CommitmentRef("theta_after", 99, point_from_tag(b"extra"))]
    with pytest.raises(InvalidInputError, match="names exactly the 2 the client holds"):
        service.submit(dev.header(r.request_id, extra, proofs), iter([b"".join(proofs)]))
    assert service.state.submissions_for(r.request_id) == []
    assert dev.submit(r.request_id).verdict == VERDICT_ACCEPTED


class _ReceiptRefusingSigner(StatementSigner):
    """Signs everything but receipts that carry commitments: a receipt the limits failed to keep small."""

    def sign(self, domain: str, payload: Any) -> Any:
        from zkunlearn.proofs.statements import StatementError

        if domain == DOMAIN_RECEIPT and payload.get("before_commitments"):
            raise StatementError("statement would be 9000000 bytes, above 8388608")
        return super().sign(domain, payload)


def test_a_receipt_that_cannot_be_signed_becomes_a_signed_rejection_not_a_stuck_job(
    state: ProviderState,
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = _ReceiptRefusingSigner(Ed25519PrivateKey.generate())
    svc = ProviderService(
        state,
        signer,
        FakeVerifier(),
        ServiceConfig(update_kinds=ALL_KINDS, model_ids=("m1",), max_proof_bytes=4096),
    )
    dev = Device(svc)
    dev.enroll()
    r = svc.create_request(dev.client_id, mask())
    done = dev.submit(r.request_id)  # an honest answer: the verifier accepts it
    assert done.verdict == VERDICT_REJECTED
    assert done.reason.startswith("receipt could not be signed: statement would be")
    leaf = svc.receipt(r.request_id, dev.client_id).leaf
    assert leaf is not None
    payload = signer.verifier().verify((leaf.canonical, leaf.signature), DOMAIN_RECEIPT)
    assert (payload["verdict"], payload["before_commitments"]) == ("rejected", [])
    client = svc.state.get_client(dev.client_id)
    assert client is not None
    assert client.current_commitments == client.enrolled_commitments  # nothing moved
    svc.close()


def test_answers_to_one_request_are_bounded_but_an_identical_one_is_still_answered(
    state: ProviderState,
) -> None:
    """Every rejected answer may be retried, but each costs a verification: not without end."""
    svc = ProviderService(
        state,
        StatementSigner.generate(),
        FakeVerifier(),
        ServiceConfig(
            update_kinds=ALL_KINDS, model_ids=("m1",), max_proof_bytes=4096, max_submissions_per_request=2
        ),
    )
    dev = Device(svc)
    dev.enroll()
    r = svc.create_request(dev.client_id, mask())
    after, _ = dev.proof(r.request_id)

    def bad(i: int) -> Any:
        junk = [bytes([i]) * 32, bytes([i]) * 32]  # a different wrong answer each time
        return svc.submit(dev.header(r.request_id, after, junk), iter([b"".join(junk)]))

    for i in range(2):
        assert svc.wait(bad(i).submission_id, 10).verdict == VERDICT_REJECTED
    with pytest.raises(ResourceExhaustedError, match="already has 2 submissions"):
        dev.submit(r.request_id)
    # The same bytes again are not a new answer: the stored verdict comes back.
    assert bad(1).verdict == VERDICT_REJECTED
    assert len(svc.state.submissions_for(r.request_id)) == 2
    svc.close()


def test_enrollment_checks(service: ProviderService) -> None:
    dev = Device(service)
    with pytest.raises(InvalidInputError, match="does not match"):
        service.enroll(dev.enrollment(model_id="m1", layers=("fc2",)))
    with pytest.raises(NotFoundServiceError, match="unknown model"):
        service.enroll(dev.enrollment(model_id="other"))
    with pytest.raises(InvalidInputError, match="32 raw Ed25519 bytes"):
        service.enroll(dev.enrollment(public_key=b"short"))
    with pytest.raises(InvalidInputError, match="enrollment"):
        service.enroll(dev.enrollment(signature=bytes(64)))
    with pytest.raises(InvalidInputError, match="enrollment"):
        service.enroll(dev.enrollment(canonical=b"garbage"))
    with pytest.raises(InvalidInputError, match="small order"):  # would let anyone sign as this client
        service.enroll(dev.enrollment(public_key=b"\x01" + bytes(31)))
    for point in ("ab" * 31, "ab" * 33, "AB" * 32, "ab" * 2048):
        with pytest.raises(InvalidInputError, match="point must be 64 lower-case hex"):
            service.enroll(dev.enrollment(commitments=(CommitmentRef("theta", 0, point),)))
    # Well-formed hex that is no curve point (x past the field, x with no y, the zero string) commits
    # to no tensor: refused, beside the honest enrollment below.
    for point in ("ab" * 32, "ff" * 32, "00" * 32):
        with pytest.raises(InvalidInputError, match="not a point of BN254"):
            service.enroll(dev.enrollment(commitments=(CommitmentRef("theta", 0, point),)))
    dev.enroll()
    dev.enroll()  # idempotent
    thief = Device(service, dev.client_id)
    with pytest.raises(AlreadyExistsError, match="already enrolled"):
        thief.enroll()
    # Challenge answers an unknown id as it answers a known one: it does not reveal who is enrolled.
    unknown, _ = service.challenge("stranger")
    known, _ = service.challenge(dev.client_id)
    assert len(unknown) == len(known)


def test_analytic_request_carries_forget_data(service: ProviderService) -> None:
    dev = Device(service, "an-1", kind=2)
    dev.enroll()
    with pytest.raises(InvalidInputError, match="needs the forget"):
        service.create_request(dev.client_id, mask())
    x = np.arange(6, dtype="<f8").reshape(2, 3)
    y = np.ones((2, 1), dtype="<f8")
    with pytest.raises(InvalidInputError, match="needs 48 bytes"):
        service.create_request(
            dev.client_id,
            mask(),
            forget_features=TensorData((2, 3), b"x"),
            forget_labels=TensorData((2, 1), y.tobytes()),
        )
    for bad in (np.nan, np.inf):
        poisoned = x.copy()
        poisoned[1, 2] = bad
        with pytest.raises(InvalidInputError, match="forget features: contains NaN or infinity"):
            service.create_request(
                dev.client_id,
                mask(),
                forget_features=TensorData((2, 3), poisoned.tobytes()),
                forget_labels=TensorData((2, 1), y.tobytes()),
            )
    assert service.requests_after(service.state.get_client("an-1"), 0, 10) == []  # type: ignore[arg-type]
    r = service.create_request(
        dev.client_id,
        mask(),
        forget_features=TensorData((2, 3), x.tobytes()),
        forget_labels=TensorData((2, 1), y.tobytes()),
    )
    delivered = service.requests_after(service.state.get_client("an-1"), 0, 10)  # type: ignore[arg-type]
    assert delivered[0].forget_features == TensorData((2, 3), x.tobytes())
    assert dev.submit(r.request_id).verdict == VERDICT_ACCEPTED


def test_pending_submission_is_verified_after_a_restart(tmp_path: Path) -> None:
    signer = StatementSigner.generate()
    # No verification workers: simulates a provider dying right after storing the upload.
    first = ProviderService(
        SqlState.sqlite(tmp_path / "p.db"),
        signer,
        FakeVerifier(),
        ServiceConfig(update_kinds=ALL_KINDS, verify_workers=0),
    )
    dev = Device(first)
    dev.enroll()
    r = first.create_request(dev.client_id, mask())
    after, proofs = dev.proof(r.request_id)
    sub = first.submit(dev.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
    assert first.wait(sub.submission_id, 0.3).verdict == VERDICT_PENDING
    assert [s.submission_id for s in first.state.pending_submissions()] == [sub.submission_id]
    first.state.close()
    # The job never left the database: the next process's workers take it without being told.
    second = ProviderService(
        SqlState.sqlite(tmp_path / "p.db"), signer, FakeVerifier(), ServiceConfig(update_kinds=ALL_KINDS)
    )
    assert second.recover() in (0, 1)  # 0 when a worker already took it during start-up
    assert second.wait(sub.submission_id, 10).verdict == VERDICT_ACCEPTED
    second.close()


def test_concurrent_identical_submissions_make_one_submission_and_one_leaf(tmp_path: Path) -> None:
    import threading

    svc = ProviderService(
        SqlState.sqlite(tmp_path / "p.db"),
        StatementSigner.generate(),
        FakeVerifier(),
        ServiceConfig(update_kinds=ALL_KINDS),
    )
    dev = Device(svc)
    dev.enroll()
    r = svc.create_request(dev.client_id, mask())
    after, proofs = dev.proof(r.request_id)
    headers = [dev.header(r.request_id, after, proofs) for _ in range(4)]  # four fresh nonces
    ids: list[str] = []
    barrier = threading.Barrier(len(headers))

    def go(h: SubmissionHeader) -> None:
        barrier.wait()
        ids.append(svc.submit(h, iter([b"".join(proofs)])).submission_id)

    threads = [threading.Thread(target=go, args=(h,)) for h in headers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert svc.wait(ids[0], 10).verdict == VERDICT_ACCEPTED
    assert svc.ledger.size == 1
    svc.close()


class _TogetherVerifier(FakeVerifier):
    """The fake verifier, but two jobs are inside ``verify`` at once, as two slow ezkl checks would be."""

    def __init__(self) -> None:
        import threading

        super().__init__()
        self.barrier = threading.Barrier(2, timeout=5)

    def verify(self, job: Any) -> Any:
        self.barrier.wait()
        return super().verify(job)


def test_two_answers_built_on_one_state_cannot_both_be_accepted(state: ProviderState) -> None:
    """Attack: answer two open requests from the same state and have them verified concurrently.

    Both verify against the enrolled state; accepting both would leave the client's committed state
    at whichever finished last, with the other deletion's weights back in it under a signed receipt.
    """
    svc = ProviderService(
        state,
        StatementSigner.generate(),
        _TogetherVerifier(),
        ServiceConfig(update_kinds=ALL_KINDS, model_ids=("m1",), max_proof_bytes=4096, verify_workers=2),
    )
    dev = Device(svc)
    dev.enroll()
    requests = [svc.create_request(dev.client_id, mask()) for _ in range(2)]
    answers = [dev.proof(r.request_id) for r in requests]  # both from the enrolled state
    subs = [
        svc.submit(dev.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
        for r, (after, proofs) in zip(requests, answers, strict=True)
    ]
    done = [svc.wait(s.submission_id, 10) for s in subs]
    assert sorted(d.verdict for d in done) == sorted([VERDICT_ACCEPTED, VERDICT_REJECTED])
    won = next(i for i, d in enumerate(done) if d.verdict == VERDICT_ACCEPTED)
    lost = 1 - won
    assert "changed while this answer was verified" in done[lost].reason
    client = svc.state.get_client(dev.client_id)
    assert client is not None
    assert client.current_commitments == done[won].after_commitments
    # The loser's receipt is a signed rejection, and the log still chains from the enrollment.
    view = svc.receipt(requests[lost].request_id, dev.client_id)
    assert view.leaf is not None
    payload = svc.signer.verifier().verify((view.leaf.canonical, view.leaf.signature), DOMAIN_RECEIPT)
    assert payload["verdict"] == "rejected"
    # Rebuilt on the new state, the lost request's answer is accepted and continues the chain.
    svc.verifier.barrier = type(svc.verifier.barrier)(1)  # type: ignore[attr-defined]
    assert dev.submit(requests[lost].request_id).verdict == VERDICT_ACCEPTED
    svc.close()


class _Panic(BaseException):
    """Stands in for pyo3's PanicException, which ezkl raises and which is not an Exception."""


class _PanickingOnceVerifier(FakeVerifier):
    def __init__(self) -> None:
        super().__init__()
        self.panicked = False

    def verify(self, job: Any) -> Any:
        if not self.panicked:
            self.panicked = True
            raise _Panic("called `Option::unwrap()` on a `None` value")
        return super().verify(job)


def test_a_verifier_panic_is_a_rejection_and_the_worker_lives_on(state: ProviderState) -> None:
    svc = ProviderService(
        state,
        StatementSigner.generate(),
        _PanickingOnceVerifier(),
        ServiceConfig(update_kinds=ALL_KINDS, model_ids=("m1",), max_proof_bytes=4096, verify_workers=1),
    )
    dev = Device(svc)
    dev.enroll()
    r = svc.create_request(dev.client_id, mask())
    first = dev.submit(r.request_id)
    assert first.verdict == VERDICT_REJECTED
    assert first.reason == "verifier error: _Panic: called `Option::unwrap()` on a `None` value"
    # The only worker survived: it verifies the next request's answer.
    r2 = svc.create_request(dev.client_id, mask())
    assert dev.submit(r2.request_id).verdict == VERDICT_ACCEPTED
    svc.close()


class _CrashingOnceVerifier(FakeVerifier):
    """Its first call loses its ezkl worker process, as a pooled verifier does when one dies."""

    def __init__(self) -> None:
        super().__init__()
        self.crashed = False

    def verify(self, job: Any) -> Any:
        if not self.crashed:
            self.crashed = True
            raise VerifierCrashedError("a verifier worker died mid-request (exit status -9)")
        return super().verify(job)


def test_a_crashed_verifier_worker_is_retried_not_a_rejection(state: ProviderState) -> None:
    """A provider-side crash says nothing about the proof: the job is verified again and accepted,
    beside the panic above, which a hostile proof can cause and which is a rejection."""
    verifier = _CrashingOnceVerifier()
    svc = ProviderService(
        state,
        StatementSigner.generate(),
        verifier,
        ServiceConfig(update_kinds=ALL_KINDS, model_ids=("m1",), max_proof_bytes=4096, verify_workers=1),
    )
    dev = Device(svc)
    dev.enroll()
    r = svc.create_request(dev.client_id, mask())
    outcome = dev.submit(r.request_id)
    assert verifier.crashed
    assert (outcome.verdict, outcome.reason) == (VERDICT_ACCEPTED, "")
    svc.close()


def test_verification_runs_off_the_calling_thread(tmp_path: Path) -> None:
    gate = threading.Event()
    svc = ProviderService(
        InMemoryState(),
        StatementSigner.generate(),
        FakeVerifier(gate=gate),
        ServiceConfig(update_kinds=ALL_KINDS),
    )
    try:
        dev = Device(svc)
        dev.enroll()
        r = svc.create_request(dev.client_id, mask())
        after, proofs = dev.proof(r.request_id)
        answered: list[Any] = []
        caller = threading.Thread(
            target=lambda: answered.append(
                svc.submit(dev.header(r.request_id, after, proofs), iter([b"".join(proofs)]))
            )
        )
        caller.start()
        caller.join(30)  # the verifier is held until the gate opens: an inline verification never returns
        assert answered, "submit waited for the verification"
        assert answered[0].verdict == 1  # PENDING
        assert svc.receipt(r.request_id, dev.client_id).leaf is None
        gate.set()
        assert svc.wait(answered[0].submission_id, 10).verdict == VERDICT_ACCEPTED
    finally:
        gate.set()
        svc.close()


def test_a_watcher_does_not_sleep_through_a_request_added_while_it_looked(
    service: ProviderService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lost-wakeup race: a request added between the watcher's read and its wait must end the wait."""
    dev = Device(service)
    dev.enroll()
    client = service.state.get_client(dev.client_id)
    assert client is not None
    reads = [0]
    read = service.requests_after

    def read_then_race(*args: Any, **kwargs: Any) -> Any:
        found = read(*args, **kwargs)
        reads[0] += 1
        if reads[0] == 1:  # another RPC thread adds a request right after this first (empty) read
            service.create_request(dev.client_id, mask())
        return found

    monkeypatch.setattr(service, "requests_after", read_then_race)
    started = time.monotonic()
    delivered = service.wait_for_requests(client, 0, timeout_s=60.0)
    assert len(delivered) == 1
    assert time.monotonic() - started < 30.0  # it did not wait out the 60 s re-read period


def test_challenges_write_nothing_and_nonces_are_bound_single_use_and_expiring(
    service: ProviderService,
) -> None:
    """Unauthenticated challenges cost no state (they once wrote a row each, for anyone's client id);
    a nonce verifies only for the client it was issued to, once, before it expires."""
    dev = Device(service, "nonce-1")
    dev.enroll()
    other = Device(service, "nonce-2")
    other.enroll()
    for i in range(200):
        service.challenge("nonce-1" if i % 2 else f"nobody-{i}")
    assert service.state.purge_nonces(2**62) == 0  # no nonce row was written by a challenge
    fields = {"after_cursor": 0}
    auth = dev.auth("WatchRequests", fields)
    assert service.authenticate(auth, "WatchRequests", fields).client_id == "nonce-1"
    with pytest.raises(UnauthenticatedError, match="already used"):
        service.authenticate(auth, "WatchRequests", fields)
    # A nonce issued to nonce-1, signed by nonce-2 for itself: not issued to this client.
    nonce, _ = service.challenge("nonce-1")
    st = other.signer.sign(
        DOMAIN_RPC_AUTH, {"client_id": "nonce-2", "rpc": "WatchRequests", "nonce": nonce.hex(), **fields}
    )
    with pytest.raises(UnauthenticatedError, match="not issued to this client"):
        service.authenticate(AuthInput("nonce-2", nonce, st.canonical, st.signature), "WatchRequests", fields)
    # A forged nonce (random bytes of the right length) and an expired one are refused too.
    forged = secrets.token_bytes(len(nonce))
    st = dev.signer.sign(
        DOMAIN_RPC_AUTH, {"client_id": "nonce-1", "rpc": "WatchRequests", "nonce": forged.hex(), **fields}
    )
    with pytest.raises(UnauthenticatedError, match="not issued to this client"):
        service.authenticate(
            AuthInput("nonce-1", forged, st.canonical, st.signature), "WatchRequests", fields
        )
    late = dev.auth("WatchRequests", fields)
    now = service.clock_ms
    service.clock_ms = lambda: now() + int(service.config.nonce_ttl_s * 1000) + 1
    try:
        with pytest.raises(UnauthenticatedError, match="expired"):
            service.authenticate(late, "WatchRequests", fields)
    finally:
        service.clock_ms = now


class PreparingVerifier(FakeVerifier):
    """A verifier that also prepares issued requests (the real one commits to their masks)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.prepared: list[tuple[str, int, bytes, bytes]] = []

    def prepare(self, model_id: str, update_kind: int, request_canonical: bytes, mask: bytes) -> None:
        self.prepared.append((model_id, update_kind, request_canonical, mask))
        if self.fail:
            raise RuntimeError("preparation failed")


def test_issued_requests_are_handed_to_a_preparing_verifier_with_their_client_model_and_kind(
    state: ProviderState,
) -> None:
    verifier = PreparingVerifier()
    svc = ProviderService(state, StatementSigner.generate(), verifier, ServiceConfig(update_kinds=ALL_KINDS))
    try:
        dev = Device(svc)
        dev.enroll()
        issued = svc.create_request(dev.client_id, mask())
        assert verifier.prepared == [("m1", 1, issued.canonical, issued.mask)]
        assert dev.submit(issued.request_id).verdict == VERDICT_ACCEPTED
    finally:
        svc.close()


def test_a_process_that_verifies_nothing_prepares_nothing(state: ProviderState) -> None:
    verifier = PreparingVerifier()
    config = ServiceConfig(update_kinds=ALL_KINDS, verify_workers=0)
    svc = ProviderService(state, StatementSigner.generate(), verifier, config)
    try:
        dev = Device(svc)
        dev.enroll()
        svc.create_request(dev.client_id, mask())
        assert verifier.prepared == []
    finally:
        svc.close()


def test_a_failing_preparation_loses_no_request(state: ProviderState) -> None:
    """Preparation is an optimisation: a verifier that breaks its contract and raises does not undo
    or fail the issue, and the request is still answered."""
    verifier = PreparingVerifier(fail=True)
    svc = ProviderService(state, StatementSigner.generate(), verifier, ServiceConfig(update_kinds=ALL_KINDS))
    try:
        dev = Device(svc)
        dev.enroll()
        issued = svc.create_request(dev.client_id, mask())
        assert len(verifier.prepared) == 1
        client = svc.state.get_client(dev.client_id)
        assert client is not None
        assert [d.record.request_id for d in svc.requests_after(client, 0, 10)] == [issued.request_id]
        assert dev.submit(issued.request_id).verdict == VERDICT_ACCEPTED
    finally:
        svc.close()
