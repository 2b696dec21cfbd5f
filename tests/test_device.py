"""The one-call device (``zkunlearn.client.EdgeDevice``) as a device developer meets it.

A user's program (``tests/user_programs/digits_cnn.py``: a small CNN of its own on scikit-learn's
digits, no ``__main__`` guard) runs as its own process against a provider on loopback: it connects,
enrolls with real ezkl proofs, receives a deletion the operator issues through the Operator service,
proves it, is accepted and checks its receipt and the provider's log; the test then audits the
provider's export offline against the head the device verified, reopens the device from its state
folder, and has every misuse refused with one error naming it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from sklearn.datasets import load_digits
from torch import Tensor, nn
from zkunlearn.client import DeviceError, EdgeDevice
from zkunlearn.proofs.audit import audit_bundle
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.served import publication
from zkunlearn.proofs.statements import StatementSigner
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.operator import DeletionOrder
from zkunlearn.provider.operator_client import OperatorClient
from zkunlearn.provider.planning import ForgetSelection, MaskOptions, TorchPlanner
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.provider.verification import EzklVerifier

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_POLICY, loopback_settings  # noqa: E402

PROGRAM = ROOT / "tests" / "user_programs" / "digits_cnn.py"
MODEL = "digits-cnn"
LAYER = "0.weight"  # the CNN's convolution: 2 x 1 x 4 x 4 = 32 weights, one batch of the exact circuit


def provider_copy() -> tuple[nn.Module, Tensor, Tensor]:
    """The provider's own copy of the model (shapes are what Enroll and the planner check) and data."""
    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16, dtype=torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 4, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(50, 10))
    return model, x, torch.tensor(digits.target)


@dataclass
class World:
    server: ProviderServer
    circuits: DeletionCircuits
    operator: StatementSigner
    tmp: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def key(self) -> str:
        return self.server.service.signer.public_bytes().hex()


def serve(tmp: Path, circuits: DeletionCircuits, operator: StatementSigner, **config: Any) -> ProviderServer:
    """A provider on loopback publishing ``circuits`` for MODEL, with its planner and an operator key."""
    served = publication(MODEL, circuits).items()
    artifacts = {cid: {name: str(path) for name, path in files.items()} for cid, files in served}
    model, x, y = provider_copy()
    planner = TorchPlanner(
        model, x, y, [LAYER], defaults=MaskOptions("fisher-ratio", 250_000, "unstructured"), block_size=16
    )
    settings = loopback_settings(
        tmp,
        model_ids=[MODEL],
        **{"operator.public_keys": [operator.public_bytes().hex()], "artifacts": artifacts, **config},
    )
    return build_server(
        ProviderConfig.load(None, settings),
        verifier=EzklVerifier({MODEL: circuits.directory}),
        planners={MODEL: planner},
    )


@pytest.fixture
def world(tmp_path: Path, exact_published: DeletionCircuits) -> Iterator[World]:
    operator = StatementSigner.generate()
    server = serve(tmp_path, exact_published, operator)
    yield World(server, exact_published, operator, tmp_path)
    server.stop(0)


def code_lines(path: Path) -> int:
    """Lines that are neither blank nor comments."""
    return sum(
        1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")
    )


def quiet() -> Console:
    return Console(file=io.StringIO())


