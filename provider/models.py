"""The provider's value types: protocol constants, inputs the service checks, what it hands verifiers.

Shared by the service, its gRPC servicers, the operator service and the verifiers, so that none of
them defines a second copy of a message's shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from zkunlearn.circuits.mask import Mask
from zkunlearn.proofs.backend import is_commitment_point
from zkunlearn.proofs.statements import MAX_STATEMENT_BYTES, canonical_json, same_json

from .errors import InvalidInputError, ResourceExhaustedError, ServiceError
from .state import LeafRecord, RequestRecord

PROTOCOL_VERSION = 1
UPDATE_KIND_GROUP_OBS = 1
UPDATE_KIND_ANALYTIC = 2
UPDATE_KIND_GROUP_OBS_EXACT = 3
UPDATE_KIND_ANALYTIC_EXACT = 4
UPDATE_KINDS = {
    UPDATE_KIND_GROUP_OBS: "group_obs",
    UPDATE_KIND_ANALYTIC: "analytic",
    UPDATE_KIND_GROUP_OBS_EXACT: "group_obs_exact",
    UPDATE_KIND_ANALYTIC_EXACT: "analytic_exact",
}
PROVEN_ENROLLMENT_KINDS = frozenset({UPDATE_KIND_GROUP_OBS_EXACT, UPDATE_KIND_ANALYTIC_EXACT})
"""Update kinds whose enrollment carries proofs over its commitments (the exact relations)."""
ANALYTIC_KINDS = frozenset({UPDATE_KIND_ANALYTIC, UPDATE_KIND_ANALYTIC_EXACT})
SOUND_UPDATE_KINDS = PROVEN_ENROLLMENT_KINDS
"""Update kinds whose relation certifies the deletion (derived, tight tolerances): a provider's default."""
LOOSE_UPDATE_KINDS = frozenset({UPDATE_KIND_GROUP_OBS, UPDATE_KIND_ANALYTIC})
"""Fixed-point relations that do not certify the deletion (docs/protocol.md): accepted only on opt-in."""


@dataclass(frozen=True)
class CommitmentRef:
    """A KZG commitment to one committed circuit input (see the proto's ``Commitment``)."""

    name: str
    block: int
    point_hex: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block, "point_hex": self.point_hex}

    @staticmethod
    def from_json(value: Any) -> CommitmentRef:
        if not isinstance(value, Mapping) or set(value) != {"name", "block", "point_hex"}:
            raise InvalidInputError("a commitment must be an object with exactly name, block and point_hex")
        return CommitmentRef(str(value["name"]), int(value["block"]), str(value["point_hex"]))


#: A signed receipt carries the before and after commitment lists in full (the auditor re-checks the
#: proofs against them), so each list gets under half of a statement's size limit, with room left
#: for the receipt's other fields. A client could otherwise enroll or submit lists that make its
#: own receipt impossible to sign, and its job would be retried for ever.
MAX_COMMITMENT_LIST_BYTES = (MAX_STATEMENT_BYTES - 64 * 1024) // 2
#: Longest verdict reason a receipt carries (verifier errors can quote what they refused).
MAX_REASON_CHARS = 2000
_POINT_HEX_CHARS = 64  # a compressed BN254 G1 point, as ezkl writes a polycommit commitment


