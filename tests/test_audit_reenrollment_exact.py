"""An exact Group-OBS client re-enrolls between two deletions: each deletion is audited by its own enrollment.

Real parts at the tests' small exact shape: ezkl proofs, the provider's ezkl verifier, SQLite, gRPC on
loopback. The client enrolls, answers a deletion, re-enrolls from other data (so the new enrollment
proves other norms ``||G_q||_F^2``) and answers a second deletion. The honest bundle audits OK, with the
first deletion judged by the replaced enrollment and the second by the new one; each attack is tried
beside it and refused: a bundle that drops, swaps or re-labels an enrollment, and a re-signed log
placing the second deletion before the re-enrollment it was proven under. A colluding provider's log
shows why the enrollment matters: a deletion its enrollment does not admit, accepted, then a
re-enrollment whose norms would admit it; judged by the enrollment in force at the end of the log it
would pass, and the audit fails it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.client.committed_state import load_state
from zkunlearn.client.group_obs_exact import ExactUpdate
from zkunlearn.client.sdk import EdgeClient
from zkunlearn.client.store import ClientStore
from zkunlearn.client.transport import ChannelConfig
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.client.unlearning_exact import ExactEnrollment, ExactGroupObsUnlearner
from zkunlearn.proofs.audit import AuditReport, audit_bundle
from zkunlearn.proofs.audit_checks import default_circuit_checker, default_proof_checker
from zkunlearn.proofs.audit_rotation import is_reenrollment
from zkunlearn.proofs.deletion import UPDATE_KIND_GROUP_OBS_EXACT, DeletionCircuits
from zkunlearn.proofs.exact import IntArray, exact_outputs, g_fro_sq, quantise_exact
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
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.provider.service import VerificationJob, VerificationResult
from zkunlearn.provider.verification import EzklVerifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fakes import loopback_settings

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


_REBUILT: dict[str, str] = {}


def _circuits_rebuilt(circuits: Path) -> str:
    """The default circuit check, run once per distinct ``circuits/`` content (it is deterministic):
    every bundle here carries the published circuits, byte for byte."""
    digest = hashlib.sha256()
    for path in sorted(p for p in circuits.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(circuits)).encode() + b"\x00" + path.read_bytes())
    key = digest.hexdigest()
    if key not in _REBUILT:
        _REBUILT[key] = default_circuit_checker(circuits)
    return _REBUILT[key]


@dataclass
class History:
    bundle: Path
    signer: StatementSigner
    tmp: Path

    @property
    def key(self) -> bytes:
        return self.signer.public_bytes()

    def copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.bundle, self.tmp / name))

    def audit(self, bundle: Path) -> AuditReport:
        return audit_bundle(bundle, provider_public_key=self.key, circuit_checker=_circuits_rebuilt)


class Colluding(EzklVerifier):
    """A provider that checks enrollments but accepts every deletion unexamined."""

    def verify(self, job: VerificationJob) -> VerificationResult:
        return VerificationResult(True, "")


class Sloppy(ExactGroupObsUnlearner):
    """A client whose update is off the Group-OBS solution by more than its enrollment's norms allow,
    but by no more than the norms ``looser`` (another enrollment's, of the same batch) would."""

    looser: tuple[int, ...] = ()

    def batch_update(self, theta: IntArray, g: IntArray, mask: npt.NDArray[np.bool_]) -> ExactUpdate:
        honest = super().batch_update(theta, g, mask)
        spec, tight = self.spec, g_fro_sq(g)
        for q in sorted(range(spec.batch), key=lambda q: tight[q] / self.looser[q]):
            strict, loose = spec.thresholds(tight[q]), spec.thresholds(self.looser[q])
            j = int(np.flatnonzero(~mask[q])[0])  # a kept weight of block q
            for step in range(1, 4096):
                theta_after = honest.theta_after.copy()
                theta_after[q, j] += step
                outputs = exact_outputs(spec, theta, theta_after, g, mask, honest.w)
                _kept, s_w, s_row, _below = outputs[q]
                if s_w > loose.w or s_row > loose.row:
                    break
                if s_w > strict.w or s_row > strict.row:
                    return ExactUpdate(theta_after, honest.w, outputs)
        raise AssertionError("no update between the two enrollments' limits: choose other data")


def _serve(tmp: Path, published: DeletionCircuits, verifier: EzklVerifier) -> ProviderServer:
    config = ProviderConfig.load(None, loopback_settings(tmp))
    return build_server(config, verifier=verifier)


def _unlearner(
    published: DeletionCircuits, state: Path, kind: type[ExactGroupObsUnlearner] = ExactGroupObsUnlearner
) -> ExactGroupObsUnlearner:
    assert published.exact is not None
    spec, deletion, enrollment = published.exact
    return kind(Tiny(), spec, deletion.as_client(), enrollment.as_client(), state, OPTIONS)


def _edge(tmp: Path, server: ProviderServer, unlearner: ExactGroupObsUnlearner) -> EdgeClient:
    channel = ChannelConfig(f"127.0.0.1:{server.port}", call_timeout_s=120.0, retry_attempts=5)
    return EdgeClient(channel, ClientStore(tmp / "client.db"), unlearner)


def _export(tmp: Path, server: ProviderServer, published: DeletionCircuits) -> History:
    service = server.service
    bundle = export_bundle(
        server.state,
        service.ledger,
        service.signer.public_bytes(),
        tmp / "bundle",
        circuits_dir=published.directory,
    )
    return History(bundle, service.signer, tmp)


def _enroll(unlearner: ExactGroupObsUnlearner, seed: int, *, replace: bool = False) -> ExactEnrollment:
    x, y = _data(seed)
    return unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy, replace=replace)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, exact_published: DeletionCircuits) -> Iterator[History]:
    """enroll -> deletion (leaf 0) -> re-enrollment from other data (leaf 1) -> deletion (leaf 2)."""
    tmp = tmp_path_factory.mktemp("audit-reenrollment")
    server = _serve(tmp, exact_published, EzklVerifier({MODEL: exact_published.directory}))
    unlearner = _unlearner(exact_published, tmp / "state")
    client = _edge(tmp, server, unlearner)
    try:
        first = _enroll(unlearner, 1)
        client.enroll(CLIENT, MODEL, [LAYER], UPDATE_KIND_GROUP_OBS_EXACT, first.commitments, first.proofs)
        server.service.create_request(CLIENT, _mask(1, 2), request_id="before-rotation")
        assert [o.status for o in client.poll()] == ["accepted"]
        second = _enroll(unlearner, 2, replace=True)  # other data: another factor, other proven norms
        client.reenroll(second.commitments, second.proofs)
        server.service.create_request(CLIENT, _mask(3, 3), request_id="after-rotation")
        assert [o.status for o in client.poll()] == ["accepted"]
        yield _export(tmp, server, exact_published)
    finally:
        client.close()
        server.stop(0)


