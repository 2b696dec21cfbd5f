"""The enrollments the auditor judges a client's receipts by, and the client's commitment chain.

``enrollments/<client>.json`` holds the enrollment in force at the end of the exported log and, in
``replaced``, every enrollment a re-enrollment replaced, oldest first, each with ``replaced_at``: the
index of the re-enrollment leaf that replaced it. Which enrollment a receipt is judged by is fixed by
the log's order alone: the one in force after the client's last re-enrollment before the receipt.
The bundle's enrollments must be exactly the ones the client's re-enrollment leaves name (each
replaced one as its leaf's ``previous_enrollment``, the next as its ``enrollment``), so an enrollment
cannot be dropped, swapped, or moved to other receipts without the check failing; an exact-kind
deletion is then judged with the norms its own enrollment's proofs show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zkunlearn.proofs.audit_format import (
    CheckError,
    hex_bytes,
    json_list,
    json_object,
    load_json,
    non_negative_int,
    required_field,
    verified_payload,
)
from zkunlearn.proofs.audit_rotation import Enrolled, embedded_enrollment, rotate
from zkunlearn.proofs.statements import (
    DOMAIN_ENROLLMENT,
    StatementError,
    StatementVerifier,
    enrollment_proofs_digest,
)

__all__ = ["ClientLeaf", "EnrollmentVersion", "chain", "enrollment_versions", "in_force"]

#: One of a client's log leaves: its index and signed payload.
ClientLeaf = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class EnrollmentVersion:
    """One enrollment a client held, as the bundle exports it (``record``, handed to the proof checker)."""

    record: dict[str, Any]
    enrolled: Enrolled
    replaced_at: int | None  # the re-enrollment leaf that replaced it; None for the one in force at the end
    label: str  # where the bundle holds it

    @property
    def proven(self) -> bool:
        """Whether the client's signed enrollment names enrollment proofs (the exact kinds)."""
        return "enrollment_proofs_sha256" in self.enrolled.payload


def _version(obj: dict[str, Any], where: str, client_id: str, replaced_at: int | None) -> EnrollmentVersion:
    """An exported enrollment, checked against the client's signature: key, commitments and proofs."""
    key = hex_bytes(required_field(obj, "public_key", where), f"{where} public_key", 32)
    try:
        client = StatementVerifier.from_public_bytes(key)
    except StatementError as exc:
        raise CheckError(f"{where} public_key: {exc}") from None
    canonical = required_field(obj, "canonical", where)
    payload = verified_payload(
        client, canonical, required_field(obj, "signature", where), DOMAIN_ENROLLMENT, where
    )
    if payload.get("client_id") != client_id or payload.get("public_key") != key.hex():
        raise CheckError(f"{where} client_id/public_key: the signed enrollment names another client or key")
    commitments = json_list(required_field(obj, "commitments", where), f"{where} commitments")
    if payload.get("commitments") != commitments:
        raise CheckError(f"{where} commitments: differ from the signed enrollment's commitments")
    # Every enrollment record lists its proofs (empty for the kinds that enroll without any).
    raw = json_list(required_field(obj, "enrollment_proofs", where), f"{where} enrollment_proofs")
    proofs = [hex_bytes(p, f"{where} enrollment_proofs") for p in raw]
    if "enrollment_proofs_sha256" in payload:
        if enrollment_proofs_digest(proofs) != payload["enrollment_proofs_sha256"]:
            raise CheckError(f"{where} enrollment_proofs: not the proofs the client signed")
    elif proofs:
        raise CheckError(f"{where} enrollment_proofs: the client's signed enrollment names no proofs")
    return EnrollmentVersion(obj, Enrolled(payload, bytes.fromhex(canonical)), replaced_at, where)


