"""Deletion requests: checking a draft against the client's enrollment, signing it, and signing its
delivery cursor."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import Any

from zkunlearn.circuits.mask import Mask, MaskError
from zkunlearn.proofs.statements import DOMAIN_DELETION_REQUEST, DOMAIN_DELIVERY, StatementSigner

from .errors import InvalidInputError
from .models import (
    ANALYTIC_KINDS,
    PROTOCOL_VERSION,
    DeliveredRequest,
    RequestDraft,
    ServiceConfig,
    check_id,
    decode_forget,
    encode_forget,
)
from .state import ClientRecord, RequestRecord

__all__ = ["delivered", "sign_request"]


def sign_request(
    draft: RequestDraft, client: ClientRecord, signer: StatementSigner, config: ServiceConfig, now_ms: int
) -> RequestRecord:
    """The signed request for ``draft`` to the enrolled ``client``; refuses a mask naming layers the
    client did not enroll, and forget data that is malformed, oversized or missing for an analytic
    client."""
    mask, forget_features, forget_labels = draft.mask, draft.forget_features, draft.forget_labels
    try:
        parsed = Mask.from_bytes(mask) if isinstance(mask, bytes | bytearray) else mask
    except MaskError as exc:
        raise InvalidInputError(f"mask: {exc}") from exc
    unknown = sorted(set(parsed.layer_names) - set(client.layers))
    if unknown:
        raise InvalidInputError(f"mask names layers client {client.client_id!r} did not enroll: {unknown}")
    if (forget_features is None) != (forget_labels is None):
        raise InvalidInputError("forget features and labels come together or not at all")
    if client.update_kind in ANALYTIC_KINDS and forget_features is None:
        raise InvalidInputError(
            f"analytic client {client.client_id!r} needs the forget samples' features and labels"
        )
    forget: dict[str, Any] | None = None
    if forget_features is not None and forget_labels is not None:
        forget_features.validate("forget features", config.max_forget_bytes)
        forget_labels.validate("forget labels", config.max_forget_bytes)
        forget = {"features": forget_features.digest_json(), "labels": forget_labels.digest_json()}
    rid = check_id(draft.request_id, "request id") if draft.request_id else uuid.uuid4().hex
    issued = now_ms
    ttl_s = config.request_ttl_s if draft.ttl_s is None else draft.ttl_s
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
    statement = signer.sign(DOMAIN_DELETION_REQUEST, payload)
    return RequestRecord(
        request_id=rid,
        client_id=client.client_id,
        canonical=statement.canonical,
        signature=statement.signature,
        mask=mask_bytes,
        forget=encode_forget(forget_features, forget_labels),
        issued_ms=issued,
        expires_ms=expires,
    )


def delivered(record: RequestRecord, signer: StatementSigner) -> DeliveredRequest:
    """The request with its cursor signed: the client moves its stored cursor only to a signed one,
    so a genuine request replayed with another cursor cannot make it skip requests."""
    features, labels = decode_forget(record.forget)
    signed = signer.sign(
        DOMAIN_DELIVERY,
        {
            "request_id": record.request_id,
            "client_id": record.client_id,
            "cursor": record.cursor,
            "request_sha256": hashlib.sha256(record.canonical).hexdigest(),
        },
    )
    return DeliveredRequest(record, features, labels, signed.canonical, signed.signature)
