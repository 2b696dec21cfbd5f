"""The edge client: enroll, receive deletion requests, check them, prove the update, submit, keep receipts.

A request is acted on only after the client has checked, offline, everything it will be held to:
the provider's signature (with the key pinned at enrollment, so a later key swap is noticed), that
the request is addressed to this client and model, that it has not expired, and that the mask and
forget data it received are the ones the signature covers. Only then is the pluggable
:class:`UpdateProver` called, its output saved durably before upload, and the signed receipt checked
against what was submitted before it is stored. A request id is never proved twice: a restart finds
it applied (skip) or pending (resubmit the saved proof).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential
from zkunlearn.proofs.statements import (
    DOMAIN_ENROLLMENT,
    DOMAIN_RPC_AUTH,
    StatementSigner,
    StatementVerifier,
    enrollment_proofs_digest,
    now_ms,
)
from zkunlearn.v1 import provider_pb2 as pb

from zkunlearn.errors import MalformedError, RefusedError

from .checks import MAX_CURSOR, check_signed_receipt, verify_log_growth, verify_signed_request
from .records import (
    Commitment,
    ExpiredRequestError,
    ForgedRequestError,
    Outcome,
    ReceiptError,
    RequestRefusedError,
    UpdateProver,
    UpdateResult,
    VerifiedRequest,
)
from .store import AppliedRecord, ClientStore, PendingUpdate, StoreError
from .transport import ChannelConfig, Transport, is_retryable

__all__ = [
    "CHUNK_BYTES",
    "Commitment",
    "EdgeClient",
    "ExpiredRequestError",
    "ForgedRequestError",
    "Outcome",
    "ReceiptError",
    "RequestRefusedError",
    "UpdateProver",
    "UpdateResult",
    "VerifiedRequest",
]

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
PROTOCOL_VERSION = 1
#: What the provider's ALREADY_EXISTS answer to a Reenroll says when it holds exactly that enrollment.
REENROLLED_ALREADY = "already enrolled with exactly this enrollment"
_UPDATE_KIND = {
    1: pb.UPDATE_KIND_GROUP_OBS,
    2: pb.UPDATE_KIND_ANALYTIC,
    3: pb.UPDATE_KIND_GROUP_OBS_EXACT,
    4: pb.UPDATE_KIND_ANALYTIC_EXACT,
}
_VERDICTS = {pb.VERDICT_ACCEPTED: "accepted", pb.VERDICT_REJECTED: "rejected"}


def _refuses_request(exc: BaseException) -> bool:
    """Whether a prover's exception says the request itself cannot be processed (permanent).

    A prover refuses a request by raising a :class:`~zkunlearn.errors.MalformedError` or
    :class:`~zkunlearn.errors.RefusedError`. Every error along the ``raise ... from`` chain must carry
    one of those meanings: the provers wrap their own I/O too (``UnlearningError("cannot read committed
    state") from OSError``), and a request must not be given up because a disk or the memory cap failed
    for a moment.
    """
    error: BaseException | None = exc
    while error is not None:
        if not isinstance(error, (MalformedError, RefusedError)):
            return False
        error = error.__cause__
    return True


class EdgeClient:
    """One device's protocol driver. ``store`` keeps identity and progress across restarts."""

    def __init__(
        self,
        transport: Transport | ChannelConfig | str,
        store: ClientStore,
        prover: UpdateProver,
        *,
        provider_public_key: bytes | None = None,
        clock_ms: Any = now_ms,
        receipt_wait_s: float = 120.0,
    ) -> None:
        self.transport = transport if isinstance(transport, Transport) else Transport(transport)
        self.store = store
        self.prover = prover
        self.clock_ms = clock_ms
        self.receipt_wait_s = receipt_wait_s
        # Deletions chain (each is proved from the state the previous one left), so requests are
        # processed one at a time, whichever thread (poll(), watch()) delivers them.
        self._processing = threading.Lock()
        if provider_public_key is not None:
            pinned = self.store.put_if_absent("provider_public_key", provider_public_key)
            if pinned != provider_public_key:
                raise StoreError("the store pins another provider key than the one given")

    # -- identity -----------------------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        raw = self.store.get("client_id")
        if raw is None:
            raise StoreError("client is not enrolled (no client id in the store)")
        return raw.decode()

    def _signer(self) -> StatementSigner:
        raw = self.store.get("private_key")
        if raw is None:
            raise StoreError("client has no signing key (enroll first)")
        return StatementSigner.from_private_bytes(raw)

    def _provider(self) -> StatementVerifier:
        raw = self.store.get("provider_public_key")
        if raw is None:
            info = self.transport.call(
                lambda: self.transport.stub.GetInfo(pb.GetInfoRequest(), timeout=self.transport.timeout)
            )
            # Trust on first use: pinned from here on; pass provider_public_key to pin out of band.
            raw = self.store.put_if_absent("provider_public_key", bytes(info.provider_public_key))
        return StatementVerifier.from_public_bytes(raw)

    @property
    def commitments(self) -> list[Commitment]:
        value = self.store.get_json("commitments")
        return [Commitment.from_json(v) for v in value] if isinstance(value, list) else []

    def enroll(
        self,
        client_id: str,
        model_id: str,
        layers: Sequence[str],
        update_kind: int,
        commitments: Sequence[Commitment],
        enrollment_proofs: Sequence[bytes] = (),
    ) -> pb.EnrollResponse:
        """Create (or reuse) the device key and enroll it with its commitments; safe to repeat.

        An exact client (``update_kind`` 3 or 4) also sends its enrollment proofs
        (:meth:`zkunlearn.client.unlearning_exact.ExactGroupObsUnlearner.enroll`); the signed statement
        names their digest."""
        stored_id = self.store.put_if_absent("client_id", client_id.encode()).decode()
        if stored_id != client_id:
            raise StoreError(f"this store belongs to client {stored_id!r}, not {client_id!r}")
        StatementSigner.from_private_bytes(
            self.store.put_if_absent("private_key", StatementSigner.generate().private_bytes())
        )
        self._provider()
        request = self._enrollment(model_id, layers, update_kind, commitments, enrollment_proofs)
        response: pb.EnrollResponse = self.transport.call(
            lambda: self.transport.stub.Enroll(request, timeout=self.transport.timeout)
        )
        self.store.put_json(
            "enrollment", {"model_id": model_id, "layers": list(layers), "update_kind": update_kind}
        )
        self.store.put("enrollment_canonical", bytes(request.canonical))
        if self.store.get("commitments") is None:
            self.store.put_json("commitments", [c.to_json() for c in commitments])
        return response

    def reenroll(
        self, commitments: Sequence[Commitment], enrollment_proofs: Sequence[bytes] = ()
    ) -> pb.EnrollResponse:
        """Replace this client's enrolled commitments with fresh ones: the recovery of a client whose
        committed state is lost or corrupted. Same id, key, model, layers and kind; the call is signed
        by the enrolled key and names the enrollment it replaces, and the provider logs the rotation.

        Refused (``FAILED_PRECONDITION``) while a deletion request addressed to the client is open,
        under the provider's default policy. Repeating a re-enrollment the provider already holds
        (a lost response) returns normally."""
        enrollment = self.store.get_json("enrollment")
        previous = self.store.get("enrollment_canonical")
        if not isinstance(enrollment, dict):
            raise StoreError("client is not enrolled (no enrollment in the store): enroll instead")
        if previous is None:
            raise StoreError(
                "the store holds no copy of the enrollment statement this client signed "
                "('enrollment_canonical'), so it cannot name the enrollment to replace"
            )
        request = self._enrollment(
            enrollment["model_id"],
            enrollment["layers"],
            enrollment["update_kind"],
            commitments,
            enrollment_proofs,
        )
        fields = {
            "previous_enrollment_sha256": hashlib.sha256(previous).hexdigest(),
            "enrollment_sha256": hashlib.sha256(request.canonical).hexdigest(),
        }

        def attempt() -> pb.EnrollResponse:
            call = pb.ReenrollRequest(enrollment=request, auth=self.auth("Reenroll", fields))
            answer: pb.EnrollResponse = self.transport.stub.Reenroll(call, timeout=self.transport.timeout)
            return answer

        try:
            response: pb.EnrollResponse = self.transport.call(attempt)
        except grpc.RpcError as exc:
            # A retry after a lost response: the provider holds exactly this (client-signed) enrollment.
            repeat = REENROLLED_ALREADY in (exc.details() or "")
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS or not repeat:
                raise
            response = pb.EnrollResponse(version=PROTOCOL_VERSION, client_id=self.client_id)
        self.store.put("enrollment_canonical", bytes(request.canonical))
        self.store.put_json("commitments", [c.to_json() for c in commitments])
        return response

    def _enrollment(
        self,
        model_id: str,
        layers: Sequence[str],
        update_kind: int,
        commitments: Sequence[Commitment],
        enrollment_proofs: Sequence[bytes],
    ) -> pb.EnrollRequest:
        """The enrollment message with its statement signed by the device key (proof of possession)."""
        client_id, signer = self.client_id, self._signer()
        payload = {
            "client_id": client_id,
            "public_key": signer.public_bytes().hex(),
            "model_id": model_id,
            "layers": list(layers),
            "update_kind": update_kind,
            "commitments": [c.to_json() for c in commitments],
        }
        if update_kind in (3, 4):  # the exact relations enroll with proofs
            payload["enrollment_proofs_sha256"] = enrollment_proofs_digest(list(enrollment_proofs))
        statement = signer.sign(DOMAIN_ENROLLMENT, payload)
        return pb.EnrollRequest(
            version=PROTOCOL_VERSION,
            client_id=client_id,
            public_key=signer.public_bytes(),
            model_id=model_id,
            layers=list(layers),
            update_kind=_UPDATE_KIND[update_kind],
            commitments=[c.to_pb() for c in commitments],
            proof_of_possession=statement.signature,
            canonical=statement.canonical,
            enrollment_proofs=list(enrollment_proofs),
        )

    def auth(self, rpc: str, fields: Mapping[str, Any]) -> pb.ClientAuth:
        """A fresh nonce from the provider, signed together with the RPC name and the call's fields."""
        challenge = self.transport.stub.Challenge(
            pb.ChallengeRequest(client_id=self.client_id), timeout=self.transport.timeout
        )
        statement = self._signer().sign(
            DOMAIN_RPC_AUTH,
            {"client_id": self.client_id, "rpc": rpc, "nonce": bytes(challenge.nonce).hex(), **fields},
        )
        return pb.ClientAuth(
            client_id=self.client_id,
            nonce=challenge.nonce,
            signature=statement.signature,
            canonical=statement.canonical,
        )

    # -- receiving requests -------------------------------------------------------------------------

    def poll(self, max_items: int = 100) -> list[Outcome]:
        """Fetch and process everything after the stored cursor (one round)."""

        def attempt() -> pb.PollResponse:
            cursor = self.store.cursor
            auth = self.auth("PollRequests", {"after_cursor": cursor, "max_items": max_items})
            response: pb.PollResponse = self.transport.stub.PollRequests(
                pb.PollRequest(auth=auth, after_cursor=cursor, max_items=max_items),
                timeout=self.transport.timeout,
            )
            return response

        return [self.process(item) for item in self.transport.call(attempt).requests]

    def watch(
        self,
        stop: threading.Event | None = None,
        *,
        max_requests: int | None = None,
        reconnect_budget_s: float = 60.0,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Follow the server stream, reconnecting (from the stored cursor) when the provider goes away.

        Returns after ``max_requests`` outcomes, when ``stop`` is set, or when the provider stays
        unreachable for ``reconnect_budget_s``. ``on_outcome`` is called with each outcome as it comes.
        """
        outcomes: list[Outcome] = []
        stop = stop or threading.Event()
        down_since: float | None = None
        while not stop.is_set() and (max_requests is None or len(outcomes) < max_requests):
            try:
                for item in self._stream(stop):
                    down_since = None
                    outcomes.append(self.process(item))
                    if on_outcome is not None:
                        on_outcome(outcomes[-1])
                    if max_requests is not None and len(outcomes) >= max_requests:
                        break
            except grpc.RpcError as exc:
                if not is_retryable(exc) and exc.code() != grpc.StatusCode.CANCELLED:
                    raise
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > reconnect_budget_s:
                    raise
                log.info("watch stream interrupted (%s); reconnecting", exc.code())
                stop.wait(0.2)
        return outcomes

    def _stream(self, stop: threading.Event) -> Iterator[pb.SignedDeletionRequest]:
        cursor = self.store.cursor
        auth = self.auth("WatchRequests", {"after_cursor": cursor})
        call = self.transport.stub.WatchRequests(pb.WatchRequest(auth=auth, after_cursor=cursor))
        done = threading.Event()

        def cancel_on_stop() -> None:
            # Ends with the stream: a watcher that reconnects often must not leave a thread per stream.
            while not done.is_set():
                if stop.wait(0.2):
                    call.cancel()
                    return

        threading.Thread(target=cancel_on_stop, daemon=True, name="zku-watch-cancel").start()
        try:
            yield from call
        finally:
            done.set()
            call.cancel()

    # -- acting on a request ------------------------------------------------------------------------

    def verify_request(self, msg: pb.SignedDeletionRequest) -> VerifiedRequest:
        """Check everything the request claims before anything is done with it
        (:func:`~zkunlearn.client.checks.verify_signed_request`)."""
        enrollment = self.store.get_json("enrollment")
        return verify_signed_request(
            self._provider(),
            msg,
            client_id=self.client_id,
            enrollment=enrollment if isinstance(enrollment, dict) else None,
            now_ms=self.clock_ms(),
            before_commitments=tuple(self.commitments),
        )

    def process(self, msg: pb.SignedDeletionRequest) -> Outcome:
        """Verify, prove (once), submit, check and store the receipt.

        A request is *refused* -- ``Outcome("refused", reason)``, logged as a warning, nothing proved or
        submitted -- when it is forged, expired, or one the prover can never process: the prover raised a
        :class:`~zkunlearn.errors.MalformedError` or :class:`~zkunlearn.errors.RefusedError` (caused by
        nothing else), e.g. a mask naming a layer this client never enrolled. Genuine refusals advance
        the stored cursor past the request (to the cursor the provider signed for it,
        :data:`~zkunlearn.proofs.statements.DOMAIN_DELIVERY`), as a receipt does, so that one request the
        client cannot honour does not hold back every later one; it is not dropped on the provider's
        side, which still sees it unanswered, and ``poll_all(from_cursor=...)`` delivers it again (e.g.
        once the client has enrolled the layer). A forged request, or a genuine
        one delivered with a cursor the provider did not sign for it, never moves the cursor.

        Any other failure of the prover -- I/O, a crashed or out-of-memory proving worker, a bug -- is
        raised, with the cursor where it was, so that the next poll retries the request: a deletion is
        never skipped because the device failed for a moment.

        An already applied request is skipped; the cursor moves at most to the one recorded with its
        receipt, never to the one delivered with this (unchecked) message. Processing is serialised
        per client: deletions chain, so two requests proved at once would both start from the same
        state (the provider would refuse the second as stale), and the same delivery handled on two
        threads (``poll()`` and ``watch()``) is proved once: the thread that waited finds it applied.
        """
        with self._processing:
            return self._process(msg)

    def _advance_cursor(self, cursor: int) -> None:
        """Advance the stored cursor, unless ``cursor`` is one no later poll could be made after."""
        if 0 <= cursor <= MAX_CURSOR:
            self.store.advance_cursor(cursor)
        else:
            log.warning("not moving the cursor to %d: outside [0, 2**53 - 1]", cursor)

    def _process(self, msg: pb.SignedDeletionRequest) -> Outcome:
        applied = self.store.applied(msg.request_id)
        if applied is not None:
            # Nothing of this message has been checked yet: only the cursor recorded with the receipt may
            # move the stored one (a re-delivery after
            # ``poll_all(from_cursor=...)`` must get past it), or a forger reusing an applied id could
            # make the client skip genuine requests.
            self._advance_cursor(applied.cursor)
            return Outcome(msg.request_id, "skipped", "already applied")
        try:
            request = self.verify_request(msg)
        except ForgedRequestError as exc:
            # A forged message (or a cursor the provider did not sign for this request) must not move
            # the cursor, or a forger could make the client skip genuine requests.
            log.warning("refusing forged request %r: %s", msg.request_id, exc)
            return Outcome(msg.request_id, "refused", str(exc))
        except RequestRefusedError as exc:
            # Expired: raised only once the signatures (request and cursor) and addressee have checked out.
            log.warning("refusing request %r: %s", msg.request_id, exc)
            self._advance_cursor(int(msg.cursor))
            return Outcome(msg.request_id, "refused", str(exc))
        pending = self.store.pending(request.request_id)
        if pending is None:
            try:
                result = self.prover.prove(request)
            except Exception as exc:
                if not _refuses_request(exc):
                    raise
                reason = f"the prover cannot process it: {type(exc).__name__}: {exc}"
                log.warning("refusing request %r: %s", request.request_id, reason)
                self._advance_cursor(request.cursor)
                return Outcome(request.request_id, "refused", reason)
            pending = self.store.save_pending(
                PendingUpdate(
                    request.request_id,
                    request.cursor,
                    [c.to_json() for c in result.after_commitments],
                    [bytes(p) for p in result.proofs],
                ),
                self.clock_ms(),
            )
        return self._submit(request, pending)

    def resume(self) -> list[Outcome]:
        """Resubmit proofs saved before a crash, then catch up by polling."""
        outcomes: list[Outcome] = []
        if self.store.pending_ids():
            outcomes.extend(self.poll_all(from_cursor=0))
        outcomes.extend(self.poll_all())
        return outcomes

    def poll_all(self, from_cursor: int | None = None) -> list[Outcome]:
        """Poll until the provider has nothing newer than the cursor."""
        if from_cursor is not None and from_cursor < self.store.cursor:
            # Re-deliveries of applied requests are skipped; pending ones get their saved proofs resubmitted.
            saved = self.store.cursor
            self.store.put("cursor", str(from_cursor).encode())
            try:
                return self.poll_all()
            finally:
                self.store.advance_cursor(saved)
        outcomes: list[Outcome] = []
        while True:
            batch = self.poll()
            outcomes.extend(batch)
            if not batch:
                return outcomes

    def _submit(self, request: VerifiedRequest, pending: PendingUpdate) -> Outcome:
        proof = b"".join(pending.proofs)
        sizes = [len(p) for p in pending.proofs]
        digest = hashlib.sha256(proof).hexdigest()
        after = [Commitment.from_json(c) for c in pending.after_commitments]

        def chunks(auth: pb.ClientAuth) -> Iterator[pb.ProofChunk]:
            yield pb.ProofChunk(
                header=pb.ProofHeader(
                    version=PROTOCOL_VERSION,
                    request_id=request.request_id,
                    client_id=self.client_id,
                    update_kind=_UPDATE_KIND[request.update_kind],
                    after_commitments=[c.to_pb() for c in after],
                    proof_count=len(sizes),
                    total_bytes=len(proof),
                    sha256=digest,
                    auth=auth,
                    proof_sizes=sizes,
                )
            )
            for offset in range(0, len(proof), CHUNK_BYTES):
                yield pb.ProofChunk(data=proof[offset : offset + CHUNK_BYTES])

        def attempt() -> pb.SubmitProofResponse:
            auth = self.auth(
                "SubmitProof",
                {
                    "request_id": request.request_id,
                    "update_kind": request.update_kind,
                    "sha256": digest,
                    "total_bytes": len(proof),
                    "proof_sizes": sizes,
                    "after_commitments": [c.to_json() for c in after],
                },
            )
            response: pb.SubmitProofResponse = self.transport.stub.SubmitProof(
                chunks(auth), timeout=self.transport.timeout
            )
            return response

        response = self.transport.call(attempt)
        verdict, reason, receipt = response.verdict, response.reason, response.receipt
        if verdict == pb.VERDICT_PENDING or not response.HasField("receipt"):
            verdict, reason, receipt = self._wait_receipt(request.request_id)
        payload = self.check_receipt(receipt, request, digest, after)
        record = AppliedRecord(
            request_id=request.request_id,
            cursor=request.cursor,
            verdict=_VERDICTS[verdict],
            reason=reason,
            submission_id=str(payload["submission_id"]),
            receipt_canonical=bytes(receipt.canonical),
            receipt_signature=bytes(receipt.signature),
            leaf_index=int(receipt.leaf_index),
        )
        new_commitments = [c.to_json() for c in after] if verdict == pb.VERDICT_ACCEPTED else None
        # Returns the receipt already stored if another client on this store finished the request first.
        stored = self.store.finish(record, self.clock_ms(), new_commitments)
        return Outcome(request.request_id, stored.verdict, stored.reason, stored.leaf_index)

    def _wait_receipt(self, request_id: str) -> tuple[pb.Verdict.ValueType, str, pb.SignedReceipt]:
        retrying = Retrying(
            retry=retry_if_exception(lambda e: is_retryable(e) or isinstance(e, _StillPendingError)),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self.receipt_wait_s),
            reraise=True,
        )

        def attempt() -> tuple[pb.Verdict.ValueType, str, pb.SignedReceipt]:
            response = self.transport.stub.GetReceipt(
                pb.GetReceiptRequest(request_id=request_id, client_id=self.client_id),
                timeout=self.transport.timeout,
            )
            if response.verdict == pb.VERDICT_PENDING or not response.HasField("receipt"):
                raise _StillPendingError(f"request {request_id!r} still pending")
            return response.verdict, response.reason, response.receipt

        return retrying(attempt)

    def check_receipt(
        self,
        receipt: pb.SignedReceipt,
        request: VerifiedRequest,
        proof_sha256: str,
        after: Sequence[Commitment],
    ) -> dict[str, Any]:
        """The receipt must be signed by the provider and speak of exactly what this client submitted."""
        return check_signed_receipt(self._provider(), receipt, request, proof_sha256, after, self.client_id)

    # -- ledger -------------------------------------------------------------------------------------

    def verify_log(self) -> int:
        """Check every stored receipt is in the provider's log and the log only grew since last time.

        Returns the verified tree size. The last verified signed head is kept in the store, so a
        provider that rewrites history is caught on the next call (consistency proof fails).
        """
        # One retried unit: a provider restart between the head and a proof must not fail the check
        # (found by the load benchmark's SIGKILL runs); refusals (ReceiptError) are never retried.
        return self.transport.call(self._verify_log_once)

    def _verify_log_once(self) -> int:
        last = self.store.get_json("tree_head")
        head = verify_log_growth(
            self._provider(),
            self.transport.stub,
            self.transport.timeout,
            last if isinstance(last, dict) else None,
            self.store.receipts(),
        )
        self.store.put_json("tree_head", head)
        return int(head["size"])

    def known_head(self) -> dict[str, Any] | None:
        """The last signed tree head this client verified its receipts under (None before any).

        Written to a file, it is what ``zkunlearn audit verify --known-head`` takes: an audit of the
        provider's exported log then fails unless that log extends the head this client saw.
        """
        head = self.store.get_json("tree_head")
        return dict(head) if isinstance(head, dict) else None

    def close(self) -> None:
        self.transport.close()


class _StillPendingError(Exception):
    pass
