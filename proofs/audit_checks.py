"""The auditor's checks over one bundle, in order: provider key and tree heads, log leaves, cross-checks
of each receipt against its request and submission, per-client commitment chains, proofs, and the tree
heads the caller holds; plus the default circuit and proof checkers."""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zkunlearn.circuits.mask import Mask, MaskError
from zkunlearn.proofs.audit_enrollments import (
    ClientLeaf,
    EnrollmentVersion,
    chain,
    enrollment_versions,
    in_force,
)
from zkunlearn.proofs.audit_format import (
    BUNDLE_FORMAT,
    VERDICTS,
    CheckError,
    CircuitChecker,
    Forget,
    ProofChecker,
    forget_array,
    forget_tensor,
    hex_bytes,
    json_list,
    json_object,
    load_json,
    non_negative_int,
    required_field,
    safe_id,
    verified_payload,
)
from zkunlearn.proofs.audit_report import AuditItem, AuditReport
from zkunlearn.proofs.audit_rotation import is_reenrollment
from zkunlearn.proofs.statements import (
    DOMAIN_DELETION_REQUEST,
    DOMAIN_RECEIPT,
    DOMAIN_REENROLLMENT,
    SignedStatement,
    StatementError,
    StatementVerifier,
    TreeHead,
    check_tree_head,
    key_id_for,
)
from zkunlearn.proofs.transparency import (
    MerkleProofError,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

if TYPE_CHECKING:
    from zkunlearn.proofs.backend import ProvingBackend


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


class Auditor:
    """Every check over one bundle, recorded as items of ``report`` by :meth:`run`."""

    def __init__(
        self,
        bundle: Path,
        report: AuditReport,
        pinned: bytes | None,
        checker: ProofChecker | None,
        known_heads: Sequence[tuple[str, Any]] = (),
        circuit_checker: CircuitChecker | None = None,
        backend: ProvingBackend | None = None,
    ) -> None:
        self.known_heads = known_heads
        # The default proof checker trusts the bundle's vk: it comes with the rebuild that justifies it,
        # and the exact kinds' enrollment proofs it judges deletions by are re-verified too.
        self.circuit_checker = circuit_checker or (default_circuit_checker if checker is None else None)
        self.enrollment_checker = default_enrollment_checker if checker is None else None
        self.backend = backend
        self.bundle = bundle
        self.report = report
        self.pinned = pinned
        self.checker = checker
        self.verifier: StatementVerifier | None = None
        self.latest: TreeHead | None = None
        self.leaves: list[_Leaf] = []  # receipts
        self.rotations: list[_Leaf] = []  # re-enrollments
        self.versions: dict[str, list[EnrollmentVersion]] = {}  # per client, oldest first
        self.in_force: dict[int, EnrollmentVersion] = {}  # per receipt's leaf index, by the log's order
        self.leaf_hashes: list[bytes] = []

    def record(self, item: str, check: Callable[[], str]) -> bool:
        """Run one check; ``check`` returns an OK note or raises. Unexpected errors are FAILs too."""
        try:
            note = check()
        except CheckError as exc:
            self.report.items.append(AuditItem(item, False, str(exc)))
            return False
        except (StatementError, MerkleProofError, MaskError, ValueError, TypeError, KeyError) as exc:
            self.report.items.append(AuditItem(item, False, f"{type(exc).__name__}: {exc}"))
            return False
        self.report.items.append(AuditItem(item, True, note))
        return True

    # (1) key, heads, consistency -------------------------------------------------------------------

    def manifest(self) -> str:
        manifest = json_object(load_json(self.bundle, "manifest.json"), "manifest.json")
        if manifest.get("format") != BUNDLE_FORMAT:
            raise CheckError(f"manifest.json format: {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        key = hex_bytes(
            required_field(manifest, "provider_public_key", "manifest.json"),
            "manifest.json provider_public_key",
            32,
        )
        if manifest.get("key_id") != key_id_for(key):
            raise CheckError("manifest.json key_id: does not match provider_public_key")
        srs = json_object(required_field(manifest, "srs", "manifest.json"), "manifest.json srs")
        note = f"srs sha256 {str(srs.get('sha256'))[:16] or '(none)'}"
        if srs.get("insecure", True):
            note += " (INSECURE dev SRS)"
        if self.pinned is not None:
            assert self.verifier is not None  # set from the pinned key before the manifest is read
            if key != self.pinned:
                raise CheckError(
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
            raw = json_list(load_json(self.bundle, "tree_heads.json"), "tree_heads.json")
            if not raw:
                raise CheckError("tree_heads.json: no tree head (at least the latest is required)")
        except CheckError as exc:
            self.report.items.append(AuditItem("tree_heads.json", False, str(exc)))
            return
        for i, entry in enumerate(raw):

            def one(i: int = i, entry: Any = entry) -> str:
                where = f"tree_heads.json[{i}]"
                try:
                    statement = SignedStatement.from_dict(json_object(entry, where))
                except StatementError as exc:
                    raise CheckError(f"{where}: {exc}") from None
                try:
                    head = check_tree_head(verifier, statement)
                except StatementError as exc:
                    raise CheckError(f"{where} signature: {exc}") from None
                if heads and head.size <= heads[-1].size:
                    heads.append(head)
                    raise CheckError(
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
            raw = json_list(load_json(self.bundle, "consistency.json"), "consistency.json")
            if len(raw) != max(0, len(heads) - 1):
                raise CheckError(
                    f"consistency.json: {len(raw)} proofs for {len(heads)} heads (need {len(heads) - 1})"
                )
            return f"{len(raw)} proofs"

        if not self.record("consistency.json", check):
            return
        raw = load_json(self.bundle, "consistency.json")
        for i, entry in enumerate(raw):
            first, second = heads[i], heads[i + 1]

            def one(
                entry: Any = entry, first: TreeHead = first, second: TreeHead = second, i: int = i
            ) -> str:
                where = f"consistency.json[{i}]"
                obj = json_object(entry, where)
                if first.size < 0 or second.size < 0:
                    raise CheckError(f"{where}: not checked, a tree head it links failed")
                sizes = (
                    non_negative_int(required_field(obj, "first_size", where), where),
                    non_negative_int(required_field(obj, "second_size", where), where),
                )
                if sizes != (first.size, second.size):
                    raise CheckError(
                        f"{where} first_size/second_size: {sizes}, heads are {(first.size, second.size)}"
                    )
                proof = [
                    hex_bytes(n, f"{where} proof", 32)
                    for n in json_list(required_field(obj, "proof", where), f"{where} proof")
                ]
                try:
                    verify_consistency(first.size, second.size, first.root, second.root, proof)
                except MerkleProofError as exc:
                    raise CheckError(f"{where} proof: {exc}") from None
                return f"{first.size} -> {second.size}"

            self.record(f"consistency.json[{i}]", one)

    # (2) leaves ----------------------------------------------------------------------------------

    def log(self) -> None:
        assert self.verifier is not None
        verifier = self.verifier
        try:
            raw = json_list(load_json(self.bundle, "log.json"), "log.json")
        except CheckError as exc:
            self.report.items.append(AuditItem("log.json", False, str(exc)))
            return
        for i, entry in enumerate(raw):

            def one(i: int = i, entry: Any = entry) -> str:
                where = f"log.json[{i}]"
                obj = json_object(entry, where)
                index = required_field(obj, "index", where)
                if type(index) is not int or index != i:
                    raise CheckError(f"{where} index: {obj.get('index')!r}, expected {i}")
                canonical = hex_bytes(required_field(obj, "canonical", where), f"{where} canonical")
                self.leaf_hashes.append(leaf_hash(canonical))
                rotation = is_reenrollment(canonical)
                payload = verified_payload(
                    verifier,
                    obj["canonical"],
                    required_field(obj, "signature", where),
                    DOMAIN_REENROLLMENT if rotation else DOMAIN_RECEIPT,
                    where,
                )
                if rotation:
                    self.rotations.append(_Leaf(i, payload))
                elif payload.get("verdict") not in VERDICTS:
                    raise CheckError(f"{where} verdict: {payload.get('verdict')!r} is not accepted/rejected")
                else:
                    self.leaves.append(_Leaf(i, payload))
                if self.latest is None:
                    raise CheckError(f"{where} inclusion_proof: not checked, no valid latest tree head")
                proof = [
                    hex_bytes(n, f"{where} inclusion_proof", 32)
                    for n in json_list(
                        required_field(obj, "inclusion_proof", where), f"{where} inclusion_proof"
                    )
                ]
                try:
                    verify_inclusion(leaf_hash(canonical), i, self.latest.size, proof, self.latest.root)
                except MerkleProofError as exc:
                    raise CheckError(f"{where} inclusion_proof: {exc}") from None
                if rotation:
                    return f"re-enrollment of client {payload.get('client_id')}: its commitments rotated"
                return f"{payload['verdict']} receipt for request {payload.get('request_id')}"

            if not self.record(f"log.json[{i}]", one) and len(self.leaf_hashes) <= i:
                self.leaf_hashes.append(b"")

        def root() -> str:
            if self.latest is None:
                raise CheckError("tree_heads.json: no valid latest head to compare the log with")
            if len(raw) != self.latest.size:
                raise CheckError(f"log.json: {len(raw)} leaves, latest tree head has size {self.latest.size}")
            if any(len(h) != 32 for h in self.leaf_hashes):
                raise CheckError("log.json: root not recomputed, a leaf is unreadable")
            if root_hash(self.leaf_hashes) != self.latest.root:
                raise CheckError(
                    "log.json: root recomputed from all leaves differs from the latest head's root_hash"
                )
            return f"root of {len(raw)} leaves matches the latest head"

        self.record("log root", root)

    # (3) cross-checks -----------------------------------------------------------------------------

    def cross(self, leaf: _Leaf) -> str:
        assert self.verifier is not None
        r = leaf.payload
        where = f"log.json[{leaf.index}]"
        request_id = safe_id(r.get("request_id"), f"{where} receipt request_id")
        safe_id(r.get("client_id"), f"{where} receipt client_id")
        submission_id = safe_id(r.get("submission_id"), f"{where} receipt submission_id")

        rel = f"requests/{request_id}.json"
        req = json_object(load_json(self.bundle, rel), rel)
        canonical = hex_bytes(required_field(req, "canonical", rel), f"{rel} canonical")
        if hashlib.sha256(canonical).hexdigest() != r.get("request_sha256"):
            raise CheckError(f"{where} receipt request_sha256: does not match sha256 of {rel} canonical")
        payload = verified_payload(
            self.verifier,
            req["canonical"],
            required_field(req, "signature", rel),
            DOMAIN_DELETION_REQUEST,
            rel,
        )
        for key in ("request_id", "client_id", "model_id", "update_kind"):
            if payload.get(key) != r.get(key):
                raise CheckError(
                    f"{rel} {key}: request says {payload.get(key)!r}, receipt says {r.get(key)!r}"
                )
        mask = hex_bytes(required_field(req, "mask", rel), f"{rel} mask")
        try:
            digest = Mask.from_bytes(mask).digest()
        except MaskError as exc:
            raise CheckError(f"{rel} mask: {exc}") from None
        if digest != payload.get("mask_sha256"):
            raise CheckError(f"{rel} mask: digest {digest[:16]} differs from the signed mask_sha256")
        if payload.get("mask_sha256") != r.get("mask_sha256"):
            raise CheckError(f"{where} receipt mask_sha256: differs from the request's mask_sha256")
        features = forget_tensor(required_field(req, "forget_features", rel), f"{rel} forget_features")
        labels = forget_tensor(required_field(req, "forget_labels", rel), f"{rel} forget_labels")
        signed_forget = payload.get("forget")
        if signed_forget is None:
            if features is not None or labels is not None:
                raise CheckError(f"{rel} forget_features: present, but the signed request has no forget data")
        else:
            for name, tensor in (("features", features), ("labels", labels)):
                expected = json_object(signed_forget, f"{rel} signed forget").get(name)
                got = (
                    None
                    if tensor is None
                    else {
                        "shape": list(tensor[0]),
                        "sha256": hashlib.sha256(tensor[1]).hexdigest(),
                    }
                )
                if got != expected:
                    raise CheckError(f"{rel} forget_{name}: shape or sha256 differs from the signed request")

        srel = f"submissions/{submission_id}.json"
        sub = json_object(load_json(self.bundle, srel), srel)
        for key in ("request_id", "client_id"):
            if sub.get(key) != r.get(key):
                raise CheckError(f"{srel} {key}: {sub.get(key)!r}, receipt says {r.get(key)!r}")
        brel = f"submissions/{submission_id}.bin"
        try:
            blob = (self.bundle / brel).read_bytes()
        except OSError as exc:
            raise CheckError(f"{brel}: cannot read: {exc}") from None
        actual = hashlib.sha256(blob).hexdigest()
        if sub.get("proof_sha256") != actual:
            raise CheckError(f"{srel} proof_sha256: differs from sha256 of {brel}")
        if r.get("proof_sha256") != actual:
            raise CheckError(f"{where} receipt proof_sha256: differs from sha256 of {brel}")
        sizes = [
            non_negative_int(s, f"{srel} proof_sizes")
            for s in json_list(required_field(sub, "proof_sizes", srel), f"{srel} proof_sizes")
        ]
        if not sizes or any(s == 0 for s in sizes) or sum(sizes) != len(blob):
            raise CheckError(f"{srel} proof_sizes: {sizes} do not split the {len(blob)} proof bytes")
        if required_field(sub, "after_commitments", srel) != r.get("after_commitments"):
            raise CheckError(f"{srel} after_commitments: differ from the receipt's after_commitments")
        proofs, offset = [], 0
        for s in sizes:
            proofs.append(blob[offset : offset + s])
            offset += s
        leaf.request_payload, leaf.request_canonical, leaf.mask = payload, canonical, mask
        leaf.features, leaf.labels, leaf.proofs = forget_array(features), forget_array(labels), proofs
        return f"request {request_id}, submission {submission_id}"

    # (4) commitment chains ------------------------------------------------------------------------

    def chains(self) -> None:
        by_client: dict[str, list[ClientLeaf]] = {}
        for leaf in sorted([*self.leaves, *self.rotations], key=lambda leaf: leaf.index):
            by_client.setdefault(str(leaf.payload.get("client_id")), []).append((leaf.index, leaf.payload))
        rotations = {leaf.index for leaf in self.rotations}
        for client_id, leaves in sorted(by_client.items()):

            def one(client_id: str = client_id, leaves: list[ClientLeaf] = leaves) -> str:
                safe_id(client_id, "receipt client_id")
                versions = enrollment_versions(self.bundle, client_id)
                self.versions[client_id] = versions
                self.in_force.update(in_force(client_id, leaves, rotations, versions))
                return chain(client_id, leaves, rotations, versions)

            self.record(f"chain {client_id}", one)

    def enrollment_proofs(self, version: EnrollmentVersion) -> str:
        assert self.enrollment_checker is not None
        try:
            return self.enrollment_checker(version.record, self.bundle / "circuits", self.backend)
        except CheckError:
            raise
        except Exception as exc:  # a crashing checker is a failed check with a reason, never a pass
            raise CheckError(f"{version.label} enrollment_proofs: checker error: {exc}") from None

    # (5) proofs ------------------------------------------------------------------------------------

    def proof(self, leaf: _Leaf) -> str:
        where = f"log.json[{leaf.index}]"
        if leaf.proofs is None or leaf.request_payload is None:
            raise CheckError(f"{where}: proofs not checked, the receipt's inputs failed the cross-check")
        arguments = (
            leaf.request_payload,
            leaf.request_canonical,
            leaf.mask,
            leaf.features,
            leaf.labels,
            list(leaf.payload.get("before_commitments") or []),
            list(leaf.payload.get("after_commitments") or []),
            leaf.proofs,
            self.bundle / "circuits",
        )
        version = self.in_force.get(leaf.index)
        try:
            if self.checker is not None:
                ok, reason = self.checker(*arguments)
            else:  # the default checker judges an exact-kind deletion by the enrollment in force
                ok, reason = default_proof_checker(
                    *arguments, None if version is None else version.record, backend=self.backend
                )
        except Exception as exc:  # a crashing checker is a failed check with a reason, never a pass
            raise CheckError(f"{where} proofs: checker error: {type(exc).__name__}: {exc}") from None
        if ok is not True:
            raise CheckError(f"{where} proofs: {reason or 'rejected'}")
        note = f"{len(leaf.proofs)} proof(s) verify" + (f" ({reason})" if reason else "")
        client_versions = self.versions.get(str(leaf.payload.get("client_id")), [])
        if self.checker is None and version is not None and len(client_versions) > 1:
            note += f"; judged by {version.label}"
        return note

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
        proven = [v for _, versions in sorted(self.versions.items()) for v in versions if v.proven]
        if self.enrollment_checker is None:
            proven = []
        if (accepted or proven) and self.circuit_checker is not None:
            checker = self.circuit_checker
            self.record("circuits/ rebuilt from specs", lambda: checker(self.bundle / "circuits"))
        for version in proven:  # every exact-kind enrollment the client held, whether or not it judged one
            self.record(
                f"{version.label} enrollment proofs", functools.partial(self.enrollment_proofs, version)
            )
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
        obj = json_object(entry, "known head")
        if "canonical" in obj:
            try:
                head = check_tree_head(self.verifier, SignedStatement.from_dict(obj))
            except StatementError as exc:
                raise CheckError(f"signature: {exc}") from None
            size, root, kind = head.size, head.root, "signed"
        else:
            size = non_negative_int(required_field(obj, "size", "known head"), "known head size")
            root = hex_bytes(required_field(obj, "root", "known head"), "known head root", 32)
            kind = "unsigned"
        if self.latest is None or len(self.leaf_hashes) != self.latest.size:
            raise CheckError("not checked: the bundle's own log did not verify")
        if size > self.latest.size:
            raise CheckError(
                f"size {size} is beyond the bundle's log of {self.latest.size} leaves: the exported log is "
                "truncated or rolled back"
            )
        if any(len(h) != 32 for h in self.leaf_hashes[:size]):
            raise CheckError("not checked: a leaf it covers is unreadable")
        if root_hash(self.leaf_hashes[:size]) != root:
            raise CheckError(
                f"root: the bundle's first {size} leaves hash to another root (a forked or rewritten log)"
            )
        return f"{kind} head of size {size} is a prefix of the bundle's log"


def default_circuit_checker(circuits_dir: Path) -> str:
    """``zkunlearn.proofs.published.check_published_circuits``, imported only when it runs.

    If it is not importable the check fails, like the proof checker: never an unchecked OK.
    """
    try:
        module = importlib.import_module("zkunlearn.proofs.published")
        check: CircuitChecker = module.check_published_circuits
    except (ImportError, AttributeError) as exc:
        raise CheckError(f"circuit rebuild unavailable: {exc}") from None
    try:
        return check(circuits_dir)
    except module.DeletionError as exc:
        raise CheckError(str(exc)) from None


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
    enrollment: Mapping[str, Any] | None = None,
    *,
    backend: ProvingBackend | None = None,
) -> tuple[bool, str]:
    """``zkunlearn.proofs.published.verify_bundle_submission``, imported only when a proof is checked;
    ``enrollment`` is the exported enrollment in force at the receipt (the exact kinds are judged by it).

    If it is not importable the check fails: an auditor that could not verify must never say OK.
    """
    try:
        module = importlib.import_module("zkunlearn.proofs.published")
        verify = module.verify_bundle_submission
    except (ImportError, AttributeError) as exc:
        return False, f"proof verification unavailable: {exc}"
    verdict: tuple[bool, str] = verify(
        request_payload,
        request_canonical,
        mask,
        forget_features,
        forget_labels,
        before_commitments,
        after_commitments,
        proofs,
        circuits_dir,
        enrollment,
        backend=backend,
    )
    return verdict


def default_enrollment_checker(
    record: Mapping[str, Any], circuits_dir: Path, backend: ProvingBackend | None = None
) -> str:
    """``zkunlearn.proofs.published.check_bundle_enrollment``: one exported enrollment's proofs verify
    with the bundle's circuits. Not importable, or refused: a failed check."""
    try:
        module = importlib.import_module("zkunlearn.proofs.published")
        check = module.check_bundle_enrollment
    except (ImportError, AttributeError) as exc:
        raise CheckError(f"enrollment proof verification unavailable: {exc}") from None
    try:
        note: str = check(record, circuits_dir, backend=backend)
    except module.DeletionError as exc:
        raise CheckError(str(exc)) from None
    return note
