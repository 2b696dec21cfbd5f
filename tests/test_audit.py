"""The offline auditor against a real provider's export: a clean bundle passes, every tampering fails.

The provider runs the real service on SQLite with the fake (hash-transcript) verifier, so receipts,
heads and proofs are what a deployment would export. Each attack edits one thing in a fresh copy and
asserts the audit names the item that caught it. The "malicious provider" attacks re-sign receipts and
heads with the provider's own key, so signatures and Merkle proofs all hold and only the cross-checks
and the commitment chain can catch the lie.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zkunlearn.proofs.audit import AuditReport, Forget, audit_bundle, main, render_table, report_json
from zkunlearn.proofs.statements import (
    DOMAIN_RECEIPT,
    DOMAIN_TREE_HEAD,
    StatementSigner,
    canonical_json,
    tree_head_payload,
)
from zkunlearn.proofs.transparency import MerkleTree, leaf_hash
from zkunlearn.provider.export import BundleExportError, export_bundle, export_from_config
from zkunlearn.provider.server import ProviderConfig
from zkunlearn.provider.service import ProviderService, ServiceConfig, TensorData
from zkunlearn.provider.state import VERDICT_ACCEPTED, VERDICT_REJECTED, SqlState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fakes import ALL_KINDS, BLOCKS, FakeVerifier, _transcript, after_for
from tests.test_service import Device, mask


def fake_checker(
    payload: Mapping[str, Any],
    canonical: bytes,
    mask_bytes: bytes,
    features: Forget | None,
    labels: Forget | None,
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    proofs: list[bytes],
    circuits_dir: Path,
) -> tuple[bool, str]:
    """The fake verifier's rule, recomputed from what the bundle says: any changed byte fails it."""
    if after != after_for(before, str(payload["request_id"])):
        return False, "after-commitments do not follow from the before-commitments"
    if len(proofs) != BLOCKS:
        return False, f"expected {BLOCKS} proofs, got {len(proofs)}"
    for i, proof in enumerate(proofs):
        if proof != _transcript(canonical, mask_bytes, before, after, i):
            return False, f"proof for block {i} does not verify"
    if payload.get("forget") is not None and (features is None or labels is None):
        return False, "forget tensors missing"
    if not (circuits_dir / "settings.json").is_file():
        return False, "no circuit settings in the bundle"
    return True, "fake transcript"


@dataclass
class Provider:
    signer: StatementSigner
    db: Path
    key_file: Path
    bundle: Path
    accepted: dict[str, str]  # request id -> accepted submission id
    rejected: str  # a rejected submission's id


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Provider:
    base = tmp_path_factory.mktemp("provider")
    signer = StatementSigner.generate()
    key_file = base / "provider.key"
    signer.save(key_file)
    state = SqlState.sqlite(base / "p.db")
    service = ProviderService(
        state,
        signer,
        FakeVerifier(),
        ServiceConfig(update_kinds=ALL_KINDS, model_ids=("m1",), max_proof_bytes=4096),
    )
    try:
        alice, bob = Device(service, "alice"), Device(service, "bob", kind=2)
        alice.enroll()
        bob.enroll()
        accepted: dict[str, str] = {}
        r1 = service.create_request("alice", mask(), request_id="alice-1")
        done = alice.submit(r1.request_id)
        assert done.verdict == VERDICT_ACCEPTED
        accepted[r1.request_id] = done.submission_id
        service.tree_head()  # size 1
        r2 = service.create_request("alice", mask(), request_id="alice-2")
        bad = alice.submit(r2.request_id, tamper=True)
        assert bad.verdict == VERDICT_REJECTED
        service.tree_head()  # size 2
        good = alice.submit(r2.request_id)
        assert good.verdict == VERDICT_ACCEPTED
        accepted[r2.request_id] = good.submission_id
        x = np.arange(6, dtype=np.float64).reshape(2, 3)
        y = np.array([[1.0], [0.0]])
        rb = service.create_request(
            "bob",
            mask(),
            request_id="bob-1",
            forget_features=TensorData((2, 3), x.tobytes()),
            forget_labels=TensorData((2, 1), y.tobytes()),
        )
        done = bob.submit(rb.request_id)
        assert done.verdict == VERDICT_ACCEPTED
        accepted[rb.request_id] = done.submission_id
        service.tree_head()  # size 4
        r3 = service.create_request("alice", mask(), request_id="alice-3")
        done = alice.submit(r3.request_id)
        assert done.verdict == VERDICT_ACCEPTED
        accepted[r3.request_id] = done.submission_id
        circuits = base / "circuits-src"
        circuits.mkdir()
        (circuits / "settings.json").write_text('{"run_args": {}}')
        (circuits / "c1").mkdir()
        (circuits / "c1" / "vk.key").write_bytes(b"vk")
        (circuits / "c1" / "pk.key").write_bytes(b"proving key: large, never exported")
        bundle = export_bundle(
            state,
            service.ledger,
            signer.public_bytes(),
            base / "bundle",
            circuits_dir=circuits,
            srs_sha256="ab" * 32,
            srs_insecure=True,
        )
    finally:
        service.close()
        state.close()
    return Provider(signer, base / "p.db", key_file, bundle, accepted, bad.submission_id)


