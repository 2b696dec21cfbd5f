"""Circuit artifacts published over gRPC: chunked, size- and SHA-256-checked, never a proving key."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from zkunlearn.client.artifacts import fetch_artifact
from zkunlearn.client.transport import ChannelConfig, Transport
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_POLICY, FakeVerifier  # noqa: E402

pytestmark = pytest.mark.grpc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ProviderServer, bytes]]:
    # Larger than one 1 MiB chunk, so reassembly across chunks is exercised.
    payload = bytes(range(256)) * (5 * 1024 + 7)
    (tmp_path / "model.compiled").write_bytes(payload)
    config = ProviderConfig.load(
        None,
        {
            **ALL_KINDS_POLICY,
            "listen": "127.0.0.1:0",
            "state": str(tmp_path / "p.db"),
            "key_file": str(tmp_path / "p.key"),
            "artifacts": {"m/group_obs": {"compiled": str(tmp_path / "model.compiled")}},
        },
    )
    server = build_server(config, verifier=FakeVerifier())
    yield server, payload
    server.stop(0)


def test_fetch_reassembles_and_checks_the_digest(
    served: tuple[ProviderServer, bytes], tmp_path: Path
) -> None:
    server, payload = served
    with Transport(ChannelConfig(f"127.0.0.1:{server.port}")) as transport:
        path = fetch_artifact(transport, "m/group_obs", "compiled", tmp_path / "got" / "model.compiled")
    assert path.read_bytes() == payload


def test_unknown_artifact_is_not_found_and_leaves_no_file(
    served: tuple[ProviderServer, bytes], tmp_path: Path
) -> None:
    server, _ = served
    transport = Transport(ChannelConfig(f"127.0.0.1:{server.port}", retry_attempts=1))
    with transport, pytest.raises(grpc.RpcError) as caught:
        fetch_artifact(transport, "m/group_obs", "pk", tmp_path / "got" / "pk")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert not any((tmp_path / "got").iterdir())


def test_hostile_ids_get_our_own_error_not_a_grpc_trailer_overflow(
    served: tuple[ProviderServer, bytes],
) -> None:
    """Found by fuzzing: echoing a 100 kB id in the status overflowed gRPC's 16 KiB metadata limit."""
    from zkunlearn.v1 import provider_pb2 as pb

    server, _ = served
    with Transport(ChannelConfig(f"127.0.0.1:{server.port}")) as transport:
        huge = "y" * 100_000
        calls = [
            lambda: list(
                transport.stub.GetArtifact(pb.GetArtifactRequest(circuit_id=huge, artifact="compiled"))
            ),
            lambda: transport.stub.GetReceipt(pb.GetReceiptRequest(request_id="r1", client_id=huge)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            err = caught.value
            assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), err.details()
            assert err.details().startswith(("GetArtifact:", "GetReceipt:"))
            assert len(err.details()) <= 1024