def check_commitments(items: Sequence[CommitmentRef], what: str) -> list[CommitmentRef]:
    out: list[CommitmentRef] = []
    seen: set[tuple[str, int]] = set()
    if len(items) > 100_000:
        raise ResourceExhaustedError(f"{what}: {len(items)} commitments exceed the limit of 100000")
    for c in items:
        if not c.name or len(c.name) > 64:
            raise InvalidInputError(f"{what}: commitment name must be 1..64 characters, got {c.name!r}")
        if not 0 <= c.block < 2**32:
            raise InvalidInputError(f"{what}: commitment block out of range: {c.block}")
        if len(c.point_hex) != _POINT_HEX_CHARS or any(ch not in "0123456789abcdef" for ch in c.point_hex):
            raise InvalidInputError(
                f"{what}: commitment {c.name}/{c.block} point must be {_POINT_HEX_CHARS} lower-case hex "
                f"characters (a compressed G1 point), got {len(c.point_hex)} characters"
            )
        if not is_commitment_point(c.point_hex):
            raise InvalidInputError(
                f"{what}: commitment {c.name}/{c.block} is not a point of BN254's G1 (compressed): no "
                "tensor commits to it"
            )
        if (c.name, c.block) in seen:
            raise InvalidInputError(f"{what}: duplicate commitment {c.name}/{c.block}")
        seen.add((c.name, c.block))
        out.append(c)
    size = len(commitments_json(out).encode())
    if size > MAX_COMMITMENT_LIST_BYTES:
        raise ResourceExhaustedError(
            f"{what}: the commitment list is {size} bytes, above the {MAX_COMMITMENT_LIST_BYTES}-byte "
            "limit that keeps a receipt signable"
        )
    return out


def commitments_json(items: Sequence[CommitmentRef]) -> str:
    return json.dumps([c.to_json() for c in items], sort_keys=True, separators=(",", ":"))


def commitments_from_json(text: str) -> list[CommitmentRef]:
    return [CommitmentRef.from_json(v) for v in json.loads(text)]


@dataclass(frozen=True)
class TensorData:
    """Shape plus little-endian float64 bytes, validated so the two agree."""

    shape: tuple[int, ...]
    float64_le: bytes

    def validate(self, what: str, max_bytes: int) -> None:
        if not self.shape or len(self.shape) > 8 or any(d < 0 for d in self.shape):
            raise InvalidInputError(
                f"{what}: shape must have 1..8 non-negative dimensions, got {list(self.shape)}"
            )
        need = math.prod(self.shape) * 8
        if need > max_bytes:
            raise ResourceExhaustedError(f"{what}: {need} bytes exceed the limit of {max_bytes}")
        if len(self.float64_le) != need:
            raise InvalidInputError(
                f"{what}: shape {list(self.shape)} needs {need} bytes of float64 "
                f"but {len(self.float64_le)} were sent"
            )
        if not np.isfinite(np.frombuffer(self.float64_le, dtype="<f8")).all():
            raise InvalidInputError(f"{what}: contains NaN or infinity")

    @classmethod
    def from_array(cls, array: npt.ArrayLike) -> TensorData:
        values = np.ascontiguousarray(array, dtype="<f8")
        return cls(tuple(int(d) for d in values.shape), values.tobytes())

    def array(self) -> npt.NDArray[np.float64]:
        """The values as a float64 array of ``shape`` (call :meth:`validate` first on untrusted data)."""
        return np.frombuffer(self.float64_le, dtype="<f8").reshape(self.shape).astype(np.float64)

    def digest_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "sha256": hashlib.sha256(self.float64_le).hexdigest()}


def encode_forget(features: TensorData | None, labels: TensorData | None) -> bytes:
    """A request's forget samples as stored: a canonical JSON header line, then the raw float64 bytes
    (pickle-free, self-describing); empty without samples."""
    if features is None or labels is None:
        return b""
    header = canonical_json({"features": list(features.shape), "labels": list(labels.shape)})
    return header + b"\n" + features.float64_le + labels.float64_le


def decode_forget(blob: bytes) -> tuple[TensorData | None, TensorData | None]:
    """The inverse of :func:`encode_forget` (the blob comes from the provider's own records)."""
    if not blob:
        return None, None
    head, _, rest = blob.partition(b"\n")
    shapes = json.loads(head)
    fshape, lshape = tuple(shapes["features"]), tuple(shapes["labels"])
    n = math.prod(fshape) * 8
    return TensorData(fshape, rest[:n]), TensorData(lshape, rest[n:])