@pytest.fixture(scope="module")
def colluded(
    tmp_path_factory: pytest.TempPathFactory, exact_published: DeletionCircuits
) -> Iterator[History]:
    """A deletion outside its enrollment's limits, accepted by a colluding provider (leaf 0), then a
    re-enrollment whose norms would admit it (leaf 1)."""
    tmp = tmp_path_factory.mktemp("audit-colluded")
    server = _serve(tmp, exact_published, Colluding({MODEL: exact_published.directory}))
    sloppy = _unlearner(exact_published, tmp / "state", Sloppy)
    later = _unlearner(exact_published, tmp / "later")
    client = _edge(tmp, server, sloppy)
    try:
        first = _enroll(sloppy, 1)
        client.enroll(CLIENT, MODEL, [LAYER], UPDATE_KIND_GROUP_OBS_EXACT, first.commitments, first.proofs)
        # Prepared first, the sloppy update sized to its norms: this data's factor puts a larger share
        # of the layer's (normalised) curvature on the second block.
        second = _enroll(later, 5)
        arrays, _meta = load_state(tmp / "later")
        assert isinstance(sloppy, Sloppy)
        assert exact_published.exact is not None
        g_bits = exact_published.exact[0].g_bits
        sloppy.looser = tuple(g_fro_sq(quantise_exact(arrays[f"{LAYER}/g"][0], g_bits)))
        server.service.create_request(CLIENT, _mask(1, 2), request_id="sloppy")
        assert [o.status for o in client.poll()] == ["accepted"]
        client.reenroll(second.commitments, second.proofs)
        yield _export(tmp, server, exact_published)
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


def test_a_deletion_beyond_its_enrollments_limits_fails_though_the_next_enrollment_would_admit_it(
    colluded: History,
) -> None:
    """The provider accepted a deletion its client's enrollment does not admit; the client then
    re-enrolled with norms that would. Judged by the enrollment it was accepted under, it fails; judged
    by the enrollment in force at the end of the log, it would pass."""
    report = colluded.audit(colluded.bundle)
    failed = _failed(report)
    assert list(failed) == ["log.json[0] proofs"], report.failures
    assert re.search(r"block \d: \d+ > \d+$", failed["log.json[0] proofs"])
    current = _load(colluded.bundle / ENROLLMENT)

    def by_the_current_enrollment(*args: Any) -> tuple[bool, str]:
        return default_proof_checker(*args, current)

    assert audit_bundle(
        colluded.bundle, provider_public_key=colluded.key, proof_checker=by_the_current_enrollment
    ).ok
