"""Call a running provider's Operator service: what ``zkunlearn provider request/status/receipts`` do.

Each call asks for a nonce, signs the call's fields with the operator key and sends them; a refusal
comes back as :class:`OperatorCallError` carrying the provider's one-line reason. Forget-sample files
are ``.npz`` archives with ``x`` (inputs, as the model takes them) and ``y`` (integer labels).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from zkunlearn.proofs.statements import (
    DOMAIN_OPERATOR_AUTH,
    StatementError,
    StatementSigner,
)
from zkunlearn.v1 import operator_pb2 as opb
from zkunlearn.v1 import operator_pb2_grpc as opb_grpc
from zkunlearn.v1 import provider_pb2 as pb

from zkunlearn.errors import MalformedError, ZkUnlearnError

from .config import OperatorConfig, ProviderConfig
from .operator import DeletionOrder
from .planning import ForgetSelection

__all__ = ["OperatorCallError", "OperatorClient", "OperatorSetupError", "load_forget_file"]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class OperatorSetupError(MalformedError):
    """The operator's own inputs are wrong (key, config, forget file); nothing was sent."""


class OperatorCallError(ZkUnlearnError, RuntimeError):
    """The provider refused or could not be reached; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def load_forget_file(path: Path) -> ForgetSelection:
    """``x`` (float inputs) and ``y`` (whole-number labels) from an ``.npz``; refused by name if not."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise OperatorSetupError(f"cannot read forget samples {path}: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            x = np.asarray(archive["x"]) if "x" in names else None
            y = np.asarray(archive["y"]) if "y" in names else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OperatorSetupError(f"cannot read forget samples {path}: {reason}") from exc
    if x is None or y is None:
        raise OperatorSetupError(f"{path}: an .npz with arrays 'x' and 'y' is needed, found {names}")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise OperatorSetupError(f"{path}: x and y must be numeric, got {x.dtype} and {y.dtype}")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    if not (np.isfinite(x64).all() and np.isfinite(y64).all()):
        raise OperatorSetupError(f"{path}: x or y contains NaN or infinity")
    if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise OperatorSetupError(
            f"{path}: need x [n, ...] and y [n] with n > 0, got {list(x.shape)} and {list(y.shape)}"
        )
    if not np.array_equal(y64, np.round(y64)):
        raise OperatorSetupError(f"{path}: labels y must be whole class numbers")
    return ForgetSelection(features=x64, labels=y64.astype(np.int64))


@dataclass(frozen=True)
class _Endpoint:
    target: str
    credentials: grpc.ChannelCredentials | None
    server_name: str


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OperatorSetupError(f"cannot read {what} {path}: {exc}") from exc


def _endpoint(config: ProviderConfig, target: str | None) -> _Endpoint:
    op: OperatorConfig = config.operator
    address = target or op.target or config.listen
    if not config.tls.cert_file:
        return _Endpoint(address, None, "")
    roots = _read(op.ca_file or config.tls.cert_file, "the provider's CA certificate")
    chain = key = None
    if config.tls.client_ca_file:
        if not (op.cert_file and op.cert_key_file):
            raise OperatorSetupError(
                "the provider requires client certificates: set operator.cert_file and operator.cert_key_file"
            )
        chain, key = _read(op.cert_file, "operator certificate"), _read(op.cert_key_file, "operator TLS key")
    creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    return _Endpoint(address, creds, op.server_name)


class OperatorClient:
    """One channel to the provider's Operator service, signing with one operator key."""

    def __init__(
        self,
        target: str,
        signer: StatementSigner,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
        timeout_s: float = 600.0,
    ) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials
            else grpc.insecure_channel(target, options)
        )
        self._stub = opb_grpc.OperatorStub(self._channel)
        self.signer, self.timeout_s, self.target = signer, timeout_s, target

    @classmethod
    def from_config(
        cls, config: ProviderConfig, *, target: str | None = None, key_file: str | None = None
    ) -> OperatorClient:
        path = key_file or config.operator.key_file
        try:
            signer = StatementSigner.load(path)
        except (OSError, StatementError) as exc:
            raise OperatorSetupError(f"cannot load the operator key {path}: {exc}") from exc
        endpoint = _endpoint(config, target)
        return cls(
            endpoint.target, signer, credentials=endpoint.credentials, server_name=endpoint.server_name
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise OperatorCallError(exc.code(), f"{exc.code().name}: {exc.details()}") from exc

    def _auth(self, rpc: str, fields: dict[str, Any]) -> opb.OperatorAuth:
        challenge = self._call(self._stub.Challenge, opb.OperatorChallengeRequest(key_id=self.signer.key_id))
        nonce = bytes(challenge.nonce)
        statement = self.signer.sign(DOMAIN_OPERATOR_AUTH, {"rpc": rpc, "nonce": nonce.hex(), **fields})
        return opb.OperatorAuth(
            key_id=self.signer.key_id,
            nonce=nonce,
            canonical=statement.canonical,
            signature=statement.signature,
        )

    def create_requests(self, order: DeletionOrder) -> opb.CreateRequestsResponse:
        request = opb.CreateRequestsRequest(
            auth=self._auth("CreateRequests", order.signed_fields()),
            model_id=order.model_id,
            client_ids=list(order.client_ids),
            mask=opb.MaskOptions(
                score=order.options.score,
                fraction_ppm=order.options.fraction_ppm,
                structure=order.options.structure,
            ),
            ttl_s=order.ttl_s,
        )
        selection = order.selection
        if selection.forget_class is not None:
            request.forget_class = selection.forget_class
        elif selection.sample_ids is not None:
            request.sample_ids.ids.extend(selection.sample_ids)
        elif selection.features is not None and selection.labels is not None:
            request.samples.features.CopyFrom(_tensor(selection.features))
            request.samples.labels.CopyFrom(_tensor(selection.labels.astype(np.float64)))
        response: opb.CreateRequestsResponse = self._call(self._stub.CreateRequests, request)
        return response

    def status(self) -> opb.GetStatusResponse:
        request = opb.GetStatusRequest(auth=self._auth("GetStatus", {}))
        response: opb.GetStatusResponse = self._call(self._stub.GetStatus, request)
        return response

    def receipts(self, start: int = 0, max_items: int = 0) -> opb.ListReceiptsResponse:
        fields = {"start": start, "max_items": max_items}
        request = opb.ListReceiptsRequest(
            auth=self._auth("ListReceipts", fields), start=start, max_items=max_items
        )
        response: opb.ListReceiptsResponse = self._call(self._stub.ListReceipts, request)
        return response


def _tensor(array: np.ndarray[Any, Any]) -> pb.Tensor:
    return pb.Tensor(shape=list(array.shape), float64_le=np.ascontiguousarray(array, dtype="<f8").tobytes())