@dataclass(frozen=True)
class RequestDraft:
    """One deletion request before it is signed: who, which mask, and an analytic client's samples."""

    client_id: str
    mask: Mask | bytes
    forget_features: TensorData | None = None
    forget_labels: TensorData | None = None
    ttl_s: float | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class AuthInput:
    client_id: str
    nonce: bytes
    canonical: bytes
    signature: bytes


@dataclass(frozen=True)
class EnrollmentInput:
    version: int
    client_id: str
    public_key: bytes
    model_id: str
    layers: tuple[str, ...]
    update_kind: int
    commitments: tuple[CommitmentRef, ...]
    canonical: bytes
    signature: bytes
    enrollment_proofs: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class SubmissionHeader:
    version: int
    request_id: str
    client_id: str
    update_kind: int
    after_commitments: tuple[CommitmentRef, ...]
    proof_sizes: tuple[int, ...]
    total_bytes: int
    sha256: str
    auth: AuthInput


@dataclass(frozen=True)
class ProviderInfo:
    protocol_version: int
    key_id: str
    public_key: bytes
    model_ids: tuple[str, ...]
    srs_digest: str
    srs_insecure: bool


@dataclass(frozen=True)
class ReceiptView:
    submission_id: str
    verdict: int
    reason: str
    leaf: LeafRecord | None


@dataclass(frozen=True)
class DeliveredRequest:
    """A request as delivered: its record, its forget data, and the signed statement of its cursor."""

    record: RequestRecord
    forget_features: TensorData | None
    forget_labels: TensorData | None
    delivery: bytes = b""
    delivery_signature: bytes = b""


# ---------------------------------------------------------------------------------------------------
# Verification interface


@dataclass(frozen=True)
class VerificationJob:
    """Everything a verifier may rely on, all of it from the provider's own records.

    ``before_commitments`` are the client's commitments as the provider holds them (enrollment, or
    the last accepted update), never values supplied with the proof.
    """

    request_id: str
    client_id: str
    model_id: str
    update_kind: int
    layers: tuple[str, ...]
    request_payload: Mapping[str, Any]
    request_canonical: bytes
    mask: bytes
    forget_features: TensorData | None
    forget_labels: TensorData | None
    before_commitments: tuple[CommitmentRef, ...]
    after_commitments: tuple[CommitmentRef, ...]
    proofs: tuple[bytes, ...]
    # Exact Group-OBS: the client's accepted enrollment (its layers, commitments then, and their proofs).
    enrolled_layers: tuple[str, ...] = ()
    enrolled_commitments: tuple[CommitmentRef, ...] = ()
    enrollment_proofs: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class VerificationResult:
    accepted: bool
    reason: str = ""


@runtime_checkable
class ProofVerifier(Protocol):
    """Checks a submission's proofs; the real one runs ezkl against the provider's verifying keys.

    Must be thread-safe: the service calls it from its worker pool. Raising counts as a rejection
    whose reason is the exception's message.
    """

    def verify(self, job: VerificationJob) -> VerificationResult: ...


@runtime_checkable
class RequestPreparer(Protocol):
    """A verifier that can do, when a request is issued, the work of judging its proofs that depends
    only on the request (the real one commits to the mask it issued). ``prepare`` must return at once
    (the work runs in the background) and never raise for a request it cannot prepare: verification
    computes whatever preparation did not leave behind."""

    def prepare(self, model_id: str, update_kind: int, request_canonical: bytes, mask: bytes) -> None: ...


