"""The whole deletion with real parts: gRPC on loopback, SQLite, Ed25519, and real ezkl proofs.

Honest Group-OBS and analytic clients are accepted; a client that skips the compensation and one that
proves from another model than the one it enrolled are rejected with specific reasons; the ledger and
the client's log check pass afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.client.analytic import AnalyticHead
from zkunlearn.client.analytic_unlearner import AnalyticUnlearner
from zkunlearn.client.sdk import Commitment, EdgeClient
from zkunlearn.client.store import ClientStore
from zkunlearn.client.transport import ChannelConfig
from zkunlearn.client.unlearning import GroupObsUnlearner, ProveOptions
from zkunlearn.proofs.artifacts import ClientCircuit, client_artifacts
from zkunlearn.proofs.deletion import AnalyticSpec, DeletionCircuits, GroupObsSpec
from zkunlearn.provider.planning import MaskOptions, TorchPlanner
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.provider.service import TensorData
from zkunlearn.provider.verification import EzklVerifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_POLICY, loopback_settings  # noqa: E402  (the fixed-point kinds under test: opted into)

if TYPE_CHECKING:
    from tests.conftest import SharedCircuits

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc]
MODEL = "tiny-mlp"
LAYER = "fc1.weight"
GO_SPEC = GroupObsSpec(block=16, m=8, batch=1, lam=0.1)
AN_SPEC = AnalyticSpec(d=8, k=3, n_u=4)
OPTIONS = ProveOptions(workers=1, memory_limit_mb=None, progress=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@dataclass
class World:
    circuits: DeletionCircuits
    server: ProviderServer
    tmp: Path
    device_circuits: dict[str, ClientCircuit] = field(default_factory=dict)
    """Each published circuit as a device derives it (once per module: key generation is deterministic,
    so every device gets the same bytes)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, shared_circuits: SharedCircuits) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e")
    circuits = shared_circuits.build(group_obs=GO_SPEC, analytic=AN_SPEC)
    server = serve(tmp, MODEL, circuits.directory)
    yield World(circuits, server, tmp)
    server.stop(0)


def serve(tmp: Path, model: str, circuits: Path) -> ProviderServer:
    """A provider on loopback with a SQLite state in ``tmp``, verifying ``model`` with ``circuits``."""
    config = ProviderConfig.load(
        None,
        loopback_settings(tmp, **ALL_KINDS_POLICY),
    )
    # The provider's own copy of the model: Enroll counts each layer's batches against its shapes.
    x, y = data()
    planner = TorchPlanner(
        Tiny(), x, y, [LAYER], defaults=MaskOptions("fisher-ratio", 250_000, "unstructured"), block_size=16
    )
    return build_server(config, verifier=EzklVerifier({model: circuits}), planners={model: planner})


def client_circuit(world: World, kind: str) -> ClientCircuit:
    """What a device does: regenerate its proving key from the published compiled circuit and SRS."""
    if kind not in world.device_circuits:
        _spec, arts = world.circuits.group_obs if kind == "group_obs" else world.circuits.analytic  # type: ignore[misc]
        circuit = client_artifacts(
            arts.compiled.read_bytes(), arts.settings.read_bytes(), arts.srs, world.tmp / "device" / kind
        )
        assert circuit.vk.read_bytes() == arts.vk.read_bytes()
        world.device_circuits[kind] = circuit
    return world.device_circuits[kind]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def mask_for(model: nn.Module) -> Mask:
    dense = np.zeros((8, 8), dtype=bool)
    dense[1, 2] = dense[1, 5] = dense[6, 0] = True  # touches blocks 0 and 3 (rows 0-1 and 6-7)
    return Mask((LayerMask.from_dense(LAYER, dense, GO_SPEC.block),))


def edge(world: World, name: str, prover: object) -> EdgeClient:
    channel = ChannelConfig(f"127.0.0.1:{world.server.port}", call_timeout_s=120.0, retry_attempts=5)
    return EdgeClient(channel, ClientStore(world.tmp / f"{name}.db"), prover)  # type: ignore[arg-type]


def group_obs_client(
    world: World, name: str, unlearner_cls: type[GroupObsUnlearner] = GroupObsUnlearner
) -> tuple[EdgeClient, GroupObsUnlearner, Tiny]:
    model = Tiny()
    unlearner = unlearner_cls(
        model, GO_SPEC, client_circuit(world, "group_obs"), world.tmp / name / "state", OPTIONS
    )
    x, y = data()
    commitments = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    client = edge(world, name, unlearner)
    client.enroll(name, MODEL, [LAYER], 1, commitments)
    return client, unlearner, model


class SkipsCompensation(GroupObsUnlearner):
    """Dishonest: zeroes the masked weights but leaves every other weight as it was."""

    def compensate(self, theta, g, layer_mask, lam):  # type: ignore[no-untyped-def]
        after = theta.copy().reshape(-1)
        after[layer_mask.dense().reshape(-1)] = 0.0
        return after.reshape(theta.shape), np.zeros((theta.shape[0] * theta.shape[1], self.spec.m))


