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
import hmac
import json
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from zkunlearn.circuits.mask import Mask, MaskError
from zkunlearn.proofs.exact_deletion import decode_proof_list, encode_proof_list, enrollment_proofs_digest
from zkunlearn.proofs.statements import (
    DOMAIN_DELETION_REQUEST,
    DOMAIN_DELIVERY,
    DOMAIN_ENROLLMENT,
    DOMAIN_RECEIPT,
    DOMAIN_RPC_AUTH,
    SignedStatement,
    StatementError,
    StatementSigner,
    StatementVerifier,
    canonical_json,
    key_id_for,
)

from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundServiceError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryLaterError,
    ServiceError,
    UnauthenticatedError,
)
from .jobs import JobSettings, VerificationWorkers
from .ledger import Ledger, LedgerError, TreeHead
from .models import (
    ANALYTIC_KINDS,
    MAX_REASON_CHARS,
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
    ServiceConfig,
    SubmissionHeader,
    TensorData,
    VerificationJob,
    VerificationResult,
    _check_commitments,
    commitments_from_json,
    commitments_json,
    require_payload,
)
from .ratelimit import RateLimiter
from .state import (
    VERDICT_ACCEPTED,
    VERDICT_PENDING,
    VERDICT_REJECTED,
    AlreadyAcceptedError,
    ClientRecord,
    ConflictError,
    NonceError,
    NotFoundError,
    ProviderState,
    RequestRecord,
    StaleCommitmentsError,
    SubmissionRecord,
)

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

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
_MAX_ID = 128
_NONCE_BYTES = 16
_NONCE_MAC_BYTES = 16
_VERDICT_NAMES = {VERDICT_ACCEPTED: "accepted", VERDICT_REJECTED: "rejected", VERDICT_PENDING: "pending"}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{what} is empty")
    if len(value) > _MAX_ID:
        raise InvalidInputError(f"{what} is longer than {_MAX_ID} characters")
    if not set(value) <= _ID_CHARS:
        raise InvalidInputError(f"{what} {value!r} may only contain letters, digits and -_.:")
    return value


