"""The provider's protocol logic, free of any transport: the gRPC servicer only decodes and encodes.

Everything a client can send is checked here against signed statements and the durable state:

- enrollment carries a proof of possession (the client's key signs the enrollment statement);
- every other client call carries an RPC-auth statement signed by the enrolled key over a fresh,
  single-use, server-issued nonce, the RPC name and the call's own fields, so a captured call cannot
  be replayed, redirected to another RPC, or altered;
- a deletion request is a provider-signed statement binding the client, model, layers, mask digest,
  forget-data digests, issue and expiry times and a nonce, so a client can refuse forgeries offline;
- proof uploads are size-limited while streaming and checked against the declared SHA-256 before
  anything is stored; identical resubmissions are idempotent, different answers to an answered
  request are refused;
- verification runs in worker threads that claim jobs from the shared state (see :mod:`.jobs`), so a
  slow (minutes-long) ezkl verification never holds an RPC thread, several replicas and stand-alone
  workers share the work, and every verdict becomes a signed receipt appended to the ledger in the
  same transaction that finishes the job.

Pending submissions survive a crash: they stay jobs in the database; :meth:`ProviderService.recover`
frees the leases this replica held before it restarted so they are taken again at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from zkunlearn.circuits.mask import Mask
from zkunlearn.proofs.exact_deletion import encode_proof_list, enrollment_proofs_digest
from zkunlearn.proofs.statements import (
    DOMAIN_ENROLLMENT,
    DOMAIN_RPC_AUTH,
    StatementError,
    StatementSigner,
    StatementVerifier,
    canonical_json,
    key_id_for,
    now_ms,
)

from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundServiceError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceError,
    UnauthenticatedError,
)
from .jobs import JobSettings, VerificationWorkers
from .ledger import Ledger, LedgerError, TreeHead
from .models import (
    MAX_ID_CHARS,
    PROTOCOL_VERSION,
    PROVEN_ENROLLMENT_KINDS,
    UPDATE_KINDS,
    AuthInput,
    CommitmentRef,
    DeliveredRequest,
    EnrollmentInput,
    EnrollmentLayoutChecker,
    EnrollmentVerifier,
    ProofVerifier,
    ProviderInfo,
    ReceiptView,
    RequestDraft,
    RequestPreparer,
    ServiceConfig,
    SubmissionHeader,
    TensorData,
    VerificationJob,
    VerificationResult,
    check_commitments,
    check_id,
    check_layer,
    commitments_from_json,
    commitments_json,
    require_payload,
)
from .nonces import NonceBook
from .reenrollment import reenroll
from .requests import delivered, sign_request
from .state import (
    VERDICT_PENDING,
    AlreadyAcceptedError,
    ClientRecord,
    ConflictError,
    NotFoundError,
    ProviderState,
    RequestRecord,
    SubmissionRecord,
)
from .submissions import check_submission_header, receive_upload
from .update_policy import check_accepted_kind, warn_if_loose
from .verdicts import VerdictRecorder

__all__ = [
    "PROTOCOL_VERSION",
    "UPDATE_KINDS",
    "AlreadyExistsError",
    "AuthInput",
    "CommitmentRef",
    "EnrollmentInput",
    "EnrollmentVerifier",
    "FailedPreconditionError",
    "InvalidInputError",
    "NotFoundServiceError",
    "PermissionDeniedError",
    "ProofVerifier",
    "ProviderInfo",
    "ProviderService",
    "ReceiptView",
    "ResourceExhaustedError",
    "ServiceConfig",
    "ServiceError",
    "SubmissionHeader",
    "TensorData",
    "UnauthenticatedError",
    "VerificationJob",
    "VerificationResult",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------


class ProviderService:
    """The provider: enrollment, authentication, deletion requests, submissions, receipts, ledger."""

    def __init__(
        self,
        state: ProviderState,
        signer: StatementSigner,
        verifier: ProofVerifier,
        config: ServiceConfig | None = None,
        *,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.state = state
        self.signer = signer
        self.verifier = verifier
        self.config = config or ServiceConfig()
        warn_if_loose(self.config.update_kinds)
        self.clock_ms = clock_ms
        self.ledger = Ledger(state, signer, clock_ms)
        # The components read the service's clock through it, so replacing ``clock_ms`` reaches them all.
        self.verdicts = VerdictRecorder(state, signer, verifier, self.ledger, lambda: self.clock_ms())
        self.workers = VerificationWorkers(
            state,
            self.verdicts.finish,
            self.verdicts.give_up,
            replica_id=check_id(self.config.replica_id, "replica id"),
            settings=JobSettings(
                workers=self.config.verify_workers,
                lease_s=self.config.verify_lease_s,
                poll_s=self.config.verify_poll_s,
                max_attempts=self.config.verify_max_attempts,
            ),
            clock_ms=clock_ms,
        )
        self._new_requests = threading.Condition()
        self._requests_generation = 0  # bumped under _new_requests whenever requests are added
        self._closed = threading.Event()
        self.nonces = NonceBook(state, signer, self.config, lambda: self.clock_ms())
        self.workers.start()

    # -- lifecycle ----------------------------------------------------------------------------------

    def recover(self) -> int:
        """Free the job leases this replica held before a restart; returns how many jobs are pending.

        Pending submissions never leave the database, so nothing needs re-queueing: jobs held by a
        previous life of this replica are released for immediate pickup, those of other (possibly
        live) replicas are left to their leases.
        """
        self.state.release_claims(self.workers.replica_id + "/")
        self.workers.nudge()
        return len(self.state.pending_submissions())

    def close(self, wait: bool = True) -> None:
        """Stop accepting work, wake watchers so their streams end, and drain (or abandon) verification.

        An abandoned job keeps its lease until it expires (or this replica restarts), then another
        worker takes it: nothing is lost either way.
        """
        self._closed.set()
        with self._new_requests:
            self._new_requests.notify_all()
        self.workers.stop(wait=wait)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            protocol_version=PROTOCOL_VERSION,
            key_id=self.signer.key_id,
            public_key=self.signer.public_bytes(),
            model_ids=self.config.model_ids,
            srs_digest=self.config.srs_digest,
            srs_insecure=self.config.srs_insecure,
        )

    # -- enrollment and authentication --------------------------------------------------------------

    def enroll(self, enrollment: EnrollmentInput) -> ClientRecord:
        """Register a client key; repeating an identical enrollment is idempotent."""
        record = self.checked_enrollment(enrollment)
        try:
            stored, _ = self.state.add_client(record)
        except ConflictError as exc:
            raise AlreadyExistsError(str(exc)) from exc
        return stored

    def reenroll(self, enrollment: EnrollmentInput, auth: AuthInput) -> ClientRecord:
        """Replace an enrolled client's commitments; see :func:`.reenrollment.reenroll`."""
        return reenroll(self, enrollment, auth)

    def checked_enrollment(self, enrollment: EnrollmentInput) -> ClientRecord:
        """The client record an enrollment asks for, after every check of it; nothing is stored."""
        if enrollment.version != PROTOCOL_VERSION:
            raise InvalidInputError(f"protocol version {enrollment.version} unsupported (provider speaks 1)")
        client_id = check_id(enrollment.client_id, "client id")
        if len(enrollment.public_key) != 32:
            raise InvalidInputError(
                f"public key must be 32 raw Ed25519 bytes, got {len(enrollment.public_key)}"
            )
        check_id(enrollment.model_id, "model id")
        if self.config.model_ids and enrollment.model_id not in self.config.model_ids:
            raise NotFoundServiceError(
                f"unknown model id {enrollment.model_id!r} (provider serves {list(self.config.model_ids)})"
            )
        if enrollment.update_kind not in UPDATE_KINDS:
            raise InvalidInputError(
                "update kind must be GROUP_OBS (1), ANALYTIC (2), GROUP_OBS_EXACT (3) or "
                f"ANALYTIC_EXACT (4), got {enrollment.update_kind}"
            )
        check_accepted_kind(enrollment.update_kind, self.config.update_kinds)
        if not enrollment.layers or len(enrollment.layers) > self.config.max_layers:
            raise InvalidInputError(f"enrollment must name 1..{self.config.max_layers} layers")
        layers = tuple(check_layer(n) for n in enrollment.layers)
        if len(set(layers)) != len(layers):
            raise InvalidInputError("enrollment names a layer twice")
        commitments = check_commitments(enrollment.commitments, "enrollment")
        payload = self._open(
            enrollment.canonical, enrollment.signature, enrollment.public_key, DOMAIN_ENROLLMENT, "enrollment"
        )
        expected = {
            "version": PROTOCOL_VERSION,
            "key_id": key_id_for(enrollment.public_key),
            "client_id": client_id,
            "public_key": enrollment.public_key.hex(),
            "model_id": enrollment.model_id,
            "layers": list(layers),
            "update_kind": enrollment.update_kind,
            "commitments": [c.to_json() for c in commitments],
        }
        proofs = self._enrollment_proofs(enrollment)
        if enrollment.update_kind in PROVEN_ENROLLMENT_KINDS:
            expected["enrollment_proofs_sha256"] = enrollment_proofs_digest(proofs)
        require_payload(payload, expected, "enrollment", InvalidInputError)
        if isinstance(self.verifier, EnrollmentLayoutChecker):
            layout = self.verifier.check_enrollment(
                enrollment.model_id,
                enrollment.update_kind,
                layers,
                tuple(commitments),
                self.config.layer_shapes.get(enrollment.model_id),
            )
            if not layout.accepted:
                raise InvalidInputError(f"enrollment commitments refused: {layout.reason}")
        if enrollment.update_kind in PROVEN_ENROLLMENT_KINDS:
            if not isinstance(self.verifier, EnrollmentVerifier):
                raise FailedPreconditionError("this provider does not verify enrollment proofs")
            result = self.verifier.verify_enrollment(enrollment.model_id, layers, tuple(commitments), proofs)
            if not result.accepted:
                raise InvalidInputError(f"enrollment proofs refused: {result.reason}")
        return ClientRecord(
            client_id=client_id,
            public_key=enrollment.public_key,
            model_id=enrollment.model_id,
            layers=layers,
            update_kind=enrollment.update_kind,
            enrolled_commitments=commitments_json(commitments),
            current_commitments=commitments_json(commitments),
            enrollment_canonical=enrollment.canonical,
            enrollment_signature=enrollment.signature,
            enrolled_ms=self.clock_ms(),
            enrollment_proofs=encode_proof_list(proofs) if proofs else b"",
        )

    def _enrollment_proofs(self, enrollment: EnrollmentInput) -> tuple[bytes, ...]:
        """Exact enrollments carry proofs, bounded like a submission's; no other kind does."""
        proofs = tuple(enrollment.enrollment_proofs)
        if enrollment.update_kind not in PROVEN_ENROLLMENT_KINDS:
            if proofs:
                raise InvalidInputError(
                    "only exact (GROUP_OBS_EXACT, ANALYTIC_EXACT) enrollments carry proofs"
                )
            return ()
        if not proofs or len(proofs) > self.config.max_proofs:
            raise InvalidInputError(f"an exact enrollment carries 1..{self.config.max_proofs} proofs")
        if sum(len(p) for p in proofs) > self.config.max_proof_bytes:
            raise InvalidInputError(f"enrollment proofs exceed {self.config.max_proof_bytes} bytes")
        return proofs

    def challenge(self, client_id: str, peer: str = "") -> tuple[bytes, int]:
        """Issue a single-use nonce for the client's next authenticated call.

        Stateless: ``expiry || random || HMAC(key, client_id || expiry || random)``, with a key derived
        from the provider's signing key (so every replica issues and accepts the same nonces). An
        unauthenticated caller can therefore neither write to the state nor learn which client ids are
        enrolled: every well-formed id gets a nonce; only a use of it, signed by the enrolled key, is
        recorded (:meth:`authenticate`)."""
        subject = check_id(client_id, "client id")
        self.throttle_challenge(subject, peer)
        return self.issue_nonce(subject)

    def throttle_challenge(self, subject: str, peer: str) -> None:
        """See :meth:`.nonces.NonceBook.throttle`."""
        self.nonces.throttle(subject, peer)

    def issue_nonce(self, subject: str) -> tuple[bytes, int]:
        """See :meth:`.nonces.NonceBook.issue`."""
        return self.nonces.issue(subject)

    def use_nonce(self, client_id: str, nonce: bytes) -> None:
        """See :meth:`.nonces.NonceBook.use`."""
        self.nonces.use(client_id, nonce)

    def authenticate(self, auth: AuthInput, rpc: str, fields: Mapping[str, Any]) -> ClientRecord:
        """Check an RPC-auth statement against the enrolled key, then consume its nonce.

        The statement must name this client, this nonce, this RPC and exactly these call fields, so
        a signature cannot be lifted onto another call.
        """
        if not auth.client_id:
            raise UnauthenticatedError(f"{rpc} needs client authentication (auth.client_id is empty)")
        client = self.state.get_client(auth.client_id)
        if client is None:
            raise UnauthenticatedError(f"unknown client {auth.client_id[:MAX_ID_CHARS]!r}: enroll first")
        try:
            payload = self._open(
                auth.canonical, auth.signature, client.public_key, DOMAIN_RPC_AUTH, "rpc auth"
            )
        except InvalidInputError as exc:
            raise UnauthenticatedError(
                f"{exc} (checked with the key enrolled for {client.client_id!r})"
            ) from exc
        if payload.get("client_id") != client.client_id:
            raise PermissionDeniedError("the signed auth names another client than the call")
        if payload.get("rpc") != rpc:
            raise PermissionDeniedError(f"the signed auth is for {payload.get('rpc')!r}, not {rpc!r}")
        if payload.get("nonce") != auth.nonce.hex():
            raise UnauthenticatedError("the signed auth covers another nonce than the one presented")
        require_payload(
            payload,
            {
                "version": PROTOCOL_VERSION,
                "key_id": key_id_for(client.public_key),
                "client_id": client.client_id,
                "rpc": rpc,
                "nonce": auth.nonce.hex(),
                **fields,
            },
            "rpc auth",
            PermissionDeniedError,
        )
        self.use_nonce(client.client_id, auth.nonce)
        return client

    def _open(
        self, canonical: bytes, signature: bytes, public_key: bytes, domain: str, what: str
    ) -> dict[str, Any]:
        try:
            payload = StatementVerifier.from_public_bytes(public_key).verify((canonical, signature), domain)
        except StatementError as exc:
            raise InvalidInputError(f"{what}: {exc}") from exc
        return payload

    # -- deletion requests --------------------------------------------------------------------------

    def create_request(
        self,
        client_id: str,
        mask: Mask | bytes,
        *,
        forget_features: TensorData | None = None,
        forget_labels: TensorData | None = None,
        ttl_s: float | None = None,
        request_id: str | None = None,
    ) -> RequestRecord:
        """Sign and queue a deletion request for one enrolled client."""
        draft = RequestDraft(client_id, mask, forget_features, forget_labels, ttl_s, request_id)
        return self.create_requests([draft])[0]

    def _sign(self, draft: RequestDraft) -> tuple[RequestRecord, ClientRecord]:
        client = self.state.get_client(draft.client_id)
        if client is None:
            raise NotFoundServiceError(f"unknown client {draft.client_id!r}")
        return sign_request(draft, client, self.signer, self.config, self.clock_ms()), client

    def create_requests(self, drafts: Sequence[RequestDraft]) -> list[RequestRecord]:
        """Check, sign and queue deletion requests in one transaction: all are stored or none.

        Every draft is checked (enrolled client, mask layers the client enrolled, forget data an
        analytic client needs) before anything is signed, so a bad one refuses the whole batch.
        """
        signed = [self._sign(draft) for draft in drafts]
        try:
            stored = self.state.add_requests([record for record, _client in signed])
        except ConflictError as exc:
            raise AlreadyExistsError(str(exc)) from exc
        except NotFoundError as exc:
            raise NotFoundServiceError(str(exc)) from exc
        with self._new_requests:
            self._requests_generation += 1
            self._new_requests.notify_all()
        if isinstance(self.verifier, RequestPreparer) and self.config.verify_workers > 0:
            # In the background: the verifier commits to each issued mask before its proofs arrive. A
            # process that verifies nothing (stand-alone workers do) would prepare for no one.
            for record, client in signed:
                try:
                    self.verifier.prepare(client.model_id, client.update_kind, record.canonical, record.mask)
                except Exception as exc:  # the requests are stored: verification does the work instead
                    log.warning("request %s not prepared: %s", record.request_id, exc)
        return stored

    def requests_after(self, client: ClientRecord, cursor: int, limit: int) -> list[DeliveredRequest]:
        if cursor < 0:
            raise InvalidInputError(f"cursor must be >= 0, got {cursor}")
        limit = max(1, min(limit or 100, 1000))
        return [delivered(r, self.signer) for r in self.state.requests_after(client.client_id, cursor, limit)]

    def wait_for_requests(
        self, client: ClientRecord, cursor: int, timeout_s: float, limit: int = 100
    ) -> list[DeliveredRequest]:
        """Block until requests after ``cursor`` exist, the timeout passes, or the service closes.

        The state is re-read after every wake-up and timeout, so requests written by another provider
        process sharing the database are delivered too (within one timeout). Requests added by this
        process between the first read and the wait are not missed: the wait is skipped when the
        generation counter moved.
        """
        with self._new_requests:
            seen = self._requests_generation
        found = self.requests_after(client, cursor, limit)
        if found or self._closed.is_set():
            return found
        with self._new_requests:
            if self._requests_generation == seen and not self._closed.is_set():
                self._new_requests.wait(timeout_s)
        return self.requests_after(client, cursor, limit)

    # -- submissions --------------------------------------------------------------------------------

    def submit(self, header: SubmissionHeader, chunks: Iterable[bytes]) -> SubmissionRecord:
        """Authenticate, receive and store a proof upload, and queue it for verification.

        Returns the stored submission (PENDING, or the earlier result for an identical resubmission).
        """
        if self._closed.is_set():
            raise FailedPreconditionError("provider is shutting down; retry shortly")
        after = check_submission_header(header, self.config)
        check_id(header.request_id, "request id")
        client = self.authenticate(
            header.auth,
            "SubmitProof",
            {
                "request_id": header.request_id,
                "update_kind": header.update_kind,
                "sha256": header.sha256,
                "total_bytes": header.total_bytes,
                "proof_sizes": list(header.proof_sizes),
                "after_commitments": [c.to_json() for c in after],
            },
        )
        if header.client_id and header.client_id != client.client_id:
            raise PermissionDeniedError("the header names another client than the authenticated one")
        request = self.state.get_request(header.request_id)
        if request is None:
            raise NotFoundServiceError(f"unknown request {header.request_id!r}")
        if request.client_id != client.client_id:
            raise PermissionDeniedError(f"request {header.request_id!r} was issued to another client")
        if header.update_kind != client.update_kind:
            raise InvalidInputError(
                f"update kind {header.update_kind} does not match the client's "
                f"enrolled kind {client.update_kind}"
            )
        enrolled = len(commitments_from_json(client.current_commitments))
        if len(after) > enrolled:
            raise InvalidInputError(
                f"after_commitments names {len(after)} commitments; an answer names exactly the "
                f"{enrolled} the client holds"
            )
        content = hashlib.sha256(
            canonical_json(
                {
                    "request_id": request.request_id,
                    "client_id": client.client_id,
                    "update_kind": header.update_kind,
                    "proof_sha256": header.sha256,
                    "proof_sizes": list(header.proof_sizes),
                    "after_commitments": [c.to_json() for c in after],
                }
            )
        ).hexdigest()
        earlier = self.state.submissions_for(request.request_id)
        existing = [s for s in earlier if s.content_digest == content]
        if not existing and len(earlier) >= self.config.max_submissions_per_request:
            raise ResourceExhaustedError(
                f"request {request.request_id!r} already has {len(earlier)} submissions (the limit, "
                "max_submissions_per_request); the provider must issue a new request"
            )
        proof = receive_upload(chunks, header.total_bytes, header.sha256)
        if not existing and request.expires_ms < self.clock_ms():
            raise FailedPreconditionError(
                f"request {request.request_id!r} expired at {request.expires_ms} (unix ms)"
            )
        record = SubmissionRecord(
            submission_id=uuid.uuid4().hex,
            request_id=request.request_id,
            client_id=client.client_id,
            content_digest=content,
            proof_sha256=header.sha256,
            proof_sizes=json.dumps(list(header.proof_sizes)),
            proof=proof,
            after_commitments=commitments_json(after),
            created_ms=self.clock_ms(),
        )
        try:
            stored, created = self.state.add_submission(record)
        except AlreadyAcceptedError as exc:
            raise AlreadyExistsError(str(exc)) from exc
        except NotFoundError as exc:
            raise NotFoundServiceError(str(exc)) from exc
        if created or stored.verdict == VERDICT_PENDING:
            self.workers.nudge()
        return stored

    def wait(self, submission_id: str, timeout_s: float) -> SubmissionRecord:
        """The submission after waiting up to ``timeout_s`` for its verdict (still PENDING on timeout).

        Wakes when a local worker finishes a job and otherwise re-reads the state every poll period,
        so a verdict reached by another replica or a stand-alone worker is seen too.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        poll = max(0.05, 2 * self.config.verify_poll_s)
        while True:
            sub = self.state.get_submission(submission_id)
            if sub is None:
                raise NotFoundServiceError(f"unknown submission {submission_id!r}")
            left = deadline - time.monotonic()
            if sub.verdict != VERDICT_PENDING or left <= 0 or self._closed.is_set():
                return sub
            with self.workers.finished:
                self.workers.finished.wait(min(poll, left))

    # -- receipts and ledger ------------------------------------------------------------------------

    def receipt(self, request_id: str, client_id: str) -> ReceiptView:
        """The accepted submission's receipt, else the latest one's (PENDING without a leaf)."""
        check_id(request_id, "request id")
        if client_id:
            check_id(client_id, "client id")
        request = self.state.get_request(request_id)
        if request is None:
            raise NotFoundServiceError(f"unknown request {request_id!r}")
        if client_id and request.client_id != client_id:
            raise NotFoundServiceError(f"request {request_id!r} does not belong to client {client_id!r}")
        subs = self.state.submissions_for(request_id)
        if not subs:
            raise NotFoundServiceError(f"no submission yet for request {request_id!r}")
        chosen = next((s for s in subs if s.submission_id == request.accepted_submission_id), subs[-1])
        return self.view(chosen)

    def view(self, sub: SubmissionRecord) -> ReceiptView:
        leaf = None if sub.leaf_index is None else self.state.get_leaf(sub.leaf_index)
        return ReceiptView(sub.submission_id, sub.verdict, sub.reason, leaf)

    def tree_head(self) -> TreeHead:
        return self.ledger.tree_head()

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        try:
            return self.ledger.inclusion_proof(index, size or None)
        except LedgerError as exc:
            raise InvalidInputError(str(exc)) from exc

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        try:
            return self.ledger.consistency_proof(first, second or None)
        except LedgerError as exc:
            raise InvalidInputError(str(exc)) from exc