def test_honest_group_obs_accepted_dishonest_rejected(world: World) -> None:
    honest, _unlearner, model = group_obs_client(world, "honest")
    cheat, _, _ = group_obs_client(world, "cheat", SkipsCompensation)
    before = model.fc1.weight.detach().clone()
    mask = mask_for(model)
    world.server.service.create_request("honest", mask)
    world.server.service.create_request("cheat", mask)
    (good,) = honest.poll()
    (bad,) = cheat.poll()
    assert good.status == "accepted", good.reason
    assert bad.status == "rejected"
    assert "kkt_residual_above_tolerance" in bad.reason
    after = model.fc1.weight.detach()
    dense = torch.from_numpy(mask.dense(LAYER))
    assert torch.all(after[dense] == 0)
    assert not torch.allclose(after[~dense], before[~dense])  # compensated, not just masked
    assert honest.verify_log() == 2  # the tree holds both receipts: accepted and rejected
    # Chaining: a second deletion starts from the accepted after-commitments.
    second = np.zeros((8, 8), dtype=bool)
    second[3, 3] = True
    world.server.service.create_request("honest", Mask((LayerMask.from_dense(LAYER, second, GO_SPEC.block),)))
    (again,) = honest.poll()
    assert again.status == "accepted", again.reason
    for client in (honest, cheat):
        client.close()


class ProvesAnotherModel(GroupObsUnlearner):
    """Dishonest: swaps in other weights (e.g. the global model) after committing to its own."""

    self_check = False

    def prove(self, request):  # type: ignore[no-untyped-def]
        arrays_path = self.state_dir / "state.npz"
        with np.load(arrays_path) as stored:
            arrays = {k: stored[k] for k in stored.files}
        arrays[f"{LAYER}/theta"] = np.round(arrays[f"{LAYER}/theta"] * 0.5 * 2**13) / 2**13
        np.savez(arrays_path, **arrays)
        return super().prove(request)


def test_proof_from_another_model_rejected(world: World) -> None:
    client, _, _ = group_obs_client(world, "swapper", ProvesAnotherModel)
    world.server.service.create_request("swapper", mask_for(Tiny()))
    (outcome,) = client.poll()
    assert outcome.status == "rejected"
    assert "proof_invalid_for_expected_commitments" in outcome.reason
    client.close()


def test_analytic_client_accepted(world: World) -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(40, AN_SPEC.d))
    y = rng.integers(0, AN_SPEC.k, size=40)
    head = AnalyticHead(AN_SPEC.d, AN_SPEC.k, gamma=1.0)
    head.learn(x, np.eye(AN_SPEC.k)[y])
    unlearner = AnalyticUnlearner(
        head, AN_SPEC, client_circuit(world, "analytic"), world.tmp / "ana" / "state", OPTIONS
    )
    client = edge(world, "ana", unlearner)
    client.enroll("ana", MODEL, ["head"], 2, unlearner.enroll())
    forget_x, forget_y = x[:3], y[:3].astype(np.float64)
    world.server.service.create_request(
        "ana",
        Mask(()),
        forget_features=TensorData(forget_x.shape, forget_x.astype("<f8").tobytes()),
        forget_labels=TensorData(forget_y.shape, forget_y.astype("<f8").tobytes()),
    )
    (outcome,) = client.poll()
    assert outcome.status == "accepted", outcome.reason
    # Exact unlearning: the head now equals ridge retrained on the 37 retained samples (up to the grid).
    retrained = AnalyticHead(AN_SPEC.d, AN_SPEC.k, gamma=1.0)
    retrained.learn(x[3:], np.eye(AN_SPEC.k)[y[3:]])
    assert np.allclose(head.W, retrained.W, atol=1e-3)
    client.close()


def test_enrollment_commitments_the_published_circuits_never_read_are_refused(world: World) -> None:
    """A missing ``g`` batch, a stray tensor, a batch off 0..n-1, tensors of another kind: each
    refused at Enroll by name; the same commitments enrolled as they are (the control) pass."""
    model = Tiny()
    unlearner = GroupObsUnlearner(
        model, GO_SPEC, client_circuit(world, "group_obs"), world.tmp / "layout" / "state", OPTIONS
    )
    x, y = data()
    honest = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    spare = honest[0].point_hex
    without_g = [c for c in honest if not c.name.startswith("g:")]
    attacks = {
        "must both be 0..n-1": (1, without_g),
        "no published circuit reads": (1, [*honest, Commitment("theta:fc9", 0, spare)]),
        "0..n-1": (1, [*honest, Commitment(f"theta:{LAYER}", 7, spare), Commitment(f"g:{LAYER}", 7, spare)]),
        "need 4 batches": (1, [c for c in honest if c.block < 2]),  # half the layer, batches 0..1
        "an analytic head enrolls": (2, honest),  # Group-OBS tensors declared as an analytic head
    }
    for i, (reason, (kind, commitments)) in enumerate(attacks.items()):
        client = edge(world, f"layout-{i}", unlearner)
        with pytest.raises(grpc.RpcError) as refused:
            client.enroll(f"layout-{i}", MODEL, [LAYER], kind, commitments)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in (refused.value.details() or ""), refused.value.details()
        client.close()
    assert all(world.server.service.state.get_client(f"layout-{i}") is None for i in range(len(attacks)))
    control = edge(world, "layout-ok", unlearner)
    control.enroll("layout-ok", MODEL, [LAYER], 1, honest)
    assert world.server.service.state.get_client("layout-ok") is not None
    control.close()