def test_a_user_program_connects_enrolls_is_accepted_audits_and_reopens(world: World) -> None:
    assert "__main__" not in PROGRAM.read_text()
    assert code_lines(PROGRAM) <= 30
    state = world.tmp / "device"
    program = subprocess.Popen(
        [sys.executable, str(PROGRAM), world.address, world.key, str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while world.server.state.summary().clients == 0:
            assert program.poll() is None, program.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the program did not enroll"
            time.sleep(0.2)
        with OperatorClient(world.address, world.operator, timeout_s=60.0) as operator:
            order = DeletionOrder(MODEL, (), ForgetSelection(forget_class=3), MaskOptions())
            (created,) = operator.create_requests(order).requests
        output, _ = program.communicate(timeout=240)
    finally:
        program.kill()
    assert program.returncode == 0, output[-3000:]
    assert "outcomes: ['accepted'] log size: 1" in output, output[-3000:]
    assert f"request {created.request_id} accepted after 1 proof(s)" in output  # progress, one line each

    # The offline auditor: the provider's export, held to the head the device verified its receipt under.
    service = world.server.service
    bundle = export_bundle(
        world.server.state,
        service.ledger,
        service.signer.public_bytes(),
        world.tmp / "bundle",
        circuits_dir=world.circuits.directory,
    )
    head = json.loads((state / "known_head.json").read_text())
    report = audit_bundle(
        bundle, provider_public_key=service.signer.public_bytes(), known_heads=[("device", head)]
    )
    assert report.ok, [item for item in report.items if not item.ok]

    # After a restart: the same call reopens the folder (nothing derived, enrolled or proved again), and
    # enroll_model writes the committed weights, the deletion included, into a fresh model.
    proving_key = state / "circuit" / "group_obs_exact" / "deletion" / "pk.key"
    derived_at = proving_key.stat().st_mtime_ns
    model, x, y = provider_copy()
    with EdgeDevice.connect(
        world.address, MODEL, provider_key=world.key, state_dir=state, console=quiet()
    ) as device:
        assert device.reopened
        assert device.enrolled_layers == (LAYER,)
        enrollment = device.enroll_model(model, [LAYER], x[:8], y[:8], nn.functional.cross_entropy)
        assert enrollment.reopened
        assert int((model[0].weight == 0).sum()) == created.masked_weights
        assert device.verify_log() == 1
        with pytest.raises(DeviceError, match="would overwrite its committed state"):
            device.enroll_model(model, ["3.weight"], x[:8], y[:8], nn.functional.cross_entropy)
    assert proving_key.stat().st_mtime_ns == derived_at
    assert world.server.state.summary().clients == 1
    # The folder is this model's and this provider's only.
    for kwargs, reason in (
        ({"model_id": "other-model"}, "belongs to model 'digits-cnn'"),
        ({"provider_key": StatementSigner.generate().public_bytes()}, "belongs to the provider with key"),
        ({"client_id": "someone-else"}, "belongs to client"),
    ):
        args = {"model_id": MODEL, "provider_key": world.key, **kwargs}
        with pytest.raises(DeviceError, match=reason):
            EdgeDevice.connect(world.address, state_dir=state, console=quiet(), **args)


def test_each_misuse_is_refused_by_name_and_a_cut_enrollment_is_sent_again(world: World) -> None:
    """Refused before anything is derived or enrolled; the honest control connects, is refused only for
    what it does out of order, and survives a crash between committing and enrolling."""

    def connect(
        folder: str, model_id: str = MODEL, address: str = world.address, **kwargs: Any
    ) -> EdgeDevice:
        options = {"provider_key": world.key, "allow_insecure_srs": True, "console": quiet(), **kwargs}
        return EdgeDevice.connect(address, model_id, state_dir=world.tmp / folder, **options)

    cases: list[tuple[dict[str, Any], str]] = [
        ({"provider_key": StatementSigner.generate().public_bytes()}, "presents key .* not the pinned"),
        ({"provider_key": "not hex"}, "64 hex digits"),
        ({"model_id": "some-other-model"}, "unknown model 'some-other-model'"),
        ({"allow_insecure_srs": False}, "INSECURE development SRS"),
        ({"srs_sha256": "00" * 32}, "not the pinned"),
        ({"kind": "group_obs"}, "publishes no circuit for model 'digits-cnn'"),
    ]
    for i, (kwargs, reason) in enumerate(cases):
        with pytest.raises(DeviceError, match=reason):
            connect(f"refused-{i}", **kwargs)
        assert not (world.tmp / f"refused-{i}" / "device.json").exists()
    # A low-level client's folder is not taken over.
    foreign = world.tmp / "foreign"
    foreign.mkdir()
    (foreign / "client.db").write_bytes(b"")
    with pytest.raises(DeviceError, match="holds client state"):
        connect("foreign")
    # A provider publishing the circuit without one of its artifacts.
    served = publication(MODEL, world.circuits)
    for files in served.values():
        del files["enrollment_settings"]
    (world.tmp / "partial").mkdir()
    partial = serve(
        world.tmp / "partial",
        world.circuits,
        world.operator,
        artifacts={c: {n: str(p) for n, p in f.items()} for c, f in served.items()},
        key_file=str(world.tmp / "provider.key"),  # the same provider, serving less
    )
    try:
        with pytest.raises(DeviceError, match="without its 'enrollment_settings' artifact"):
            connect("partial", address=f"127.0.0.1:{partial.port}")
    finally:
        partial.stop(0)
    # The honest control: connected (circuit derived), then refused for running before enrolling and
    # for asking an analytic head of a Group-OBS model.
    with connect("control") as device:
        assert (device.kind, device.reopened, device.enrolled_layers) == ("group_obs_exact", False, None)
        with pytest.raises(DeviceError, match="enroll_model"):
            device.run(max_requests=1)
        with pytest.raises(DeviceError, match="use enroll_model"):
            device.enroll_head([[0.0]], [0])
        interrupted_enrollment(world, device, connect)


def interrupted_enrollment(world: World, device: EdgeDevice, connect: Any) -> None:
    """The device commits to its model, then dies before its Enroll call: the program's next run sends
    the committed enrollment, computing nothing again, and refuses to replace it with other layers."""
    model, x, y = provider_copy()

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise SystemExit("the device lost power before its Enroll call")

    device.client.enroll = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        device.enroll_model(model, [LAYER], x[:64], y[:64], nn.functional.cross_entropy)
    device.close()
    state = device.state_dir / "committed" / "state.json"
    committed = json.loads(state.read_text())
    assert world.server.state.get_client(device.client_id) is None
    with connect("control") as again:
        assert again.reopened
        assert again.enrolled_layers is None
        with pytest.raises(DeviceError, match="never acknowledged"):
            again.enroll_model(model, ["3.weight"], x[:64], y[:64], nn.functional.cross_entropy)
        fresh = provider_copy()[0]  # the program's model after its restart
        enrollment = again.enroll_model(fresh, [LAYER], x[:8], y[:8], nn.functional.cross_entropy)
        assert not enrollment.reopened
        assert again.enrolled_layers == (LAYER,)
    # The provider holds the commitments committed before the cut, with their enrollment proofs.
    record = world.server.state.get_client(device.client_id)
    assert record is not None
    assert json.loads(record.enrolled_commitments) == committed["commitments"]
    assert json.loads(record.enrollment_proofs) == committed["enrollment_proofs"]
    assert json.loads(state.read_text()) == committed  # nothing recomputed


def test_what_the_one_call_device_cannot_prove_is_refused_by_name(world: World) -> None:
    """A fixed-point analytic head (update kind 2) and a publication with output-refit circuits are
    refused at connect with the reason and the way out; the honest control (the exact circuit) connects."""
    with pytest.raises(DeviceError, match=r"fixed-point analytic head \(kind 'analytic', update kind 2\)"):
        EdgeDevice.connect(
            world.address, MODEL, provider_key=world.key, state_dir=world.tmp / "kind-2", kind="analytic"
        )
    # The same provider publishing Group-OBS with an output refit pair in its index.
    index = json.loads((world.circuits.directory / "circuits.json").read_text())
    exact = index["group_obs_exact"]
    index["group_obs"] = {"spec": {}, "srs": exact["srs"]}
    index["refits"] = [{"spec": {"masked": LAYER, "following": "3.weight"}}]
    refit_index = world.tmp / "refit-index.json"
    refit_index.write_text(json.dumps(index))
    (world.tmp / "refit").mkdir()
    refit = serve(
        world.tmp / "refit",
        world.circuits,
        world.operator,
        artifacts={f"{MODEL}/group_obs": {"index": str(refit_index)}},
        key_file=str(world.tmp / "provider.key"),
        **ALL_KINDS_POLICY,  # the refit pair is a fixed-point (kind 1) publication: opted in
    )
    try:
        with pytest.raises(
            DeviceError, match="output-refit circuits, which the one-call device does not prove"
        ):
            EdgeDevice.connect(
                f"127.0.0.1:{refit.port}",
                MODEL,
                provider_key=world.key,
                state_dir=world.tmp / "refit-device",
                allow_insecure_srs=True,
            )
    finally:
        refit.stop(0)
    with EdgeDevice.connect(
        world.address, MODEL, provider_key=world.key, state_dir=world.tmp / "control", allow_insecure_srs=True
    ) as device:
        assert device.kind == "group_obs_exact"
