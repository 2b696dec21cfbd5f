"""The provider keeps answering under stream load, streams artifacts, and refuses malformed configs.

A sync gRPC server spends one pool thread per open stream: streams are capped below the pool
(``limits.max_streams``), watch streams end after ``limits.watch_max_s``, stalled streams are cancelled
after ``limits.stream_timeout_s``, and calls beyond ``limits.max_concurrent_rpcs`` fail at once.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from zkunlearn.provider import servicer as servicer_module
from zkunlearn.provider.server import ConfigError, ProviderConfig, ProviderServer, build_server, serve_command
from zkunlearn.provider.servicer import ProviderServicer
from zkunlearn.v1 import provider_pb2 as pb
from zkunlearn.v1 import provider_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import FakeVerifier  # noqa: E402
from tests.test_grpc import edge, enroll, mask, start  # noqa: E402

pytestmark = pytest.mark.grpc
BIG = 48 << 20  # larger than any HTTP/2 flow-control window: a reader that stops reading stalls the sender


def _stub(port: int) -> tuple[grpc.Channel, pb_grpc.ProviderStub]:
    # Its own connection, so one stalled stream's flow control does not hold up the other calls.
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
    return ch, pb_grpc.ProviderStub(ch)


def _wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _status(call: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as exc:
        return exc.code(), None


def _unary_calls_answer_promptly(port: int) -> None:
    ch, stub = _stub(port)
    with ch:
        # A call queued behind held threads would wait until the test releases them: the deadline
        # fails it. The deadline is the contrast, not a speed target.
        for _ in range(5):
            stub.GetInfo(pb.GetInfoRequest(), timeout=15)
            assert stub.Challenge(pb.ChallengeRequest(client_id="nobody"), timeout=15).nonce


def _watch(client: Any, stub: pb_grpc.ProviderStub) -> Any:
    auth = client.auth("WatchRequests", {"after_cursor": 0})
    return stub.WatchRequests(pb.WatchRequest(auth=auth, after_cursor=0), timeout=30)


def _refused(call: Callable[[], Any]) -> grpc.RpcError:
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    # Waiting for a thread would last until the test releases the held streams (after this call).
    assert time.monotonic() - t0 < 15.0, "an excess stream must fail fast, not wait for a thread"
    # UNAVAILABLE: transient, so the SDK retries it with backoff instead of giving up.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    return caught.value


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    return path


def test_excess_streams_are_refused_while_unary_calls_still_answer(tmp_path: Path, artifact: Path) -> None:
    # 4 RPC threads: by default at most 2 streams, so 2 threads always remain for unary calls.
    server = start(tmp_path, **{"limits.max_workers": 4, "artifacts": {"m/g": {"srs": str(artifact)}}})
    channels: list[grpc.Channel] = []
    try:
        clients = [edge(tmp_path, server.port, name=f"c{i}") for i in range(3)]
        for i, c in enumerate(clients):
            enroll(c, client_id=f"dev-{i}")
        watches = []
        for i in range(2):  # two watchers hold both stream slots; each has its first delivery in hand
            ch, stub = _stub(server.port)
            channels.append(ch)
            server.service.create_request(f"dev-{i}", mask())
            call = _watch(clients[i], stub)
            assert next(call).request_id
            watches.append(call)

        ch, stub = _stub(server.port)
        channels.append(ch)
        request = pb.GetArtifactRequest(circuit_id="m/g", artifact="srs")
        err = _refused(lambda: list(stub.GetArtifact(request)))
        assert "limits.max_streams" in (err.details() or "")
        _refused(lambda: next(_watch(clients[2], stub)))
        # An upload holds a thread like any stream: it is refused too, before any of it is read.
        upload = iter([pb.ProofChunk(header=pb.ProofHeader(version=1, request_id="r", client_id="dev-2"))])
        assert "limits.max_streams" in (_refused(lambda: stub.SubmitProof(upload)).details() or "")
        _unary_calls_answer_promptly(server.port)

        # A closed stream frees its slot.
        watches[0].cancel()

        def artifact_served() -> bool:
            code, chunks = _status(lambda: list(stub.GetArtifact(request)))
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
            if code != grpc.StatusCode.OK:
                return False
            assert b"".join(c.data for c in chunks) == artifact.read_bytes()
            return True

        _wait_until(artifact_served)
        watches[1].cancel()
        for c in clients:
            c.close()
    finally:
        for ch in channels:
            ch.close()
        server.stop(0)


def test_calls_beyond_max_concurrent_rpcs_fail_fast(tmp_path: Path) -> None:
    server = start(tmp_path, **{"limits.max_workers": 4, "limits.max_concurrent_rpcs": 4})
    release = threading.Event()
    channels: list[grpc.Channel] = []
    info = server.service.info

    def stalled_info() -> Any:  # four of these in flight are the server's whole admission budget
        release.wait(30)
        return info()

    server.service.info = stalled_info  # type: ignore[method-assign]
    try:
        ch, stub = _stub(server.port)
        channels.append(ch)
        futures: list[Any] = []

        def all_admitted() -> bool:
            # A stalled call that arrived while a probe was in flight was itself refused: replace it.
            futures[:] = [f for f in futures if not f.done()]
            while len(futures) < 4:
                futures.append(stub.GetInfo.future(pb.GetInfoRequest(), timeout=30))
            return refused_now() and not any(f.done() for f in futures)

        def refused_now() -> bool:
            # A probe waiting for a held thread would exceed its deadline and fail the check below.
            code, _ = _status(lambda: stub.Challenge(pb.ChallengeRequest(client_id="probe"), timeout=15))
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
            return code == grpc.StatusCode.RESOURCE_EXHAUSTED

        _wait_until(all_admitted, 10.0)
        assert refused_now()
        release.set()
        for f in futures:
            assert f.result(timeout=10).protocol_version == 1
        stub.GetInfo(pb.GetInfoRequest(), timeout=5)
    finally:
        release.set()
        for ch in channels:
            ch.close()
        server.stop(0)


def test_watch_stream_ends_after_its_lifetime_and_the_sdk_reopens_it(tmp_path: Path) -> None:
    server = start(tmp_path, **{"limits.watch_max_s": 0.5})
    try:
        client = edge(tmp_path, server.port)
        enroll(client)
        ch, stub = _stub(server.port)
        with ch:
            t0 = time.monotonic()
            assert list(_watch(client, stub)) == []  # ends with OK, no error
            assert 0.4 < time.monotonic() - t0 < 20.0  # ended by its lifetime, not the 30 s deadline
        results: list[Any] = []
        watcher = threading.Thread(target=lambda: results.extend(client.watch(max_requests=1)), daemon=True)
        watcher.start()
        time.sleep(1.5)  # its stream has ended and been re-opened at least twice
        assert watcher.is_alive()
        request = server.service.create_request("dev-1", mask())
        watcher.join(15)
        assert not watcher.is_alive()
        assert [(o.request_id, o.status) for o in results] == [(request.request_id, "accepted")]
        client.close()
    finally:
        server.stop(0)


def test_a_stalled_artifact_reader_is_cancelled_after_the_stream_timeout(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\7" * BIG)
    server = start(
        tmp_path,
        **{
            "limits.max_workers": 4,
            "limits.max_streams": 1,
            "limits.watch_max_s": 0.5,
            "limits.stream_timeout_s": 1.5,
            "limits.max_message_bytes": 4 * 1024 * 1024,
            "artifacts": {"m/g": {"srs": str(big)}},
        },
    )
    ch1, stalled_stub = _stub(server.port)
    ch2, stub = _stub(server.port)
    try:
        stalled = stalled_stub.GetArtifact(pb.GetArtifactRequest(circuit_id="m/g", artifact="srs"))
        assert next(stalled).total_bytes == BIG  # then stop reading
        _refused(lambda: next(stub.GetArtifact(pb.GetArtifactRequest(circuit_id="m/g", artifact="srs"))))
        _unary_calls_answer_promptly(server.port)

        def slot_freed() -> bool:
            code, first = _status(
                lambda: next(stub.GetArtifact(pb.GetArtifactRequest(circuit_id="m/g", artifact="srs")))
            )
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
            return code == grpc.StatusCode.OK and first.total_bytes == BIG

        _wait_until(slot_freed, 10.0)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stalled:
                pass
        assert caught.value.code() == grpc.StatusCode.CANCELLED
    finally:
        ch1.close()
        ch2.close()
        server.stop(0)


class _Context:
    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"{code}: {details}")

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True

    def cancel(self) -> None:
        pass


def test_get_artifact_streams_the_file_and_hashes_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "srs"
    payload = os.urandom(16 << 20)
    path.write_bytes(payload)
    servicer = ProviderServicer(service=None, artifacts={"m/g": {"srs": path}})  # type: ignore[arg-type]
    request = pb.GetArtifactRequest(circuit_id="m/g", artifact="srs")

    def no_whole_file(self: Path) -> bytes:
        raise AssertionError(f"{self} read whole into memory")

    hashed: list[int] = []
    real_file_digest = hashlib.file_digest

    def counting_file_digest(fh: Any, digest: Any) -> Any:
        hashed.append(1)
        return real_file_digest(fh, digest)

    monkeypatch.setattr(Path, "read_bytes", no_whole_file)
    monkeypatch.setattr(servicer_module.hashlib, "file_digest", counting_file_digest)
    for _ in range(2):
        tracemalloc.start()
        try:
            chunks = servicer.GetArtifact(request, _Context())  # type: ignore[arg-type]
            first = next(chunks)
            _, peak_first = tracemalloc.get_traced_memory()
            got, size = hashlib.sha256(first.data), len(first.data)
            for chunk in chunks:
                got.update(chunk.data)
                size += len(chunk.data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The old code held the whole 16 MiB file before sending anything.
        assert peak_first < 4 << 20, peak_first
        assert peak < 4 << 20, peak
        assert first.sha256 == got.hexdigest() == hashlib.sha256(payload).hexdigest()
        assert first.total_bytes == size == len(payload)
    assert len(hashed) == 1  # the digest is cached per file version

    # A new version of the file (other size and mtime) is hashed again.
    monkeypatch.undo()
    path.write_bytes(b"new")
    chunks = list(servicer.GetArtifact(request, _Context()))  # type: ignore[arg-type]
    assert [c.data for c in chunks] == [b"new"]
    assert chunks[0].sha256 == hashlib.sha256(b"new").hexdigest()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"artifacts": 5}, "artifacts"),
        ({"artifacts": {"x": "some/path"}}, "artifacts.x"),
        ({"artifacts": {"x": {"vk": 3}}}, "artifacts.x.vk"),
        ({"model_ids": 7}, "model_ids"),
        ({"model_ids": "mnist"}, "model_ids"),
        ({"model_ids": ["a", 1]}, "model_ids"),
        ({"limits": {"max_message_bytes": True}}, "limits.max_message_bytes"),
        ({"limits": {"max_message_bytes": -1}}, "limits.max_message_bytes"),
        ({"limits": {"max_workers": 0}}, "limits.max_workers"),
        ({"limits": {"max_workers": 1}}, "limits.max_workers"),
        ({"limits": {"max_workers": 8, "max_streams": 8}}, "limits.max_streams"),
        ({"limits": {"max_concurrent_rpcs": 3}}, "limits.max_concurrent_rpcs"),
        ({"limits": {"watch_max_s": 10.0, "stream_timeout_s": 5.0}}, "limits.watch_max_s"),
        ({"limits": {"nonce_ttl_s": float("nan")}}, "limits.nonce_ttl_s"),
        ({"keepalive": {"time_ms": 0}}, "keepalive.time_ms"),
        ({"grace_s": True}, "grace_s"),
        ({"grace_s": -1.0}, "grace_s"),
    ],
)
def test_malformed_config_values_are_refused_naming_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ProviderConfig.from_mapping(data)
    assert f"config key {key} must" in str(caught.value)


def test_well_formed_limits_are_accepted() -> None:
    cfg = ProviderConfig.from_mapping(
        {"model_ids": ["m"], "submit_wait_s": 0, "limits": {"max_workers": 8, "verify_workers": 0}}
    )
    assert cfg.model_ids == ("m",)
    assert cfg.submit_wait_s == 0.0
    assert (cfg.limits.stream_slots(), cfg.limits.concurrent_rpcs()) == (6, 32)
    assert ProviderConfig().limits.stream_slots() == 12  # of 16 threads
    cfg = ProviderConfig.from_mapping({"limits": {"max_streams": 6, "max_concurrent_rpcs": 100}})
    assert (cfg.limits.stream_slots(), cfg.limits.concurrent_rpcs()) == (6, 100)


def _verify_threads() -> int:
    return sum(t.name.startswith("zku-verify-") and t.is_alive() for t in threading.enumerate())


def test_main_reports_a_missing_tls_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "p.toml"
    config.write_text(
        "\n".join(
            [
                'listen = "127.0.0.1:0"',
                f'state = "{tmp_path / "p.db"}"',
                f'key_file = "{tmp_path / "p.key"}"',
                'verifier = "tests.fakes:make_verifier"',
                "[tls]",
                f'cert_file = "{tmp_path / "missing.pem"}"',
                f'key_file = "{tmp_path / "missing.key"}"',
                "",
            ]
        )
    )
    before = _verify_threads()
    assert serve_command(config) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err
    assert "missing.key" in err or "missing.pem" in err
    assert _verify_threads() == before


def test_a_failed_start_leaves_no_workers_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ProviderConfig.load(
            None,
            {
                "listen": f"127.0.0.1:{port}",
                "state": str(tmp_path / "p.db"),
                "key_file": str(tmp_path / "p.key"),
            },
        )
        before = _verify_threads()
        server: ProviderServer | None = None
        try:
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
                server = build_server(cfg, verifier=FakeVerifier())
        finally:
            if server is not None:
                server.stop(0)
        _wait_until(lambda: _verify_threads() == before, 5.0)