def enrollment_versions(bundle: Path, client_id: str) -> list[EnrollmentVersion]:
    """Every enrollment the bundle exports for the client, oldest first; the last is the one in force."""
    rel = f"enrollments/{client_id}.json"
    obj = json_object(load_json(bundle, rel), rel)
    versions = []
    for k, entry in enumerate(json_list(required_field(obj, "replaced", rel), f"{rel} replaced")):
        where = f"{rel} replaced[{k}]"
        entry = json_object(entry, where)
        replaced_at = non_negative_int(required_field(entry, "replaced_at", where), f"{where} replaced_at")
        versions.append(_version(entry, where, client_id, replaced_at))
    versions.append(_version(obj, rel, client_id, None))
    return versions


def in_force(
    client_id: str, leaves: Sequence[ClientLeaf], rotations: set[int], versions: Sequence[EnrollmentVersion]
) -> dict[int, EnrollmentVersion]:
    """The enrollment in force at each of the client's receipts (by leaf index), by the log's order,
    after checking that ``versions`` are the enrollments its re-enrollment leaves (``rotations``) name."""
    rel = f"enrollments/{client_id}.json"
    rotated = [(index, payload) for index, payload in leaves if index in rotations]
    if len(versions) != len(rotated) + 1:
        raise CheckError(
            f"{rel} replaced: {len(versions) - 1} replaced enrollment(s), the log has {len(rotated)} "
            "re-enrollment(s) of the client"
        )
    for k, (index, payload) in enumerate(rotated):
        where, old, new = f"log.json[{index}]", versions[k], versions[k + 1]
        if old.replaced_at != index:
            raise CheckError(
                f"{old.label} replaced_at: {old.replaced_at}, the re-enrollment replacing it is {where}"
            )
        named = required_field(payload, "previous_enrollment", where)
        if (
            embedded_enrollment(named, f"{where} previous_enrollment", client_id).canonical
            != old.enrolled.canonical
        ):
            raise CheckError(f"{old.label}: not the enrollment {where} replaced")
        moved = required_field(payload, "enrollment", where)
        if embedded_enrollment(moved, f"{where} enrollment", client_id).canonical != new.enrolled.canonical:
            raise CheckError(f"{new.label}: not the enrollment {where} moved the client to")
    judged: dict[int, EnrollmentVersion] = {}
    k = 0
    for index, _payload in leaves:
        if index in rotations:
            k += 1
        else:
            judged[index] = versions[k]
    return judged


def chain(
    client_id: str, leaves: Sequence[ClientLeaf], rotations: set[int], versions: Sequence[EnrollmentVersion]
) -> str:
    """Check that the client's accepted receipts chain enrollment -> after -> before ..., through each
    re-enrollment (authorized by the replaced enrollment's key); returns the OK note or raises."""
    enrolled = versions[0].enrolled
    current: Any = enrolled.payload.get("commitments")
    rotated = [index for index, _payload in leaves if index in rotations]
    answered: dict[str, int] = {}
    accepted = 0
    for index, r in leaves:
        where = f"log.json[{index}]"
        if index in rotations:
            enrolled = rotate(r, where, client_id, enrolled, current)
            current, accepted = enrolled.payload.get("commitments"), 0
            continue
        for key in ("model_id", "update_kind"):
            if r.get(key) != enrolled.payload.get(key):
                raise CheckError(
                    f"{where} receipt {key}: {r.get(key)!r}, enrolled {enrolled.payload.get(key)!r}"
                )
        if r.get("verdict") != "accepted":
            continue
        rid = str(r.get("request_id"))
        if rid in answered:
            raise CheckError(f"{where} verdict: request {rid} already accepted at log.json[{answered[rid]}]")
        answered[rid] = index
        if r.get("before_commitments") != current:
            source = "the enrollment" if not accepted else "the previous accepted receipt"
            if rotated and not accepted and index > rotated[0]:
                source = "the re-enrollment"
            raise CheckError(f"{where} before_commitments: differ from {source}'s commitments")
        current = r.get("after_commitments")
        accepted += 1
    if rotated:
        at = ", ".join(f"log.json[{index}]" for index in rotated)
        return (
            f"{len(answered)} accepted update(s) chain from the enrollment and "
            f"{len(rotated)} re-enrollment(s) ({at}); {accepted} since the last one"
        )
    return f"{accepted} accepted update(s) chain from the enrollment"
