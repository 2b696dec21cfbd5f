"""The edge client trusts nothing the provider serves about the circuit it proves.

A provider could serve settings that make the client's weights public instances, a compiled circuit
whose outputs are the weights, a spec without blinding rows, or a download that never ends. The client
derives its circuit from the published spec itself, checks the settings' run arguments, refuses too
little blinding, and bounds every download. Real ezkl keys (a small Group-OBS circuit) and real gRPC.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ezkl
import grpc
import pytest
import torch
from zkunlearn.client.artifacts import ArtifactDownloadError, fetch_artifact
from zkunlearn.client.published import fetch_published
from zkunlearn.client.transport import ChannelConfig, Transport, TransportError, open_channel
from zkunlearn.proofs.artifacts import ArtifactError, client_artifacts
from zkunlearn.proofs.deletion import DeletionCircuits, GroupObsSpec
from zkunlearn.provider.server import ProviderConfig, build_server
from zkunlearn.v1 import provider_pb2 as pb
from zkunlearn.v1 import provider_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_POLICY, FakeVerifier  # noqa: E402

if TYPE_CHECKING:
    from tests.conftest import SharedCircuits

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc]

SPEC = GroupObsSpec(block=16, m=8, batch=1, lam=0.1)
MiB = 1 << 20


@dataclass(frozen=True)
class Published:
    directory: Path
    index: dict[str, Any]
    settings: Path
    compiled: Path
    vk: Path
    srs: Path
    other_compiled: Path  # a different circuit, compiled with sound run args: what a hostile provider serves


class _Sum(torch.nn.Module):
    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.sum(dim=1, keepdim=True)  # "outputs" that reveal the committed inputs' sum


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, shared_circuits: SharedCircuits) -> Published:
    root = tmp_path_factory.mktemp("trust")
    circuits = shared_circuits.build(group_obs=SPEC)
    assert circuits.group_obs is not None
    arts = circuits.group_obs[1]
    onnx = root / "sum.onnx"
    torch.onnx.export(
        _Sum(),
        (torch.zeros(1, 4),),
        str(onnx),
        input_names=["theta"],
        output_names=["y"],
        opset_version=17,
        dynamo=False,
    )
    ra = ezkl.PyRunArgs()
    ra.input_visibility = "polycommit"
    ra.output_visibility = "public"
    ra.param_visibility = "fixed"
    ra.logrows = 10
    other_settings, other_compiled = root / "sum.settings.json", root / "sum.compiled"
    assert ezkl.gen_settings(str(onnx), str(other_settings), py_run_args=ra)
    assert ezkl.compile_circuit(str(onnx), str(other_compiled), str(other_settings))
    index = json.loads((circuits.directory / "circuits.json").read_text())
    return Published(
        circuits.directory, index, arts.settings, arts.compiled, arts.vk, arts.srs.path, other_compiled
    )


def _serve_and_fetch(
    tmp: Path,
    pub: Published,
    *,
    compiled: Path | None = None,
    settings: bytes | None = None,
    spec_changes: dict[str, Any] | None = None,
) -> Any:
    """Serve ``pub`` (with the given substitutions) over gRPC and run the device's download."""
    index = json.loads(json.dumps(pub.index))
    index["group_obs"]["spec"].update(spec_changes or {})
    index_path, settings_path = tmp / "served-index.json", tmp / "served-settings.json"
    index_path.write_text(json.dumps(index))
    settings_path.write_bytes(pub.settings.read_bytes() if settings is None else settings)
    config = ProviderConfig.load(
        None,
        {
            **ALL_KINDS_POLICY,
            "listen": "127.0.0.1:0",
            "state": str(tmp / "p.db"),
            "key_file": str(tmp / "p.key"),
            "artifacts": {
                "m/group_obs": {
                    "index": str(index_path),
                    "compiled": str(compiled or pub.compiled),
                    "settings": str(settings_path),
                    "srs": str(pub.srs),
                }
            },
        },
    )
    server = build_server(config, verifier=FakeVerifier())
    try:
        with Transport(ChannelConfig(f"127.0.0.1:{server.port}", retry_attempts=1)) as transport:
            published = fetch_published(
                transport, "m", tmp / "client", kinds=("group_obs",), allow_insecure_srs=True
            )
            return published.spec, published.circuits[0]
    finally:
        server.stop(0)


# ---- the circuit the client proves -----------------------------------------------------------------


