"""An exact analytic-head device that lost its committed state recovers by re-enrolling its head.

A provider on loopback publishes the exact analytic head (the smallest shape, d 4, k 3); the device
connects through the one-call client, enrolls its head, answers a deletion, loses its committed
folder, is refused a plain enrollment, re-enrolls with ``reenroll_head`` (refused for a readable state
unless asked), answers the next deletion from the fresh state, and the offline audit passes with the
rotation in the log.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from zkunlearn.circuits.mask import Mask
from zkunlearn.client import DeviceError, EdgeDevice
from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
from zkunlearn.proofs.audit import audit_bundle
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.served import publication
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.models import TensorData
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.provider.verification import EzklVerifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.analytic_exact_cases import digits_features
from tests.fakes import loopback_settings

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc]

SPEC = ExactAnalyticSpec(4, 3, 2)
MODEL = "digits-head"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ProviderServer, DeletionCircuits, Path]]:
    tmp = tmp_path_factory.mktemp("head-recovery")
    circuits = DeletionCircuits.build(tmp / "published", group_obs=None, analytic=None, analytic_exact=SPEC)
    artifacts = {
        cid: {n: str(p) for n, p in files.items()} for cid, files in publication(MODEL, circuits).items()
    }
    config = ProviderConfig.load(None, loopback_settings(tmp, model_ids=[MODEL], artifacts=artifacts))
    server = build_server(config, verifier=EzklVerifier({MODEL: circuits.directory}))
    yield server, circuits, tmp
    server.stop(0)


def _forget(server: ProviderServer, client_id: str, x: np.ndarray, y: np.ndarray) -> str:
    labels = y.astype(np.float64)
    return server.service.create_request(
        client_id,
        Mask(()),
        forget_features=TensorData(x.shape, x.astype("<f8").tobytes()),
        forget_labels=TensorData(labels.shape, labels.astype("<f8").tobytes()),
    ).request_id


def test_a_head_device_that_lost_its_state_reenrolls_and_answers_the_next_deletion(
    served: tuple[ProviderServer, DeletionCircuits, Path],
) -> None:
    server, circuits, tmp = served
    x, y = digits_features(SPEC, 60)
    state = tmp / "device"
    key = server.service.signer.public_bytes().hex()

    def connect() -> EdgeDevice:
        return EdgeDevice.connect(
            f"127.0.0.1:{server.port}",
            MODEL,
            provider_key=key,
            state_dir=state,
            allow_insecure_srs=True,
            console=Console(file=io.StringIO()),
        )

    with connect() as device:
        with pytest.raises(DeviceError, match="never enrolled: use enroll_head"):
            device.reenroll_head(x, y)
        device.enroll_head(x, y)
        first = _forget(server, device.client_id, x[:2], y[:2])
        assert [o.status for o in device.run(max_requests=1, timeout_s=120)] == ["accepted"]
        # A readable state is not discarded unless asked.
        with pytest.raises(DeviceError, match="readable committed state"):
            device.reenroll_head(x[2:], y[2:])
        client_id = device.client_id
    shutil.rmtree(state / "committed")  # the state is lost
    with connect() as device:
        with pytest.raises(DeviceError, match="cannot read committed state"):
            device.enroll_head(x[2:], y[2:])
        enrollment = device.reenroll_head(x[2:], y[2:])  # the head as it stands after the deletion
        assert enrollment.commitments > 0
        second = _forget(server, client_id, x[2:4], y[2:4])
        assert [o.status for o in device.run(max_requests=1, timeout_s=120)] == ["accepted"]
        scores = np.asarray(device.predict(x[4:]))
        assert scores.shape == (56, SPEC.k)
    for request_id in (first, second):
        record = server.state.get_request(request_id)
        assert record is not None
        assert record.accepted_submission_id is not None

    service = server.service
    bundle = export_bundle(
        server.state,
        service.ledger,
        service.signer.public_bytes(),
        tmp / "bundle",
        circuits_dir=circuits.directory,
    )
    report = audit_bundle(bundle, provider_public_key=service.signer.public_bytes())
    assert report.ok, report.failures
    assert any(item.reason.startswith(f"re-enrollment of client {client_id}") for item in report.items)
