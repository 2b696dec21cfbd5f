"""A device's state cannot be lost: a SIGKILL at any stage of its life, and a lost committed state.

The user's program (``tests/user_programs/digits_cnn.py``) runs as its own process group against a
provider on loopback and is SIGKILLed, with its proving workers, in the middle of a stage: enrolling,
applying a deletion, proving it, or waiting on the submitted proof. The program's next run from the
same state folder completes its next deletion, accepted. A device whose committed state is then lost
recovers through a signed re-enrollment, which the provider's log and the offline audit show.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from torch import nn
from zkunlearn.client import DeviceError, EdgeDevice
from zkunlearn.proofs.audit import main as audit_main
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.statements import StatementSigner
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.operator import DeletionOrder
from zkunlearn.provider.operator_client import OperatorClient
from zkunlearn.provider.planning import ForgetSelection, MaskOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_device import LAYER, MODEL, PROGRAM, World, provider_copy, quiet, serve

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, exact_published: DeletionCircuits) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("recovery")
    operator = StatementSigner.generate()
    server = serve(tmp, exact_published, operator)
    yield World(server, exact_published, operator, tmp)
    server.stop(0)


class Program:
    """The user's program as a process group, its output collected line by line into a file."""

    def __init__(self, world: World, state: Path) -> None:
        self.log = state.with_suffix(f".{time.monotonic_ns()}.log")
        self.handle = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(PROGRAM), world.address, world.key, str(state)],
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the kill takes its proving workers too
        )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, f"exited before {what}: {self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout_s} s: {self.output[-3000:]}"
            time.sleep(0.05)

    def proving(self) -> bool:
        """A proving worker is running (a child process of the program)."""
        try:
            return bool(psutil.Process(self.process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return False

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.handle.close()

    def finish(self, timeout_s: float = 240.0) -> str:
        try:
            self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.handle.close()
        assert self.process.returncode == 0, self.output[-3000:]
        return self.output


def client_id(state: Path) -> str:
    return str(json.loads((state / "device.json").read_text())["client_id"])


def enrolled(world: World, state: Path) -> bool:
    return (state / "device.json").exists() and world.server.state.get_client(client_id(state)) is not None


def issue(world: World, state: Path, ttl_s: int = 0) -> str:
    with OperatorClient(world.address, world.operator, timeout_s=60.0) as operator:
        selection = ForgetSelection(forget_class=3)
        order = DeletionOrder(MODEL, (client_id(state),), selection, MaskOptions(), ttl_s=ttl_s)
        (created,) = operator.create_requests(order).requests
    return created.request_id


def submitted(world: World, request_id: str) -> bool:
    return bool(world.server.state.submissions_for(request_id))


@pytest.fixture(scope="module")
def device(world: World) -> tuple[Path, str]:
    """A state folder the program enrolled and answered a first deletion from; its request id."""
    state = world.tmp / "device"
    program = Program(world, state)
    program.wait_for(lambda: enrolled(world, state), "enrollment")
    first = issue(world, state)
    assert "outcomes: ['accepted']" in program.finish()
    return state, first


def test_a_sigkill_mid_enrollment_leaves_a_device_that_enrolls_and_completes_its_next_deletion(
    world: World,
) -> None:
    state = world.tmp / "device-enroll"
    first = Program(world, state)
    first.wait_for(lambda: "proving the enrollment" in first.output, "enrollment")
    first.wait_for(first.proving, "enrollment proving worker")
    first.kill()
    assert not enrolled(world, state)
    again = Program(world, state)
    again.wait_for(lambda: enrolled(world, state), "enrollment")
    request_id = issue(world, state)
    assert "outcomes: ['accepted']" in again.finish()
    request = world.server.state.get_request(request_id)
    assert request is not None
    assert request.accepted_submission_id is not None


class HeldVerifier:
    """The provider's verifier, holding every verdict until ``release`` is set: a device killed while it
    waits on its receipt is killed before the receipt exists, however slow the machine is."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.release = inner, threading.Event()

    def verify(self, job: Any) -> Any:
        self.release.wait(timeout=300)
        return self.inner.verify(job)


@pytest.mark.parametrize("stage", ["apply", "prove", "submit"])
def test_a_sigkill_mid_deletion_leaves_a_device_that_completes_it_on_its_next_run(
    world: World, device: tuple[Path, str], stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enrolled device's program is restarted, a deletion is issued, and the program is killed
    while it applies the update, proves it, or waits on the uploaded proof's receipt."""
    state, _first = device
    held = HeldVerifier(world.server.service.verdicts.verifier)
    if stage == "submit":
        monkeypatch.setattr(world.server.service.verdicts, "verifier", held)
    first = Program(world, state)
    request_id = issue(world, state)
    if stage == "apply":  # the request is checked and its update is being computed
        first.wait_for(lambda: f"request {request_id}: deleting" in first.output, "apply")
    elif stage == "prove":
        first.wait_for(first.proving, "deletion proving worker")
    else:  # the proof is uploaded, the device waits on its receipt
        first.wait_for(lambda: submitted(world, request_id), "submission")
    first.kill()
    held.release.set()
    assert "outcomes" not in first.output
    output = Program(world, state).finish()
    assert "outcomes: ['accepted']" in output, output[-3000:]
    request = world.server.state.get_request(request_id)
    assert request is not None
    assert request.accepted_submission_id is not None


def test_a_device_that_lost_its_committed_state_recovers_by_reenrolling(
    world: World, device: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The device's committed folder is gone: the provider's next deletion cannot be proved; a
    re-enrollment (refused while a request is open, and for a readable state unless asked) restores
    it, the log records the rotation, and the next deletion is accepted and audits."""
    state, first = device
    model, x, y = provider_copy()
    loss = nn.functional.cross_entropy
    with EdgeDevice.connect(
        world.address, MODEL, provider_key=world.key, state_dir=state, console=quiet()
    ) as device:
        # A readable state is not discarded unless asked.
        with pytest.raises(DeviceError, match="readable committed state"):
            device.reenroll_model(model, [LAYER], x[:64], y[:64], loss)
        shutil.rmtree(state / "committed")  # the state is lost
        with pytest.raises(DeviceError, match="cannot read committed state"):
            device.enroll_model(model, [LAYER], x[:64], y[:64], loss)
        pending = issue(world, state, ttl_s=30)  # an open request blocks the rotation
        with pytest.raises(DeviceError, match=r"FAILED_PRECONDITION.*open deletion request"):
            device.reenroll_model(model, [LAYER], x[:64], y[:64], loss)
        fresh = json.loads((state / "committed" / "state.json").read_text())["commitments"]
        record = world.server.state.get_request(pending)
        assert record is not None
        time.sleep(max(0.0, record.expires_ms / 1000 - time.time()) + 0.5)  # it expires unanswered
        # The refused re-enrollment is sent again as it was committed, not recomputed.
        enrollment = device.reenroll_model(model, [LAYER], x[:64], y[:64], loss)
        assert json.loads((state / "committed" / "state.json").read_text())["commitments"] == fresh
        assert enrollment.commitments > 0
        second = issue(world, state)
        outcomes = device.run(max_requests=2, timeout_s=180)
    by_id = {o.request_id: o.status for o in outcomes}
    assert by_id[second] == "accepted", outcomes
    assert pending not in by_id or by_id[pending] != "accepted"
    client = world.server.state.get_client(client_id(state))
    assert client is not None
    assert [c["point_hex"] for c in json.loads(client.enrolled_commitments)] == [
        c["point_hex"] for c in fresh
    ]
    service = world.server.service
    bundle = export_bundle(
        world.server.state,
        service.ledger,
        service.signer.public_bytes(),
        world.tmp / "bundle",
        circuits_dir=world.circuits.directory,
    )
    # The auditor's command line: every receipt's proofs verify, those before the rotation against the
    # old commitments, the rotation is listed, and the chain runs through it.
    assert audit_main(bundle, True, service.signer.public_bytes().hex()) == 0, capsys.readouterr().out
    report = json.loads(capsys.readouterr().out)
    reasons = {item["item"]: item["reason"] for item in report["items"]}
    assert any(r.startswith(f"re-enrollment of client {client_id(state)}") for r in reasons.values())
    chain = reasons[f"chain {client_id(state)}"]
    assert "1 re-enrollment(s)" in chain
    assert "1 since the last one" in chain
    first_leaf = world.server.service.receipt(first, client_id(state)).leaf
    assert first_leaf is not None
    assert reasons[f"log.json[{first_leaf.index}] proofs"].startswith("1 proof(s) verify")
