"""Exact Group-OBS with real parts: gRPC on loopback, SQLite, Ed25519, real ezkl proofs, offline audit.

The device enrolls with its enrollment proofs (refused when they do not match its commitments),
answers two chained deletions that are accepted, and the auditor re-verifies the enrollment and every
deletion from an exported bundle.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
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
from zkunlearn.proofs.artifacts import ClientCircuit, derive_exact_client_circuits
from zkunlearn.proofs.audit import audit_bundle
from zkunlearn.proofs.audit import main as audit_main
from zkunlearn.proofs.deletion import UPDATE_KIND_GROUP_OBS_EXACT, DeletionCircuits
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.provider.verification import EzklVerifier

from tests.fakes import loopback_settings

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc]
MODEL = "tiny-exact"
LAYER = "fc1.weight"
OPTIONS = ProveOptions(workers=2, memory_limit_mb=2048, progress=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


@dataclass
class World:
    circuits: DeletionCircuits
    server: ProviderServer
    verifier: EzklVerifier
    tmp: Path
    device_circuits: tuple[ClientCircuit, ClientCircuit] | None = None
    """The circuits as a device derives them (once per module: every device gets the same bytes)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, exact_published: DeletionCircuits) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e-exact")
    config = ProviderConfig.load(
        None,
        loopback_settings(tmp),
    )
    verifier = EzklVerifier({MODEL: exact_published.directory})
    server = build_server(config, verifier=verifier)
    yield World(exact_published, server, verifier, tmp)
    server.stop(0)


def _device_circuits(world: World) -> tuple[ClientCircuit, ClientCircuit]:
    """What a device does: export the published spec's relations itself, compile them with the served
    settings, and set them up on the pinned SRS; its verifying keys equal the provider's."""
    assert world.circuits.exact is not None
    if world.device_circuits is None:
        spec, deletion, enrollment = world.circuits.exact
        world.device_circuits = derive_exact_client_circuits(
            spec,
            deletion.settings.read_bytes(),
            enrollment.settings.read_bytes(),
            deletion.srs,
            world.tmp / "device",
        )
        for mine, published in zip(world.device_circuits, (deletion, enrollment), strict=True):
            assert mine.vk.read_bytes() == published.vk.read_bytes()
    return world.device_circuits


def _client(world: World, name: str) -> tuple[EdgeClient, ExactGroupObsUnlearner, Tiny]:
    assert world.circuits.exact is not None
    model = Tiny()
    deletion, enrollment = _device_circuits(world)
    unlearner = ExactGroupObsUnlearner(
        model, world.circuits.exact[0], deletion, enrollment, world.tmp / name / "state", OPTIONS
    )
    channel = ChannelConfig(f"127.0.0.1:{world.server.port}", call_timeout_s=120.0, retry_attempts=5)
    return EdgeClient(channel, ClientStore(world.tmp / f"{name}.db"), unlearner), unlearner, model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def _mask(*cells: tuple[int, int]) -> Mask:
    dense = np.zeros((8, 8), dtype=bool)
    for r, c in cells:
        dense[r, c] = True
    return Mask((LayerMask.from_dense(LAYER, dense, 16),))


def test_exact_client_enrolls_with_proofs_is_accepted_twice_and_audits(world: World) -> None:
    client, unlearner, model = _client(world, "exact")
    x, y = _data()
    enrollment = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    client.enroll(
        "exact", MODEL, [LAYER], UPDATE_KIND_GROUP_OBS_EXACT, enrollment.commitments, enrollment.proofs
    )

    mask = _mask((1, 2), (1, 5), (6, 0))  # blocks 0 and 3: one in each of the layer's two batches
    before = model.fc1.weight.detach().clone()
    memo = world.verifier.commit_memo
    misses, hits = memo.misses, memo.hits
    world.server.service.create_request("exact", mask)
    (first,) = client.poll()
    assert first.status == "accepted", first.reason
    # The provider committed to the mask of each touched batch once, when it issued the request
    # (or, had verification come first, then), and judged the proofs with those commitments.
    assert (memo.misses - misses, memo.hits - hits) == (2, 2)
    after = model.fc1.weight.detach()
    dense = torch.from_numpy(mask.dense(LAYER))
    assert torch.all(after[dense] == 0)
    assert not torch.allclose(after[~dense], before[~dense])  # compensated, not just masked

    world.server.service.create_request("exact", _mask((3, 3)))
    (second,) = client.poll()
    assert second.status == "accepted", second.reason
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

    # The auditor holds the enrollment proofs to the client's signature: swapped proofs fail the audit.
    tampered = world.tmp / "tampered"
    shutil.copytree(bundle, tampered)
    record = tampered / "enrollments" / "exact.json"
    text = record.read_text()
    proofs = enrollment.proofs
    record.write_text(text.replace(proofs[0].hex(), proofs[1].hex(), 1))
    assert not audit_bundle(tampered, provider_public_key=service.signer.public_bytes()).ok
    # The auditor's command line verifies on a pool of ezkl processes and judges the same.
    key_hex = service.signer.public_bytes().hex()
    assert audit_main(bundle, True, key_hex, (), workers=2) == 0
    assert audit_main(tampered, True, key_hex, (), workers=2) == 1


def test_enrollment_proofs_that_do_not_match_the_commitments_are_refused(world: World) -> None:
    """A device sends another device's enrollment proofs (or none) with its own commitments."""
    x, y = _data()
    first, first_unlearner, _ = _client(world, "proof-donor")
    donor = first_unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    client, unlearner, _ = _client(world, "proof-thief")
    own = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    with pytest.raises(grpc.RpcError) as refused:
        client.enroll(
            "proof-thief", MODEL, [LAYER], UPDATE_KIND_GROUP_OBS_EXACT, own.commitments, donor.proofs
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "enrollment proofs refused" in str(refused.value.details())
    with pytest.raises(grpc.RpcError) as empty:
        client.enroll("proof-thief", MODEL, [LAYER], UPDATE_KIND_GROUP_OBS_EXACT, own.commitments, [])
    assert empty.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    for c in (first, client):
        c.close()