@runtime_checkable
class EnrollmentLayoutChecker(Protocol):
    """A verifier that knows each model's published circuits can refuse, at enrollment, commitments
    those circuits would never read (a missing or stray tensor, a kind the model does not publish)."""

    def check_enrollment(
        self,
        model_id: str,
        update_kind: int,
        layers: tuple[str, ...],
        commitments: tuple[CommitmentRef, ...],
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> VerificationResult: ...


@runtime_checkable
class EnrollmentVerifier(Protocol):
    """Checks an exact Group-OBS enrollment's proofs over its commitments (the real one runs ezkl).

    A provider whose verifier does not implement it refuses such enrollments.
    """

    def verify_enrollment(
        self,
        model_id: str,
        layers: tuple[str, ...],
        commitments: tuple[CommitmentRef, ...],
        proofs: tuple[bytes, ...],
    ) -> VerificationResult: ...


@dataclass(frozen=True)
class ServiceConfig:
    model_ids: tuple[str, ...] = ()  # empty: any model id is accepted at enrollment
    nonce_ttl_s: float = 120.0
    # Challenges per second (bursts of twice that) per caller address and per client id or operator
    # key: a challenge writes nothing, these only bound the HMAC work one caller can ask for. 0: off.
    challenge_rate_per_peer: float = 200.0
    challenge_rate_per_subject: float = 10.0
    # model id -> parameter name -> shape, from the model's deletion planner: what Enroll counts a
    # Group-OBS layer's batches against (a model without a planner gets the structural checks only).
    layer_shapes: Mapping[str, Mapping[str, tuple[int, ...]]] = field(default_factory=dict)
    request_ttl_s: float = 7 * 24 * 3600.0
    max_proof_bytes: int = 256 * 1024 * 1024
    max_proofs: int = 4096
    max_forget_bytes: int = 64 * 1024 * 1024
    max_layers: int = 256
    # Each submission costs a verification (minutes of ezkl on big circuits): rejected answers to one
    # request may be retried, but not without end.
    max_submissions_per_request: int = 16
    # Re-enrollment while a request addressed to the client is unanswered and unexpired: refused
    # unless set (docs/decisions/re-enrollment.md).
    reenroll_with_open_requests: bool = False
    verify_workers: int = 2  # 0: this process verifies nothing (stand-alone workers do)
    verify_lease_s: float = 300.0
    verify_poll_s: float = 0.25
    verify_max_attempts: int = 3
    # Names this replica's job leases; a restart under the same name frees them at once.
    replica_id: str = field(default_factory=socket.gethostname)
    srs_digest: str = ""
    srs_insecure: bool = True
    # Update kinds Enroll accepts (provider.update_policy); the loose kinds 1 and 2 only on opt-in.
    update_kinds: frozenset[int] = SOUND_UPDATE_KINDS


def require_payload(
    payload: Mapping[str, Any], expected: Mapping[str, Any], what: str, error: type[ServiceError]
) -> None:
    """The signed payload must say exactly what the message says: no extra, missing or differing field."""
    extra = sorted(set(payload) - set(expected))
    missing = sorted(set(expected) - set(payload))
    if extra or missing:
        raise error(f"{what}: signed statement has fields {sorted(payload)}; expected {sorted(expected)}")
    for key, value in expected.items():
        # Compared as canonical JSON, so types count too: a signed `true` is not the message's 1.
        if not same_json(value, payload[key]):
            raise error(f"{what}: signed field {key!r} does not match the message")


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
MAX_ID_CHARS = 128


def check_id(value: str, what: str) -> str:
    """``value`` if it is a usable id (client, request, replica): 1..128 of ``[A-Za-z0-9-_.:]``."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{what} is empty")
    if len(value) > MAX_ID_CHARS:
        raise InvalidInputError(f"{what} is longer than {MAX_ID_CHARS} characters")
    if not set(value) <= _ID_CHARS:
        raise InvalidInputError(f"{what} {value!r} may only contain letters, digits and -_.:")
    return value


def check_layer(name: str) -> str:
    """``name`` if it is a usable layer name: 1..256 characters without newlines."""
    if not name or len(name) > 256 or "\n" in name:
        raise InvalidInputError(f"layer name must be 1..256 characters without newlines, got {name[:40]!r}")
    return name
