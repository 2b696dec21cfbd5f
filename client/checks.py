"""What an edge client checks, offline, of what the provider sends it: a signed deletion request and
its delivery cursor, a signed receipt, and the growth of the provider's log.

Each check refuses with :class:`~zkunlearn.client.records.ForgedRequestError`,
:class:`~zkunlearn.client.records.ExpiredRequestError` or :class:`~zkunlearn.client.records.ReceiptError`
and one message naming what does not check out; :class:`~zkunlearn.client.sdk.EdgeClient` calls them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from zkunlearn.circuits.mask import Mask, MaskError
from zkunlearn.proofs.statements import (
    DOMAIN_DELETION_REQUEST,
    DOMAIN_DELIVERY,
    DOMAIN_RECEIPT,
    MAX_INT,
    StatementError,
    StatementVerifier,
    check_tree_head,
)
from zkunlearn.proofs.transparency import MerkleProofError, leaf_hash, verify_consistency, verify_inclusion
from zkunlearn.v1 import provider_pb2 as pb
from zkunlearn.v1 import provider_pb2_grpc as pb_grpc

from .records import Commitment, ExpiredRequestError, ForgedRequestError, ReceiptError, VerifiedRequest
from .store import AppliedRecord

__all__ = ["MAX_CURSOR", "check_signed_receipt", "verify_log_growth", "verify_signed_request"]


# The largest cursor the client can ask for: ``after_cursor`` is a field of the signed RPC auth statement,
# whose canonical JSON carries integers up to 2**53 - 1 only. A larger stored cursor would make every
# later poll fail, so none is ever stored.
MAX_CURSOR = MAX_INT


def _tensor(t: pb.Tensor, what: str) -> npt.NDArray[np.float64]:
    """The delivered array, refused unless its shape accounts for exactly its bytes.

    The size is a Python-int product: ``np.prod`` wraps around in int64 (``[2**32, 2**32]`` -> 0), so an
    empty buffer would pass the check and fail later in ``reshape`` as a bare ``ValueError``.
    """
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape) or math.prod(shape) * 8 != len(t.float64_le):
        raise ForgedRequestError(f"{what}: shape {list(shape)} does not match {len(t.float64_le)} bytes")
    try:
        return np.frombuffer(t.float64_le, dtype="<f8").reshape(shape).astype(np.float64)
    except ValueError as exc:  # e.g. more dimensions than numpy supports
        raise ForgedRequestError(f"{what}: shape {list(shape)} cannot be used: {exc}") from exc


def verify_signed_request(
    provider: StatementVerifier,
    msg: pb.SignedDeletionRequest,
    *,
    client_id: str,
    enrollment: Mapping[str, Any] | None,
    now_ms: int,
    before_commitments: Sequence[Commitment],
) -> VerifiedRequest:
    """The request, once its signature, addressee, model, update kind, cursor, expiry and every delivered
    byte (mask, forget data) check out against what the provider signed."""
    try:
        payload = provider.verify((bytes(msg.canonical), bytes(msg.signature)), DOMAIN_DELETION_REQUEST)
    except StatementError as exc:
        raise ForgedRequestError(f"request {msg.request_id!r}: provider signature refused: {exc}") from exc
    if payload.get("request_id") != msg.request_id:
        raise ForgedRequestError("delivered request id differs from the signed one")
    if payload.get("client_id") != client_id:
        raise ForgedRequestError(f"request is addressed to {payload.get('client_id')!r}, not to this client")
    if enrollment is not None:
        if payload.get("model_id") != enrollment["model_id"]:
            raise ForgedRequestError(f"request targets model {payload.get('model_id')!r}, not ours")
        if payload.get("update_kind") != enrollment["update_kind"]:
            raise ForgedRequestError("request asks for another update kind than this client enrolled")
    cursor = int(msg.cursor)
    if not 0 <= cursor <= MAX_CURSOR:
        # A genuine provider never sends one the client cannot poll after.
        raise ForgedRequestError(f"delivered cursor {cursor} is outside [0, 2**53 - 1]")
    _check_delivery(provider, msg, client_id, cursor)
    expires = payload.get("expires_ms")
    if not isinstance(expires, int) or expires < now_ms:
        raise ExpiredRequestError(f"request {msg.request_id!r} expired at {expires} (unix ms)")
    mask_bytes = bytes(msg.mask)
    if hashlib.sha256(mask_bytes).hexdigest() != payload.get("mask_sha256"):
        raise ForgedRequestError("delivered mask bytes do not match the signed mask digest")
    if len(mask_bytes) != payload.get("mask_bytes"):
        raise ForgedRequestError("delivered mask length differs from the signed mask_bytes")
    try:
        mask = Mask.from_bytes(mask_bytes)
    except MaskError as exc:
        raise ForgedRequestError(f"mask does not decode: {exc}") from exc
    if list(mask.layer_names) != list(payload.get("layers", [])):
        raise ForgedRequestError("mask layers differ from the signed layer list")
    features = labels = None
    forget = payload.get("forget")
    if forget is not None:
        if not msg.HasField("forget_features") or not msg.HasField("forget_labels"):
            raise ForgedRequestError("the signed request has forget data but none was delivered")
        for name, tensor in (("features", msg.forget_features), ("labels", msg.forget_labels)):
            signed = forget[name]
            if (
                list(tensor.shape) != signed["shape"]
                or hashlib.sha256(tensor.float64_le).hexdigest() != signed["sha256"]
            ):
                raise ForgedRequestError(f"delivered forget {name} differ from the signed digest")
        features = _tensor(msg.forget_features, "forget features")
        labels = _tensor(msg.forget_labels, "forget labels")
    return VerifiedRequest(
        request_id=msg.request_id,
        client_id=client_id,
        model_id=str(payload.get("model_id")),
        update_kind=int(payload["update_kind"]),
        layers=tuple(mask.layer_names),
        mask=mask,
        mask_bytes=mask_bytes,
        forget_features=features,
        forget_labels=labels,
        issued_ms=int(payload["issued_ms"]),
        expires_ms=expires,
        cursor=cursor,
        before_commitments=tuple(before_commitments),
        payload=payload,
        canonical=bytes(msg.canonical),
        signature=bytes(msg.signature),
    )


def _check_delivery(
    provider: StatementVerifier, msg: pb.SignedDeletionRequest, client_id: str, cursor: int
) -> None:
    """The cursor must be the one the provider signed for this very request and client."""
    try:
        delivery = provider.verify((bytes(msg.delivery), bytes(msg.delivery_signature)), DOMAIN_DELIVERY)
    except StatementError as exc:
        raise ForgedRequestError(f"request {msg.request_id!r}: cursor not signed: {exc}") from exc
    expected = {
        "request_id": msg.request_id,
        "client_id": client_id,
        "cursor": cursor,
        "request_sha256": hashlib.sha256(bytes(msg.canonical)).hexdigest(),
    }
    for key, value in expected.items():
        if delivery.get(key) != value:
            raise ForgedRequestError(f"the signed delivery's {key} differs from the delivered cursor")


def check_signed_receipt(
    provider: StatementVerifier,
    receipt: pb.SignedReceipt,
    request: VerifiedRequest,
    proof_sha256: str,
    after: Sequence[Commitment],
    client_id: str,
) -> dict[str, Any]:
    """The receipt's payload, once it is signed by the provider and speaks of exactly what ``client_id``
    submitted."""
    try:
        payload = provider.verify((bytes(receipt.canonical), bytes(receipt.signature)), DOMAIN_RECEIPT)
    except StatementError as exc:
        raise ReceiptError(f"receipt signature refused: {exc}") from exc
    expected = {
        "request_id": request.request_id,
        "request_sha256": hashlib.sha256(request.canonical).hexdigest(),
        "client_id": client_id,
        "proof_sha256": proof_sha256,
        "after_commitments": [c.to_json() for c in after],
    }
    for key, value in expected.items():
        if payload.get(key) != value:
            raise ReceiptError(f"receipt field {key!r} does not match the submission")
    return payload


def verify_log_growth(
    provider: StatementVerifier,
    stub: pb_grpc.ProviderStub,
    timeout: float,
    last_head: Mapping[str, Any] | None,
    receipts: Iterable[AppliedRecord],
) -> dict[str, Any]:
    """The provider's current signed tree head, once it extends ``last_head`` (RFC 9162 consistency) and
    includes every stored receipt (inclusion proofs); returned as the record to keep for next time."""
    head_pb = stub.GetTreeHead(pb.GetTreeHeadRequest(), timeout=timeout)
    try:
        head = check_tree_head(provider, (bytes(head_pb.canonical), bytes(head_pb.signature)))
    except StatementError as exc:
        raise ReceiptError(f"tree head refused: {exc}") from exc
    try:
        if last_head is not None and 0 < last_head["size"] <= head.size:
            proof = stub.GetConsistencyProof(
                pb.ConsistencyProofRequest(first_size=last_head["size"], second_size=head.size),
                timeout=timeout,
            )
            verify_consistency(
                last_head["size"], head.size, bytes.fromhex(last_head["root"]), head.root, list(proof.hashes)
            )
        elif last_head is not None and last_head["size"] > head.size:
            raise ReceiptError(f"log shrank from {last_head['size']} to {head.size} leaves")
        for rec in receipts:
            inclusion = stub.GetInclusionProof(
                pb.InclusionProofRequest(leaf_index=rec.leaf_index, tree_size=head.size), timeout=timeout
            )
            verify_inclusion(
                leaf_hash(rec.receipt_canonical), rec.leaf_index, head.size, list(inclusion.hashes), head.root
            )
    except MerkleProofError as exc:
        raise ReceiptError(f"log proof refused: {exc}") from exc
    # The signed head itself, not only its size and root: it is evidence a third party can check
    # (`zkunlearn audit verify --known-head`), and what reveals a provider exporting a truncated log.
    return {
        "size": head.size,
        "root": head.root.hex(),
        "canonical": bytes(head_pb.canonical).hex(),
        "signature": bytes(head_pb.signature).hex(),
    }
