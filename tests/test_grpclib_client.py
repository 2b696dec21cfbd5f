"""A second client written only from the .proto files and docs/wire.md: grpclib, no zkunlearn imports.

The client runs in a subprocess whose code never imports zkunlearn: messages and stubs are generated
from copies of provider.proto and operator.proto into a temporary folder; signing, statement checks,
the mask decoder and the RFC 9162 verifiers are written here from docs/wire.md, with `cryptography`
for Ed25519. It enrolls, polls a request the test creates, answers it (a wrong proof first, then the
right one), watches the stream for a request an operator issues through the Operator service, checks
each request's signature, mask digest and signed delivery cursor, answers it, checks the signed
receipts, their inclusion under a signed tree head and the log's consistency between sizes, and reads
the log back through the Operator service with the operator's key. The proofs are the ones
`tests.fakes.FakeVerifier` accepts, rebuilt from that file's documented format.
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
from zkunlearn.proofs.statements import StatementSigner
from zkunlearn.provider.operator import DeletionOrder
from zkunlearn.provider.operator_client import OperatorClient
from zkunlearn.provider.planning import ForgetSelection, MaskOptions
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.v1 import provider_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_POLICY, FakeVerifier  # noqa: E402

pytestmark = pytest.mark.grpc

CLIENT = textwrap.dedent(
    r'''
    import asyncio, hashlib, json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from grpclib.client import Channel
    from grpclib.exceptions import GRPCError
    from wire import operator_pb2 as opb
    from wire import provider_pb2 as pb
    from wire.operator_grpc import OperatorStub
    from wire.provider_grpc import ProviderStub

    PREFIX = b"zkunlearn-statement\x00"
    CLIENT = "py-free"
    MAX_INT = 2**53 - 1
    Q = 21888242871839275222246405745257275088696311157297823662689037894645226208583  # BN254 base field

    # -- statements (docs/wire.md: Keys and key ids, Signed statements, Canonical JSON) -------------

    def key_id(public):
        return hashlib.sha256(public).digest()[:16].hex()

    def canonical(payload):
        def check(value):
            assert not isinstance(value, float), "floats are not canonical"
            if isinstance(value, int) and not isinstance(value, bool):
                assert -MAX_INT <= value <= MAX_INT, "integer out of range"
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
            for item in items:
                check(item)
        check(payload)
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def sign(key, domain, payload):
        public = key.public_key().public_bytes_raw()
        body = canonical(dict(payload, version=1, key_id=key_id(public)))
        statement = PREFIX + domain.encode() + b"\x00" + body
        return statement, key.sign(statement)

    def refuse(text):
        raise ValueError("not canonical: " + text)

    def unique(pairs):
        out = dict(pairs)
        assert len(out) == len(pairs), "duplicate JSON key"
        return out

    def open_statement(public, domain, statement, signature, fields=None):
        """Verify as the document says; with `fields`, the payload must hold exactly those (and
        version, key_id)."""
        assert len(signature) == 64 and len(statement) <= 8 * 1024 * 1024
        head = PREFIX + domain.encode() + b"\x00"
        assert statement.startswith(head), "wrong framing or domain"
        body = statement[len(head):]
        payload = json.loads(body.decode("utf-8"), parse_float=refuse, parse_constant=refuse,
                             object_pairs_hook=unique)
        assert isinstance(payload, dict) and canonical(payload) == body, "payload is not canonical JSON"
        assert payload["key_id"] == key_id(public), "signed by another key"
        Ed25519PublicKey.from_public_bytes(public).verify(signature, statement)  # raises if forged
        assert type(payload["version"]) is int and payload["version"] == 1
        if fields is not None:
            assert set(payload) == set(fields) | {"version", "key_id"}, sorted(payload)
        return payload

    # -- the mask (docs/wire.md: Mask) -----------------------------------------------------------

    def decode_mask(data):
        """Layer names and the number of masked weights; refuses what a strict decoder refuses."""
        pos = 0
        def varint():
            nonlocal pos
            value = 0
            for i in range(10):
                byte = data[pos]
                pos += 1
                value |= (byte & 0x7F) << (7 * i)
                if not byte & 0x80:
                    assert not (byte == 0 and i > 0), "non-minimal varint"
                    assert value < 2**63
                    return value
            raise AssertionError("varint longer than 10 bytes")
        assert data[:4] == b"ZKUM"
        pos = 4
        assert varint() == 1
        names, masked, previous = [], 0, b""
        for _ in range(varint()):
            length = varint()
            name = data[pos:pos + length]
            pos += length
            assert 1 <= length <= 256 and name > previous, "layers out of order"
            previous = name
            dims = [varint() for _ in range(varint())]
            numel = 1
            for d in dims:
                assert d >= 1
                numel *= d
            size = varint()
            blocks, last = -(-numel // size), -1
            for _ in range(varint()):
                block = varint()
                assert last < block < blocks
                last = block
                span, offsets = min(size, numel - block * size), [varint() for _ in range(varint())]
                assert offsets and offsets == sorted(set(offsets)) and offsets[-1] < span
                masked += len(offsets)
            names.append(name.decode("utf-8"))
        assert pos == len(data), "trailing bytes"
        return names, masked

    # -- the log (docs/wire.md: The receipt log (RFC 9162)) ----------------------------------------

    def leaf_hash(data):
        return hashlib.sha256(b"\x00" + data).digest()

    def node(left, right):
        return hashlib.sha256(b"\x01" + left + right).digest()

    def root_of(leaves):
        if len(leaves) == 1:
            return leaves[0]
        k = 1
        while k * 2 < len(leaves):
            k *= 2
        return node(root_of(leaves[:k]), root_of(leaves[k:]))

    def verify_inclusion(leaf, index, size, proof, root):
        if index >= size:
            return False
        fn, sn, r = index, size - 1, leaf
        for p in proof:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                r = node(p, r)
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
            else:
                r = node(r, p)
            fn >>= 1
            sn >>= 1
        return sn == 0 and r == root

    def verify_consistency(first, second, first_root, second_root, proof):
        if first == 0 or first > second:
            return False
        if first == second:
            return not proof and first_root == second_root
        if not proof:
            return False
        if first & (first - 1) == 0:
            proof = [first_root, *proof]
        fn, sn = first - 1, second - 1
        while fn & 1:
            fn >>= 1
            sn >>= 1
        fr = sr = proof[0]
        for c in proof[1:]:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                fr, sr = node(c, fr), node(c, sr)
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
            else:
                sr = node(sr, c)
            fn >>= 1
            sn >>= 1
        return sn == 0 and fr == first_root and sr == second_root

    # -- what tests/fakes.py's FakeVerifier accepts, rebuilt from that file ------------------------

    def point_from_tag(tag):
        """A compressed BN254 G1 point (docs/wire.md: Commitments) by try-and-increment."""
        counter = 0
        while True:
            x = int.from_bytes(hashlib.sha256(tag + counter.to_bytes(4, "big")).digest(), "big") % Q
            rhs = (pow(x, 3, Q) + 3) % Q
            y = pow(rhs, (Q + 1) // 4, Q)
            if y * y % Q == rhs:
                raw = bytearray(x.to_bytes(32, "little"))
                raw[-1] |= 0x80 if y & 1 else 0
                return raw.hex()
            counter += 1

    def fake_answer(request, before):
        after = [{"name": "theta_after", "block": i, "point_hex": point_from_tag(
            (request.request_id + json.dumps(before, sort_keys=True) + str(i)).encode())} for i in range(2)]
        proofs = []
        for i in range(2):
            body = json.dumps({"before": before, "after": after, "block": i}, sort_keys=True).encode()
            proofs.append(hashlib.sha256(b"zkunlearn-fake-proof\x00" + request.canonical + b"\x00"
                                         + request.mask + b"\x00" + body).digest())
        return after, proofs

    # -- the client --------------------------------------------------------------------------------

    class Client:
        def __init__(self, stub, provider_key):
            self.stub, self.provider, self.key = stub, provider_key, Ed25519PrivateKey.generate()
            self.public = self.key.public_key().public_bytes_raw()

        async def auth(self, rpc, fields):
            challenge = await self.stub.Challenge(pb.ChallengeRequest(client_id=CLIENT))
            statement, signature = sign(self.key, "zkunlearn/v1/rpc-auth",
                                        dict(fields, client_id=CLIENT, rpc=rpc, nonce=challenge.nonce.hex()))
            return pb.ClientAuth(client_id=CLIENT, nonce=challenge.nonce, signature=signature,
                                 canonical=statement)

        def check_request(self, r):
            """docs/wire.md: What a client checks on each delivered request."""
            p = open_statement(self.provider, "zkunlearn/v1/deletion-request", r.canonical, r.signature, [
                "request_id", "client_id", "model_id", "update_kind", "layers", "mask_sha256", "mask_bytes",
                "forget", "issued_ms", "expires_ms", "nonce"])
            assert (p["request_id"], p["client_id"], p["model_id"], p["update_kind"]) == (
                r.request_id, CLIENT, "m1", 1)
            d = open_statement(self.provider, "zkunlearn/v1/delivery", r.delivery, r.delivery_signature,
                               ["request_id", "client_id", "cursor", "request_sha256"])
            assert d == dict(d, request_id=r.request_id, client_id=CLIENT, cursor=r.cursor,
                             request_sha256=hashlib.sha256(r.canonical).hexdigest())
            assert 0 < r.cursor <= MAX_INT
            assert hashlib.sha256(r.mask).hexdigest() == p["mask_sha256"] and len(r.mask) == p["mask_bytes"]
            layers, masked = decode_mask(r.mask)
            assert layers == p["layers"] and p["forget"] is None
            return p, masked

        async def submit(self, r, before, tamper=False):
            after, proofs = fake_answer(r, before)
            if tamper:
                proofs[0] = bytes([proofs[0][0] ^ 1]) + proofs[0][1:]
            blob, sizes = b"".join(proofs), [len(p) for p in proofs]
            digest = hashlib.sha256(blob).hexdigest()
            auth = await self.auth("SubmitProof", {
                "request_id": r.request_id, "update_kind": 1, "sha256": digest, "total_bytes": len(blob),
                "proof_sizes": sizes, "after_commitments": after})
            header = pb.ProofHeader(
                version=1, request_id=r.request_id, client_id=CLIENT, update_kind=pb.UPDATE_KIND_GROUP_OBS,
                after_commitments=[pb.Commitment(**c) for c in after], proof_count=len(proofs),
                total_bytes=len(blob), sha256=digest, auth=auth, proof_sizes=sizes)
            data = [pb.ProofChunk(data=blob[i:i + 40]) for i in range(0, len(blob), 40)]  # any chunking
            chunks = [pb.ProofChunk(header=header), *data]
            answer = await self.stub.SubmitProof(chunks)
            assert answer.verdict in (pb.VERDICT_ACCEPTED, pb.VERDICT_REJECTED) and answer.HasField("receipt")
            self.check_receipt(answer.receipt, answer.verdict, r, before, after, digest)
            return answer, after

        def check_receipt(self, receipt, verdict, r, before, after, proof_sha256):
            p = open_statement(self.provider, "zkunlearn/v1/receipt", receipt.canonical, receipt.signature, [
                "request_id", "request_sha256", "client_id", "model_id", "submission_id", "update_kind",
                "verdict", "reason", "mask_sha256", "proof_sha256", "before_commitments",
                "after_commitments", "verified_ms"])
            names = {pb.VERDICT_ACCEPTED: "accepted", pb.VERDICT_REJECTED: "rejected"}
            assert p == dict(p, request_id=r.request_id, client_id=CLIENT, proof_sha256=proof_sha256,
                             request_sha256=hashlib.sha256(r.canonical).hexdigest(), after_commitments=after,
                             before_commitments=before, mask_sha256=hashlib.sha256(r.mask).hexdigest(),
                             verdict=names[verdict])
            return p

        async def head(self):
            h = await self.stub.GetTreeHead(pb.GetTreeHeadRequest())
            p = open_statement(self.provider, "zkunlearn/v1/tree-head", h.canonical, h.signature,
                               ["tree_size", "root_hash", "timestamp_ms"])
            return p["tree_size"], bytes.fromhex(p["root_hash"]), h.canonical

    async def main(port, work):
        operator = Ed25519PrivateKey.from_private_bytes(bytes.fromhex((work / "operator.key").read_text()))
        async with Channel("127.0.0.1", port) as channel:
            stub, ops = ProviderStub(channel), OperatorStub(channel)
            info = await stub.GetInfo(pb.GetInfoRequest())
            assert info.provider_key_id == key_id(info.provider_public_key)
            client = Client(stub, info.provider_public_key)
            commitments = [{"name": "theta:fc1", "block": b, "point_hex": point_from_tag(b"py-free/%d" % b)}
                           for b in range(2)]
            enrollment = {"client_id": CLIENT, "public_key": client.public.hex(), "model_id": "m1",
                          "layers": ["fc1"], "update_kind": 1, "commitments": commitments}
            statement, signature = sign(client.key, "zkunlearn/v1/enrollment", enrollment)
            await stub.Enroll(pb.EnrollRequest(
                version=1, client_id=CLIENT, public_key=client.public, model_id="m1", layers=["fc1"],
                update_kind=pb.UPDATE_KIND_GROUP_OBS, commitments=[pb.Commitment(**c) for c in commitments],
                proof_of_possession=signature, canonical=statement))

            # 1. Poll the request the test creates; a replayed auth is refused with a status.
            requests = []
            for _ in range(400):
                a = await client.auth("PollRequests", {"after_cursor": 0, "max_items": 10})
                requests = (await stub.PollRequests(pb.PollRequest(auth=a, max_items=10))).requests
                if requests:
                    break
                await asyncio.sleep(0.05)
            r1 = requests[0]
            client.check_request(r1)
            a = await client.auth("PollRequests", {"after_cursor": 0, "max_items": 10})
            await stub.PollRequests(pb.PollRequest(auth=a, max_items=10))
            try:
                await stub.PollRequests(pb.PollRequest(auth=a, max_items=10))
                replay = "accepted"
            except GRPCError as exc:
                replay = exc.status.name
            held, verdicts, heads, receipts = commitments, [], [], []
            for tamper in (True, False):  # a wrong answer is judged and logged too
                answer, after = await client.submit(r1, held, tamper=tamper)
                verdicts.append(answer.verdict)
                receipts.append(answer.receipt)
                heads.append(await client.head())
            held = after

            # 2. Watch for the operator's request.
            async with stub.WatchRequests.open() as stream:
                a = await client.auth("WatchRequests", {"after_cursor": r1.cursor})
                await stream.send_message(pb.WatchRequest(auth=a, after_cursor=r1.cursor), end=True)
                (work / "watching").write_text("")
                r2 = await asyncio.wait_for(stream.recv_message(), 30)
                await stream.cancel()
            p2, masked = client.check_request(r2)
            answer, after = await client.submit(r2, held)
            verdicts.append(answer.verdict)
            receipts.append(answer.receipt)
            heads.append(await client.head())
            got = await stub.GetReceipt(pb.GetReceiptRequest(request_id=r2.request_id, client_id=CLIENT))
            assert got.verdict == pb.VERDICT_ACCEPTED and got.receipt == answer.receipt
            got = await stub.GetReceipt(pb.GetReceiptRequest(request_id=r1.request_id, client_id=CLIENT))
            assert got.receipt == receipts[1]  # the accepted answer, not the later-logged rejection

            # 3. Every receipt is in the log under the latest signed head; the log only grew.
            size, root, head_statement = heads[-1]
            leaves = [leaf_hash(r.canonical) for r in receipts]
            for r in receipts:
                asked = pb.InclusionProofRequest(leaf_index=r.leaf_index, tree_size=size)
                path = list((await stub.GetInclusionProof(asked)).hashes)
                assert verify_inclusion(leaf_hash(r.canonical), r.leaf_index, size, path, root)
                assert not verify_inclusion(leaf_hash(r.canonical + b"x"), r.leaf_index, size, path, root)
            consistent = []
            for first, first_root, _ in heads[:-1]:
                asked = pb.ConsistencyProofRequest(first_size=first, second_size=size)
                proof = list((await stub.GetConsistencyProof(asked)).hashes)
                assert verify_consistency(first, size, first_root, root, proof)
                assert not verify_consistency(first, size, leaf_hash(b"forged"), root, proof)
                consistent.append([first, size, len(proof)])
            assert heads[0][1] == leaves[0] and root == root_of(leaves)

            # 4. The operator reads the same log and head back (docs/wire.md: Operator call authentication).
            async def operator_auth(rpc, fields):
                public = operator.public_key().public_bytes_raw()
                nonce = (await ops.Challenge(opb.OperatorChallengeRequest(key_id=key_id(public)))).nonce
                statement, signature = sign(operator, "zkunlearn/v1/operator-auth",
                                            dict(fields, rpc=rpc, nonce=nonce.hex()))
                return opb.OperatorAuth(key_id=key_id(public), nonce=nonce, canonical=statement,
                                        signature=signature)
            listed = await ops.ListReceipts(opb.ListReceiptsRequest(
                auth=await operator_auth("ListReceipts", {"start": 0, "max_items": 0})))
            assert [e.receipt.canonical for e in listed.receipts] == [r.canonical for r in receipts]
            status = await ops.GetStatus(opb.GetStatusRequest(auth=await operator_auth("GetStatus", {})))
            assert status.tree_head.canonical == head_statement

        print(json.dumps({
            "requests": [r1.request_id, r2.request_id], "cursors": [r1.cursor, r2.cursor], "replay": replay,
            "verdicts": [pb.Verdict.Name(v) for v in verdicts],
            "leaf_indices": [r.leaf_index for r in receipts],
            "head_sizes": [h[0] for h in heads], "consistency": consistent, "log_size": listed.log_size,
            "watched_mask": {"sha256": p2["mask_sha256"], "masked": masked, "layers": p2["layers"]},
            "status": [status.requests, status.answered_requests, status.rejected_submissions],
            "zkunlearn_imported": any(m.startswith("zkunlearn") for m in sys.modules)}))

    asyncio.run(main(int(sys.argv[2]), Path(sys.argv[3])))
    '''
)


@pytest.fixture
def operator_key() -> StatementSigner:
    return StatementSigner.generate()


@pytest.fixture
def provider(tmp_path: Path, operator_key: StatementSigner) -> Iterator[ProviderServer]:
    cfg = ProviderConfig.load(
        None,
        {
            **ALL_KINDS_POLICY,
            "listen": "127.0.0.1:0",
            "state": str(tmp_path / "p.db"),
            "key_file": str(tmp_path / "p.key"),
            "submit_wait_s": 10.0,
            "watch_poll_s": 0.2,
            "operator.public_keys": [operator_key.public_bytes().hex()],
            "planners.m1.factory": "tests.operator_cases:planner",
        },
    )
    server = build_server(cfg, verifier=FakeVerifier())
    yield server
    server.stop(0)


def _generate(out: Path) -> None:
    """Python messages and grpclib stubs from copies of both .proto files (operator.proto's import of
    provider.proto pointed at the copy, so nothing is generated under a ``zkunlearn`` package)."""
    plugin = Path(sys.executable).parent / "protoc-gen-grpclib_python"
    if not plugin.exists():
        pytest.fail(f"grpclib's protoc plugin is missing at {plugin} (dev dependency grpclib)")
    (out / "wire").mkdir(parents=True)
    protos = ROOT / "protos" / "zkunlearn" / "v1"
    shutil.copy(protos / "provider.proto", out / "wire" / "provider.proto")
    operator = (protos / "operator.proto").read_text()
    imported = 'import "zkunlearn/v1/provider.proto";'
    assert imported in operator
    (out / "wire" / "operator.proto").write_text(operator.replace(imported, 'import "wire/provider.proto";'))
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
            "wire/operator.proto",
        ],
        check=True,
    )


def _wait(proc: subprocess.Popen[bytes], done: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (done() if callable(done) else done):
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"the client exited before {what}: {err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_grpclib_client_from_the_protos_and_wire_md_runs_the_whole_protocol(
    provider: ProviderServer, operator_key: StatementSigner, tmp_path: Path
) -> None:
    gen = tmp_path / "gen"
    _generate(gen)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    (tmp_path / "operator.key").write_text(operator_key.private_bytes().hex())
    proc = subprocess.Popen(
        [sys.executable, str(script), str(gen), str(provider.port), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        _wait(proc, lambda: provider.service.state.get_client("py-free") is not None, "enrolling")
        dense = np.zeros((4, 8), dtype=bool)
        dense[1, 1] = True
        r1 = provider.service.create_request("py-free", Mask.from_dense({"fc1": dense}, 16))
        _wait(proc, (tmp_path / "watching").exists, "watching")
        order = DeletionOrder("m1", ("py-free",), ForgetSelection(forget_class=1), MaskOptions())
        with OperatorClient(f"127.0.0.1:{provider.port}", operator_key, timeout_s=30.0) as operator:
            [created] = operator.create_requests(order).requests
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result == {
        "requests": [r1.request_id, created.request_id],
        "cursors": [1, 2],
        "replay": "UNAUTHENTICATED",
        "verdicts": ["VERDICT_REJECTED", "VERDICT_ACCEPTED", "VERDICT_ACCEPTED"],
        "leaf_indices": [0, 1, 2],
        "head_sizes": [1, 2, 3],
        "consistency": [[1, 3, 2], [2, 3, 1]],
        "log_size": 3,
        "watched_mask": {"sha256": created.mask_sha256, "masked": created.masked_weights, "layers": ["fc1"]},
        "status": [2, 2, 1],
        "zkunlearn_imported": False,
    }
    assert created.masked_weights == 8  # a quarter of fc1's 32 weights, the planner's default
    head = provider.service.tree_head()
    assert head.size == 3
    receipt = provider.service.receipt(created.request_id, "py-free")
    assert receipt.verdict == pb.VERDICT_ACCEPTED
