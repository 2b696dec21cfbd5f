"""The state interface every backend implements: its records, its errors and what it must guarantee."""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from zkunlearn.errors import RefusedError, TransientError, ZkUnlearnError

# Verdict codes match the wire enum zkunlearn.v1.Verdict so no translation table can drift.
VERDICT_PENDING = 1
VERDICT_ACCEPTED = 2
VERDICT_REJECTED = 3

FaultHook = Callable[[str], None]


class StateError(ZkUnlearnError):
    """Base class of everything the state refuses; the message says what and why."""


class ConflictError(StateError, RefusedError):
    """An id is already taken by a record with different content (not an idempotent repeat)."""


class NotFoundError(StateError, RefusedError):
    """A record named by id does not exist."""


class NonceError(StateError, RefusedError):
    """A nonce is unknown, already used, expired, or was issued to another client."""


class AlreadyAcceptedError(StateError, RefusedError):
    """The request already has an accepted submission; a different one is a replay or a second answer."""


class StaleCommitmentsError(StateError, TransientError):
    """The client's current commitments changed while a submission was being verified against them.

    Two answers built from the same state (two open requests of one client, verified at once) would
    otherwise both be accepted, and the later one would put back weights the earlier one deleted.
    """


class PendingRequestsError(StateError):
    """A re-enrollment was refused because deletion requests addressed to the client are still open."""


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    public_key: bytes
    model_id: str
    layers: tuple[str, ...]
    update_kind: int
    enrolled_commitments: str  # canonical JSON list, as enrolled
    current_commitments: str  # canonical JSON list, advanced by each accepted update
    enrollment_canonical: bytes
    enrollment_signature: bytes
    enrolled_ms: int
    # Exact Group-OBS clients: their enrollment proofs, a canonical JSON list of hex strings, as
    # accepted at enrollment (every later deletion of theirs is judged with what they prove).
    enrollment_proofs: bytes = b""


@dataclass(frozen=True)
class ReplacedEnrollment:
    """An enrollment a re-enrollment replaced: the client's record as it stood then, and the index of
    the re-enrollment leaf that replaced it. The log's order is what ties a receipt to an enrollment:
    this one was in force for the client's leaves before ``replaced_at`` (and after the previous one's)."""

    replaced_at: int
    record: ClientRecord


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    client_id: str
    canonical: bytes
    signature: bytes
    mask: bytes
    forget: bytes  # opaque to the state: the service's encoding of the forget tensors
    issued_ms: int
    expires_ms: int
    cursor: int = 0  # assigned by add_request: 1, 2, ... per client
    accepted_submission_id: str | None = None


@dataclass(frozen=True)
class SubmissionRecord:
    submission_id: str
    request_id: str
    client_id: str
    content_digest: str  # SHA-256 over what makes two submissions "the same" (see service)
    proof_sha256: str
    proof_sizes: str  # canonical JSON list of ints
    proof: bytes
    after_commitments: str  # canonical JSON list
    created_ms: int
    verdict: int = VERDICT_PENDING
    reason: str = ""
    leaf_index: int | None = None
    # Job-queue bookkeeping: which worker holds the verification lease, until when, and how many
    # times the job was claimed (a job that keeps killing its workers is finished as rejected).
    claimed_by: str | None = None
    lease_expires_ms: int | None = None
    attempts: int = 0


@dataclass(frozen=True)
class StateSummary:
    clients: int
    requests: int
    answered_requests: int  # with an accepted submission
    pending_submissions: int
    accepted_submissions: int
    rejected_submissions: int
    ledger_size: int


@dataclass(frozen=True)
class LeafRecord:
    index: int
    leaf_hash: bytes
    canonical: bytes
    signature: bytes
    submission_id: str
    request_id: str


@dataclass(frozen=True)
class TreeHeadRecord:
    size: int
    root_hash: bytes
    canonical: bytes
    signature: bytes


def _client_same(a: ClientRecord, b: ClientRecord) -> bool:
    """Idempotent re-enrollment: same key and same declared model; timestamps may differ."""
    return (
        a.public_key,
        a.model_id,
        a.layers,
        a.update_kind,
        a.enrolled_commitments,
        a.enrollment_proofs,
    ) == (
        b.public_key,
        b.model_id,
        b.layers,
        b.update_kind,
        b.enrolled_commitments,
        b.enrollment_proofs,
    )


