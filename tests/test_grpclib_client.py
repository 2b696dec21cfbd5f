"""A second client written only from the .proto and the statement format: grpclib, no zkunlearn imports.

The client runs in a subprocess whose code never imports zkunlearn: messages and stubs are generated
from a copy of provider.proto into a temporary folder, signing uses `cryptography` directly with the
documented statement layout. It enrolls, authenticates with a server nonce, polls a deletion request,
and checks the provider's signature and the mask digest, which shows the wire protocol needs no
Python pickles and no code from this repository.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from zkunlearn.circuits.mask import Mask
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import FakeVerifier  # noqa: E402

pytestmark = pytest.mark.grpc

CLIENT = textwrap.dedent(
    r"""
    import asyncio, hashlib, json, sys
    sys.path.insert(0, sys.argv[1])
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from grpclib.client import Channel
    from grpclib.exceptions import GRPCError
    from wire import provider_pb2 as pb
    from wire.provider_grpc import ProviderStub

    PREFIX = b"zkunlearn-statement\x00"

    def statement(key, domain, payload):
        pub = key.public_key().public_bytes_raw()
        payload = dict(payload, version=1, key_id=hashlib.sha256(pub).digest()[:16].hex())
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        canonical = PREFIX + domain.encode() + b"\x00" + body
        return canonical, key.sign(canonical)

    def open_statement(public, domain, canonical, signature):
        Ed25519PublicKey.from_public_bytes(public).verify(signature, canonical)  # raises if forged
        head = PREFIX + domain.encode() + b"\x00"
        assert canonical.startswith(head), "wrong domain"
        return json.loads(canonical[len(head):])

    async def auth(stub, key, rpc, fields):
        ch = await stub.Challenge(pb.ChallengeRequest(client_id="py-free"))
        canonical, sig = statement(key, "zkunlearn/v1/rpc-auth",
                                   dict(fields, client_id="py-free", rpc=rpc, nonce=ch.nonce.hex()))
        return pb.ClientAuth(client_id="py-free", nonce=ch.nonce, signature=sig, canonical=canonical)

    async def main(port):
        key = Ed25519PrivateKey.generate()
        async with Channel("127.0.0.1", port) as channel:
            stub = ProviderStub(channel)
            info = await stub.GetInfo(pb.GetInfoRequest())
            # a compressed BN254 G1 point (the provider refuses strings that are none)
            commitments = [{"name": "theta", "block": 0,
                            "point_hex": "6df40f3eeb4eaf55d4dcedf989d3137a667f435c5731b67bd96a27b78f30202d"}]
            enrollment = {"client_id": "py-free", "public_key": key.public_key().public_bytes_raw().hex(),
                          "model_id": "m1", "layers": ["fc1"], "update_kind": 1, "commitments": commitments}
            canonical, sig = statement(key, "zkunlearn/v1/enrollment", enrollment)
            await stub.Enroll(pb.EnrollRequest(
                version=1, client_id="py-free", public_key=key.public_key().public_bytes_raw(), model_id="m1",
                layers=["fc1"], update_kind=pb.UPDATE_KIND_GROUP_OBS,
                commitments=[pb.Commitment(**c) for c in commitments],
                proof_of_possession=sig, canonical=canonical))
            print("ENROLLED", flush=True)
            requests = []
            for _ in range(200):
                a = await auth(stub, key, "PollRequests", {"after_cursor": 0, "max_items": 10})
                requests = (await stub.PollRequests(pb.PollRequest(auth=a, max_items=10))).requests
                if requests:
                    break
                await asyncio.sleep(0.05)
            r = requests[0]
            payload = open_statement(info.provider_public_key, "zkunlearn/v1/deletion-request",
                                     r.canonical, r.signature)
            assert hashlib.sha256(r.mask).hexdigest() == payload["mask_sha256"]
            # Replaying an auth is refused with a gRPC status, not a crash.
            a = await auth(stub, key, "PollRequests", {"after_cursor": 0, "max_items": 10})
            await stub.PollRequests(pb.PollRequest(auth=a, max_items=10))
            try:
                await stub.PollRequests(pb.PollRequest(auth=a, max_items=10))
                replay = "accepted"
            except GRPCError as exc:
                replay = exc.status.name
            print(json.dumps({"request_id": r.request_id, "client_id": payload["client_id"],
                              "cursor": r.cursor, "replay": replay,
                              "zkunlearn_imported": any(m.startswith("zkunlearn") for m in sys.modules)}))

    asyncio.run(main(int(sys.argv[2])))
    """
)


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[ProviderServer]:
    cfg = ProviderConfig.load(
        None,
        {"listen": "127.0.0.1:0", "state": str(tmp_path / "p.db"), "key_file": str(tmp_path / "p.key")},
    )
    server = build_server(cfg, verifier=FakeVerifier())
    yield server
    server.stop(0)


def _generate(out: Path) -> None:
    plugin = Path(sys.executable).parent / "protoc-gen-grpclib_python"
    if not plugin.exists():
        pytest.fail(f"grpclib's protoc plugin is missing at {plugin} (dev dependency grpclib)")
    (out / "wire").mkdir(parents=True)
    shutil.copy(ROOT / "protos" / "zkunlearn" / "v1" / "provider.proto", out / "wire" / "provider.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{out}",
            f"--python_out={out}",
            f"--plugin=protoc-gen-grpclib_python={plugin}",
            f"--grpclib_python_out={out}",
            "wire/provider.proto",
        ],
        check=True,
    )


def test_grpclib_client_from_the_proto_enrolls_and_reads_requests(
    provider: ProviderServer, tmp_path: Path
) -> None:
    gen = tmp_path / "gen"
    _generate(gen)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(gen), str(provider.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while provider.service.state.get_client("py-free") is None:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dense = np.zeros((4, 8), dtype=bool)
        dense[1, 1] = True
        r = provider.service.create_request("py-free", Mask.from_dense({"fc1": dense}, 16))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result == {
        "request_id": r.request_id,
        "client_id": "py-free",
        "cursor": 1,
        "replay": "UNAUTHENTICATED",
        "zkunlearn_imported": False,
    }
