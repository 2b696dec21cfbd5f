"""The exact analytic head with real parts: gRPC on loopback, SQLite, Ed25519, real ezkl proofs, audit.

A device enrolls its head with the enrollment proof, answers two chained deletions (its head equals
ridge retrained without the forgotten rows), and the auditor re-verifies everything from an exported
bundle. A device that answers with its old head, and one that sends another device's enrollment proof,
are refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from zkunlearn.circuits.mask import Mask
from zkunlearn.client.analytic_exact import ExactAnalyticUnlearner
from zkunlearn.client.sdk import EdgeClient
from zkunlearn.client.store import ClientStore
from zkunlearn.client.transport import ChannelConfig
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec, IntArray, factor_of
from zkunlearn.proofs.artifacts import ClientCircuit, derive_analytic_exact_client_circuit
from zkunlearn.proofs.audit import audit_bundle
from zkunlearn.proofs.deletion import UPDATE_KIND_ANALYTIC_EXACT, DeletionCircuits, DeletionError
from zkunlearn.proofs.published import check_published_circuits
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.provider.service import TensorData
from zkunlearn.provider.verification import EzklVerifier

from tests.analytic_exact_cases import digits_features
from tests.fakes import loopback_settings

if TYPE_CHECKING:
    from tests.conftest import SharedCircuits

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc]
MODEL = "head-exact"
SPEC = ExactAnalyticSpec(4, 3, 2)
OPTIONS = ProveOptions(workers=1, memory_limit_mb=2048, progress=False)


@dataclass
class World:
    circuits: DeletionCircuits
    server: ProviderServer
    tmp: Path
    device_circuit: ClientCircuit | None = None
    """The circuit as a device derives it (once per module: every device gets the same bytes)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, shared_circuits: SharedCircuits) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e-analytic-exact")
    circuits = shared_circuits.build(analytic_exact=SPEC)
    config = ProviderConfig.load(
        None,
        loopback_settings(tmp),
    )
    server = build_server(config, verifier=EzklVerifier({MODEL: circuits.directory}))
    yield World(circuits, server, tmp)
    server.stop(0)


def _client(world: World, name: str) -> tuple[EdgeClient, ExactAnalyticUnlearner]:
    """What a device does: export the published spec's relation itself, compile it with the served
    settings and set it up on the pinned SRS; its verifying key equals the provider's."""
    assert world.circuits.analytic_exact is not None
    spec, published = world.circuits.analytic_exact
    if world.device_circuit is None:  # once per module: every device derives the same bytes
        world.device_circuit = derive_analytic_exact_client_circuit(
            spec, published.settings.read_bytes(), published.srs, world.tmp / "device" / "circuit"
        )
        assert world.device_circuit.vk.read_bytes() == published.vk.read_bytes()
    unlearner = ExactAnalyticUnlearner(spec, world.device_circuit, world.tmp / name / "state", OPTIONS)
    channel = ChannelConfig(f"127.0.0.1:{world.server.port}", call_timeout_s=120.0, retry_attempts=5)
    return EdgeClient(channel, ClientStore(world.tmp / f"{name}.db"), unlearner), unlearner