class ProviderState(abc.ABC):
    """What the service needs from storage. Implementations must make each method atomic."""

    #: Called between the writes of multi-step transactions with a step name; tests raise from it
    #: to prove an interrupted transaction leaves nothing behind.
    fault_hook: FaultHook | None = None

    def _fault(self, step: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(step)

    # clients
    @abc.abstractmethod
    def add_client(self, record: ClientRecord) -> tuple[ClientRecord, bool]:
        """Store an enrollment; an identical repeat returns the stored one and ``False``."""

    @abc.abstractmethod
    def get_client(self, client_id: str) -> ClientRecord | None: ...

    @abc.abstractmethod
    def rotate_client(
        self,
        record: ClientRecord,
        previous_enrollment_sha256: str,
        leaf: LeafRecord,
        *,
        now_ms: int,
        refuse_pending: bool,
    ) -> tuple[ClientRecord, LeafRecord]:
        """Replace a client's enrollment and append its signed re-enrollment leaf, in one transaction.

        The replaced record is kept (:meth:`replaced_enrollments`), keyed by the leaf's index: an
        exact-kind client's earlier deletions stay judged by the enrollment proofs they were accepted
        under. The stored enrollment must still be the one ``previous_enrollment_sha256`` names
        (SHA-256 of its canonical bytes), else :class:`ConflictError`: a replayed or raced
        re-enrollment changes nothing.
        ``refuse_pending``: an unanswered, unexpired request of the client raises
        :class:`PendingRequestsError`. Unknown client: :class:`NotFoundError`. ``leaf.index`` is assigned.
        """

    @abc.abstractmethod
    def replaced_enrollments(self, client_id: str) -> list[ReplacedEnrollment]:
        """Every enrollment of the client that a re-enrollment replaced, oldest first (by ``replaced_at``)."""

    @abc.abstractmethod
    def list_clients(
        self, model_id: str | None = None, after: str = "", limit: int = 1000
    ) -> list[ClientRecord]:
        """Enrolled clients (of ``model_id`` if given) with ids after ``after``, by id, at most ``limit``."""

    @abc.abstractmethod
    def summary(self) -> StateSummary:
        """What an operator counts: clients, requests, answered ones, submissions by verdict, log size."""

    # nonces
    @abc.abstractmethod
    def add_nonce(self, client_id: str, nonce: bytes, expires_ms: int) -> None: ...

    @abc.abstractmethod
    def consume_nonce(self, client_id: str, nonce: bytes, now_ms: int) -> None:
        """Mark the nonce used, or raise :class:`NonceError` saying why it cannot be."""

    @abc.abstractmethod
    def purge_nonces(self, now_ms: int) -> int:
        """Drop expired nonces (used or not: an expired nonce is refused either way)."""

    # deletion requests
    def add_request(self, record: RequestRecord) -> RequestRecord:
        """Store a request and assign it the client's next delivery cursor."""
        return self.add_requests([record])[0]

    @abc.abstractmethod
    def add_requests(self, records: Sequence[RequestRecord]) -> list[RequestRecord]:
        """Store requests in one transaction, each with its client's next delivery cursor, in order.

        All or none: an id already taken (:class:`ConflictError`) or an unknown client
        (:class:`NotFoundError`) stores nothing of the batch.
        """

    @abc.abstractmethod
    def get_request(self, request_id: str) -> RequestRecord | None: ...

    @abc.abstractmethod
    def requests_after(self, client_id: str, cursor: int, limit: int) -> list[RequestRecord]: ...

    # submissions
    @abc.abstractmethod
    def add_submission(self, record: SubmissionRecord) -> tuple[SubmissionRecord, bool]:
        """Store a pending submission; an identical one (same content digest) returns the first and ``False``.

        Raises :class:`AlreadyAcceptedError` when the request already has a different accepted answer.
        """

    @abc.abstractmethod
    def get_submission(self, submission_id: str) -> SubmissionRecord | None: ...

    @abc.abstractmethod
    def submissions_for(self, request_id: str) -> list[SubmissionRecord]: ...

    @abc.abstractmethod
    def pending_submissions(self) -> list[SubmissionRecord]: ...

    @abc.abstractmethod
    def claim_submissions(
        self, worker_id: str, now_ms: int, lease_ms: int, limit: int = 1
    ) -> list[SubmissionRecord]:
        """Claim up to ``limit`` pending submissions whose lease is free or expired, oldest first.

        This is the verification job queue: any number of workers in any number of processes may
        call it at once and no job is handed to two of them while its lease runs (PostgreSQL:
        ``FOR UPDATE SKIP LOCKED``; SQLite: the write lock taken at BEGIN). A worker that dies
        leaves its lease to expire, and the job is claimed again (``attempts`` counts claims).
        """

    @abc.abstractmethod
    def extend_lease(self, submission_id: str, worker_id: str, until_ms: int) -> bool:
        """Push the lease of a job this worker still holds; ``False`` if it lost it or the job is done.

        Workers call it periodically while verifying, so a verification longer than one lease is
        not taken (and done a second time) by another worker.
        """

    @abc.abstractmethod
    def release_claims(self, worker_prefix: str) -> int:
        """Free the leases of pending jobs held by workers whose id starts with ``worker_prefix``.

        A replica restarting under the same name calls this so the jobs its previous life held
        are picked up at once instead of after their leases expire.
        """

    @abc.abstractmethod
    def finish_submission(
        self,
        submission_id: str,
        verdict: int,
        reason: str,
        leaf: LeafRecord,
        *,
        verified_against: str | None = None,
    ) -> tuple[SubmissionRecord, LeafRecord]:
        """Record the verdict and append its receipt leaf (``leaf.index`` is ignored and assigned).

        One transaction: the verdict, the leaf, the request's accepted submission and, when accepted,
        the client's current commitments. Finishing an already finished submission returns the
        stored result unchanged, so two workers racing on one submission cannot append twice.
        ``verified_against`` is the client's ``current_commitments`` the verdict was reached on: an
        acceptance raises :class:`StaleCommitmentsError` (and writes nothing) if they have changed since.
        """

    # ledger
    @abc.abstractmethod
    def ledger_size(self) -> int: ...

    @abc.abstractmethod
    def leaf_hashes(self, size: int | None = None, start: int = 0) -> list[bytes]:
        """Leaf hashes with index in ``[start, size)``: a mirror extends itself with only the new ones."""

    @abc.abstractmethod
    def get_leaf(self, index: int) -> LeafRecord | None: ...

    @abc.abstractmethod
    def add_tree_head(self, record: TreeHeadRecord) -> TreeHeadRecord:
        """Store a signed tree head; one already stored for that size wins (returned)."""

    @abc.abstractmethod
    def get_tree_head(self, size: int) -> TreeHeadRecord | None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and files."""


# ---------------------------------------------------------------------------------------------------
# In-memory backend


def _check_nonce(entry: tuple[str, int, bool] | None, client_id: str, now_ms: int) -> None:
    if entry is None:
        raise NonceError("unknown nonce: ask Challenge for a fresh one")
    owner, expires_ms, used = entry
    if owner != client_id:
        raise NonceError("nonce was issued to another client")
    if used:
        raise NonceError("nonce already used (replay refused): ask Challenge for a fresh one")
    if expires_ms < now_ms:
        raise NonceError("nonce expired: ask Challenge for a fresh one")


_CONSUMED = object()  # consume_nonce's transaction marked the nonce used


def _stale_message(client_id: str) -> str:
    return (
        f"client {client_id!r}'s committed state changed while this answer was verified "
        "(another answer was accepted first); rebuild it on the new state and submit again"
    )


def _check_rotation(
    old: ClientRecord | None, record: ClientRecord, previous_enrollment_sha256: str
) -> ClientRecord:
    """The stored client a re-enrollment may replace, or the error saying why it may not."""
    if old is None:
        raise NotFoundError(f"unknown client {record.client_id!r}: enroll first")
    if hashlib.sha256(old.enrollment_canonical).hexdigest() != previous_enrollment_sha256:
        raise ConflictError(
            f"client {record.client_id!r} is no longer enrolled with the enrollment this re-enrollment "
            "replaces (a replay, or another re-enrollment came first)"
        )
    return old


def _pending_message(client_id: str, request_ids: Sequence[str]) -> str:
    shown = ", ".join(repr(r) for r in request_ids[:5]) + (" ..." if len(request_ids) > 5 else "")
    return (
        f"client {client_id!r} has {len(request_ids)} open deletion request(s) ({shown}): answer them, "
        "or wait until they expire, before re-enrolling"
    )


def _check_verdict(verdict: int) -> None:
    if verdict not in (VERDICT_ACCEPTED, VERDICT_REJECTED):
        raise StateError(f"a finished submission needs verdict ACCEPTED or REJECTED, got {verdict}")


# ---------------------------------------------------------------------------------------------------
# SQLAlchemy backend
