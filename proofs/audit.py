"""The offline auditor: re-check a provider's exported bundle without trusting the provider.

The auditor runs alone (it imports only ``zkunlearn.circuits`` and its own package) and reports every
check as an item that is OK or FAIL with a reason naming the file and field, so a failed audit says
*what* was wrong rather than only *that* something was. A malformed bundle (missing file, bad JSON,
bad hex) is a FAIL item, never a traceback.

Bundle format ``zkunlearn-audit-bundle/v1`` (a directory; all bytes are lowercase hex):

``manifest.json``
    ``{"format": "zkunlearn-audit-bundle/v1", "provider_public_key": hex(32 bytes Ed25519),
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
    ``{"canonical", "signature", "public_key", "commitments", "enrollment_proofs"}``: the enrollment
    statement, signed by the *client's* key (proof of possession), the commitments it enrolled, and
    its enrollment proofs (hex; empty unless the statement names their digest).
``submissions/<submission_id>.json`` and ``.bin``
    ``{"request_id", "client_id", "proof_sha256", "proof_sizes", "after_commitments"}`` and the raw
    proof bytes (the proofs concatenated in ``proof_sizes`` order).
``circuits/``
    The provider's settings, verifying keys and circuit specs; opaque here, handed to the proof checker.

Checks: (1) every head is signed by the provider key (pinned by the caller, or else taken from the
manifest, which the report says), sizes increase, consecutive heads are consistent, and the latest
root is recomputed from all leaves; (2) every leaf is a valid provider receipt included under the
latest head; (3) cross-checks, because a valid proof *of something else* must fail (cosign
GHSA-8gw7-4j42-w388): the receipt binds the request's exact bytes, client, mask digest, the
submission's proof digest and after-commitments; (4) per client, accepted receipts chain
enrollment -> after -> before -> ...; (5) each accepted receipt's proofs verify, with verifying keys
the auditor first rebuilt from the published specs (``circuits/``: same ONNX, sound settings, same
vk); (6) every tree head the caller already holds (``known_heads``: one a client kept after
checking its receipt, or a monitor's) is a prefix of this log.

Only (6) catches a provider that exports a *truncated* log: a prefix of its log together with its own
older signed heads is self-consistent, so nothing inside the bundle can reveal what was cut off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from zkunlearn.circuits.mask import Mask, MaskError
from zkunlearn.proofs.statements import (
    DOMAIN_DELETION_REQUEST,
    DOMAIN_ENROLLMENT,
    DOMAIN_RECEIPT,
    SignedStatement,
    StatementError,
    StatementVerifier,
    TreeHead,
    check_tree_head,
    enrollment_proofs_digest,
    key_id_for,
)
from zkunlearn.proofs.transparency import (
    MerkleProofError,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

__all__ = [
    "BUNDLE_FORMAT",
    "AuditItem",
    "AuditReport",
    "Forget",
    "ProofChecker",
    "audit_bundle",
    "default_proof_checker",
    "main",
    "render_table",
    "report_json",
]

BUNDLE_FORMAT = "zkunlearn-audit-bundle/v1"
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_VERDICTS = ("accepted", "rejected")


#: ``(request_payload, request_canonical, mask, forget_features, forget_labels, before_commitments,
#: after_commitments, proofs, circuits_dir) -> (ok, reason)``; called positionally. The forget tensors
#: are float64 arrays of their signed shapes (or ``None``); commitments are ``{"name", "block",
#: "point_hex"}`` dicts as signed in the receipt; ``circuits_dir`` is the bundle's ``circuits/`` folder
#: (it may not exist: the checker must then fail).
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


@dataclass(frozen=True)
class AuditItem:
    item: str
    ok: bool
    reason: str = ""


@dataclass
class AuditReport:
    bundle: str
    key_pinned: bool = False
    provider_key_id: str = ""
    tree_size: int = 0
    items: list[AuditItem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True only if something was checked and nothing failed: an empty audit proves nothing."""
        return bool(self.items) and all(i.ok for i in self.items)

    @property
    def items_checked(self) -> int:
        return len(self.items)

    @property
    def failures(self) -> list[dict[str, str]]:
        return [{"item": i.item, "reason": i.reason} for i in self.items if not i.ok]


