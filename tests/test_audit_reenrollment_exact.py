"""An exact Group-OBS client re-enrolls between two deletions: each deletion is audited by its own enrollment.

Real parts at the tests' small exact shape: ezkl proofs, the provider's ezkl verifier, SQLite, gRPC on
loopback. The client enrolls, answers a deletion, re-enrolls from other data (so the new enrollment
proves other norms ``||G_q||_F^2``) and answers a second deletion. The honest bundle audits OK, with the
first deletion judged by the replaced enrollment and the second by the new one; each attack is tried
beside it and refused: the first deletion judged by the new enrollment's norms, a bundle that drops,
swaps or re-labels an enrollment, and a re-signed log placing the second deletion before the
re-enrollment it was proven under.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.client.sdk import EdgeClient
from zkunlearn.client.store import ClientStore
from zkunlearn.client.transport import ChannelConfig
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.client.unlearning_exact import ExactGroupObsUnlearner
from zkunlearn.proofs.audit import AuditReport, audit_bundle
from zkunlearn.proofs.audit_checks import default_circuit_checker
from zkunlearn.proofs.audit_format import CheckError
from zkunlearn.proofs.audit_rotation import is_reenrollment
from zkunlearn.proofs.deletion import UPDATE_KIND_GROUP_OBS_EXACT, DeletionCircuits
from zkunlearn.proofs.exact_deletion import bundle_enrolled_norms
from zkunlearn.proofs.statements import (
    DOMAIN_RECEIPT,
    DOMAIN_REENROLLMENT,
    DOMAIN_TREE_HEAD,
    StatementSigner,
    tree_head_payload,
)
from zkunlearn.proofs.transparency import MerkleTree, leaf_hash
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.server import ProviderConfig, build_server
from zkunlearn.provider.verification import EzklVerifier

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc]
MODEL = "tiny-exact"
LAYER = "fc1.weight"
CLIENT = "rotating"
ENROLLMENT = f"enrollments/{CLIENT}.json"
OPTIONS = ProveOptions(workers=2, memory_limit_mb=2048, progress=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 4, bias=False)  # 32 weights: one batch of two blocks, one proof each
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def _mask(row: int, column: int) -> Mask:
    dense = np.zeros((4, 8), dtype=bool)
    dense[row, column] = True
    return Mask((LayerMask.from_dense(LAYER, dense, 16),))


@dataclass
class History:
    bundle: Path
    signer: StatementSigner
    tmp: Path
    rebuilt: list[str] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.signer.public_bytes()

    def copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.bundle, self.tmp / name))

    def audit(self, bundle: Path) -> AuditReport:
        """The default audit; the circuits are rebuilt from their specs once for the module: every
        bundle here carries the honest bundle's ``circuits/``, byte for byte."""
        return audit_bundle(bundle, provider_public_key=self.key, circuit_checker=self.circuits_rebuilt)

    def circuits_rebuilt(self, circuits: Path) -> str:
        if _tree(circuits) != _tree(self.bundle / "circuits"):
            raise CheckError("circuits/: not the honest bundle's circuits")
        if not self.rebuilt:
            self.rebuilt.append(default_circuit_checker(self.bundle / "circuits"))
        return self.rebuilt[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, exact_published: DeletionCircuits) -> Iterator[History]:
    """enroll -> deletion (leaf 0) -> re-enrollment from other data (leaf 1) -> deletion (leaf 2)."""
    tmp = tmp_path_factory.mktemp("audit-reenrollment")
    config = ProviderConfig.load(
        None,
        {
            "listen": "127.0.0.1:0",
            "state": str(tmp / "provider.db"),
            "key_file": str(tmp / "provider.key"),
            "submit_wait_s": 60.0,
            "watch_poll_s": 0.2,
            "grace_s": 0.5,
        },
    )
    server = build_server(config, verifier=EzklVerifier({MODEL: exact_published.directory}))
    assert exact_published.exact is not None
    spec, deletion, enrollment = exact_published.exact
    model = Tiny()
    unlearner = ExactGroupObsUnlearner(
        model, spec, deletion.as_client(), enrollment.as_client(), tmp / "state", OPTIONS
    )
    channel = ChannelConfig(f"127.0.0.1:{server.port}", call_timeout_s=120.0, retry_attempts=5)
    client = EdgeClient(channel, ClientStore(tmp / "client.db"), unlearner)
    try:
        x, y = _data(1)
        first = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
        client.enroll(CLIENT, MODEL, [LAYER], UPDATE_KIND_GROUP_OBS_EXACT, first.commitments, first.proofs)
        server.service.create_request(CLIENT, _mask(1, 2), request_id="before-rotation")
        assert [o.status for o in client.poll()] == ["accepted"]
        x, y = _data(2)  # other data: another curvature factor, other proven norms
        second = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy, replace=True)
        client.reenroll(second.commitments, second.proofs)
        server.service.create_request(CLIENT, _mask(3, 3), request_id="after-rotation")
        assert [o.status for o in client.poll()] == ["accepted"]
        service = server.service
        bundle = export_bundle(
            server.state,
            service.ledger,
            service.signer.public_bytes(),
            tmp / "bundle",
            circuits_dir=exact_published.directory,
        )
        yield History(bundle, service.signer, tmp)
    finally:
        client.close()
        server.stop(0)


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _edit_enrollments(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / ENROLLMENT
    record = _load(path)
    change(record)
    path.write_text(json.dumps(record))


def _reasons(report: AuditReport) -> dict[str, str]:
    return {item.item: item.reason for item in report.items}


def _failed(report: AuditReport) -> dict[str, str]:
    return {f["item"]: f["reason"] for f in report.failures}


def test_an_honest_history_audits_with_each_deletion_judged_by_its_own_enrollment(history: History) -> None:
    record = _load(history.bundle / ENROLLMENT)
    (replaced,) = record["replaced"]
    assert replaced["replaced_at"] == 1
    spec, exact = DeletionCircuits.load(history.bundle / "circuits").exact_verifier()
    # The two enrollments prove other norms for the batch both deletions touch, so a deletion judged
    # by the other one would be held to other limits on its residuals.
    old_norms, new_norms = (bundle_enrolled_norms(exact, r)[(LAYER, 0)] for r in (replaced, record))
    assert [spec.thresholds(n) for n in old_norms] != [spec.thresholds(n) for n in new_norms]

    report = history.audit(history.bundle)
    assert report.ok, report.failures
    reasons = _reasons(report)
    assert reasons[f"{ENROLLMENT} replaced[0] enrollment proofs"].startswith("1 enrollment proof(s) verify")
    assert reasons[f"{ENROLLMENT} enrollment proofs"].startswith("1 enrollment proof(s) verify")
    assert reasons["log.json[0] proofs"].endswith(f"judged by {ENROLLMENT} replaced[0]")
    assert reasons["log.json[2] proofs"].endswith(f"judged by {ENROLLMENT}")
    assert "1 re-enrollment(s) (log.json[1]); 1 since the last one" in reasons[f"chain {CLIENT}"]


def test_a_bundle_relabelling_the_replaced_enrollment_with_the_new_ones_proofs_fails(
    history: History,
) -> None:
    bundle = history.copy("relabelled")
    _edit_enrollments(
        bundle,
        lambda r: r["replaced"][0].update(enrollment_proofs=r["enrollment_proofs"]),
    )
    failed = _failed(history.audit(bundle))
    assert (
        failed[f"chain {CLIENT}"]
        == f"{ENROLLMENT} replaced[0] enrollment_proofs: not the proofs the client signed"
    )
    assert "the enrollment in force at this receipt is unknown" in failed["log.json[0] proofs"]


@pytest.mark.parametrize("attack", ["dropped", "swapped"])
def test_a_bundle_that_drops_or_swaps_an_enrollment_fails(history: History, attack: str) -> None:
    def swap(record: dict[str, Any]) -> None:
        old = record["replaced"][0]
        for key in ("canonical", "signature", "commitments", "enrollment_proofs"):
            old[key], record[key] = record[key], old[key]

    bundle = history.copy(attack)
    _edit_enrollments(bundle, (lambda r: r["replaced"].clear()) if attack == "dropped" else swap)
    report = history.audit(bundle)
    failed = _failed(report)
    expected = {
        "dropped": f"{ENROLLMENT} replaced: 0 replaced enrollment(s), the log has 1 re-enrollment(s)",
        "swapped": f"{ENROLLMENT} replaced[0]: not the enrollment log.json[1] replaced",
    }
    assert failed[f"chain {CLIENT}"].startswith(expected[attack])
    # Neither deletion is judged by an enrollment the log does not put in force for it.
    for leaf in (0, 2):
        assert "the enrollment in force at this receipt is unknown" in failed[f"log.json[{leaf}] proofs"]


def _resign(bundle: Path, signer: StatementSigner, order: list[int]) -> None:
    """A provider rewriting its log with its own key: the leaves in ``order``, one fresh head."""
    log = _load(bundle / "log.json")
    tree, entries = MerkleTree(), []
    for position in order:
        canonical = bytes.fromhex(log[position]["canonical"])
        payload: Mapping[str, Any] = json.loads(canonical.split(b"\x00", 2)[2])
        domain = DOMAIN_REENROLLMENT if is_reenrollment(canonical) else DOMAIN_RECEIPT
        statement = signer.sign(domain, dict(payload))
        tree.append(leaf_hash(statement.canonical))
        entries.append(statement)
    (bundle / "log.json").write_text(
        json.dumps(
            [
                {
                    "index": i,
                    "canonical": st.canonical.hex(),
                    "signature": st.signature.hex(),
                    "inclusion_proof": [n.hex() for n in tree.inclusion_proof(i, tree.size)],
                }
                for i, st in enumerate(entries)
            ]
        )
    )
    head = signer.sign(DOMAIN_TREE_HEAD, tree_head_payload(tree.size, tree.root(), 1))
    (bundle / "tree_heads.json").write_text(json.dumps([head.to_dict()]))
    (bundle / "consistency.json").write_text("[]")


def test_a_deletion_placed_before_the_reenrollment_it_was_proven_under_fails(history: History) -> None:
    """The second deletion's receipt (proven on the new enrollment) moved before the re-enrollment, the
    bundle's enrollments moved to match: it is judged by the enrollment then in force, and refused."""
    control = history.copy("resigned")
    _resign(control, history.signer, [0, 1, 2])
    assert history.audit(control).ok  # the helper alone breaks nothing

    bundle = history.copy("backdated")
    _resign(bundle, history.signer, [0, 2, 1])
    _edit_enrollments(bundle, lambda r: r["replaced"][0].update(replaced_at=2))
    report = history.audit(bundle)
    assert _failed(report) == {
        f"chain {CLIENT}": "log.json[1] before_commitments: differ from the previous accepted receipt's "
        "commitments"
    }
    # Its proofs are judged by the enrollment the log puts in force there, not the one they name.
    assert _reasons(report)["log.json[1] proofs"].endswith(f"judged by {ENROLLMENT} replaced[0]")
