"""The deletion workflow over real gRPC on loopback: happy paths, attacks, restarts and a SIGKILL."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from zkunlearn.bench.postgres import free_port
from zkunlearn.circuits.mask import Mask
from zkunlearn.client.sdk import Commitment, EdgeClient
from zkunlearn.client.store import ClientStore
from zkunlearn.client.transport import ChannelConfig, Transport
from zkunlearn.proofs.backend import point_from_tag
from zkunlearn.proofs.statements import DOMAIN_DELETION_REQUEST, DOMAIN_RPC_AUTH, StatementSigner
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server, load_signer
from zkunlearn.provider.service import ProviderService, ServiceConfig, TensorData
from zkunlearn.provider.state import SqlState
from zkunlearn.v1 import provider_pb2 as pb
from zkunlearn.v1 import provider_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_POLICY, ALL_KINDS_TOML, FakeProver, FakeVerifier  # noqa: E402

pytestmark = pytest.mark.grpc
BEFORE = [
    Commitment("theta", 0, point_from_tag(b"theta")),
    Commitment("gradient_factor", 0, point_from_tag(b"g")),
]


def mask() -> Mask:
    dense = np.zeros((4, 8), dtype=bool)
    dense[0, 1] = dense[2, 5] = True
    return Mask.from_dense({"fc1": dense}, block_size=16)


def start(tmp: Path, port: int = 0, **config: Any) -> ProviderServer:
    cfg = ProviderConfig.load(
        None,
        {
            "listen": f"127.0.0.1:{port}",
            "state": str(tmp / "provider.db"),
            "key_file": str(tmp / "provider.key"),
            "submit_wait_s": 10.0,
            "watch_poll_s": 0.2,
            "grace_s": 0.5,
            "limits.max_message_bytes": 2 * 1024 * 1024,
            "limits.max_proof_bytes": 1024 * 1024,
            **ALL_KINDS_POLICY,
            **config,
        },
    )
    return build_server(cfg, verifier=FakeVerifier())


def channel(port: int) -> ChannelConfig:
    return ChannelConfig(f"127.0.0.1:{port}", call_timeout_s=15.0, retry_attempts=30, retry_max_s=0.5)


def edge(tmp: Path, port: int, name: str = "c", prover: FakeProver | None = None, **kw: Any) -> EdgeClient:
    return EdgeClient(channel(port), ClientStore(tmp / f"{name}.db"), prover or FakeProver(), **kw)


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[ProviderServer]:
    server = start(tmp_path)
    yield server
    server.stop(0)


def enroll(client: EdgeClient, client_id: str = "dev-1", kind: int = 1) -> None:
    client.enroll(client_id, "m1", ["fc1"], kind, BEFORE)


@pytest.mark.parametrize("kind", [1, 2])
def test_enroll_request_apply_submit_receipt_over_grpc(
    provider: ProviderServer, tmp_path: Path, kind: int
) -> None:
    prover = FakeProver()
    client = edge(tmp_path, provider.port, prover=prover)
    enroll(client, kind=kind)
    extra: dict[str, Any] = {}
    if kind == 2:
        x = np.random.default_rng(0).normal(size=(3, 5))
        extra = {
            "forget_features": TensorData((3, 5), x.astype("<f8").tobytes()),
            "forget_labels": TensorData((3, 2), np.zeros((3, 2), "<f8").tobytes()),
        }
    r1 = provider.service.create_request("dev-1", mask(), **extra)
    outcomes = client.poll()
    assert [(o.request_id, o.status) for o in outcomes] == [(r1.request_id, "accepted")]
    # The watch stream delivers the next one.
    r2 = provider.service.create_request("dev-1", mask(), **extra)
    watched = client.watch(max_requests=1)
    assert [(o.request_id, o.status) for o in watched] == [(r2.request_id, "accepted")]
    assert prover.calls == [r1.request_id, r2.request_id]
    assert [r.leaf_index for r in client.store.receipts()] == [0, 1]
    assert client.commitments != BEFORE  # advanced to the accepted after-commitments
    assert client.known_head() is None  # nothing verified yet
    assert client.verify_log() == 2
    # The head it verified under is kept signed: evidence for `audit verify --known-head`.
    held = client.known_head()
    assert held is not None
    from zkunlearn.proofs.statements import SignedStatement, check_tree_head

    signed = check_tree_head(provider.service.signer.verifier(), SignedStatement.from_dict(held))
    assert (signed.size, signed.root.hex()) == (held["size"], held["root"]) == (2, held["root"])
    # Nothing is proved twice: re-polling from the start skips applied requests.
    assert {o.status for o in client.poll_all(from_cursor=0)} == {"skipped"}
    assert len(prover.calls) == 2
    client.close()


def test_client_refuses_forged_and_expired_requests(provider: ProviderServer, tmp_path: Path) -> None:
    prover = FakeProver()
    client = edge(tmp_path, provider.port, prover=prover)
    enroll(client)
    real = provider.service.create_request("dev-1", mask())
    msg = client.transport.stub.PollRequests(
        pb.PollRequest(auth=client.auth("PollRequests", {"after_cursor": 0, "max_items": 1}), max_items=1)
    ).requests[0]
    bad_sig = pb.SignedDeletionRequest()
    bad_sig.CopyFrom(msg)
    bad_sig.signature = bytes(64)
    assert client.process(bad_sig).status == "refused"
    other_mask = pb.SignedDeletionRequest()
    other_mask.CopyFrom(msg)
    dense = np.ones((4, 8), dtype=bool)
    other_mask.mask = Mask.from_dense({"fc1": dense}, 16).to_bytes()
    out = client.process(other_mask)
    assert out.status == "refused"
    assert "mask" in out.reason
    garbage_mask = pb.SignedDeletionRequest()
    garbage_mask.CopyFrom(msg)
    garbage_mask.mask = b"\xff" * 40
    assert client.process(garbage_mask).status == "refused"
    # A well-formed request signed by someone else's key.
    impostor = StatementSigner.generate()
    st = impostor.sign(DOMAIN_DELETION_REQUEST, {"request_id": "evil", "client_id": "dev-1"})
    forged = pb.SignedDeletionRequest(
        request_id="evil", canonical=st.canonical, signature=st.signature, cursor=10**9
    )
    assert "signature refused" in client.process(forged).reason
    assert client.store.cursor == 0  # a forged message cannot make the client skip genuine requests
    assert prover.calls == []
    expired = provider.service.create_request("dev-1", mask(), ttl_s=-1)
    client.store.put("cursor", b"1")
    out = client.poll()[0]
    assert out.request_id == expired.request_id
    assert out.status == "refused"
    assert "expired" in out.reason
    assert prover.calls == []
    # The real request is still answered correctly.
    client.store.put("cursor", b"0")
    assert client.poll()[0].status == "accepted"
    assert prover.calls == [real.request_id]
    client.close()


def _submission(client: EdgeClient, provider: ProviderServer, request_id: str) -> tuple[pb.ProofChunk, bytes]:
    """A hand-built SubmitProof header + payload, as the SDK would send it."""
    msg = client.transport.stub.PollRequests(
        pb.PollRequest(auth=client.auth("PollRequests", {"after_cursor": 0, "max_items": 10}), max_items=10)
    ).requests
    req = client.verify_request(next(m for m in msg if m.request_id == request_id))
    result = FakeProver().prove(req)
    blob = b"".join(result.proofs)
    fields = {
        "request_id": request_id,
        "update_kind": 1,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "total_bytes": len(blob),
        "proof_sizes": [len(p) for p in result.proofs],
        "after_commitments": [c.to_json() for c in result.after_commitments],
    }
    header = pb.ProofHeader(
        version=1,
        request_id=request_id,
        client_id=client.client_id,
        update_kind=pb.UPDATE_KIND_GROUP_OBS,
        after_commitments=[c.to_pb() for c in result.after_commitments],
        proof_count=len(result.proofs),
        total_bytes=len(blob),
        sha256=fields["sha256"],
        auth=client.auth("SubmitProof", fields),
        proof_sizes=fields["proof_sizes"],
    )
    return pb.ProofChunk(header=header), blob


def test_replayed_submission_is_refused_and_identical_resubmission_is_idempotent(
    provider: ProviderServer, tmp_path: Path
) -> None:
    client = edge(tmp_path, provider.port)
    enroll(client)
    r = provider.service.create_request("dev-1", mask())
    head, blob = _submission(client, provider, r.request_id)
    stub = client.transport.stub
    first = stub.SubmitProof(iter([head, pb.ProofChunk(data=blob)]), timeout=10)
    assert first.verdict == pb.VERDICT_ACCEPTED
    # A captured upload replayed byte for byte: its nonce is spent.
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitProof(iter([head, pb.ProofChunk(data=blob)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (err.value.details() or "")
    # The client retrying the same content with a fresh nonce gets the same receipt.
    head2, blob2 = _submission(client, provider, r.request_id)
    again = stub.SubmitProof(iter([head2, pb.ProofChunk(data=blob2)]), timeout=10)
    assert again.submission_id == first.submission_id
    assert again.receipt.canonical == first.receipt.canonical
    assert provider.service.ledger.size == 1
    client.close()


def test_rpc_auth_refuses_reused_nonce_wrong_key_and_other_clients_id(
    provider: ProviderServer, tmp_path: Path
) -> None:
    alice = edge(tmp_path, provider.port, "alice")
    mallory = edge(tmp_path, provider.port, "mallory")
    enroll(alice, "alice")
    enroll(mallory, "mallory")
    r = provider.service.create_request("alice", mask())
    stub = alice.transport.stub
    auth = alice.auth("PollRequests", {"after_cursor": 0, "max_items": 5})
    assert len(stub.PollRequests(pb.PollRequest(auth=auth, max_items=5)).requests) == 1
    cases: list[tuple[str, pb.ClientAuth, grpc.StatusCode]] = [
        ("reused nonce", auth, grpc.StatusCode.UNAUTHENTICATED)
    ]
    # Wrong key: Alice's id and nonce, Mallory's signature.
    challenge = stub.Challenge(pb.ChallengeRequest(client_id="alice"))
    st = mallory._signer().sign(
        DOMAIN_RPC_AUTH,
        {
            "client_id": "alice",
            "rpc": "PollRequests",
            "nonce": challenge.nonce.hex(),
            "after_cursor": 0,
            "max_items": 5,
        },
    )
    cases.append(
        (
            "wrong key",
            pb.ClientAuth(
                client_id="alice", nonce=challenge.nonce, signature=st.signature, canonical=st.canonical
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    )
    # Mallory's valid auth, but signed for Alice's id while presented as Mallory's.
    challenge = stub.Challenge(pb.ChallengeRequest(client_id="mallory"))
    st = mallory._signer().sign(
        DOMAIN_RPC_AUTH,
        {
            "client_id": "alice",
            "rpc": "PollRequests",
            "nonce": challenge.nonce.hex(),
            "after_cursor": 0,
            "max_items": 5,
        },
    )
    cases.append(
        (
            "other client's id",
            pb.ClientAuth(
                client_id="mallory", nonce=challenge.nonce, signature=st.signature, canonical=st.canonical
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    )
    for what, bad, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.PollRequests(pb.PollRequest(auth=bad, max_items=5))
        assert err.value.code() == code, what
    # Mallory, correctly authenticated as herself, answering Alice's request.
    head, blob = _submission(alice, provider, r.request_id)
    fields = {
        "request_id": r.request_id,
        "update_kind": 1,
        "sha256": head.header.sha256,
        "total_bytes": head.header.total_bytes,
        "proof_sizes": list(head.header.proof_sizes),
        "after_commitments": [
            Commitment(c.name, c.block, c.point_hex).to_json() for c in head.header.after_commitments
        ],
    }
    head.header.client_id = "mallory"
    head.header.auth.CopyFrom(mallory.auth("SubmitProof", fields))
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitProof(iter([head, pb.ProofChunk(data=blob)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "another client" in (err.value.details() or "")
    alice.close()
    mallory.close()


def test_bad_input_on_every_rpc_gets_a_status_and_the_server_stays_up(
    provider: ProviderServer, tmp_path: Path
) -> None:
    client = edge(tmp_path, provider.port)
    enroll(client)
    r = provider.service.create_request("dev-1", mask())
    stub = client.transport.stub
    head, blob = _submission(client, provider, r.request_id)
    junk_auth = pb.ClientAuth(
        client_id="dev-1", nonce=b"\x00" * 3, signature=b"\x01" * 7, canonical=b"\xff\xfe garbage"
    )
    calls: list[tuple[str, Any, set[grpc.StatusCode]]] = [
        (
            "Challenge empty",
            lambda: stub.Challenge(pb.ChallengeRequest()),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        (
            "Challenge huge id",
            lambda: stub.Challenge(pb.ChallengeRequest(client_id="x" * 5000)),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        (
            "Enroll garbage",
            lambda: stub.Enroll(
                pb.EnrollRequest(
                    version=1,
                    client_id="z",
                    public_key=b"\x00" * 32,
                    model_id="m",
                    layers=["a"],
                    update_kind=1,
                    canonical=b"\x00junk",
                    proof_of_possession=b"1",
                )
            ),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        (
            "Enroll bad key",
            lambda: stub.Enroll(pb.EnrollRequest(version=1, client_id="z", public_key=b"\x01")),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        (
            "Enroll kind 99",
            lambda: stub.Enroll(
                pb.EnrollRequest(
                    version=1, client_id="z", public_key=bytes(32), model_id="m", layers=["a"], update_kind=99
                )
            ),  # type: ignore[arg-type]
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        (
            "GetArtifact unknown",
            lambda: list(stub.GetArtifact(pb.GetArtifactRequest(circuit_id="c", artifact="vk"))),
            {grpc.StatusCode.NOT_FOUND},
        ),
        (
            "Watch no auth",
            lambda: list(stub.WatchRequests(pb.WatchRequest(), timeout=5)),
            {grpc.StatusCode.UNAUTHENTICATED},
        ),
        (
            "Watch junk auth",
            lambda: list(stub.WatchRequests(pb.WatchRequest(auth=junk_auth), timeout=5)),
            {grpc.StatusCode.UNAUTHENTICATED},
        ),
        (
            "Poll junk auth",
            lambda: stub.PollRequests(pb.PollRequest(auth=junk_auth)),
            {grpc.StatusCode.UNAUTHENTICATED},
        ),
        ("Submit empty stream", lambda: stub.SubmitProof(iter([])), {grpc.StatusCode.INVALID_ARGUMENT}),
        (
            "Submit data first",
            lambda: stub.SubmitProof(iter([pb.ProofChunk(data=b"x")])),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        (
            "Submit truncated",
            lambda: stub.SubmitProof(iter([head, pb.ProofChunk(data=blob[:5])])),
            {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED},
        ),
        (
            "Submit two headers",
            lambda: stub.SubmitProof(iter([head, head])),
            {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED},
        ),
        (
            "Submit oversized chunk",
            lambda: stub.SubmitProof(iter([head, pb.ProofChunk(data=b"x" * (3 * 1024 * 1024))])),
            {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED},
        ),
        (
            "Submit junk header",
            lambda: stub.SubmitProof(
                iter(
                    [
                        pb.ProofChunk(
                            header=pb.ProofHeader(
                                version=1,
                                request_id="r",
                                total_bytes=10**12,
                                proof_sizes=[10**12],
                                sha256="zz",
                                auth=junk_auth,
                            )
                        )
                    ]
                )
            ),
            {grpc.StatusCode.RESOURCE_EXHAUSTED},
        ),
        (
            "Receipt unknown",
            lambda: stub.GetReceipt(pb.GetReceiptRequest(request_id="nope")),
            {grpc.StatusCode.NOT_FOUND},
        ),
        (
            "Receipt bad id",
            lambda: stub.GetReceipt(pb.GetReceiptRequest(request_id="../etc\x00")),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        (
            "Inclusion out of range",
            lambda: stub.GetInclusionProof(pb.InclusionProofRequest(leaf_index=9, tree_size=99)),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        (
            "Consistency reversed",
            lambda: stub.GetConsistencyProof(pb.ConsistencyProofRequest(first_size=5, second_size=2)),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
    ]
    for what, call, codes in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() in codes, f"{what}: {err.value.code()} {err.value.details()}"
        assert err.value.details(), what
        assert "Traceback" not in (err.value.details() or ""), what
    # Raw garbage that is not even a protobuf message.
    raw = grpc.insecure_channel(f"127.0.0.1:{provider.port}")
    for method in ("GetInfo", "Enroll", "PollRequests", "GetReceipt"):
        fn = raw.unary_unary(
            f"/zkunlearn.v1.Provider/{method}", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as err:
            fn(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
        assert err.value.code() != grpc.StatusCode.UNAVAILABLE
    raw.close()
    # Still serving, and a valid call succeeds.
    assert stub.GetInfo(pb.GetInfoRequest()).protocol_version == 1
    assert client.poll()[0].status == "accepted"
    client.close()


def test_cancelled_uploads_are_one_log_line_not_internal_errors(
    provider: ProviderServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that cancel SubmitProof before or after their first message are not a provider fault:
    no INTERNAL error and no logged traceback (the provider notes each in one INFO line)."""
    raw = grpc.insecure_channel(f"127.0.0.1:{provider.port}")
    submit = raw.stream_unary(
        "/zkunlearn.v1.Provider/SubmitProof",
        request_serializer=pb.ProofChunk.SerializeToString,
        response_deserializer=pb.SubmitProofResponse.FromString,
    )
    release = threading.Event()

    def chunks(first: bool) -> Iterator[pb.ProofChunk]:
        if first:
            yield pb.ProofChunk(header=pb.ProofHeader(version=1, request_id="r", client_id="c"))
        release.wait(10)
        yield pb.ProofChunk(data=b"late")

    with caplog.at_level(logging.INFO):
        calls = []
        for i in range(6):
            calls.append(submit.future(chunks(i % 2 == 1), timeout=30))
            time.sleep(0.3)
            calls[-1].cancel()
        time.sleep(3.0)
        release.set()
    raw.close()
    faults = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not faults, [r.getMessage() for r in faults]


