"""The edge SDK guide's runnable blocks run as written.

Every fenced python block of ``docs/sdk.md`` right after a ``<!-- runs: ... -->`` line is executed, in
the order of the guide, in one namespace holding only ``PROVIDER_ADDRESS`` and ``PROVIDER_KEY``, in an
empty working folder, against a provider on loopback with real ezkl proofs; the operator issues the
deletion the quick start waits for through the Operator service.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.statements import StatementSigner
from zkunlearn.provider.operator import DeletionOrder
from zkunlearn.provider.operator_client import OperatorClient
from zkunlearn.provider.planning import ForgetSelection, MaskOptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_device import MODEL, World, serve  # noqa: E402

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc]
GUIDE = ROOT / "docs" / "sdk.md"
RUNNABLE = re.compile(r"^<!-- runs: [^>]*-->\n```python\n(.*?)^```$", re.S | re.M)


def runnable_blocks() -> list[str]:
    return RUNNABLE.findall(GUIDE.read_text())


@pytest.fixture
def world(tmp_path: Path, exact_published: DeletionCircuits) -> Iterator[World]:
    operator = StatementSigner.generate()
    server = serve(tmp_path, exact_published, operator)
    yield World(server, exact_published, operator, tmp_path)
    server.stop(0)


def test_the_marked_blocks_are_the_quick_start_the_recovery_and_the_low_level_download() -> None:
    text = GUIDE.read_text()
    blocks = runnable_blocks()
    assert len(blocks) == len(re.findall(r"^<!-- runs: ", text, re.M)) == 5  # none malformed
    assert text.index("## Quick start") < text.index("<!-- runs: quick start -->") < text.index("## 1.")
    assert "EdgeDevice.connect" in blocks[1]
    assert "reenroll_model" in blocks[3]
    assert "fetch_published" in blocks[4]


def test_the_guide_runs_against_a_provider(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "reader"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    stop, issued = threading.Event(), []

    def operator() -> None:
        """Issue one deletion to the model's clients once the guide's device has enrolled."""
        while not stop.is_set() and world.server.state.summary().clients == 0:
            time.sleep(0.2)
        if not stop.is_set():
            with OperatorClient(world.address, world.operator, timeout_s=60.0) as client:
                order = DeletionOrder(MODEL, (), ForgetSelection(forget_class=7), MaskOptions())
                issued.extend(client.create_requests(order).requests)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    namespace: dict[str, Any] = {"PROVIDER_ADDRESS": world.address, "PROVIDER_KEY": world.key}
    try:
        for i, block in enumerate(runnable_blocks()):
            exec(compile(block, f"{GUIDE}, runnable block {i + 1}", "exec"), namespace)
    finally:
        stop.set()
        thread.join(60)
        if "transport" in namespace:
            namespace["transport"].close()
    assert len(issued) == 1
    assert world.server.state.summary().accepted_submissions == 1
    # The recovery block re-enrolled the device: the log's second leaf records the rotation.
    assert world.server.service.ledger.size == 2
    assert b"zkunlearn/v1/re-enrollment" in world.server.service.ledger.leaf(1).canonical
    # The low-level download derived the circuit the provider verifies with: the same verifying keys.
    assert world.circuits.exact is not None
    _spec, deletion, enrollment = world.circuits.exact
    assert namespace["deletion_circuit"].vk.read_bytes() == deletion.vk.read_bytes()
    assert namespace["enrollment_circuit"].vk.read_bytes() == enrollment.vk.read_bytes()
