"""The in-memory backend: dicts under one lock, for tests and single-process use."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence

from zkunlearn.provider.state._base import (
    VERDICT_ACCEPTED,
    VERDICT_PENDING,
    VERDICT_REJECTED,
    AlreadyAcceptedError,
    ClientRecord,
    ConflictError,
    LeafRecord,
    NotFoundError,
    PendingRequestsError,
    ProviderState,
    ReplacedEnrollment,
    RequestRecord,
    StaleCommitmentsError,
    StateSummary,
    SubmissionRecord,
    TreeHeadRecord,
    _check_nonce,
    _check_rotation,
    _check_verdict,
    _client_same,
    _pending_message,
    _stale_message,
)


class InMemoryState(ProviderState):
    """Dicts under one lock; a transaction snapshots the dicts and restores them if anything raises."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: dict[str, ClientRecord] = {}
        self._replaced: dict[str, tuple[ReplacedEnrollment, ...]] = {}
        self._nonces: dict[bytes, tuple[str, int, bool]] = {}
        self._requests: dict[str, RequestRecord] = {}
        self._submissions: dict[str, SubmissionRecord] = {}
        self._leaves: list[LeafRecord] = []
        self._heads: dict[int, TreeHeadRecord] = {}

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        with self._lock:
            saved = (
                dict(self._clients),
                dict(self._replaced),
                dict(self._nonces),
                dict(self._requests),
                dict(self._submissions),
                list(self._leaves),
                dict(self._heads),
            )
            try:
                yield
            except BaseException:
                (
                    self._clients,
                    self._replaced,
                    self._nonces,
                    self._requests,
                    self._submissions,
                    self._leaves,
                    self._heads,
                ) = saved
                raise

    def add_client(self, record: ClientRecord) -> tuple[ClientRecord, bool]:
        with self._txn():
            old = self._clients.get(record.client_id)
            if old is not None:
                if _client_same(old, record):
                    return old, False
                raise ConflictError(
                    f"client id {record.client_id!r} is already enrolled with another key or model"
                )
            self._clients[record.client_id] = record
            return record, True

    def rotate_client(
        self,
        record: ClientRecord,
        previous_enrollment_sha256: str,
        leaf: LeafRecord,
        *,
        now_ms: int,
        refuse_pending: bool,
    ) -> tuple[ClientRecord, LeafRecord]:
        with self._txn():
            old = _check_rotation(self._clients.get(record.client_id), record, previous_enrollment_sha256)
            if refuse_pending:
                open_ids = [
                    r.request_id
                    for r in sorted(self._requests.values(), key=lambda r: r.cursor)
                    if r.client_id == record.client_id
                    and r.accepted_submission_id is None
                    and r.expires_ms >= now_ms
                ]
                if open_ids:
                    raise PendingRequestsError(_pending_message(record.client_id, open_ids))
            stored_leaf = dataclasses.replace(leaf, index=len(self._leaves))
            self._leaves.append(stored_leaf)
            self._fault("leaf-appended")
            kept = ReplacedEnrollment(stored_leaf.index, old)
            self._replaced[record.client_id] = (*self._replaced.get(record.client_id, ()), kept)
            self._clients[record.client_id] = record
            return record, stored_leaf

    def replaced_enrollments(self, client_id: str) -> list[ReplacedEnrollment]:
        with self._lock:
            return list(self._replaced.get(client_id, ()))

    def get_client(self, client_id: str) -> ClientRecord | None:
        with self._lock:
            return self._clients.get(client_id)

    def list_clients(
        self, model_id: str | None = None, after: str = "", limit: int = 1000
    ) -> list[ClientRecord]:
        with self._lock:
            chosen = sorted(
                (c for c in self._clients.values() if c.client_id > after and model_id in (None, c.model_id)),
                key=lambda c: c.client_id,
            )
        return chosen[: max(0, limit)]

    def summary(self) -> StateSummary:
        with self._lock:
            verdicts = [s.verdict for s in self._submissions.values()]
            return StateSummary(
                clients=len(self._clients),
                requests=len(self._requests),
                answered_requests=sum(r.accepted_submission_id is not None for r in self._requests.values()),
                pending_submissions=verdicts.count(VERDICT_PENDING),
                accepted_submissions=verdicts.count(VERDICT_ACCEPTED),
                rejected_submissions=verdicts.count(VERDICT_REJECTED),
                ledger_size=len(self._leaves),
            )

    def add_nonce(self, client_id: str, nonce: bytes, expires_ms: int) -> None:
        with self._txn():
            if nonce in self._nonces:
                raise ConflictError("nonce collision")
            self._nonces[nonce] = (client_id, expires_ms, False)

    def consume_nonce(self, client_id: str, nonce: bytes, now_ms: int) -> None:
        with self._txn():
            entry = self._nonces.get(nonce)
            _check_nonce(entry, client_id, now_ms)
            assert entry is not None
            self._nonces[nonce] = (entry[0], entry[1], True)

    def purge_nonces(self, now_ms: int) -> int:
        with self._txn():
            stale = [n for n, (_, exp, _) in self._nonces.items() if exp < now_ms]
            for n in stale:
                del self._nonces[n]
            return len(stale)

    def add_requests(self, records: Sequence[RequestRecord]) -> list[RequestRecord]:
        with self._txn():
            stored: list[RequestRecord] = []
            for record in records:
                if record.request_id in self._requests:
                    raise ConflictError(f"request id {record.request_id!r} already exists")
                if record.client_id not in self._clients:
                    raise NotFoundError(f"unknown client {record.client_id!r}")
                cursor = 1 + max(
                    (r.cursor for r in self._requests.values() if r.client_id == record.client_id), default=0
                )
                item = dataclasses.replace(record, cursor=cursor, accepted_submission_id=None)
                self._requests[record.request_id] = item
                stored.append(item)
            return stored

    def get_request(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            return self._requests.get(request_id)

    def requests_after(self, client_id: str, cursor: int, limit: int) -> list[RequestRecord]:
        with self._lock:
            found = sorted(
                (r for r in self._requests.values() if r.client_id == client_id and r.cursor > cursor),
                key=lambda r: r.cursor,
            )
            return found[:limit]

    def add_submission(self, record: SubmissionRecord) -> tuple[SubmissionRecord, bool]:
        with self._txn():
            request = self._requests.get(record.request_id)
            if request is None:
                raise NotFoundError(f"unknown request {record.request_id!r}")
            for old in self._submissions.values():
                if old.request_id == record.request_id and old.content_digest == record.content_digest:
                    return old, False
            if request.accepted_submission_id is not None:
                raise AlreadyAcceptedError(
                    f"request {record.request_id!r} was already answered by submission "
                    f"{request.accepted_submission_id!r}; a different submission is refused"
                )
            if record.submission_id in self._submissions:
                raise ConflictError(f"submission id {record.submission_id!r} already exists")
            self._submissions[record.submission_id] = record
            return record, True

    def get_submission(self, submission_id: str) -> SubmissionRecord | None:
        with self._lock:
            return self._submissions.get(submission_id)

    def submissions_for(self, request_id: str) -> list[SubmissionRecord]:
        with self._lock:
            return sorted(
                (s for s in self._submissions.values() if s.request_id == request_id),
                key=lambda s: s.created_ms,
            )

    def pending_submissions(self) -> list[SubmissionRecord]:
        with self._lock:
            return sorted(
                (s for s in self._submissions.values() if s.verdict == VERDICT_PENDING),
                key=lambda s: s.created_ms,
            )

    def claim_submissions(
        self, worker_id: str, now_ms: int, lease_ms: int, limit: int = 1
    ) -> list[SubmissionRecord]:
        with self._txn():
            free = sorted(
                (
                    s
                    for s in self._submissions.values()
                    if s.verdict == VERDICT_PENDING
                    and (s.lease_expires_ms is None or s.lease_expires_ms < now_ms)
                ),
                key=lambda s: s.created_ms,
            )[: max(0, limit)]
            claimed = []
            for s in free:
                taken = dataclasses.replace(
                    s, claimed_by=worker_id, lease_expires_ms=now_ms + lease_ms, attempts=s.attempts + 1
                )
                self._submissions[s.submission_id] = taken
                claimed.append(taken)
            return claimed

    def extend_lease(self, submission_id: str, worker_id: str, until_ms: int) -> bool:
        with self._txn():
            s = self._submissions.get(submission_id)
            if s is None or s.verdict != VERDICT_PENDING or s.claimed_by != worker_id:
                return False
            self._submissions[submission_id] = dataclasses.replace(s, lease_expires_ms=until_ms)
            return True

    def release_claims(self, worker_prefix: str) -> int:
        with self._txn():
            held = [
                s
                for s in self._submissions.values()
                if s.verdict == VERDICT_PENDING and (s.claimed_by or "").startswith(worker_prefix)
            ]
            for s in held:
                self._submissions[s.submission_id] = dataclasses.replace(s, lease_expires_ms=None)
            return len(held)

    def finish_submission(
        self,
        submission_id: str,
        verdict: int,
        reason: str,
        leaf: LeafRecord,
        *,
        verified_against: str | None = None,
    ) -> tuple[SubmissionRecord, LeafRecord]:
        _check_verdict(verdict)
        with self._txn():
            sub = self._submissions.get(submission_id)
            if sub is None:
                raise NotFoundError(f"unknown submission {submission_id!r}")
            if sub.verdict != VERDICT_PENDING:
                assert sub.leaf_index is not None
                return sub, self._leaves[sub.leaf_index]
            request = self._requests[sub.request_id]
            stored_leaf = dataclasses.replace(leaf, index=len(self._leaves), submission_id=submission_id)
            self._leaves.append(stored_leaf)
            self._fault("leaf-appended")
            sub = dataclasses.replace(sub, verdict=verdict, reason=reason, leaf_index=stored_leaf.index)
            self._submissions[submission_id] = sub
            self._fault("submission-updated")
            if verdict == VERDICT_ACCEPTED:
                if request.accepted_submission_id is not None:
                    raise AlreadyAcceptedError(
                        f"request {request.request_id!r} already has an accepted submission"
                    )
                self._requests[request.request_id] = dataclasses.replace(
                    request, accepted_submission_id=submission_id
                )
                client = self._clients[sub.client_id]
                if verified_against is not None and client.current_commitments != verified_against:
                    raise StaleCommitmentsError(_stale_message(sub.client_id))
                self._clients[sub.client_id] = dataclasses.replace(
                    client, current_commitments=sub.after_commitments
                )
                self._fault("request-updated")
            return sub, stored_leaf

    def ledger_size(self) -> int:
        with self._lock:
            return len(self._leaves)

    def leaf_hashes(self, size: int | None = None, start: int = 0) -> list[bytes]:
        with self._lock:
            leaves = self._leaves[start:] if size is None else self._leaves[start:size]
            return [leaf.leaf_hash for leaf in leaves]

    def get_leaf(self, index: int) -> LeafRecord | None:
        with self._lock:
            return self._leaves[index] if 0 <= index < len(self._leaves) else None

    def add_tree_head(self, record: TreeHeadRecord) -> TreeHeadRecord:
        with self._txn():
            return self._heads.setdefault(record.size, record)

    def get_tree_head(self, size: int) -> TreeHeadRecord | None:
        with self._lock:
            return self._heads.get(size)

    def close(self) -> None:
        """Nothing to release: the dicts go with the object."""
