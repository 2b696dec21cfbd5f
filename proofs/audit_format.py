"""The audit bundle's format and how the auditor reads it: every malformed piece (missing file, bad JSON,
bad hex, wrong shape) becomes a :class:`CheckError` naming the file and field.

Bundle format ``zkunlearn-audit-bundle/v2`` (a directory; all bytes are lowercase hex):

``manifest.json``
    ``{"format": "zkunlearn-audit-bundle/v2", "provider_public_key": hex(32 bytes Ed25519),
    "key_id", "srs": {"sha256", "insecure": bool}, "created_ms", "tree_size"}``.
``tree_heads.json``
    Signed tree heads (``SignedStatement.to_dict()``) in strictly increasing size; at least the
    latest, whose size is the number of leaves in ``log.json``. Size 0 appears only for an empty log
    (consistency with the empty tree proves nothing).
``consistency.json``
    ``[{"first_size", "second_size", "proof": [hex]}]``, one per consecutive pair of heads.
``log.json``
    ``[{"index", "canonical", "signature", "inclusion_proof": [hex]}]``: leaf ``index`` is the
    provider-signed receipt statement's bytes; its inclusion proof is against the latest head.
``requests/<request_id>.json``
    ``{"canonical", "signature", "mask", "forget_features", "forget_labels"}``: the provider-signed
    deletion request, the mask bytes, and the forget tensors as ``{"shape", "float64_le"}`` or null.
``enrollments/<client_id>.json``
    ``{"canonical", "signature", "public_key", "commitments", "enrollment_proofs", "replaced"}``: the
    enrollment in force at the end of the log -- its statement, signed by the *client's* key (proof of
    possession), the commitments it enrolled, and its enrollment proofs (hex; empty unless the
    statement names their digest) -- and in ``replaced`` every enrollment of the client that a
    re-enrollment replaced, oldest first, in the same form plus ``replaced_at``: the index of the
    re-enrollment leaf that replaced it (:mod:`zkunlearn.proofs.audit_enrollments`).
``submissions/<submission_id>.json`` and ``.bin``
    ``{"request_id", "client_id", "proof_sha256", "proof_sizes", "after_commitments"}`` and the raw
    proof bytes (the proofs concatenated in ``proof_sizes`` order).
``circuits/``
    The provider's settings, verifying keys and circuit specs; opaque here, handed to the proof checker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from zkunlearn.proofs.statements import StatementError, StatementVerifier

from zkunlearn.errors import RefusedError

BUNDLE_FORMAT = "zkunlearn-audit-bundle/v2"
"""v2: ``enrollments/<client_id>.json`` carries ``replaced`` (v1 bundles have no replaced enrollments,
so exact deletions before a re-enrollment could not be judged by their own norms)."""
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
VERDICTS = ("accepted", "rejected")


#: ``(request_payload, request_canonical, mask, forget_features, forget_labels, before_commitments,
#: after_commitments, proofs, circuits_dir) -> (ok, reason)``; called positionally. The forget tensors
#: are float64 arrays of their signed shapes (or ``None``); commitments are ``{"name", "block",
#: "point_hex"}`` dicts as signed in the receipt; ``circuits_dir`` is the bundle's ``circuits/`` folder
#: (it may not exist: the checker must then fail). A checker of one's own is not told which
#: enrollment was in force; the default one judges an exact-kind deletion by it
#: (:func:`zkunlearn.proofs.audit_checks.default_proof_checker`).
Forget = npt.NDArray[np.float64]
ProofChecker = Callable[
    [
        Mapping[str, Any],
        bytes,
        bytes,
        Forget | None,
        Forget | None,
        list[dict[str, Any]],
        list[dict[str, Any]],
        list[bytes],
        Path,
    ],
    tuple[bool, str],
]


#: Rebuilds the bundle's verifying keys from the published specs; returns an OK note or raises.
CircuitChecker = Callable[[Path], str]


class CheckError(RefusedError):
    """One check failed; the message names the file and field."""


def load_json(bundle: Path, rel: str) -> Any:
    path = bundle / rel
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckError(f"{rel}: file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckError(f"{rel}: cannot read: {exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CheckError(f"{rel}: not valid JSON: {exc}") from None
    except RecursionError:
        raise CheckError(f"{rel}: JSON nested too deeply") from None


def json_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CheckError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def json_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise CheckError(f"{where}: expected a JSON list, got {type(value).__name__}")
    return value


def required_field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise CheckError(f"{where}: field {key!r} is missing")
    return obj[key]


def hex_bytes(value: Any, where: str, length: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) % 2 or not re.fullmatch(r"[0-9a-f]*", value):
        raise CheckError(f"{where}: not lowercase hex of whole bytes")
    raw = bytes.fromhex(value)
    if length is not None and len(raw) != length:
        raise CheckError(f"{where}: expected {length} bytes, got {len(raw)}")
    return raw


def non_negative_int(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise CheckError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def safe_id(value: Any, where: str) -> str:
    """Ids become file names: refuse anything that could leave the bundle folder."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or value in {".", ".."}:
        raise CheckError(f"{where}: {value!r} is not a valid id")
    return value


def verified_payload(
    verifier: StatementVerifier, canonical: Any, signature: Any, domain: str, where: str
) -> dict[str, Any]:
    """The payload of the statement whose hex ``canonical`` bytes ``verifier`` checks against ``signature``
    under ``domain``."""
    try:
        return verifier.verify(
            (hex_bytes(canonical, f"{where} canonical"), hex_bytes(signature, f"{where} signature")), domain
        )
    except StatementError as exc:
        raise CheckError(f"{where}: {exc}") from None


def forget_tensor(value: Any, where: str) -> tuple[tuple[int, ...], bytes] | None:
    """A request's ``{"shape", "float64_le"}`` forget tensor as its shape and raw bytes (``None`` stays)."""
    if value is None:
        return None
    obj = json_object(value, where)
    shape = json_list(required_field(obj, "shape", where), f"{where}.shape")
    dims = tuple(non_negative_int(d, f"{where}.shape") for d in shape)
    data = hex_bytes(required_field(obj, "float64_le", where), f"{where}.float64_le")
    need = 8
    for d in dims:
        need *= d
    if not dims or len(data) != need:
        raise CheckError(f"{where}: shape {list(dims)} needs {need} bytes of float64, got {len(data)}")
    return dims, data


def forget_array(tensor: tuple[tuple[int, ...], bytes] | None) -> Forget | None:
    if tensor is None:
        return None
    return np.frombuffer(tensor[1], dtype="<f8").astype(np.float64).reshape(tensor[0])