def _check_layer(name: str) -> str:
    if not name or len(name) > 256 or "\n" in name:
        raise InvalidInputError(f"layer name must be 1..256 characters without newlines, got {name[:40]!r}")
    return name


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
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.state = state
        self.signer = signer
        # Nonces are MACed with a key only the provider's key holders (its replicas) can derive.
        self._nonce_key = hashlib.sha256(b"zkunlearn/nonce-key/v1" + signer.private_bytes()).digest()
        self.verifier = verifier
        self.config = config or ServiceConfig()
        self.clock_ms = clock_ms
        self.ledger = Ledger(state, signer, clock_ms)
        self.workers = VerificationWorkers(
            state,
            self._verify,
            self._give_up,
            replica_id=_check_id(self.config.replica_id, "replica id"),
            settings=JobSettings(
                workers=self.config.verify_workers,
                lease_s=self.config.verify_lease_s,
                poll_s=self.config.verify_poll_s,
                max_attempts=self.config.verify_max_attempts,
            ),
            clock_ms=clock_ms,
        )
        self._new_requests = threading.Condition()
        self._closed = threading.Event()
        self._last_purge_ms = 0
        self._peer_challenges = RateLimiter(self.config.challenge_rate_per_peer)
        self._subject_challenges = RateLimiter(self.config.challenge_rate_per_subject)
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
        if enrollment.version != PROTOCOL_VERSION:
            raise InvalidInputError(f"protocol version {enrollment.version} unsupported (provider speaks 1)")
        client_id = _check_id(enrollment.client_id, "client id")
        if len(enrollment.public_key) != 32:
            raise InvalidInputError(
                f"public key must be 32 raw Ed25519 bytes, got {len(enrollment.public_key)}"
            )
        _check_id(enrollment.model_id, "model id")
        if self.config.model_ids and enrollment.model_id not in self.config.model_ids:
            raise NotFoundServiceError(
                f"unknown model id {enrollment.model_id!r} (provider serves {list(self.config.model_ids)})"
            )
        if enrollment.update_kind not in UPDATE_KINDS:
            raise InvalidInputError(
                "update kind must be GROUP_OBS (1), ANALYTIC (2), GROUP_OBS_EXACT (3) or "
                f"ANALYTIC_EXACT (4), got {enrollment.update_kind}"
            )
        if not enrollment.layers or len(enrollment.layers) > self.config.max_layers:
            raise InvalidInputError(f"enrollment must name 1..{self.config.max_layers} layers")
        layers = tuple(_check_layer(n) for n in enrollment.layers)
        if len(set(layers)) != len(layers):
            raise InvalidInputError("enrollment names a layer twice")
        commitments = _check_commitments(enrollment.commitments, "enrollment")
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
        record = ClientRecord(
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
        try:
            stored, _ = self.state.add_client(record)
        except ConflictError as exc:
            raise AlreadyExistsError(str(exc)) from exc
        return stored

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
        subject = _check_id(client_id, "client id")
        self.throttle_challenge(subject, peer)
        return self.issue_nonce(subject)

    def throttle_challenge(self, subject: str, peer: str) -> None:
        """Refuse, as retryable, a caller (``peer``: its address) or a subject asking for nonces
        faster than ``challenge_rate_per_peer`` / ``challenge_rate_per_subject`` allow."""
        if peer and not self._peer_challenges.allow(peer):
            raise RetryLaterError("too many challenges from this address; retry after a short wait")
        if not self._subject_challenges.allow(subject):
            raise RetryLaterError("too many challenges for this id; retry after a short wait")

    def issue_nonce(self, subject: str) -> tuple[bytes, int]:
        """A nonce only ``subject`` can use, once, before it expires (see :meth:`challenge`).

        Subjects are client ids, which cannot contain ``/``, or ``operator/<key id>``: a nonce issued
        to one namespace is never accepted in the other.
        """
        expires = self.clock_ms() + int(self.config.nonce_ttl_s * 1000)
        head = expires.to_bytes(8, "big") + secrets.token_bytes(_NONCE_BYTES)
        return head + self._nonce_mac(subject, head), expires

    def _nonce_mac(self, client_id: str, head: bytes) -> bytes:
        message = len(client_id).to_bytes(2, "big") + client_id.encode() + head
        return hmac.new(self._nonce_key, message, hashlib.sha256).digest()[:_NONCE_MAC_BYTES]

    def use_nonce(self, client_id: str, nonce: bytes) -> None:
        """Refuse a nonce this provider did not issue to ``client_id`` (a subject of :meth:`issue_nonce`),
        an expired one, or a replay; otherwise record its use."""
        now = self.clock_ms()
        head, mac = nonce[:-_NONCE_MAC_BYTES], nonce[-_NONCE_MAC_BYTES:]
        if len(nonce) != 8 + _NONCE_BYTES + _NONCE_MAC_BYTES or not hmac.compare_digest(
            mac, self._nonce_mac(client_id, head)
        ):
            raise UnauthenticatedError(
                "unknown nonce (not issued to this client): ask Challenge for a fresh one"
            )
        expires = int.from_bytes(head[:8], "big")
        if expires < now:
            raise UnauthenticatedError("nonce expired: ask Challenge for a fresh one")
        if now - self._last_purge_ms > 60_000:
            # Expired nonces are refused by their own expiry: the used ones only need keeping until then.
            self._last_purge_ms = now
            self.state.purge_nonces(now)
        try:
            self.state.add_nonce(client_id, nonce, expires)
            self.state.consume_nonce(client_id, nonce, now)
        except (ConflictError, NonceError) as exc:
            raise UnauthenticatedError(
                "nonce already used (replay refused): ask Challenge for a fresh one"
            ) from exc

    def authenticate(self, auth: AuthInput, rpc: str, fields: Mapping[str, Any]) -> ClientRecord:
        """Check an RPC-auth statement against the enrolled key, then consume its nonce.

        The statement must name this client, this nonce, this RPC and exactly these call fields, so
        a signature cannot be lifted onto another call.
        """
        if not auth.client_id:
            raise UnauthenticatedError(f"{rpc} needs client authentication (auth.client_id is empty)")
        client = self.state.get_client(auth.client_id)
        if client is None:
            raise UnauthenticatedError(f"unknown client {auth.client_id[:_MAX_ID]!r}: enroll first")
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

    def create_requests(self, drafts: Sequence[RequestDraft]) -> list[RequestRecord]:
        """Check, sign and queue deletion requests in one transaction: all are stored or none.

        Every draft is checked (enrolled client, mask layers the client enrolled, forget data an
        analytic client needs) before anything is signed, so a bad one refuses the whole batch.
        """
        records = [self._prepare(draft) for draft in drafts]
        try:
            stored = self.state.add_requests(records)
        except ConflictError as exc:
            raise AlreadyExistsError(str(exc)) from exc
        except NotFoundError as exc:
            raise NotFoundServiceError(str(exc)) from exc
        with self._new_requests:
            self._new_requests.notify_all()
        return stored

    def _prepare(self, draft: RequestDraft) -> RequestRecord:
        client = self.state.get_client(draft.client_id)
        if client is None:
            raise NotFoundServiceError(f"unknown client {draft.client_id!r}")
        mask, forget_features, forget_labels = draft.mask, draft.forget_features, draft.forget_labels
        try:
            parsed = Mask.from_bytes(mask) if isinstance(mask, bytes | bytearray) else mask
        except MaskError as exc:
            raise InvalidInputError(f"mask: {exc}") from exc
        unknown = sorted(set(parsed.layer_names) - set(client.layers))
        if unknown:
            raise InvalidInputError(
                f"mask names layers client {client.client_id!r} did not enroll: {unknown}"
            )
        if (forget_features is None) != (forget_labels is None):
            raise InvalidInputError("forget features and labels come together or not at all")
        if client.update_kind in ANALYTIC_KINDS and forget_features is None:
            raise InvalidInputError(
                f"analytic client {client.client_id!r} needs the forget samples' features and labels"
            )
        forget: dict[str, Any] | None = None
        if forget_features is not None and forget_labels is not None:
            forget_features.validate("forget features", self.config.max_forget_bytes)
            forget_labels.validate("forget labels", self.config.max_forget_bytes)
            forget = {"features": forget_features.digest_json(), "labels": forget_labels.digest_json()}
        rid = _check_id(draft.request_id, "request id") if draft.request_id else uuid.uuid4().hex
        issued = self.clock_ms()
        ttl_s = self.config.request_ttl_s if draft.ttl_s is None else draft.ttl_s
        expires = issued + int(ttl_s * 1000)
        mask_bytes = parsed.to_bytes()
        payload = {
            "version": PROTOCOL_VERSION,
            "request_id": rid,
            "client_id": client.client_id,
            "model_id": client.model_id,
            "update_kind": client.update_kind,
            "layers": parsed.layer_names,
            "mask_sha256": parsed.digest(),
            "mask_bytes": len(mask_bytes),
            "forget": forget,
            "issued_ms": issued,
            "expires_ms": expires,
            "nonce": secrets.token_hex(16),
        }
        statement = self.signer.sign(DOMAIN_DELETION_REQUEST, payload)
        return RequestRecord(
            request_id=rid,
            client_id=client.client_id,
            canonical=statement.canonical,
            signature=statement.signature,
            mask=mask_bytes,
            forget=_encode_forget(forget_features, forget_labels),
            issued_ms=issued,
            expires_ms=expires,
        )

    def _delivered(self, record: RequestRecord) -> DeliveredRequest:
        """The request with its cursor signed: the client moves its stored cursor only to a signed one,
        so a genuine request replayed with another cursor cannot make it skip requests."""
        features, labels = _decode_forget(record.forget)
        signed = self.signer.sign(
            DOMAIN_DELIVERY,
            {
                "request_id": record.request_id,
                "client_id": record.client_id,
                "cursor": record.cursor,
                "request_sha256": hashlib.sha256(record.canonical).hexdigest(),
            },
        )
        return DeliveredRequest(record, features, labels, signed.canonical, signed.signature)

    def requests_after(self, client: ClientRecord, cursor: int, limit: int) -> list[DeliveredRequest]:
        if cursor < 0:
            raise InvalidInputError(f"cursor must be >= 0, got {cursor}")
        limit = max(1, min(limit or 100, 1000))
        return [self._delivered(r) for r in self.state.requests_after(client.client_id, cursor, limit)]

    def wait_for_requests(
        self, client: ClientRecord, cursor: int, timeout_s: float, limit: int = 100
    ) -> list[DeliveredRequest]:
        """Block until requests after ``cursor`` exist, the timeout passes, or the service closes.

        The state is re-read after every wake-up and timeout, so requests written by another provider
        process sharing the database are delivered too (within one timeout).
        """
        found = self.requests_after(client, cursor, limit)
        if found or self._closed.is_set():
            return found
        with self._new_requests:
            self._new_requests.wait(timeout_s)
        return self.requests_after(client, cursor, limit)

    # -- submissions --------------------------------------------------------------------------------

    def submit(self, header: SubmissionHeader, chunks: Iterable[bytes]) -> SubmissionRecord:
        """Authenticate, receive and store a proof upload, and queue it for verification.

        Returns the stored submission (PENDING, or the earlier result for an identical resubmission).
        """
        if self._closed.is_set():
            raise FailedPreconditionError("provider is shutting down; retry shortly")
        if header.version != PROTOCOL_VERSION:
            raise InvalidInputError(f"protocol version {header.version} unsupported (provider speaks 1)")
        _check_id(header.request_id, "request id")
        if header.total_bytes > self.config.max_proof_bytes:
            raise ResourceExhaustedError(
                f"declared proof size {header.total_bytes} exceeds the limit of "
                f"{self.config.max_proof_bytes} bytes"
            )
        if not header.proof_sizes:
            raise InvalidInputError("proof_sizes is empty: a submission carries at least one proof")
        if len(header.proof_sizes) > self.config.max_proofs:
            raise ResourceExhaustedError(
                f"{len(header.proof_sizes)} proofs exceed the limit of {self.config.max_proofs}"
            )
        if any(s <= 0 for s in header.proof_sizes) or sum(header.proof_sizes) != header.total_bytes:
            raise InvalidInputError(
                "proof sizes must be positive and sum to total_bytes "
                f"({sum(header.proof_sizes)} != {header.total_bytes})"
            )
        if len(header.sha256) != 64 or any(ch not in "0123456789abcdef" for ch in header.sha256):
            raise InvalidInputError("sha256 must be 64 lower-case hex characters")
        after = _check_commitments(header.after_commitments, "after commitments")
        if not after:
            raise InvalidInputError(
                "after_commitments is empty: the proof must commit to the updated weights"
            )
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
        proof = _receive(chunks, header.total_bytes, header.sha256)
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

    def _give_up(self, sub: SubmissionRecord, reason: str) -> SubmissionRecord:
        return self._verify(sub, forced=VerificationResult(False, reason))

    def _verify(
        self, claimed: SubmissionRecord, forced: VerificationResult | None = None
    ) -> SubmissionRecord:
        """Verify one claimed job and finish it: verdict, receipt and ledger leaf in one transaction."""
        sub = self.state.get_submission(claimed.submission_id)
        if sub is None:
            raise NotFoundError(f"unknown submission {claimed.submission_id!r}")
        if sub.verdict != VERDICT_PENDING:
            return sub
        submission_id = sub.submission_id
        request = self.state.get_request(sub.request_id)
        client = self.state.get_client(sub.client_id)
        if request is None or client is None:  # foreign keys make this unreachable
            raise NotFoundError(f"submission {submission_id!r} names a missing request or client")
        before = tuple(commitments_from_json(client.current_commitments))
        after = tuple(commitments_from_json(sub.after_commitments))
        payload = SignedStatement.from_wire(request.canonical, request.signature).payload
        features, labels = _decode_forget(request.forget)
        if forced is not None:
            result = forced
        elif request.accepted_submission_id is not None:
            result = VerificationResult(
                False, f"request already answered by {request.accepted_submission_id}"
            )
        else:
            sizes = [int(s) for s in json.loads(sub.proof_sizes)]
            proofs, offset = [], 0
            for s in sizes:
                proofs.append(sub.proof[offset : offset + s])
                offset += s
            job = VerificationJob(
                request_id=request.request_id,
                client_id=client.client_id,
                model_id=client.model_id,
                update_kind=client.update_kind,
                layers=tuple(payload.get("layers", ())),
                request_payload=payload,
                request_canonical=request.canonical,
                mask=request.mask,
                forget_features=features,
                forget_labels=labels,
                before_commitments=before,
                after_commitments=after,
                proofs=tuple(proofs),
                enrolled_layers=client.layers,
                enrolled_commitments=tuple(commitments_from_json(client.enrolled_commitments)),
                enrollment_proofs=tuple(decode_proof_list(client.enrollment_proofs)),
            )
            try:
                result = self.verifier.verify(job)
            except BaseException as exc:  # a crash is a rejection with a reason, never a lost submission
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                # pyo3 panics (ezkl's) derive from BaseException: they must not kill the worker either.
                result = VerificationResult(False, f"verifier error: {type(exc).__name__}: {exc}")
        if len(result.reason) > MAX_REASON_CHARS:
            result = VerificationResult(result.accepted, result.reason[: MAX_REASON_CHARS - 3] + "...")
        verdict = VERDICT_ACCEPTED if result.accepted else VERDICT_REJECTED
        receipt = self._sign_receipt(
            {
                "version": PROTOCOL_VERSION,
                "request_id": request.request_id,
                "request_sha256": hashlib.sha256(request.canonical).hexdigest(),
                "client_id": client.client_id,
                "model_id": client.model_id,
                "submission_id": sub.submission_id,
                "update_kind": client.update_kind,
                "verdict": _VERDICT_NAMES[verdict],
                "reason": result.reason,
                "mask_sha256": payload.get("mask_sha256"),
                "proof_sha256": sub.proof_sha256,
                "before_commitments": [c.to_json() for c in before],
                "after_commitments": [c.to_json() for c in after],
                "verified_ms": self.clock_ms(),
            },
        )
        # The stored verdict is the signed one (the backstop in _sign_receipt may have made it a rejection).
        verdict = VERDICT_ACCEPTED if receipt.payload["verdict"] == "accepted" else VERDICT_REJECTED
        try:
            done, _leaf = self.ledger.append(
                sub.submission_id,
                verdict,
                str(receipt.payload["reason"]),
                receipt,
                verified_against=client.current_commitments,
            )
        except (AlreadyAcceptedError, StaleCommitmentsError) as lost:
            # Another submission won the race: for the same request, or for another request of this
            # client, which moved the state this one was verified against. Recorded as rejected.
            reason = "request already answered" if isinstance(lost, AlreadyAcceptedError) else str(lost)
            loser = self._sign_receipt({**receipt.payload, "verdict": "rejected", "reason": reason})
            done, _leaf = self.ledger.append(
                sub.submission_id, VERDICT_REJECTED, str(loser.payload["reason"]), loser
            )
        return done

    def _sign_receipt(self, payload: dict[str, Any]) -> SignedStatement:
        """Sign a receipt; one that cannot be signed becomes a signed rejection, never a stuck job.

        The input limits keep every receipt signable; this is the backstop if they ever do not, since
        a job whose receipt fails to sign would be released and retried for ever, first in the queue.
        """
        try:
            return self.signer.sign(DOMAIN_RECEIPT, payload)
        except StatementError as exc:
            reason = f"receipt could not be signed: {exc}"[:MAX_REASON_CHARS]
            return self.signer.sign(
                DOMAIN_RECEIPT,
                {
                    **payload,
                    "verdict": _VERDICT_NAMES[VERDICT_REJECTED],
                    "reason": reason,
                    "before_commitments": [],
                    "after_commitments": [],
                },
            )

    # -- receipts and ledger ------------------------------------------------------------------------

    def receipt(self, request_id: str, client_id: str) -> ReceiptView:
        """The accepted submission's receipt, else the latest one's (PENDING without a leaf)."""
        _check_id(request_id, "request id")
        if client_id:
            _check_id(client_id, "client id")
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


# ---------------------------------------------------------------------------------------------------
# helpers


def _receive(chunks: Iterable[bytes], total: int, sha256: str) -> bytes:
    digest = hashlib.sha256()
    buf = bytearray()
    for chunk in chunks:
        if len(buf) + len(chunk) > total:
            raise InvalidInputError(f"upload is longer than the declared {total} bytes")
        buf += chunk
        digest.update(chunk)
    if len(buf) < total:
        raise InvalidInputError(f"truncated upload: got {len(buf)} of the declared {total} bytes")
    if digest.hexdigest() != sha256:
        raise InvalidInputError("uploaded bytes do not match the declared sha256")
    return bytes(buf)


def _encode_forget(features: TensorData | None, labels: TensorData | None) -> bytes:
    """A self-describing, pickle-free encoding: a JSON header line, then the raw float64 bytes."""
    if features is None or labels is None:
        return b""
    header = canonical_json({"features": list(features.shape), "labels": list(labels.shape)})
    return header + b"\n" + features.float64_le + labels.float64_le


def _decode_forget(blob: bytes) -> tuple[TensorData | None, TensorData | None]:
    if not blob:
        return None, None
    head, _, rest = blob.partition(b"\n")
    shapes = json.loads(head)
    fshape, lshape = tuple(shapes["features"]), tuple(shapes["labels"])
    n = math.prod(fshape) * 8
    return TensorData(fshape, rest[:n]), TensorData(lshape, rest[n:])