@pytest.fixture
def copy(provider: Provider, tmp_path: Path) -> Path:
    return Path(shutil.copytree(provider.bundle, tmp_path / "bundle"))


def audit(bundle: Path, provider: Provider, checker: Any = fake_checker) -> AuditReport:
    return audit_bundle(bundle, provider_public_key=provider.signer.public_bytes(), proof_checker=checker)


def failed_items(report: AuditReport) -> list[str]:
    return [f["item"] for f in report.failures]


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def dump(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


def leaf_payloads(bundle: Path) -> list[dict[str, Any]]:
    return [json.loads(bytes.fromhex(e["canonical"]).split(b"\x00", 2)[2]) for e in load(bundle / "log.json")]


def leaf_of(bundle: Path, request_id: str, verdict: str = "accepted") -> int:
    for i, p in enumerate(leaf_payloads(bundle)):
        if p["request_id"] == request_id and p["verdict"] == verdict:
            return i
    raise AssertionError(f"no {verdict} leaf for {request_id}")


def resign_log(
    bundle: Path, signer: StatementSigner, edit: Callable[[list[dict[str, Any]]], None] = lambda _p: None
) -> None:
    """A provider rewriting history with its own key: re-sign receipts and a single fresh head."""
    payloads = leaf_payloads(bundle)
    edit(payloads)
    tree = MerkleTree()
    statements = [signer.sign(DOMAIN_RECEIPT, p) for p in payloads]
    for st in statements:
        tree.append(leaf_hash(st.canonical))
    dump(
        bundle / "log.json",
        [
            {
                "index": i,
                "canonical": st.canonical.hex(),
                "signature": st.signature.hex(),
                "inclusion_proof": [n.hex() for n in tree.inclusion_proof(i, tree.size)],
            }
            for i, st in enumerate(statements)
        ],
    )
    head = signer.sign(DOMAIN_TREE_HEAD, tree_head_payload(tree.size, tree.root(), 1))
    dump(bundle / "tree_heads.json", [head.to_dict()])
    dump(bundle / "consistency.json", [])


# --------------------------------------------------------------------------------------------------


def test_clean_export_audits_ok_with_every_check_counted(provider: Provider) -> None:
    report = audit(provider.bundle, provider)
    assert report.ok, report.failures
    items = [i.item for i in report.items]
    assert len([i for i in items if i.startswith("tree_heads.json[")]) == 4  # sizes 1, 2, 4, 5
    assert len([i for i in items if i.startswith("consistency.json[")]) == 3
    assert len([i for i in items if i.endswith("cross-check")]) == 5
    assert len([i for i in items if i.endswith("proofs")]) == 4  # accepted only
    assert {"chain alice", "chain bob", "log root"} <= set(items)
    assert report.key_pinned
    assert report.tree_size == 5
    assert (provider.bundle / "circuits" / "settings.json").exists()
    assert (provider.bundle / "circuits" / "c1" / "vk.key").read_bytes() == b"vk"
    assert not (provider.bundle / "circuits" / "c1" / "pk.key").exists()
    body = report_json(report)
    assert body["ok"] is True
    assert body["items_checked"] == report.items_checked
    assert body["failures"] == []


def test_unpinned_audit_says_so_and_pinning_another_key_fails(provider: Provider) -> None:
    unpinned = audit_bundle(provider.bundle, proof_checker=fake_checker)
    assert unpinned.ok
    assert not unpinned.key_pinned
    assert "NOT pinned" in unpinned.items[0].reason
    other = audit_bundle(
        provider.bundle,
        provider_public_key=StatementSigner.generate().public_bytes(),
        proof_checker=fake_checker,
    )
    assert not other.ok
    assert "manifest.json" in failed_items(other)
    assert "tree_heads.json[0]" in failed_items(other)
    assert "log.json[0]" in failed_items(other)


def test_default_checker_never_passes_silently(provider: Provider) -> None:
    """Without zkunlearn.proofs.deletion (or with it, on fake proofs) accepted receipts must FAIL."""
    report = audit(provider.bundle, provider, checker=None)
    assert not report.ok
    proofs = [f for f in report.failures if f["item"].endswith("proofs")]
    assert len(proofs) == 4
    assert all(f["reason"] for f in proofs)


def test_crashing_checker_is_a_failure_with_its_reason(provider: Provider) -> None:
    def boom(*_args: Any) -> tuple[bool, str]:
        raise RuntimeError("vk missing")

    report = audit(provider.bundle, provider, checker=boom)
    assert not report.ok
    assert all("vk missing" in f["reason"] for f in report.failures)


def _flip_hex(value: str, at: int = 0) -> str:
    raw = bytearray(bytes.fromhex(value))
    raw[at] ^= 1
    return raw.hex()


def tamper_proof_byte(b: Path, p: Provider) -> str:
    sid = p.accepted["alice-2"]
    blob = bytearray((b / "submissions" / f"{sid}.bin").read_bytes())
    blob[5] ^= 0x40
    (b / "submissions" / f"{sid}.bin").write_bytes(bytes(blob))
    return f"log.json[{leaf_of(b, 'alice-2')}] cross-check"


def tamper_receipt_field(b: Path, p: Provider) -> str:
    log = load(b / "log.json")
    i = leaf_of(b, "alice-2", "rejected")
    raw = bytes.fromhex(log[i]["canonical"])
    head, body = raw.rsplit(b"\x00", 1)
    payload = json.loads(body)
    payload["verdict"] = "accepted"
    log[i]["canonical"] = (head + b"\x00" + canonical_json(payload)).hex()
    dump(b / "log.json", log)
    return f"log.json[{i}]"


def tamper_log_leaf_dropped(b: Path, p: Provider) -> str:
    log = load(b / "log.json")
    del log[1]
    for i, e in enumerate(log):
        e["index"] = i
    dump(b / "log.json", log)
    return "log root"


def tamper_log_leaves_swapped(b: Path, p: Provider) -> str:
    log = load(b / "log.json")
    log[0], log[1] = log[1], log[0]
    log[0]["index"], log[1]["index"] = 0, 1
    dump(b / "log.json", log)
    return "log.json[0]"


def tamper_inclusion_node(b: Path, p: Provider) -> str:
    log = load(b / "log.json")
    log[2]["inclusion_proof"][0] = _flip_hex(log[2]["inclusion_proof"][0])
    dump(b / "log.json", log)
    return "log.json[2]"


def tamper_head_signature(b: Path, p: Provider) -> str:
    heads = load(b / "tree_heads.json")
    heads[1]["signature"] = _flip_hex(heads[1]["signature"], 10)
    dump(b / "tree_heads.json", heads)
    return "tree_heads.json[1]"


def tamper_consistency_node(b: Path, p: Provider) -> str:
    cons = load(b / "consistency.json")
    cons[1]["proof"][-1] = _flip_hex(cons[1]["proof"][-1], 31)
    dump(b / "consistency.json", cons)
    return "consistency.json[1]"


def tamper_request_mask_byte(b: Path, p: Provider) -> str:
    req = load(b / "requests" / "alice-3.json")
    req["mask"] = _flip_hex(req["mask"], len(req["mask"]) // 2 - 1)
    dump(b / "requests" / "alice-3.json", req)
    return f"log.json[{leaf_of(b, 'alice-3')}] cross-check"


def tamper_forget_features(b: Path, p: Provider) -> str:
    req = load(b / "requests" / "bob-1.json")
    req["forget_features"]["float64_le"] = _flip_hex(req["forget_features"]["float64_le"], 3)
    dump(b / "requests" / "bob-1.json", req)
    return f"log.json[{leaf_of(b, 'bob-1')}] cross-check"


def tamper_enrollment_commitment(b: Path, p: Provider) -> str:
    enr = load(b / "enrollments" / "alice.json")
    enr["commitments"][0]["point_hex"] = "ee" * 32
    dump(b / "enrollments" / "alice.json", enr)
    return "chain alice"


def tamper_submission_after(b: Path, p: Provider) -> str:
    path = b / "submissions" / f"{p.accepted['bob-1']}.json"
    sub = load(path)
    sub["after_commitments"][1]["point_hex"] = "00" * 32
    dump(path, sub)
    return f"log.json[{leaf_of(b, 'bob-1')}] cross-check"


def tamper_bad_hex(b: Path, p: Provider) -> str:
    req = load(b / "requests" / "alice-1.json")
    req["signature"] = "zz" + req["signature"][2:]
    dump(b / "requests" / "alice-1.json", req)
    return f"log.json[{leaf_of(b, 'alice-1')}] cross-check"


def tamper_bad_json(b: Path, p: Provider) -> str:
    (b / "consistency.json").write_text("[{")
    return "consistency.json"


def _delete(rel: Callable[[Provider], str], item: Callable[[Path, Provider], str]) -> Any:
    def run(b: Path, p: Provider) -> str:
        (b / rel(p)).unlink()
        return item(b, p)

    return run


TAMPERS: dict[str, Callable[[Path, Provider], str]] = {
    "proof byte": tamper_proof_byte,
    "receipt field": tamper_receipt_field,
    "log leaf dropped": tamper_log_leaf_dropped,
    "log leaves swapped": tamper_log_leaves_swapped,
    "inclusion node": tamper_inclusion_node,
    "tree head signature": tamper_head_signature,
    "consistency node": tamper_consistency_node,
    "request mask byte": tamper_request_mask_byte,
    "forget features": tamper_forget_features,
    "enrollment commitment": tamper_enrollment_commitment,
    "submission after_commitments": tamper_submission_after,
    "bad hex": tamper_bad_hex,
    "bad json": tamper_bad_json,
    "deleted request": _delete(
        lambda p: "requests/alice-1.json", lambda b, p: f"log.json[{leaf_of(b, 'alice-1')}] cross-check"
    ),
    "deleted proof": _delete(
        lambda p: f"submissions/{p.accepted['alice-3']}.bin",
        lambda b, p: f"log.json[{leaf_of(b, 'alice-3')}] cross-check",
    ),
    "deleted enrollment": _delete(lambda p: "enrollments/bob.json", lambda b, p: "chain bob"),
    "deleted log": _delete(lambda p: "log.json", lambda b, p: "log.json"),
    "deleted manifest": _delete(lambda p: "manifest.json", lambda b, p: "manifest.json"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampering_fails_and_names_the_item(name: str, provider: Provider, copy: Path) -> None:
    item = TAMPERS[name](copy, provider)
    report = audit(copy, provider)
    assert not report.ok
    assert item in failed_items(report), report.failures
    assert all(f["reason"] for f in report.failures)


def test_resigning_unchanged_log_still_audits_ok(provider: Provider, copy: Path) -> None:
    """The attack helper alone breaks nothing, so the attacks below fail for their own reason."""
    resign_log(copy, provider.signer)
    report = audit(copy, provider)
    assert report.ok, report.failures


def _swap_submission(payloads: list[dict[str, Any]], bundle: Path, provider: Provider) -> None:
    """Receipt for alice-1 now points at alice-3's (valid, provider-verified) submission."""
    i, j = leaf_of(bundle, "alice-1"), leaf_of(bundle, "alice-3")
    for key in ("submission_id", "proof_sha256"):
        payloads[i][key] = payloads[j][key]


def _other_request_hash(payloads: list[dict[str, Any]], bundle: Path, provider: Provider) -> None:
    i = leaf_of(bundle, "alice-1")
    other = bytes.fromhex(load(bundle / "requests" / "alice-2.json")["canonical"])
    payloads[i]["request_sha256"] = hashlib.sha256(other).hexdigest()


def _receipt_for_other_request(payloads: list[dict[str, Any]], bundle: Path, provider: Provider) -> None:
    """alice-1's receipt, wholesale, relabelled as answering alice-2 (a valid proof of something else)."""
    i, j = leaf_of(bundle, "alice-1"), leaf_of(bundle, "alice-2")
    payloads[j] = {**payloads[i], "request_id": "alice-2"}


def _other_mask(payloads: list[dict[str, Any]], bundle: Path, provider: Provider) -> None:
    payloads[leaf_of(bundle, "bob-1")]["mask_sha256"] = "00" * 32


def _fork_chain(payloads: list[dict[str, Any]], bundle: Path, provider: Provider) -> None:
    """alice-3 claims to start from the enrollment again, as if alice-2's update never happened."""
    i, first = leaf_of(bundle, "alice-3"), leaf_of(bundle, "alice-1")
    payloads[i]["before_commitments"] = payloads[first]["before_commitments"]


def _forged_proof(payloads: list[dict[str, Any]], bundle: Path, provider: Provider) -> None:
    """Every digest made consistent with altered proof bytes: only the proof check is left to fail."""
    i = leaf_of(bundle, "alice-3")
    sid = payloads[i]["submission_id"]
    blob = bytearray((bundle / "submissions" / f"{sid}.bin").read_bytes())
    blob[-1] ^= 1
    (bundle / "submissions" / f"{sid}.bin").write_bytes(bytes(blob))
    digest = hashlib.sha256(bytes(blob)).hexdigest()
    sub = load(bundle / "submissions" / f"{sid}.json")
    sub["proof_sha256"] = digest
    dump(bundle / "submissions" / f"{sid}.json", sub)
    payloads[i]["proof_sha256"] = digest


def _other_model(payloads: list[dict[str, Any]], bundle: Path, provider: Provider) -> None:
    payloads[leaf_of(bundle, "bob-1")]["model_id"] = "m2"


SWAPS = {
    "receipt for another model": (_other_model, "", "chain bob"),
    "submission of another request": (_swap_submission, "alice-1", "cross-check"),
    "request hash of another request": (_other_request_hash, "alice-1", "cross-check"),
    "receipt for another request": (_receipt_for_other_request, "alice-2", "cross-check"),
    "other mask digest": (_other_mask, "bob-1", "cross-check"),
    "forked commitment chain": (_fork_chain, "", "chain alice"),
    "forged proof bytes": (_forged_proof, "alice-3", "proofs"),
}


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_validly_signed_lies_are_caught_by_cross_checks(name: str, provider: Provider, copy: Path) -> None:
    edit, request_id, suffix = SWAPS[name]
    item = f"log.json[{leaf_of(copy, request_id)}] {suffix}" if request_id else suffix
    resign_log(copy, provider.signer, lambda payloads: edit(payloads, copy, provider))
    report = audit(copy, provider)
    assert not report.ok
    assert item in failed_items(report), report.failures
    # Signatures and Merkle proofs all hold: only the semantic checks caught it.
    assert not [f for f in failed_items(report) if f.startswith(("tree_heads", "consistency", "log root"))]


def test_forger_with_own_key_passes_only_when_the_key_is_not_pinned(provider: Provider, copy: Path) -> None:
    forger = StatementSigner.generate()
    payloads_key = forger.key_id

    def rekey(payloads: list[dict[str, Any]]) -> None:
        for p in payloads:
            p["key_id"] = payloads_key

    resign_log(copy, forger, rekey)
    for rel in sorted((copy / "requests").iterdir()):
        req = load(rel)
        body = json.loads(bytes.fromhex(req["canonical"]).split(b"\x00", 2)[2])
        st = forger.sign("zkunlearn/v1/deletion-request", {**body, "key_id": forger.key_id})
        req["canonical"], req["signature"] = st.canonical.hex(), st.signature.hex()
        dump(rel, req)
    # Receipts bind the request bytes' hash: re-sign the log once more with the new request hashes.
    hashes = {
        rel.stem: hashlib.sha256(bytes.fromhex(load(rel)["canonical"])).hexdigest()
        for rel in (copy / "requests").iterdir()
    }

    def rehash(payloads: list[dict[str, Any]]) -> None:
        for p in payloads:
            p["request_sha256"] = hashes[p["request_id"]]

    resign_log(copy, forger, rehash)
    manifest = load(copy / "manifest.json")
    manifest["provider_public_key"], manifest["key_id"] = forger.public_bytes().hex(), forger.key_id
    dump(copy / "manifest.json", manifest)
    # The fake proofs bind the original request bytes, so accept them here: this test is about keys.
    forged = audit_bundle(copy, proof_checker=lambda *_a: (True, ""))
    assert forged.ok, forged.failures  # a self-consistent forgery passes when the key is not pinned
    pinned = audit(copy, provider, checker=lambda *_a: (True, ""))
    assert not pinned.ok
    assert "manifest.json" in failed_items(pinned)


def test_main_exit_codes_and_output(
    provider: Provider, copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = provider.signer.public_bytes().hex()
    # The default checkers cannot rebuild fake circuits or verify fake proofs: exit 1, JSON names them.
    assert main(provider.bundle, True, key) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["key_pinned"] is True
    assert {f["item"] for f in out["failures"]} == {
        "circuits/ rebuilt from specs",
        *(f"log.json[{leaf_of(provider.bundle, r)}] proofs" for r in provider.accepted),
    }
    assert main(provider.bundle, False, "zz") == 2
    assert main(provider.bundle, False, "ab" * 31) == 2
    (copy / "log.json").write_text("not json")
    assert main(copy, False, key) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text
    assert "Traceback" not in text
    assert main(tmp_path / "nowhere", True, None) == 1
    assert json.loads(capsys.readouterr().out)["failures"][0]["item"] == "bundle"
    render_table(audit(provider.bundle, provider))  # renders without error


def test_text_from_the_bundle_is_shown_as_written_not_parsed_as_markup(
    provider: Provider, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anyone can edit a bundle's unsigned fields; "[/x]" used to crash the table with a MarkupError."""
    manifest = load(copy / "manifest.json")
    manifest["format"] = "[/x] [red]not red[/red]"
    dump(copy / "manifest.json", manifest)
    assert main(copy, False, provider.signer.public_bytes().hex()) == 1
    text = capsys.readouterr().out
    assert "manifest.json" in text
    assert "[/x]" in text
    assert "Traceback" not in text


def test_export_refuses_a_state_that_holds_no_log(provider: Provider, tmp_path: Path) -> None:
    """A mistyped state path must not create an empty database and publish a size-0 signed head."""
    import sqlite3

    key = str(provider.key_file)
    missing = tmp_path / "typo.db"
    with pytest.raises(BundleExportError, match=r"typo\.db does not exist"):
        export_from_config(ProviderConfig(state=str(missing), key_file=key), tmp_path / "b1")
    assert not missing.exists()
    with pytest.raises(BundleExportError, match="in memory"):
        export_from_config(ProviderConfig(state="memory", key_file=key), tmp_path / "b2")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("create table t (x int)").connection.commit()
    with pytest.raises(BundleExportError, match="holds no provider log"):
        export_from_config(ProviderConfig(state=str(other), key_file=key), tmp_path / "b3")
    with pytest.raises(BundleExportError, match="holds no provider log"):
        export_from_config(ProviderConfig(state=f"sqlite+pysqlite:///{other}", key_file=key), tmp_path / "b4")
    assert not any((tmp_path / f"b{i}").exists() for i in range(1, 5))


def test_export_refuses_existing_target_and_from_config_matches(provider: Provider, tmp_path: Path) -> None:
    config = ProviderConfig(state=str(provider.db), key_file=str(provider.key_file), srs_digest="cd" * 32)
    out = export_from_config(config, tmp_path / "b2", circuits_dir=provider.bundle.parent / "circuits-src")
    report = audit(out, provider)
    assert report.ok, report.failures
    assert load(out / "manifest.json")["srs"] == {"sha256": "cd" * 32, "insecure": True}
    with pytest.raises(BundleExportError, match="already exists"):
        export_from_config(config, out)
    with pytest.raises(BundleExportError, match="does not exist"):
        export_from_config(
            ProviderConfig(state=str(provider.db), key_file=str(tmp_path / "no.key")), tmp_path / "b3"
        )
    assert not (tmp_path / "b3").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    # Without --circuits-dir, the circuits directory the config's verifier uses is exported, and the
    # bundle passes its own audit; a config naming none (or several) is refused, not exported unauditable.
    source = provider.bundle.parent / "circuits-src"
    with_circuits = ProviderConfig(
        state=str(provider.db),
        key_file=str(provider.key_file),
        artifacts={"m1": {"circuits_dir": str(source)}},
    )
    out4 = export_from_config(with_circuits, tmp_path / "b4")
    assert audit(out4, provider).ok
    files_only = ProviderConfig(
        state=str(provider.db),
        key_file=str(provider.key_file),
        artifacts={"m1/group_obs_exact": {"settings": str(source / "settings.json")}},
    )
    with pytest.raises(BundleExportError, match=r"for 0 models \(none\); pass --circuits-dir"):
        export_from_config(files_only, tmp_path / "b5")
    two = ProviderConfig(
        state=str(provider.db),
        key_file=str(provider.key_file),
        artifacts={"m1": {"circuits_dir": str(source)}, "m2": {"circuits_dir": str(source)}},
    )
    with pytest.raises(BundleExportError, match=r"for 2 models \(m1, m2\)"):
        export_from_config(two, tmp_path / "b6")
    assert not (tmp_path / "b5").exists()
    assert not (tmp_path / "b6").exists()


def test_pinned_key_audits_everything_even_without_a_manifest(provider: Provider, copy: Path) -> None:
    (copy / "manifest.json").unlink()
    report = audit(copy, provider)
    assert failed_items(report) == ["manifest.json"]
    assert report.items_checked > 20


def test_a_broken_old_head_does_not_hide_the_rest(provider: Provider, copy: Path) -> None:
    heads = load(copy / "tree_heads.json")
    heads[1]["signature"] = _flip_hex(heads[1]["signature"], 3)
    dump(copy / "tree_heads.json", heads)
    report = audit(copy, provider)
    # The head and the two consistency proofs that link it fail; the log under the latest head holds.
    assert failed_items(report) == ["tree_heads.json[1]", "consistency.json[0]", "consistency.json[1]"]


def test_empty_log_exports_and_audits(tmp_path: Path) -> None:
    signer = StatementSigner.generate()
    state = SqlState.sqlite(tmp_path / "empty.db")
    service = ProviderService(state, signer, FakeVerifier(), ServiceConfig(update_kinds=ALL_KINDS))
    try:
        out = export_bundle(state, service.ledger, signer.public_bytes(), tmp_path / "b")
    finally:
        service.close()
        state.close()
    report = audit_bundle(out, provider_public_key=signer.public_bytes(), proof_checker=fake_checker)
    assert report.ok, report.failures
    assert report.tree_size == 0


def test_cli_export_writes_a_bundle_that_audits_and_refuses_a_missing_key(
    provider: Provider, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from zkunlearn.cli import app

    cfg = tmp_path / "provider.toml"
    cfg.write_text(f'state = "{provider.db}"\nkey_file = "{provider.key_file}"\nsrs_digest = "{"cd" * 32}"\n')
    circuits = provider.bundle.parent / "circuits-src"
    args = ["provider", "export", "--config", str(cfg), "--circuits-dir", str(circuits)]
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert done.exit_code == 0, done.output
    assert audit(tmp_path / "b", provider).ok
    cfg.write_text(f'state = "{provider.db}"\nkey_file = "{tmp_path / "missing.key"}"\n')
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c")])
    assert refused.exit_code == 2
    assert "does not exist" in refused.output
    assert "Traceback" not in refused.output
    assert not (tmp_path / "c").exists()


def test_a_held_head_reveals_a_truncated_or_forked_export(
    provider: Provider, copy: Path, tmp_path: Path
) -> None:
    """Attack: export a re-signed prefix of the log. Self-consistent: only a head held outside catches it."""
    held = load(provider.bundle / "tree_heads.json")[-1]  # what a client kept after checking its receipt
    size = len(load(provider.bundle / "log.json"))
    unsigned = {"size": size, "root": check_root(held)}
    honest = audit_bundle(
        provider.bundle,
        provider_public_key=provider.signer.public_bytes(),
        proof_checker=fake_checker,
        known_heads=[("held", held), ("sdk", unsigned)],
    )
    assert honest.ok, honest.failures
    assert [i.reason for i in honest.items if i.item.startswith("known head")] == [
        f"signed head of size {size} is a prefix of the bundle's log",
        f"unsigned head of size {size} is a prefix of the bundle's log",
    ]
    resign_log(copy, provider.signer, lambda payloads: payloads.pop())
    assert audit(copy, provider).ok  # the truncated log is self-consistent
    cut = audit_bundle(
        copy,
        provider_public_key=provider.signer.public_bytes(),
        proof_checker=fake_checker,
        known_heads=[("held", held)],
    )
    assert failed_items(cut) == ["known head held"]
    assert "truncated or rolled back" in cut.failures[0]["reason"]
    # Same size, other history: a fork.
    fork = Path(shutil.copytree(provider.bundle, tmp_path / "fork"))
    resign_log(fork, provider.signer, lambda payloads: payloads[0].update(reason="rewritten"))
    forked = audit_bundle(
        fork, provider_public_key=provider.signer.public_bytes(), known_heads=[("sdk", unsigned)]
    )
    assert "known head sdk" in failed_items(forked)
    assert "forked or rewritten" in next(
        f["reason"] for f in forked.failures if f["item"] == "known head sdk"
    )
    # A head signed by another key proves nothing.
    other = StatementSigner.generate().sign(
        DOMAIN_TREE_HEAD, tree_head_payload(size, bytes.fromhex(check_root(held)), 1)
    )
    stranger = audit_bundle(
        provider.bundle,
        provider_public_key=provider.signer.public_bytes(),
        proof_checker=fake_checker,
        known_heads=[("stranger", other.to_dict())],
    )
    assert failed_items(stranger) == ["known head stranger"]


def test_known_head_cli_option(provider: Provider, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from zkunlearn.cli import app

    held = tmp_path / "head.json"
    dump(held, {"size": len(load(provider.bundle / "log.json")) + 1, "root": "ab" * 32})
    args = ["audit", "verify", str(provider.bundle), "--json", "--known-head", str(held)]
    report = json.loads(CliRunner().invoke(app, args).stdout)
    assert "truncated" in next(f["reason"] for f in report["failures"] if f["item"] == f"known head {held}")
    held.write_text("{not json")
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert "not a readable JSON file" in " ".join(refused.output.split())


def check_root(head: dict[str, Any]) -> str:
    return str(json.loads(bytes.fromhex(head["canonical"]).split(b"\x00", 2)[2])["root_hash"])