class _CheckError(Exception):
    """One check failed; the message names the file and field."""


# --------------------------------------------------------------------------------------------------
# Reading the bundle: every malformed piece becomes a _CheckError naming where it is.


def _load_json(bundle: Path, rel: str) -> Any:
    path = bundle / rel
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _CheckError(f"{rel}: file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _CheckError(f"{rel}: cannot read: {exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _CheckError(f"{rel}: not valid JSON: {exc}") from None
    except RecursionError:
        raise _CheckError(f"{rel}: JSON nested too deeply") from None


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _CheckError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _CheckError(f"{where}: expected a JSON list, got {type(value).__name__}")
    return value


def _get(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _CheckError(f"{where}: field {key!r} is missing")
    return obj[key]


def _hex(value: Any, where: str, length: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) % 2 or not re.fullmatch(r"[0-9a-f]*", value):
        raise _CheckError(f"{where}: not lowercase hex of whole bytes")
    raw = bytes.fromhex(value)
    if length is not None and len(raw) != length:
        raise _CheckError(f"{where}: expected {length} bytes, got {len(raw)}")
    return raw


def _int(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise _CheckError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _safe_id(value: Any, where: str) -> str:
    """Ids become file names: refuse anything that could leave the bundle folder."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or value in {".", ".."}:
        raise _CheckError(f"{where}: {value!r} is not a valid id")
    return value


def _statement(
    verifier: StatementVerifier, canonical: Any, signature: Any, domain: str, where: str
) -> dict[str, Any]:
    try:
        return verifier.verify(
            (_hex(canonical, f"{where} canonical"), _hex(signature, f"{where} signature")), domain
        )
    except StatementError as exc:
        raise _CheckError(f"{where}: {exc}") from None


def _tensor(value: Any, where: str) -> tuple[tuple[int, ...], bytes] | None:
    if value is None:
        return None
    obj = _obj(value, where)
    shape = _list(_get(obj, "shape", where), f"{where}.shape")
    dims = tuple(_int(d, f"{where}.shape") for d in shape)
    data = _hex(_get(obj, "float64_le", where), f"{where}.float64_le")
    need = 8
    for d in dims:
        need *= d
    if not dims or len(data) != need:
        raise _CheckError(f"{where}: shape {list(dims)} needs {need} bytes of float64, got {len(data)}")
    return dims, data


def _array(tensor: tuple[tuple[int, ...], bytes] | None) -> Forget | None:
    if tensor is None:
        return None
    return np.frombuffer(tensor[1], dtype="<f8").astype(np.float64).reshape(tensor[0])


# --------------------------------------------------------------------------------------------------
# The audit


@dataclass
class _Leaf:
    index: int
    payload: dict[str, Any]
    request_payload: dict[str, Any] | None = None
    request_canonical: bytes = b""
    mask: bytes = b""
    features: Forget | None = None
    labels: Forget | None = None
    proofs: list[bytes] | None = None


class _Auditor:
    def __init__(
        self,
        bundle: Path,
        report: AuditReport,
        pinned: bytes | None,
        checker: ProofChecker | None,
        known_heads: Sequence[tuple[str, Any]] = (),
        circuit_checker: CircuitChecker | None = None,
    ) -> None:
        self.known_heads = known_heads
        # The default proof checker trusts the bundle's vk: it comes with the rebuild that justifies it.
        self.circuit_checker = circuit_checker or (default_circuit_checker if checker is None else None)
        self.bundle = bundle
        self.report = report
        self.pinned = pinned
        self.checker = checker
        self.verifier: StatementVerifier | None = None
        self.latest: TreeHead | None = None
        self.leaves: list[_Leaf] = []
        self.leaf_hashes: list[bytes] = []

    def record(self, item: str, check: Callable[[], str]) -> bool:
        """Run one check; ``check`` returns an OK note or raises. Unexpected errors are FAILs too."""
        try:
            note = check()
        except _CheckError as exc:
            self.report.items.append(AuditItem(item, False, str(exc)))
            return False
        except (StatementError, MerkleProofError, MaskError, ValueError, TypeError, KeyError) as exc:
            self.report.items.append(AuditItem(item, False, f"{type(exc).__name__}: {exc}"))
            return False
        self.report.items.append(AuditItem(item, True, note))
        return True

    # (1) key, heads, consistency -------------------------------------------------------------------

    def manifest(self) -> str:
        manifest = _obj(_load_json(self.bundle, "manifest.json"), "manifest.json")
        if manifest.get("format") != BUNDLE_FORMAT:
            raise _CheckError(f"manifest.json format: {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        key = _hex(
            _get(manifest, "provider_public_key", "manifest.json"), "manifest.json provider_public_key", 32
        )
        if manifest.get("key_id") != key_id_for(key):
            raise _CheckError("manifest.json key_id: does not match provider_public_key")
        srs = _obj(_get(manifest, "srs", "manifest.json"), "manifest.json srs")
        note = f"srs sha256 {str(srs.get('sha256'))[:16] or '(none)'}"
        if srs.get("insecure", True):
            note += " (INSECURE dev SRS)"
        if self.pinned is not None:
            assert self.verifier is not None  # set from the pinned key before the manifest is read
            if key != self.pinned:
                raise _CheckError(
                    f"manifest.json provider_public_key: key {key_id_for(key)} is not the pinned key "
                    f"{self.verifier.key_id}"
                )
            return f"provider key {self.verifier.key_id} pinned; {note}"
        self.verifier = StatementVerifier.from_public_bytes(key)
        self.report.provider_key_id = self.verifier.key_id
        return f"provider key {self.verifier.key_id} taken from the manifest, NOT pinned; {note}"

    def heads(self) -> None:
        assert self.verifier is not None
        verifier = self.verifier
        heads: list[TreeHead] = []
        try:
            raw = _list(_load_json(self.bundle, "tree_heads.json"), "tree_heads.json")
            if not raw:
                raise _CheckError("tree_heads.json: no tree head (at least the latest is required)")
        except _CheckError as exc:
            self.report.items.append(AuditItem("tree_heads.json", False, str(exc)))
            return
        for i, entry in enumerate(raw):

            def one(i: int = i, entry: Any = entry) -> str:
                where = f"tree_heads.json[{i}]"
                try:
                    statement = SignedStatement.from_dict(_obj(entry, where))
                except StatementError as exc:
                    raise _CheckError(f"{where}: {exc}") from None
                try:
                    head = check_tree_head(verifier, statement)
                except StatementError as exc:
                    raise _CheckError(f"{where} signature: {exc}") from None
                if heads and head.size <= heads[-1].size:
                    heads.append(head)
                    raise _CheckError(
                        f"{where} tree_size: {head.size} does not increase (previous {heads[-2].size})"
                    )
                heads.append(head)
                return f"size {head.size}, root {head.root.hex()[:16]}"

            if not self.record(f"tree_heads.json[{i}]", one) and len(heads) <= i:
                heads.append(TreeHead(-1, b"", 0, ""))  # keeps positions aligned; never trusted
        if heads and heads[-1].size >= 0:
            self.latest = heads[-1]
            self.report.tree_size = heads[-1].size
        self.consistency(heads)

    def consistency(self, heads: list[TreeHead]) -> None:
        def check() -> str:
            raw = _list(_load_json(self.bundle, "consistency.json"), "consistency.json")
            if len(raw) != max(0, len(heads) - 1):
                raise _CheckError(
                    f"consistency.json: {len(raw)} proofs for {len(heads)} heads (need {len(heads) - 1})"
                )
            return f"{len(raw)} proofs"

        if not self.record("consistency.json", check):
            return
        raw = _load_json(self.bundle, "consistency.json")
        for i, entry in enumerate(raw):
            first, second = heads[i], heads[i + 1]

            def one(
                entry: Any = entry, first: TreeHead = first, second: TreeHead = second, i: int = i
            ) -> str:
                where = f"consistency.json[{i}]"
                obj = _obj(entry, where)
                if first.size < 0 or second.size < 0:
                    raise _CheckError(f"{where}: not checked, a tree head it links failed")
                sizes = (
                    _int(_get(obj, "first_size", where), where),
                    _int(_get(obj, "second_size", where), where),
                )
                if sizes != (first.size, second.size):
                    raise _CheckError(
                        f"{where} first_size/second_size: {sizes}, heads are {(first.size, second.size)}"
                    )
                proof = [
                    _hex(n, f"{where} proof", 32) for n in _list(_get(obj, "proof", where), f"{where} proof")
                ]
                try:
                    verify_consistency(first.size, second.size, first.root, second.root, proof)
                except MerkleProofError as exc:
                    raise _CheckError(f"{where} proof: {exc}") from None
                return f"{first.size} -> {second.size}"

            self.record(f"consistency.json[{i}]", one)

    # (2) leaves ----------------------------------------------------------------------------------

    def log(self) -> None:
        assert self.verifier is not None
        verifier = self.verifier
        try:
            raw = _list(_load_json(self.bundle, "log.json"), "log.json")
        except _CheckError as exc:
            self.report.items.append(AuditItem("log.json", False, str(exc)))
            return
        for i, entry in enumerate(raw):

            def one(i: int = i, entry: Any = entry) -> str:
                where = f"log.json[{i}]"
                obj = _obj(entry, where)
                index = _get(obj, "index", where)
                if type(index) is not int or index != i:
                    raise _CheckError(f"{where} index: {obj.get('index')!r}, expected {i}")
                canonical = _hex(_get(obj, "canonical", where), f"{where} canonical")
                self.leaf_hashes.append(leaf_hash(canonical))
                payload = _statement(
                    verifier, obj["canonical"], _get(obj, "signature", where), DOMAIN_RECEIPT, where
                )
                if payload.get("verdict") not in _VERDICTS:
                    raise _CheckError(f"{where} verdict: {payload.get('verdict')!r} is not accepted/rejected")
                self.leaves.append(_Leaf(i, payload))
                if self.latest is None:
                    raise _CheckError(f"{where} inclusion_proof: not checked, no valid latest tree head")
                proof = [
                    _hex(n, f"{where} inclusion_proof", 32)
                    for n in _list(_get(obj, "inclusion_proof", where), f"{where} inclusion_proof")
                ]
                try:
                    verify_inclusion(leaf_hash(canonical), i, self.latest.size, proof, self.latest.root)
                except MerkleProofError as exc:
                    raise _CheckError(f"{where} inclusion_proof: {exc}") from None
                return f"{payload['verdict']} receipt for request {payload.get('request_id')}"

            if not self.record(f"log.json[{i}]", one) and len(self.leaf_hashes) <= i:
                self.leaf_hashes.append(b"")

        def root() -> str:
            if self.latest is None:
                raise _CheckError("tree_heads.json: no valid latest head to compare the log with")
            if len(raw) != self.latest.size:
                raise _CheckError(
                    f"log.json: {len(raw)} leaves, latest tree head has size {self.latest.size}"
                )
            if any(len(h) != 32 for h in self.leaf_hashes):
                raise _CheckError("log.json: root not recomputed, a leaf is unreadable")
            if root_hash(self.leaf_hashes) != self.latest.root:
                raise _CheckError(
                    "log.json: root recomputed from all leaves differs from the latest head's root_hash"
                )
            return f"root of {len(raw)} leaves matches the latest head"

        self.record("log root", root)

    # (3) cross-checks -----------------------------------------------------------------------------

    def cross(self, leaf: _Leaf) -> str:
        assert self.verifier is not None
        r = leaf.payload
        where = f"log.json[{leaf.index}]"
        request_id = _safe_id(r.get("request_id"), f"{where} receipt request_id")
        _safe_id(r.get("client_id"), f"{where} receipt client_id")
        submission_id = _safe_id(r.get("submission_id"), f"{where} receipt submission_id")

        rel = f"requests/{request_id}.json"
        req = _obj(_load_json(self.bundle, rel), rel)
        canonical = _hex(_get(req, "canonical", rel), f"{rel} canonical")
        if hashlib.sha256(canonical).hexdigest() != r.get("request_sha256"):
            raise _CheckError(f"{where} receipt request_sha256: does not match sha256 of {rel} canonical")
        payload = _statement(
            self.verifier, req["canonical"], _get(req, "signature", rel), DOMAIN_DELETION_REQUEST, rel
        )
        for key in ("request_id", "client_id", "model_id", "update_kind"):
            if payload.get(key) != r.get(key):
                raise _CheckError(
                    f"{rel} {key}: request says {payload.get(key)!r}, receipt says {r.get(key)!r}"
                )
        mask = _hex(_get(req, "mask", rel), f"{rel} mask")
        try:
            digest = Mask.from_bytes(mask).digest()
        except MaskError as exc:
            raise _CheckError(f"{rel} mask: {exc}") from None
        if digest != payload.get("mask_sha256"):
            raise _CheckError(f"{rel} mask: digest {digest[:16]} differs from the signed mask_sha256")
        if payload.get("mask_sha256") != r.get("mask_sha256"):
            raise _CheckError(f"{where} receipt mask_sha256: differs from the request's mask_sha256")
        features = _tensor(_get(req, "forget_features", rel), f"{rel} forget_features")
        labels = _tensor(_get(req, "forget_labels", rel), f"{rel} forget_labels")
        signed_forget = payload.get("forget")
        if signed_forget is None:
            if features is not None or labels is not None:
                raise _CheckError(
                    f"{rel} forget_features: present, but the signed request has no forget data"
                )
        else:
            for name, tensor in (("features", features), ("labels", labels)):
                expected = _obj(signed_forget, f"{rel} signed forget").get(name)
                got = (
                    None
                    if tensor is None
                    else {
                        "shape": list(tensor[0]),
                        "sha256": hashlib.sha256(tensor[1]).hexdigest(),
                    }
                )
                if got != expected:
                    raise _CheckError(f"{rel} forget_{name}: shape or sha256 differs from the signed request")

        srel = f"submissions/{submission_id}.json"
        sub = _obj(_load_json(self.bundle, srel), srel)
        for key in ("request_id", "client_id"):
            if sub.get(key) != r.get(key):
                raise _CheckError(f"{srel} {key}: {sub.get(key)!r}, receipt says {r.get(key)!r}")
        brel = f"submissions/{submission_id}.bin"
        try:
            blob = (self.bundle / brel).read_bytes()
        except OSError as exc:
            raise _CheckError(f"{brel}: cannot read: {exc}") from None
        actual = hashlib.sha256(blob).hexdigest()
        if sub.get("proof_sha256") != actual:
            raise _CheckError(f"{srel} proof_sha256: differs from sha256 of {brel}")
        if r.get("proof_sha256") != actual:
            raise _CheckError(f"{where} receipt proof_sha256: differs from sha256 of {brel}")
        sizes = [
            _int(s, f"{srel} proof_sizes")
            for s in _list(_get(sub, "proof_sizes", srel), f"{srel} proof_sizes")
        ]
        if not sizes or any(s == 0 for s in sizes) or sum(sizes) != len(blob):
            raise _CheckError(f"{srel} proof_sizes: {sizes} do not split the {len(blob)} proof bytes")
        if _get(sub, "after_commitments", srel) != r.get("after_commitments"):
            raise _CheckError(f"{srel} after_commitments: differ from the receipt's after_commitments")
        proofs, offset = [], 0
        for s in sizes:
            proofs.append(blob[offset : offset + s])
            offset += s
        leaf.request_payload, leaf.request_canonical, leaf.mask = payload, canonical, mask
        leaf.features, leaf.labels, leaf.proofs = _array(features), _array(labels), proofs
        return f"request {request_id}, submission {submission_id}"

    # (4) commitment chains ------------------------------------------------------------------------

    def enrollment(self, client_id: str) -> dict[str, Any]:
        rel = f"enrollments/{client_id}.json"
        enr = _obj(_load_json(self.bundle, rel), rel)
        key = _hex(_get(enr, "public_key", rel), f"{rel} public_key", 32)
        try:
            client = StatementVerifier.from_public_bytes(key)
        except StatementError as exc:
            raise _CheckError(f"{rel} public_key: {exc}") from None
        payload = _statement(
            client, _get(enr, "canonical", rel), _get(enr, "signature", rel), DOMAIN_ENROLLMENT, rel
        )
        if payload.get("client_id") != client_id or payload.get("public_key") != key.hex():
            raise _CheckError(
                f"{rel} client_id/public_key: the signed enrollment names another client or key"
            )
        commitments = _list(_get(enr, "commitments", rel), f"{rel} commitments")
        if payload.get("commitments") != commitments:
            raise _CheckError(f"{rel} commitments: differ from the signed enrollment's commitments")
        # Every enrollment record lists its proofs (empty for the kinds that enroll without any).
        raw = _list(_get(enr, "enrollment_proofs", rel), f"{rel} enrollment_proofs")
        proofs = [_hex(p, f"{rel} enrollment_proofs") for p in raw]
        if "enrollment_proofs_sha256" in payload:
            if enrollment_proofs_digest(proofs) != payload["enrollment_proofs_sha256"]:
                raise _CheckError(f"{rel} enrollment_proofs: not the proofs the client signed")
        elif proofs:
            raise _CheckError(f"{rel} enrollment_proofs: the client's signed enrollment names no proofs")
        return payload

    def chains(self) -> None:
        by_client: dict[str, list[_Leaf]] = {}
        for leaf in self.leaves:
            by_client.setdefault(str(leaf.payload.get("client_id")), []).append(leaf)
        for client_id, leaves in sorted(by_client.items()):

            def one(client_id: str = client_id, leaves: list[_Leaf] = leaves) -> str:
                _safe_id(client_id, "receipt client_id")
                enrolled = self.enrollment(client_id)
                current: Any = enrolled["commitments"]
                answered: dict[str, int] = {}
                accepted = 0
                for leaf in leaves:
                    r = leaf.payload
                    where = f"log.json[{leaf.index}]"
                    for key in ("model_id", "update_kind"):
                        if r.get(key) != enrolled.get(key):
                            raise _CheckError(
                                f"{where} receipt {key}: {r.get(key)!r}, enrolled {enrolled.get(key)!r}"
                            )
                    if r.get("verdict") != "accepted":
                        continue
                    rid = str(r.get("request_id"))
                    if rid in answered:
                        raise _CheckError(
                            f"{where} verdict: request {rid} already accepted at log.json[{answered[rid]}]"
                        )
                    answered[rid] = leaf.index
                    if r.get("before_commitments") != current:
                        source = "the enrollment" if not accepted else "the previous accepted receipt"
                        raise _CheckError(f"{where} before_commitments: differ from {source}'s commitments")
                    current = r.get("after_commitments")
                    accepted += 1
                return f"{accepted} accepted update(s) chain from the enrollment"

            self.record(f"chain {client_id}", one)

    # (5) proofs ------------------------------------------------------------------------------------

    def proof(self, leaf: _Leaf) -> str:
        where = f"log.json[{leaf.index}]"
        if leaf.proofs is None or leaf.request_payload is None:
            raise _CheckError(f"{where}: proofs not checked, the receipt's inputs failed the cross-check")
        circuits = self.bundle / "circuits"
        checker = self.checker or default_proof_checker
        try:
            ok, reason = checker(
                leaf.request_payload,
                leaf.request_canonical,
                leaf.mask,
                leaf.features,
                leaf.labels,
                list(leaf.payload.get("before_commitments") or []),
                list(leaf.payload.get("after_commitments") or []),
                leaf.proofs,
                circuits,
            )
        except Exception as exc:  # a crashing checker is a failed check with a reason, never a pass
            raise _CheckError(f"{where} proofs: checker error: {type(exc).__name__}: {exc}") from None
        if ok is not True:
            raise _CheckError(f"{where} proofs: {reason or 'rejected'}")
        return f"{len(leaf.proofs)} proof(s) verify" + (f" ({reason})" if reason else "")

    def run(self) -> None:
        if not self.bundle.is_dir():
            self.report.items.append(AuditItem("bundle", False, f"{self.bundle} is not a directory"))
            return
        if self.pinned is not None:
            # A pinned key does not depend on the manifest: a broken manifest still gets a full audit.
            self.verifier = StatementVerifier.from_public_bytes(self.pinned)
            self.report.key_pinned = True
            self.report.provider_key_id = self.verifier.key_id
        if not self.record("manifest.json", self.manifest) and self.verifier is None:
            return
        self.heads()
        self.log()
        for leaf in self.leaves:
            self.record(f"log.json[{leaf.index}] cross-check", functools.partial(self.cross, leaf))
        self.chains()
        accepted = [leaf for leaf in self.leaves if leaf.payload.get("verdict") == "accepted"]
        if accepted and self.circuit_checker is not None:
            checker = self.circuit_checker
            self.record("circuits/ rebuilt from specs", lambda: checker(self.bundle / "circuits"))
        for leaf in accepted:
            self.record(f"log.json[{leaf.index}] proofs", functools.partial(self.proof, leaf))
        for name, head in self.known_heads:
            self.record(f"known head {name}", functools.partial(self.known, head))

    # (6) heads the caller holds -----------------------------------------------------------------

    def known(self, entry: Any) -> str:
        """A head held outside the bundle must be a prefix of the bundle's log.

        Accepted forms: a signed head (``{"canonical", "signature"}``, as in ``tree_heads.json`` or
        ``EdgeClient.known_head()``, checked against the provider key) or a bare ``{"size", "root"}``
        (the holder's own record, trusted as such).
        """
        assert self.verifier is not None
        obj = _obj(entry, "known head")
        if "canonical" in obj:
            try:
                head = check_tree_head(self.verifier, SignedStatement.from_dict(obj))
            except StatementError as exc:
                raise _CheckError(f"signature: {exc}") from None
            size, root, kind = head.size, head.root, "signed"
        else:
            size = _int(_get(obj, "size", "known head"), "known head size")
            root = _hex(_get(obj, "root", "known head"), "known head root", 32)
            kind = "unsigned"
        if self.latest is None or len(self.leaf_hashes) != self.latest.size:
            raise _CheckError("not checked: the bundle's own log did not verify")
        if size > self.latest.size:
            raise _CheckError(
                f"size {size} is beyond the bundle's log of {self.latest.size} leaves: the exported log is "
                "truncated or rolled back"
            )
        if any(len(h) != 32 for h in self.leaf_hashes[:size]):
            raise _CheckError("not checked: a leaf it covers is unreadable")
        if root_hash(self.leaf_hashes[:size]) != root:
            raise _CheckError(
                f"root: the bundle's first {size} leaves hash to another root (a forked or rewritten log)"
            )
        return f"{kind} head of size {size} is a prefix of the bundle's log"


#: Rebuilds the bundle's verifying keys from the published specs; returns an OK note or raises.
CircuitChecker = Callable[[Path], str]


def default_circuit_checker(circuits_dir: Path) -> str:
    """``zkunlearn.proofs.published.check_published_circuits``, imported only when it runs.

    If it is not importable the check fails, like the proof checker: never an unchecked OK.
    """
    try:
        module = importlib.import_module("zkunlearn.proofs.published")
        check: CircuitChecker = module.check_published_circuits
    except (ImportError, AttributeError) as exc:
        raise _CheckError(f"circuit rebuild unavailable: {exc}") from None
    try:
        return check(circuits_dir)
    except module.DeletionError as exc:
        raise _CheckError(str(exc)) from None


def default_proof_checker(
    request_payload: Mapping[str, Any],
    request_canonical: bytes,
    mask: bytes,
    forget_features: Forget | None,
    forget_labels: Forget | None,
    before_commitments: list[dict[str, Any]],
    after_commitments: list[dict[str, Any]],
    proofs: list[bytes],
    circuits_dir: Path,
) -> tuple[bool, str]:
    """``zkunlearn.proofs.published.verify_bundle_submission``, imported only when a proof is checked.

    If it is not importable the check fails: an auditor that could not verify must never say OK.
    """
    try:
        module = importlib.import_module("zkunlearn.proofs.published")
        verify: ProofChecker = module.verify_bundle_submission
    except (ImportError, AttributeError) as exc:
        return False, f"proof verification unavailable: {exc}"
    return verify(
        request_payload,
        request_canonical,
        mask,
        forget_features,
        forget_labels,
        before_commitments,
        after_commitments,
        proofs,
        circuits_dir,
    )


def audit_bundle(
    bundle_dir: Path,
    *,
    provider_public_key: bytes | None = None,
    proof_checker: ProofChecker | None = None,
    known_heads: Sequence[tuple[str, Any]] = (),
    circuit_checker: CircuitChecker | None = None,
) -> AuditReport:
    """Check everything in the bundle; never raises on a malformed bundle (it becomes FAIL items).

    ``provider_public_key`` pins the key the provider is known by; without it the manifest's key is
    used and the report says so, since a forger could then sign a whole fake bundle consistently.
    ``known_heads``: ``(name, parsed JSON)`` of tree heads the caller holds (see ``_Auditor.known``).
    ``circuit_checker`` rebuilds the bundle's verifying keys from the published specs before any proof
    is trusted to them; by default it runs with the default proof checker (a custom proof checker
    brings its own notion of circuits, so it runs only if given).
    """
    report = AuditReport(bundle=str(bundle_dir))
    if provider_public_key is not None and len(provider_public_key) != 32:
        report.items.append(
            AuditItem("provider key", False, f"pinned key must be 32 bytes, got {len(provider_public_key)}")
        )
        return report
    _Auditor(Path(bundle_dir), report, provider_public_key, proof_checker, known_heads, circuit_checker).run()
    return report


def report_json(report: AuditReport) -> dict[str, Any]:
    return {
        "bundle": report.bundle,
        "ok": report.ok,
        "key_pinned": report.key_pinned,
        "provider_key_id": report.provider_key_id,
        "tree_size": report.tree_size,
        "items_checked": report.items_checked,
        "failures": report.failures,
        "items": [{"item": i.item, "ok": i.ok, "reason": i.reason} for i in report.items],
    }


def render_table(report: AuditReport) -> Table:
    # Everything but the verdict words comes from the bundle, which anyone can edit: escaped, so that
    # text such as "[/x]" is shown as written instead of crashing rich's markup parser.
    verdict = "[green]OK[/green]" if report.ok else "[red]FAIL[/red]"
    pinned = "pinned" if report.key_pinned else "[yellow]NOT pinned[/yellow]"
    table = Table(
        title=f"Audit of {escape(report.bundle)}: {verdict}",
        caption=(
            f"provider key {escape(report.provider_key_id or '?')} ({pinned}); "
            f"log size {report.tree_size}; "
            f"{report.items_checked} checks, {len(report.failures)} failed"
        ),
    )
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for item in report.items:
        table.add_row(
            escape(item.item), "[green]OK[/green]" if item.ok else "[red]FAIL[/red]", escape(item.reason)
        )
    return table


def main(
    bundle: Path,
    json_output: bool = False,
    provider_key_hex: str | None = None,
    known_head_files: Sequence[Path] = (),
) -> int:
    """CLI body: print the table (or JSON) and return 0 only if every check passed (2: bad arguments)."""
    console = Console()
    known: list[tuple[str, Any]] = []
    for path in known_head_files:
        try:
            known.append((str(path), json.loads(Path(path).read_text())))
        except (OSError, ValueError) as exc:
            console.print(
                f"[red]--known-head {escape(str(path))}: not a readable JSON file: {escape(str(exc))}[/red]"
            )
            return 2
    key: bytes | None = None
    if provider_key_hex:
        try:
            key = bytes.fromhex(provider_key_hex.strip())
        except ValueError:
            console.print(
                "[red]--provider-key must be the provider's 32-byte Ed25519 public key in hex[/red]"
            )
            return 2
        if len(key) != 32:
            console.print(f"[red]--provider-key is {len(key)} bytes; an Ed25519 public key is 32[/red]")
            return 2
    report = audit_bundle(Path(bundle), provider_public_key=key, known_heads=known)
    if json_output:
        print(json.dumps(report_json(report), indent=1, sort_keys=True))
    else:
        console.print(render_table(report))
    return 0 if report.ok else 1
