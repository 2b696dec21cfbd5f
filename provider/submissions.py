"""A proof upload's header limits and its streamed bytes, checked before anything is stored."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from .errors import InvalidInputError, ResourceExhaustedError
from .models import PROTOCOL_VERSION, CommitmentRef, ServiceConfig, SubmissionHeader, check_commitments

__all__ = ["check_submission_header", "receive_upload"]


def check_submission_header(header: SubmissionHeader, config: ServiceConfig) -> list[CommitmentRef]:
    """Refuse a header outside the configured limits or inconsistent with itself; returns its checked
    ``after_commitments``."""
    if header.version != PROTOCOL_VERSION:
        raise InvalidInputError(f"protocol version {header.version} unsupported (provider speaks 1)")
    if header.total_bytes > config.max_proof_bytes:
        raise ResourceExhaustedError(
            f"declared proof size {header.total_bytes} exceeds the limit of {config.max_proof_bytes} bytes"
        )
    if not header.proof_sizes:
        raise InvalidInputError("proof_sizes is empty: a submission carries at least one proof")
    if len(header.proof_sizes) > config.max_proofs:
        raise ResourceExhaustedError(
            f"{len(header.proof_sizes)} proofs exceed the limit of {config.max_proofs}"
        )
    if any(s <= 0 for s in header.proof_sizes) or sum(header.proof_sizes) != header.total_bytes:
        raise InvalidInputError(
            "proof sizes must be positive and sum to total_bytes "
            f"({sum(header.proof_sizes)} != {header.total_bytes})"
        )
    if len(header.sha256) != 64 or any(ch not in "0123456789abcdef" for ch in header.sha256):
        raise InvalidInputError("sha256 must be 64 lower-case hex characters")
    after = check_commitments(header.after_commitments, "after commitments")
    if not after:
        raise InvalidInputError("after_commitments is empty: the proof must commit to the updated weights")
    return after


def receive_upload(chunks: Iterable[bytes], total: int, sha256: str) -> bytes:
    """The uploaded bytes, refused as soon as they run past ``total`` and unless they hash to ``sha256``."""
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