def test_client_compiles_the_spec_itself_and_ignores_served_compiled_bytes(
    published: Published, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider serves another circuit's compiled bytes; the client's keys are still the spec's."""
    with caplog.at_level(logging.WARNING):
        spec, circuit = _serve_and_fetch(tmp_path, published, compiled=published.other_compiled)
    assert spec == SPEC
    assert circuit.compiled.read_bytes() != published.other_compiled.read_bytes()
    assert circuit.vk.read_bytes() == published.vk.read_bytes()
    # (d): the development SRS is flagged on the client too, not only where it was generated.
    assert any("INSECURE development SRS" in r.getMessage() for r in caplog.records)


def test_garbage_compiled_bytes_do_not_matter(published: Published, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.compiled"
    garbage.write_bytes(b"\x00not a circuit" * 100)
    _spec, circuit = _serve_and_fetch(tmp_path, published, compiled=garbage)
    assert circuit.vk.read_bytes() == published.vk.read_bytes()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("input_visibility", "Public"),
        ("input_visibility", "Hashed"),
        ("output_visibility", "Private"),
        ("param_visibility", "Private"),
        ("ignore_range_check_inputs_outputs", True),
    ],
)
def test_served_settings_with_unsound_run_args_are_refused(
    published: Published, tmp_path: Path, key: str, value: Any
) -> None:
    """Public input visibility would put the client's weights in the proof's public instances."""
    settings = json.loads(published.settings.read_text())
    settings["run_args"][key] = value
    with pytest.raises(ArtifactError, match=f"run_args {key} is"):
        _serve_and_fetch(tmp_path, published, settings=json.dumps(settings).encode())
    assert not (tmp_path / "client" / "circuit" / "group_obs" / "pk.key").exists()


def test_client_artifacts_refuses_public_input_settings(published: Published, tmp_path: Path) -> None:
    """The compiled-bytes entry point (for trusted artifacts) checks the settings too."""
    settings = json.loads(published.settings.read_text())
    settings["run_args"]["input_visibility"] = "Public"
    circuits = DeletionCircuits.load(published.directory)
    assert circuits.group_obs is not None
    with pytest.raises(ArtifactError, match="input_visibility"):
        client_artifacts(
            published.compiled.read_bytes(),
            json.dumps(settings).encode(),
            circuits.group_obs[1].srs,
            tmp_path / "client",
        )


@pytest.mark.parametrize("n_blind", [0, 3])
def test_spec_without_enough_blinding_is_refused(published: Published, tmp_path: Path, n_blind: int) -> None:
    with pytest.raises(ArtifactError, match="n_blind"):
        _serve_and_fetch(tmp_path, published, spec_changes={"n_blind": n_blind})


# ---- downloads ----------------------------------------------------------------------------------------


class _Lying(pb_grpc.ProviderServicer):
    """Announces ``total`` bytes, then streams ``chunks`` chunks of 1 MiB, watching the client's files."""

    def __init__(self, watch: Path, total: int, chunks: int) -> None:
        self.watch, self.total, self.chunks = watch, total, chunks
        self.sent, self.largest = 0, 0

    def GetArtifact(self, request: Any, context: Any) -> Iterator[pb.ArtifactChunk]:  # noqa: N802
        for i in range(self.chunks):
            for f in self.watch.glob("*"):
                self.largest = max(self.largest, f.stat().st_size)
            self.sent += 1
            digest = "0" * 64 if i == 0 else ""
            yield pb.ArtifactChunk(total_bytes=self.total, sha256=digest, data=b"\0" * MiB)


@pytest.fixture
def lying(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[_Lying, Transport, Path]]:
    total, chunks = request.param
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    servicer = _Lying(folder, total, chunks)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ProviderServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Transport(ChannelConfig(f"127.0.0.1:{port}", retry_attempts=1)) as transport:
            yield servicer, transport, folder
    finally:
        server.stop(0)


@pytest.mark.parametrize("lying", [(10, 64)], indirect=True)
def test_download_longer_than_announced_is_aborted_early(lying: tuple[_Lying, Transport, Path]) -> None:
    servicer, transport, folder = lying
    with pytest.raises(ArtifactDownloadError, match="more than the 10 bytes"):
        fetch_artifact(transport, "c", "settings", folder / "settings")
    assert servicer.largest <= 10 + MiB  # never more than one chunk past the announced size
    assert servicer.sent < 64  # the stream was cancelled, not drained
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("lying", [(5 << 30, 1)], indirect=True)
def test_announced_total_over_the_cap_is_refused(lying: tuple[_Lying, Transport, Path]) -> None:
    _servicer, transport, folder = lying
    with pytest.raises(ArtifactDownloadError, match="over the limit"):
        fetch_artifact(transport, "c", "srs", folder / "srs")  # default cap: 4 GiB
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("lying", [(2 * MiB, 2)], indirect=True)
def test_max_bytes_keyword_caps_the_total(lying: tuple[_Lying, Transport, Path]) -> None:
    servicer, transport, folder = lying
    with pytest.raises(ArtifactDownloadError, match="over the limit of 1024"):
        fetch_artifact(transport, "c", "srs", folder / "srs", max_bytes=1024)
    assert servicer.largest == 0
    assert list(folder.iterdir()) == []


# ---- transport ----------------------------------------------------------------------------------------


def test_server_name_override_without_root_certs_is_refused() -> None:
    """It is a TLS option: without root certificates the channel would silently be plaintext."""
    config = ChannelConfig("127.0.0.1:1", server_name_override="provider.example")
    with pytest.raises(TransportError, match="root_certs_file"):
        open_channel(config)
    with pytest.raises(TransportError, match="root_certs_file"):
        Transport(config)