def _ridge(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ridge retrained from scratch on the spec's grid: the gold standard a deletion must equal."""
    xq = np.rint(x * 2.0**SPEC.feature_bits) / 2.0**SPEC.feature_bits
    targets = np.eye(SPEC.k)[y]
    return np.linalg.solve(xq.T @ xq + SPEC.gamma * np.eye(SPEC.d), xq.T @ targets)


def _forget(world: World, client_id: str, x: np.ndarray, y: np.ndarray) -> None:
    labels = y.astype(np.float64)
    world.server.service.create_request(
        client_id,
        Mask(()),
        forget_features=TensorData(x.shape, x.astype("<f8").tobytes()),
        forget_labels=TensorData(labels.shape, labels.astype("<f8").tobytes()),
    )


def test_exact_head_is_retrained_twice_and_audits(world: World) -> None:
    x, y = digits_features(SPEC, 120)
    client, unlearner = _client(world, "head")
    enrollment = unlearner.enroll(x, y)
    client.enroll(
        "head", MODEL, ["head"], UPDATE_KIND_ANALYTIC_EXACT, enrollment.commitments, enrollment.proofs
    )
    assert np.abs(unlearner.weights() - _ridge(x, y)).max() < 1e-9

    _forget(world, "head", x[:2], y[:2])
    (first,) = client.poll()
    assert first.status == "accepted", first.reason
    _forget(world, "head", x[2:4], y[2:4])
    (second,) = client.poll()
    assert second.status == "accepted", second.reason
    retrained = _ridge(x[4:], y[4:])
    assert np.abs(unlearner.weights() - retrained).max() < 1e-9  # exact: retraining, to the grid
    assert client.verify_log() == 2
    client.close()

    service = world.server.service
    bundle = export_bundle(
        world.server.state,
        service.ledger,
        service.signer.public_bytes(),
        world.tmp / "bundle",
        circuits_dir=world.circuits.directory,
    )
    report = audit_bundle(bundle, provider_public_key=service.signer.public_bytes())
    assert report.ok, [item for item in report.items if not item.ok]


class _KeepsItsHead(ExactAnalyticUnlearner):
    """A device that downdates its Gram but answers with the head it had (W' = W), skipping its check."""

    def _solve(self, m_after: IntArray, w_before: IntArray) -> tuple[IntArray, IntArray]:
        return w_before, factor_of(self.spec, m_after)

    def _check(self, *args: IntArray) -> None:
        return None


def test_a_head_that_is_not_retrained_is_refused(world: World) -> None:
    x, y = digits_features(SPEC, 120, seed=1)
    client, honest = _client(world, "keeper")
    cheat = _KeepsItsHead(honest.spec, honest.circuit, honest.state_dir, OPTIONS)
    client.prover = cheat
    enrollment = cheat.enroll(x, y)
    client.enroll(
        "keeper", MODEL, ["head"], UPDATE_KIND_ANALYTIC_EXACT, enrollment.commitments, enrollment.proofs
    )
    _forget(world, "keeper", x[:2], y[:2])
    (outcome,) = client.poll()
    assert outcome.status == "rejected"
    assert "analytic_head_not_retrained_solution" in outcome.reason
    client.close()


def test_another_devices_enrollment_proof_is_refused(world: World) -> None:
    x, y = digits_features(SPEC, 120, seed=2)
    _donor_client, donor = _client(world, "donor")
    donated = donor.enroll(x, y)
    client, unlearner = _client(world, "thief")
    own = unlearner.enroll(x[:100], y[:100])
    with pytest.raises(grpc.RpcError) as refused:
        client.enroll("thief", MODEL, ["head"], UPDATE_KIND_ANALYTIC_EXACT, own.commitments, donated.proofs)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "enrollment proofs refused" in str(refused.value.details())
    client.close()
    _donor_client.close()


def test_the_auditor_rebuilds_the_exact_analytic_circuit_and_its_decomposition(world: World) -> None:
    """The published vk is rebuilt from the spec; settings that decompose with more limbs than the spec
    assumes (whose sums of squares could then wrap) are refused by name."""
    copy = world.tmp / "published-copy"
    shutil.copytree(world.circuits.directory, copy)
    assert "analytic_exact" in check_published_circuits(copy)
    assert world.circuits.analytic_exact is not None
    settings = copy / world.circuits.analytic_exact[1].key / "settings.json"
    data = json.loads(settings.read_text())
    data["run_args"]["decomp_legs"] = SPEC.decomp_legs + 1
    settings.write_text(json.dumps(data))
    with pytest.raises(DeletionError, match="decomp_legs"):
        check_published_circuits(copy)
