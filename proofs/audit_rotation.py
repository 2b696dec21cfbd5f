"""The auditor's checks of a re-enrollment leaf: the client's key authorized the rotation, and from
that leaf on the client's deletions chain from the new enrollment's commitments.

A re-enrollment leaf (domain ``zkunlearn/v1/re-enrollment``, signed by the provider) carries both
enrollments (each signed by the client), the commitments the client held when it re-enrolled and the
client's authorization: an RPC-auth statement with rpc ``Reenroll`` naming the SHA-256 of both
enrollments' canonical bytes, signed by the key of the enrollment it replaces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from zkunlearn.proofs.audit_format import (
    CheckError,
    hex_bytes,
    json_object,
    required_field,
    verified_payload,
)
from zkunlearn.proofs.statements import (
    DOMAIN_ENROLLMENT,
    DOMAIN_REENROLLMENT,
    DOMAIN_RPC_AUTH,
    STATEMENT_PREFIX,
    SignedStatement,
    StatementError,
    StatementVerifier,
)

__all__ = ["REENROLL_RPC", "Enrolled", "embedded_enrollment", "is_reenrollment", "rotate"]

REENROLL_RPC = "Reenroll"
_TAG = STATEMENT_PREFIX + DOMAIN_REENROLLMENT.encode("ascii") + b"\x00"


def is_reenrollment(canonical: bytes) -> bool:
    """Whether a log leaf's statement bytes are a re-enrollment (else a receipt, or malformed)."""
    return canonical.startswith(_TAG)


@dataclass(frozen=True)
class Enrolled:
    """A client-signed enrollment statement: its payload and the exact bytes signed."""

    payload: dict[str, Any]
    canonical: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical).hexdigest()

    def key(self, where: str) -> StatementVerifier:
        try:
            return StatementVerifier.from_public_bytes(
                hex_bytes(self.payload.get("public_key"), f"{where} public_key", 32)
            )
        except StatementError as exc:
            raise CheckError(f"{where} public_key: {exc}") from None


def embedded_enrollment(value: Any, where: str, client_id: str) -> Enrolled:
    """An enrollment carried as ``{"canonical", "signature"}`` hex, checked under the key it names."""
    obj = json_object(value, where)
    canonical = hex_bytes(required_field(obj, "canonical", where), f"{where} canonical")
    signature = hex_bytes(required_field(obj, "signature", where), f"{where} signature")
    try:
        named = Enrolled(SignedStatement.from_wire(canonical, signature).payload, canonical)
    except StatementError as exc:
        raise CheckError(f"{where}: {exc}") from None
    payload = verified_payload(named.key(where), obj["canonical"], obj["signature"], DOMAIN_ENROLLMENT, where)
    if payload.get("client_id") != client_id:
        raise CheckError(f"{where} client_id: {payload.get('client_id')!r}, the leaf names {client_id!r}")
    return Enrolled(payload, canonical)


def rotate(leaf: dict[str, Any], where: str, client_id: str, enrolled: Enrolled, current: Any) -> Enrolled:
    """The enrollment a re-enrollment leaf moves the client to, after checking that it replaces
    ``enrolled`` (holding ``current`` commitments) and that the replaced enrollment's key authorized it."""
    previous = embedded_enrollment(
        required_field(leaf, "previous_enrollment", where), f"{where} previous_enrollment", client_id
    )
    if previous.canonical != enrolled.canonical:
        raise CheckError(
            f"{where} previous_enrollment: not the enrollment the client held (the log's earlier "
            "enrollment or re-enrollment)"
        )
    if required_field(leaf, "previous_commitments", where) != current:
        raise CheckError(
            f"{where} previous_commitments: differ from the commitments the client's chain reached"
        )
    new = embedded_enrollment(required_field(leaf, "enrollment", where), f"{where} enrollment", client_id)
    for key in ("model_id", "update_kind", "public_key"):
        if new.payload.get(key) != enrolled.payload.get(key):
            raise CheckError(f"{where} enrollment {key}: changed by the re-enrollment")
    if leaf.get("model_id") != new.payload.get("model_id"):
        raise CheckError(f"{where} model_id: differs from the signed enrollment's")
    auth = json_object(required_field(leaf, "authorization", where), f"{where} authorization")
    signed = verified_payload(
        enrolled.key(where),
        required_field(auth, "canonical", f"{where} authorization"),
        required_field(auth, "signature", f"{where} authorization"),
        DOMAIN_RPC_AUTH,
        f"{where} authorization",
    )
    expected = {
        "client_id": client_id,
        "rpc": REENROLL_RPC,
        "previous_enrollment_sha256": enrolled.sha256,
        "enrollment_sha256": new.sha256,
    }
    for key, value in expected.items():
        if signed.get(key) != value:
            raise CheckError(f"{where} authorization {key}: {signed.get(key)!r}, expected {value!r}")
    return new
