"""Signed re-enrollment: a client that lost its committed state enrolls fresh commitments under its id.

The new enrollment is checked like a first one (proof of possession, layout, enrollment proofs) and
must keep the client's key and model. It is authorized by an RPC-auth statement (rpc ``Reenroll``)
signed by the enrolled key over a fresh nonce and the SHA-256 of both enrollments' canonical bytes, so
only the key holder can rotate, and a captured re-enrollment cannot be replayed: its nonce is spent,
and the enrollment it replaces is no longer the stored one. The provider signs a re-enrollment
statement naming both enrollments, the commitments given up and the client's authorization, and
appends it to the transparency log in the transaction that replaces the enrollment and keeps the
replaced one (``ProviderState.replaced_enrollments``); an auditor checks every later deletion against
the new commitments, and judges each deletion by the enrollment in force at its place in the log
(:mod:`zkunlearn.proofs.audit_enrollments`).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from zkunlearn.proofs.statements import DOMAIN_REENROLLMENT, StatementError
from zkunlearn.proofs.transparency import leaf_hash

from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundServiceError,
    PermissionDeniedError,
)
from .models import AuthInput, EnrollmentInput, check_id
from .state import ClientRecord, ConflictError, LeafRecord, NotFoundError, PendingRequestsError

if TYPE_CHECKING:
    from .service import ProviderService

__all__ = ["REENROLLED_ALREADY", "REENROLL_RPC", "reenroll", "reenrollment_leaf_id"]

REENROLL_RPC = "Reenroll"
#: The refusal of a re-enrollment the provider already holds; the SDK takes it as done (wire.md).
REENROLLED_ALREADY = "already enrolled with exactly this enrollment"


def reenrollment_leaf_id(enrollment_sha256: str) -> str:
    """The log leaf's key in the state (leaves are keyed like submissions; this one has no request)."""
    return f"re-enrollment/{enrollment_sha256}"


def reenroll(service: ProviderService, enrollment: EnrollmentInput, auth: AuthInput) -> ClientRecord:
    """Replace the client's enrollment with ``enrollment``, authorized by ``auth``; returns the new record.

    Refused: an unknown client; another key or model than enrolled; an authorization not signed by
    the enrolled key or naming other enrollments; a replay; open requests (unless the provider's
    ``reenroll_with_open_requests``); an enrollment identical to the stored one (nothing to rotate).
    """
    client_id = check_id(enrollment.client_id, "client id")
    old = service.state.get_client(client_id)
    if old is None:
        raise NotFoundServiceError(f"unknown client {client_id!r}: enroll it first")
    if auth.client_id != client_id:
        raise PermissionDeniedError("the re-enrollment's auth names another client than its enrollment")
    previous_sha = hashlib.sha256(old.enrollment_canonical).hexdigest()
    new_sha = hashlib.sha256(enrollment.canonical).hexdigest()
    if new_sha == previous_sha:  # the client signed this enrollment: a repeat after a lost response
        raise AlreadyExistsError(f"client {client_id!r} is {REENROLLED_ALREADY}; nothing to rotate")
    # Authenticated before the enrollment's own checks, so only the key holder gets its proofs verified.
    service.authenticate(
        auth, REENROLL_RPC, {"previous_enrollment_sha256": previous_sha, "enrollment_sha256": new_sha}
    )
    record = service.checked_enrollment(enrollment)
    if record.public_key != old.public_key:
        raise InvalidInputError("a re-enrollment keeps the enrolled key: the new enrollment names another")
    if record.model_id != old.model_id:
        raise InvalidInputError(
            f"a re-enrollment keeps the enrolled model {old.model_id!r}, not {record.model_id!r}"
        )
    if record.update_kind != old.update_kind:
        raise InvalidInputError(
            f"a re-enrollment keeps the enrolled update kind {old.update_kind}, not {record.update_kind}"
        )
    try:
        statement = service.signer.sign(
            DOMAIN_REENROLLMENT,
            {
                "client_id": client_id,
                "model_id": record.model_id,
                "previous_enrollment": {
                    "canonical": old.enrollment_canonical.hex(),
                    "signature": old.enrollment_signature.hex(),
                },
                "previous_commitments": json.loads(old.current_commitments),
                "enrollment": {
                    "canonical": record.enrollment_canonical.hex(),
                    "signature": record.enrollment_signature.hex(),
                },
                "authorization": {"canonical": auth.canonical.hex(), "signature": auth.signature.hex()},
                "rotated_ms": record.enrolled_ms,
            },
        )
    except StatementError as exc:
        raise InvalidInputError(f"re-enrollment cannot be recorded: {exc}") from exc
    leaf = LeafRecord(
        index=-1,
        leaf_hash=leaf_hash(statement.canonical),
        canonical=statement.canonical,
        signature=statement.signature,
        submission_id=reenrollment_leaf_id(new_sha),
        request_id="",
    )
    try:
        stored, _leaf = service.state.rotate_client(
            record,
            previous_sha,
            leaf,
            now_ms=service.clock_ms(),
            refuse_pending=not service.config.reenroll_with_open_requests,
        )
    except PendingRequestsError as exc:
        raise FailedPreconditionError(str(exc)) from exc
    except ConflictError as exc:
        raise AlreadyExistsError(str(exc)) from exc
    except NotFoundError as exc:
        raise NotFoundServiceError(str(exc)) from exc
    return stored
