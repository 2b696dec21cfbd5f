"""The gRPC face of :class:`ProviderService`: decode, call, encode, and map refusals to status codes.

No protocol decision is taken here. Each domain error class maps to one status code and its message
goes to the client unchanged; anything unexpected is logged and answered INTERNAL without details, so
a bad input can never take the server down or leak a stack trace.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from zkunlearn.v1 import provider_pb2 as pb
from zkunlearn.v1 import provider_pb2_grpc as pb_grpc

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
from .models import (
    AuthInput,
    CommitmentRef,
    DeliveredRequest,
    EnrollmentInput,
    ReceiptView,
    SubmissionHeader,
    TensorData,
)
from .service import ProviderService
from .state import VERDICT_PENDING

__all__ = [
    "ARTIFACT_CHUNK",
    "ProviderServicer",
    "peer_host",
    "register_service",
    "status_for",
    "unary_handler",
]

log = logging.getLogger(__name__)
ARTIFACT_CHUNK = 1024 * 1024


class StreamsBusyError(ServiceError):
    """Every stream slot is taken: transient, so UNAVAILABLE, which clients retry with backoff."""


_STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    StreamsBusyError: grpc.StatusCode.UNAVAILABLE,
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    NotFoundServiceError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RetryLaterError: grpc.StatusCode.UNAVAILABLE,
}
F = TypeVar("F", bound=Callable[..., Any])


def status_for(exc: ServiceError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INVALID_ARGUMENT


# gRPC refuses status details above its metadata limit (16 KiB) and the client then sees
# RESOURCE_EXHAUSTED "Stream removed" instead of our message: messages that echo hostile input are cut.
_MAX_DETAILS = 1024


def _abort(context: grpc.ServicerContext, exc: BaseException, rpc: str) -> None:
    if not context.is_active():
        # The client cancelled (or its deadline passed): not a provider fault, and nobody to answer.
        log.info("%s: the client went away before the call completed (%s)", rpc, type(exc).__name__)
        context.abort(grpc.StatusCode.CANCELLED, f"{rpc}: cancelled by the client")
    if isinstance(exc, ServiceError):
        details = f"{rpc}: {exc}"
        if len(details) > _MAX_DETAILS:
            details = details[: _MAX_DETAILS - 20] + " ... (truncated)"
        context.abort(status_for(exc), details)
    log.exception("internal error in %s", rpc)
    context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error (logged on the provider)")


@dataclass(frozen=True)
class UndecodableRequest:
    """What the tolerant deserializer hands over instead of raising: grpcio would answer INTERNAL."""

    message_type: str

    def error(self) -> InvalidInputError:
        return InvalidInputError(f"request bytes are not a valid {self.message_type} message")


def _tolerant(message_cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError:
            return UndecodableRequest(message_cls.DESCRIPTOR.full_name)

    return parse


def _checked(request: Any) -> Any:
    """Refuse an undecodable request, or each undecodable item of a client stream, as INVALID_ARGUMENT."""
    if isinstance(request, UndecodableRequest):
        raise request.error()
    if isinstance(request, Iterator):

        def items() -> Iterator[Any]:
            for item in request:
                if isinstance(item, UndecodableRequest):
                    raise item.error()
                yield item

        return items()
    return request


def unary_handler(fn: F) -> F:
    """Decode-check the request, call, and map a refusal to its status code (any servicer's method)."""
    return _unary(fn)


def _unary(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, _checked(request), context)
        except Exception as exc:
            _abort(context, exc, fn.__name__)
            raise  # pragma: no cover - abort raises

    return wrapper  # type: ignore[return-value]


def _stream(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: ProviderServicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, _checked(request), context)
        except Exception as exc:
            _abort(context, exc, fn.__name__)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class _Undecodable(UndecodableRequest):
    """A body the service's own deserializer could not decode (it raised); services registered with
    :func:`add_to_server` never raise and refuse their own undecodable bodies."""


class TolerantDecoding(grpc.ServerInterceptor):  # type: ignore[misc]
    """Every service on the server (health and reflection too) answers a request body that is not its
    protobuf message with INVALID_ARGUMENT naming the method, instead of grpcio's INTERNAL and a
    logged traceback."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize, method = handler.request_deserializer, str(details.method)

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:  # each library raises its own decode error
                return _Undecodable(method)

        def refuse(context: grpc.ServicerContext, item: _Undecodable) -> None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request bytes are not a valid {item.message_type} request"
            )

        def items(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for item in requests:
                if isinstance(item, _Undecodable):
                    refuse(context, item)
                yield item

        def checked(inner: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    refuse(context, request)
                return inner(request, context)

            return behaviour

        if handler.unary_unary is not None:
            return handler._replace(unary_unary=checked(handler.unary_unary), request_deserializer=parse)
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=checked(handler.unary_stream), request_deserializer=parse)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary
            return handler._replace(
                stream_unary=lambda requests, context: inner_su(items(requests, context), context),
                request_deserializer=parse,
            )
        inner_ss = handler.stream_stream
        return handler._replace(
            stream_stream=lambda requests, context: inner_ss(items(requests, context), context),
            request_deserializer=parse,
        )


def add_to_server(servicer: ProviderServicer, server: grpc.Server) -> None:
    """Register the servicer like the generated ``add_ProviderServicer_to_server``, but with tolerant
    request deserializers, so malformed bytes get INVALID_ARGUMENT naming the message type."""
    register_service(servicer, server, pb, "Provider")


def register_service(servicer: Any, server: grpc.Server, module: Any, name: str) -> None:
    """Register ``module``'s service ``name`` with tolerant deserializers (see :func:`add_to_server`)."""
    service = module.DESCRIPTOR.services_by_name[name]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: kinds[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=_tolerant(_message_class(module, method.input_type)),
            response_serializer=_message_class(module, method.output_type).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port (``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``)."""
    peer = str(context.peer() or "")
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def _message_class(module: Any, descriptor: Any) -> Any:
    """The generated class of a message defined in ``module`` or in the proto file it imports."""
    if descriptor.file.name == module.DESCRIPTOR.name:
        return getattr(module, descriptor.name)
    return getattr(pb, descriptor.name)


def _auth(msg: pb.ClientAuth) -> AuthInput:
    return AuthInput(msg.client_id, bytes(msg.nonce), bytes(msg.canonical), bytes(msg.signature))


def _enrollment(request: pb.EnrollRequest) -> EnrollmentInput:
    return EnrollmentInput(
        version=request.version,
        client_id=request.client_id,
        public_key=bytes(request.public_key),
        model_id=request.model_id,
        layers=tuple(request.layers),
        update_kind=int(request.update_kind),
        commitments=_commitments(request.commitments),
        canonical=bytes(request.canonical),
        signature=bytes(request.proof_of_possession),
        enrollment_proofs=tuple(bytes(p) for p in request.enrollment_proofs),
    )


def _commitments(items: Iterable[pb.Commitment]) -> tuple[CommitmentRef, ...]:
    return tuple(CommitmentRef(c.name, int(c.block), c.point_hex) for c in items)


def _tensor_out(t: TensorData | None) -> pb.Tensor | None:
    return None if t is None else pb.Tensor(shape=list(t.shape), float64_le=t.float64_le)


def delivered_to_pb(item: DeliveredRequest) -> pb.SignedDeletionRequest:
    r = item.record
    return pb.SignedDeletionRequest(
        version=1,
        request_id=r.request_id,
        canonical=r.canonical,
        signature=r.signature,
        mask=r.mask,
        forget_features=_tensor_out(item.forget_features),
        forget_labels=_tensor_out(item.forget_labels),
        cursor=r.cursor,
        delivery=item.delivery,
        delivery_signature=item.delivery_signature,
    )


def _receipt_pb(view: ReceiptView) -> pb.SignedReceipt | None:
    if view.leaf is None:
        return None
    return pb.SignedReceipt(
        version=1, canonical=view.leaf.canonical, signature=view.leaf.signature, leaf_index=view.leaf.index
    )


class _StreamSlots:
    """A non-blocking cap on the server streams open at once.

    A sync gRPC server spends one pool thread per open stream for as long as the client keeps it (a
    watcher, a reader that stopped reading). Capping streams below the pool size keeps threads for
    the unary calls; a stream over the cap is refused at once with UNAVAILABLE (the SDK retries it
    with backoff) instead of waiting for a thread.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.open = 0

    def take(self) -> Callable[[], None]:
        """Take a slot (or refuse the stream); returns the release function, which is idempotent."""
        with self._lock:
            if self.limit is not None and self.open >= self.limit:
                raise StreamsBusyError(
                    f"this provider already serves {self.limit} streams (WatchRequests, GetArtifact, "
                    "SubmitProof), "
                    "its limit (limits.max_streams); retry later or use PollRequests"
                )
            self.open += 1
        held = [True]

        def release() -> None:
            with self._lock:
                if held[0]:
                    held[0] = False
                    self.open -= 1

        return release


class ProviderServicer(pb_grpc.ProviderServicer):
    """Thin adapter; ``submit_wait_s`` bounds how long SubmitProof waits for a verdict before PENDING.

    ``max_streams`` caps WatchRequests + GetArtifact + SubmitProof streams open at once (None: no
    cap); a watch stream ends normally after ``watch_max_s`` (the client re-opens it from its cursor),
    and any stream still open after ``stream_timeout_s`` (a client that stopped reading) is cancelled.
    """

    def __init__(
        self,
        service: ProviderService,
        *,
        submit_wait_s: float = 30.0,
        watch_poll_s: float = 0.5,
        artifacts: dict[str, dict[str, Path]] | None = None,
        max_streams: int | None = None,
        watch_max_s: float = 300.0,
        stream_timeout_s: float = 1800.0,
    ) -> None:
        self.service = service
        self.submit_wait_s = submit_wait_s
        self.watch_poll_s = watch_poll_s
        self.artifacts = artifacts or {}
        self.watch_max_s = watch_max_s
        self.stream_timeout_s = stream_timeout_s
        self.streams = _StreamSlots(max_streams)
        # path -> ((device, inode, size, mtime_ns), sha256 hex): an artifact is hashed once per version.
        self._digests: dict[Path, tuple[tuple[int, int, int, int], str]] = {}
        self._digests_lock = threading.Lock()

    @contextlib.contextmanager
    def _stream_slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold a stream slot for the life of the stream; cancel the stream after stream_timeout_s."""
        release = self.streams.take()
        timer = threading.Timer(self.stream_timeout_s, context.cancel)
        timer.daemon = True

        def done() -> None:
            timer.cancel()
            release()

        try:
            # Also on termination: a cancelled stream's generator may be closed late (or never).
            context.add_callback(done)
            timer.start()
            yield
        finally:
            done()

    def _artifact_digest(self, path: Path, fh: Any, st: os.stat_result) -> str:
        version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._digests_lock:
            cached = self._digests.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        digest = hashlib.file_digest(fh, "sha256").hexdigest()  # reads in small blocks
        fh.seek(0)
        with self._digests_lock:
            self._digests[path] = (version, digest)
        return digest

    @_unary
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:  # noqa: N802
        info = self.service.info()
        return pb.GetInfoResponse(
            protocol_version=info.protocol_version,
            provider_key_id=info.key_id,
            provider_public_key=info.public_key,
            model_ids=list(info.model_ids),
            srs_digest=info.srs_digest,
            srs_insecure=info.srs_insecure,
        )

    @_unary
    def Challenge(self, request: pb.ChallengeRequest, context: grpc.ServicerContext) -> pb.ChallengeResponse:  # noqa: N802
        nonce, expires = self.service.challenge(request.client_id, peer=peer_host(context))
        return pb.ChallengeResponse(nonce=nonce, expires_unix_ms=expires)

    @_unary
    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:  # noqa: N802
        record = self.service.enroll(_enrollment(request))
        return pb.EnrollResponse(version=1, client_id=record.client_id, enrolled_unix_ms=record.enrolled_ms)

    @_unary
    def Reenroll(self, request: pb.ReenrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:  # noqa: N802
        record = self.service.reenroll(_enrollment(request.enrollment), _auth(request.auth))
        return pb.EnrollResponse(version=1, client_id=record.client_id, enrolled_unix_ms=record.enrolled_ms)

    @_stream
    def GetArtifact(  # noqa: N802
        self, request: pb.GetArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ArtifactChunk]:
        path = self.artifacts.get(request.circuit_id, {}).get(request.artifact)
        if path is None:
            raise NotFoundServiceError(
                f"no artifact {request.artifact[:128]!r} for circuit {request.circuit_id[:128]!r}"
            )
        with self._stream_slot(context), path.open("rb") as fh:
            # Size and digest of the file we opened (not of a path that may be replaced meanwhile);
            # the digest is computed once per file version, and the file streamed chunk by chunk.
            st = os.fstat(fh.fileno())
            digest = self._artifact_digest(path, fh, st)
            total, sent, first = st.st_size, 0, True
            while first or sent < total:
                data = fh.read(min(ARTIFACT_CHUNK, total - sent))
                if not data and not first:
                    return  # the file shrank under us: the client's size/digest check refuses it
                yield pb.ArtifactChunk(
                    circuit_id=request.circuit_id,
                    artifact=request.artifact,
                    total_bytes=total,
                    sha256=digest if first else "",
                    data=data,
                )
                sent += len(data)
                first = False

    @_stream
    def WatchRequests(  # noqa: N802
        self, request: pb.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SignedDeletionRequest]:
        client = self.service.authenticate(
            _auth(request.auth), "WatchRequests", {"after_cursor": int(request.after_cursor)}
        )
        cursor = int(request.after_cursor)
        with self._stream_slot(context):
            # The stream ends (OK) after watch_max_s, freeing its thread; the client re-opens it.
            ends = time.monotonic() + self.watch_max_s
            while context.is_active() and not self.service.closed:
                left = ends - time.monotonic()
                if left <= 0:
                    return
                for item in self.service.wait_for_requests(client, cursor, min(self.watch_poll_s, left)):
                    yield delivered_to_pb(item)
                    cursor = item.record.cursor

    @_unary
    def PollRequests(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollResponse:  # noqa: N802
        client = self.service.authenticate(
            _auth(request.auth),
            "PollRequests",
            {"after_cursor": int(request.after_cursor), "max_items": int(request.max_items)},
        )
        items = self.service.requests_after(client, int(request.after_cursor), int(request.max_items))
        return pb.PollResponse(requests=[delivered_to_pb(i) for i in items])

    @_unary
    def SubmitProof(  # noqa: N802
        self, request_iterator: Iterator[pb.ProofChunk], context: grpc.ServicerContext
    ) -> pb.SubmitProofResponse:
        # An upload holds a pool thread as long as a stream does (a slow or stalled client, then the
        # wait for its verdict): it counts against the same cap.
        with self._stream_slot(context):
            return self._submit_proof(request_iterator, context)

    def _submit_proof(
        self, request_iterator: Iterator[pb.ProofChunk], context: grpc.ServicerContext
    ) -> pb.SubmitProofResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidInputError("the first message of an upload must be the header")
        h = first.header
        header = SubmissionHeader(
            version=h.version,
            request_id=h.request_id,
            client_id=h.client_id,
            update_kind=int(h.update_kind),
            after_commitments=_commitments(h.after_commitments),
            proof_sizes=tuple(int(s) for s in h.proof_sizes),
            total_bytes=int(h.total_bytes),
            sha256=h.sha256,
            auth=_auth(h.auth),
        )

        def chunks() -> Iterator[bytes]:
            for msg in request_iterator:
                if msg.WhichOneof("part") != "data":
                    raise InvalidInputError("only data chunks may follow the header")
                yield bytes(msg.data)

        sub = self.service.submit(header, chunks())
        if sub.verdict == VERDICT_PENDING:
            remaining = context.time_remaining()
            budget = (
                self.submit_wait_s
                if remaining is None
                else min(self.submit_wait_s, max(0.0, remaining - 1.0))
            )
            sub = self.service.wait(sub.submission_id, budget)
        view = self.service.view(sub)
        return pb.SubmitProofResponse(
            version=1,
            submission_id=sub.submission_id,
            verdict=pb.Verdict.ValueType(sub.verdict),
            reason=sub.reason,
            receipt=_receipt_pb(view),
        )

    @_unary
    def GetReceipt(  # noqa: N802
        self, request: pb.GetReceiptRequest, context: grpc.ServicerContext
    ) -> pb.GetReceiptResponse:
        view = self.service.receipt(request.request_id, request.client_id)
        return pb.GetReceiptResponse(
            verdict=pb.Verdict.ValueType(view.verdict), reason=view.reason, receipt=_receipt_pb(view)
        )

    @_unary
    def GetTreeHead(self, request: pb.GetTreeHeadRequest, context: grpc.ServicerContext) -> pb.SignedTreeHead:  # noqa: N802
        head = self.service.tree_head()
        return pb.SignedTreeHead(version=1, canonical=head.canonical, signature=head.signature)

    @_unary
    def GetInclusionProof(  # noqa: N802
        self, request: pb.InclusionProofRequest, context: grpc.ServicerContext
    ) -> pb.AuditPath:
        return pb.AuditPath(
            hashes=self.service.inclusion_proof(int(request.leaf_index), int(request.tree_size))
        )

    @_unary
    def GetConsistencyProof(  # noqa: N802
        self, request: pb.ConsistencyProofRequest, context: grpc.ServicerContext
    ) -> pb.AuditPath:
        return pb.AuditPath(
            hashes=self.service.consistency_proof(int(request.first_size), int(request.second_size))
        )