def test_every_service_refuses_a_body_that_is_not_its_message(
    provider: ProviderServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Health and reflection too: INVALID_ARGUMENT naming the method, no INTERNAL, no logged traceback."""
    raw = grpc.insecure_channel(f"127.0.0.1:{provider.port}")
    garbage = b"\xff\xff\xff\xff\x0f garbage"
    check = raw.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
    )
    watch = raw.unary_stream(
        "/grpc.health.v1.Health/Watch", request_serializer=None, response_deserializer=None
    )
    calls = [lambda: check(garbage, timeout=5), lambda: list(watch(garbage, timeout=5))]
    with caplog.at_level(logging.DEBUG):
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "grpc.health.v1.Health" in (err.value.details() or "")
        reflection = raw.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(reflection(iter([garbage]), timeout=5))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    # The services still answer well-formed requests.
    health = health_pb2_grpc.HealthStub(raw)
    ok = health.Check(health_pb2.HealthCheckRequest(service="zkunlearn.v1.Provider"), timeout=5)
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    raw.close()


def test_health_and_reflection_are_served(provider: ProviderServer) -> None:
    ch = grpc.insecure_channel(f"127.0.0.1:{provider.port}")
    health = health_pb2_grpc.HealthStub(ch)
    resp = health.Check(health_pb2.HealthCheckRequest(service="zkunlearn.v1.Provider"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    answers = list(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "zkunlearn.v1.Provider" in names
    provider.health.enter_graceful_shutdown()
    resp = health.Check(health_pb2.HealthCheckRequest(service="zkunlearn.v1.Provider"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    ch.close()


def test_client_reconnects_after_provider_restart_and_finishes(tmp_path: Path) -> None:
    first = start(tmp_path)
    port = first.port
    prover = FakeProver()
    client = edge(tmp_path, port, prover=prover)
    enroll(client)
    r1 = first.service.create_request("dev-1", mask())
    results: list[Any] = []
    watcher = threading.Thread(
        target=lambda: results.extend(client.watch(max_requests=2, reconnect_budget_s=30))
    )
    watcher.start()
    deadline = time.monotonic() + 20
    while client.store.applied(r1.request_id) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.store.applied(r1.request_id) is not None
    first.stop(0)
    second = start(tmp_path, port)  # same SQLite file, same key, same port
    r2 = second.service.create_request("dev-1", mask())
    watcher.join(30)
    assert not watcher.is_alive()
    assert [(o.request_id, o.status) for o in results] == [
        (r1.request_id, "accepted"),
        (r2.request_id, "accepted"),
    ]
    assert prover.calls == [r1.request_id, r2.request_id]
    assert client.verify_log() == 2
    client.close()
    second.stop(0)


def _spawn(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ZKU_FAKE_VERIFY_MARKER": str(tmp / "verifying"),
        "ZKU_FAKE_VERIFY_SLOW_FILE": str(tmp / "slow"),
    }
    port_file = tmp / "port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zkunlearn.cli",
            "provider",
            "serve",
            "--config",
            str(tmp / "provider.toml"),
            "--port-file",
            str(port_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"provider did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        time.sleep(0.05)
    assert int(port_file.read_text()) == port
    return proc


def test_sigkill_mid_submission_loses_no_receipt_and_the_retry_succeeds(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "provider.toml").write_text(
        f'listen = "127.0.0.1:{port}"\nstate = "{tmp_path / "provider.db"}"\n'
        f'key_file = "{tmp_path / "provider.key"}"\n'
        'verifier = "tests.fakes:make_verifier"\nsubmit_wait_s = 30.0\ngrace_s = 0.5\n' + ALL_KINDS_TOML
    )
    proc = _spawn(tmp_path, port)
    # The operator side: another process (this one) writing requests into the same database.
    operator = ProviderService(  # signs requests only: it must not claim the server's jobs
        SqlState.sqlite(tmp_path / "provider.db"),
        load_signer(tmp_path / "provider.key"),
        FakeVerifier(),
        ServiceConfig(verify_workers=0),
    )
    prover = FakeProver()
    client = edge(tmp_path, port, prover=prover)
    try:
        enroll(client)
        r1 = operator.create_request("dev-1", mask())
        assert client.poll()[0].status == "accepted"
        (tmp_path / "slow").touch()
        r2 = operator.create_request("dev-1", mask())
        outcome: list[Any] = []
        worker = threading.Thread(target=lambda: outcome.extend(client.poll()))
        worker.start()
        deadline = time.monotonic() + 20
        while not (tmp_path / "verifying").exists() or (tmp_path / "verifying").read_text() != r2.request_id:
            assert time.monotonic() < deadline, "verification of r2 never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # mid-verification: SubmitProof is still waiting for the verdict
        proc.wait(10)
        (tmp_path / "slow").unlink()
        proc = _spawn(tmp_path, port)
        worker.join(60)
        assert not worker.is_alive()
        assert [(o.request_id, o.status) for o in outcome] == [(r2.request_id, "accepted")]
        assert prover.calls == [
            r1.request_id,
            r2.request_id,
        ]  # r2 was not re-proved, its saved proof was resent
        assert [r.request_id for r in client.store.receipts()] == [r1.request_id, r2.request_id]
        assert client.verify_log() == 2
        leaf0 = operator.state.get_leaf(0)
        assert leaf0 is not None
        assert leaf0.request_id == r1.request_id
        # SIGTERM is a graceful stop: health goes NOT_SERVING, streams end, exit status 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        client.close()
        operator.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_transport_config_refuses_half_tls(tmp_path: Path) -> None:
    from zkunlearn.client.transport import TransportError

    with pytest.raises(TransportError, match="root_certs_file"):
        Transport(ChannelConfig("127.0.0.1:1", client_cert_file="a.pem", client_key_file="b.pem"))
    with pytest.raises(TransportError, match="cannot read"):
        Transport(ChannelConfig("127.0.0.1:1", root_certs_file=str(tmp_path / "missing.pem")))
    assert replace(ChannelConfig("x"), target="y").target == "y"
    _ = pb_grpc  # the generated stub module is what the SDK uses


def _pki(tmp: Path) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (tmp / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca, ca_key)
    for stem, usage, san in (
        (
            "server",
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("dev-1")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(stem))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, cert, key)
    return {k: str(tmp / k) for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    tls = start(tmp_path, **{"tls.cert_file": pki["server.pem"], "tls.key_file": pki["server.key"]})
    try:
        cfg = replace(channel(tls.port), root_certs_file=pki["ca.pem"], server_name_override="localhost")
        client = EdgeClient(cfg, ClientStore(tmp_path / "tls.db"), FakeProver())
        enroll(client)
        tls.service.create_request("dev-1", mask())
        assert client.poll()[0].status == "accepted"
        client.close()
        plain = Transport(replace(channel(tls.port), retry_attempts=2))
        with pytest.raises(grpc.RpcError) as err:
            plain.stub.GetInfo(pb.GetInfoRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
    finally:
        tls.stop(0)
    mtls_dir = tmp_path / "mtls"
    mtls_dir.mkdir()
    mtls = start(
        mtls_dir,
        **{
            "tls.cert_file": pki["server.pem"],
            "tls.key_file": pki["server.key"],
            "tls.client_ca_file": pki["ca.pem"],
        },
    )
    try:
        tls_only = Transport(replace(channel(mtls.port), root_certs_file=pki["ca.pem"], retry_attempts=1))
        with pytest.raises(grpc.RpcError) as err:
            tls_only.stub.GetInfo(pb.GetInfoRequest(), timeout=3)
        assert (
            err.value.code() == grpc.StatusCode.UNAVAILABLE
        )  # handshake refused without a client certificate
        tls_only.close()
        mutual = Transport(
            replace(
                channel(mtls.port),
                root_certs_file=pki["ca.pem"],
                client_cert_file=pki["client.pem"],
                client_key_file=pki["client.key"],
            )
        )
        assert mutual.stub.GetInfo(pb.GetInfoRequest(), timeout=5).protocol_version == 1
        mutual.close()
    finally:
        mtls.stop(0)


def test_provider_config_is_strict(tmp_path: Path) -> None:
    from zkunlearn.provider.server import ConfigError

    (tmp_path / "p.toml").write_text(
        'listen = "127.0.0.1:0"\nsubmit_wait_s = 3\n[limits]\nverify_workers = 4\n'
    )
    cfg = ProviderConfig.load(tmp_path / "p.toml", {"tls.cert_file": "x.pem"})
    assert cfg.submit_wait_s == 3.0
    assert cfg.limits.verify_workers == 4
    assert cfg.tls.cert_file == "x.pem"
    with pytest.raises(ConfigError, match="unknown config keys"):
        ProviderConfig.load(None, {"listne": "x"})
    with pytest.raises(ConfigError, match="must be int"):
        ProviderConfig.load(None, {"limits.verify_workers": "two"})
    with pytest.raises(ConfigError, match="cannot read provider config"):
        ProviderConfig.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="module:factory"):
        build_server(
            ProviderConfig.load(
                None, {"listen": "127.0.0.1:0", "state": "memory", "key_file": str(tmp_path / "k")}
            )
        )
    with pytest.raises(ConfigError, match=r"both tls\.cert_file and tls\.key_file"):
        build_server(
            ProviderConfig.load(
                None,
                {
                    "listen": "127.0.0.1:0",
                    "state": "memory",
                    "key_file": str(tmp_path / "k"),
                    "tls.cert_file": "x.pem",
                },
            ),
            verifier=FakeVerifier(),
        )


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "injected: provider restarting"


class _FailFirst(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Fails the first call of one RPC as a restarting provider would, then lets calls through."""

    def __init__(self, rpc: str) -> None:
        self.rpc, self.failed = rpc, 0

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method.endswith("/" + self.rpc) and not self.failed:
            self.failed += 1
            raise _Unavailable()
        return continuation(details, request)


@pytest.mark.parametrize("rpc", ["GetTreeHead", "GetInclusionProof", "GetConsistencyProof"])
def test_log_check_survives_a_provider_restart_between_its_calls(
    provider: ProviderServer, tmp_path: Path, rpc: str
) -> None:
    """Found by the load benchmark's SIGKILL runs: only the tree-head call used to be retried."""
    client = edge(tmp_path, provider.port)
    enroll(client)
    provider.service.create_request("dev-1", mask())
    client.poll()
    assert client.verify_log() == 1  # stores the head, so the next check asks for consistency too
    provider.service.create_request("dev-1", mask())
    client.poll()
    failing = _FailFirst(rpc)
    retrying = EdgeClient(Transport(channel(provider.port), [failing]), client.store, FakeProver())
    assert retrying.verify_log() == 2
    assert failing.failed == 1
    retrying.close()


STUCK_PROVIDER = """
import sys, threading
from zkunlearn.provider import service as service_mod
from zkunlearn.provider.server import ProviderConfig, serve

class Verifier:
    def verify(self, job):
        raise AssertionError("no submission is made")


def make_verifier(config):
    return Verifier()


never = threading.Event()
service_mod.ProviderService.info = lambda self: never.wait()  # a handler that ignores cancellation
config = ProviderConfig.load(None, {
    "listen": "127.0.0.1:0", "state": sys.argv[1] + "/p.db", "key_file": sys.argv[1] + "/p.key",
    "grace_s": 0.5, "verifier": "__main__:make_verifier",
})
serve(config, ready=lambda running: print(running.port, flush=True))
"""


def test_sigterm_stops_the_provider_even_with_a_stuck_handler(tmp_path: Path) -> None:
    """Every shutdown wait is bounded: a handler that never returns cannot keep the process alive."""
    script = tmp_path / "stuck_provider.py"
    script.write_text(STUCK_PROVIDER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.ProviderStub(ch)
        stuck = stub.GetInfo.future(pb.GetInfoRequest(), timeout=60)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0
        assert "stopping without it" in (proc.stderr.read() if proc.stderr else "")
        assert stuck.exception(timeout=5) is not None
        ch.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
