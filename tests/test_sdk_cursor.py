"""The stored cursor against forged cursors, and one delivery processed on two threads at once.

The provider signs each delivery's cursor together with the request (``zkunlearn/v1/delivery``): the
stored cursor may only move to the cursor signed for the very request it comes with, to a value the
client can poll after (at most 2**53 - 1, the largest integer of a signed RPC statement), and an
unchecked message must not move it at all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from zkunlearn.client.sdk import Outcome, UpdateResult, VerifiedRequest
from zkunlearn.client.store import AppliedRecord, ClientStore
from zkunlearn.provider.server import ProviderServer
from zkunlearn.provider.servicer import delivered_to_pb
from zkunlearn.v1 import provider_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import FakeProver  # noqa: E402
from tests.test_grpc import edge, enroll, mask, start  # noqa: E402

pytestmark = pytest.mark.grpc
ABSURD = [2**53 - 1, 2**53, 2**62, 2**64 - 1]


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[ProviderServer]:
    server = start(tmp_path)
    yield server
    server.stop(0)


def _delivered(provider: ProviderServer, request_id: str) -> pb.SignedDeletionRequest:
    """The genuine signed message the provider delivers for ``request_id``."""
    client = provider.service.state.get_client("dev-1")
    items = provider.service.requests_after(client, 0, 100)
    return delivered_to_pb(next(i for i in items if i.record.request_id == request_id))


def _with_cursor(msg: pb.SignedDeletionRequest, cursor: int) -> pb.SignedDeletionRequest:
    out = pb.SignedDeletionRequest()
    out.CopyFrom(msg)
    out.cursor = cursor
    return out


@pytest.mark.parametrize("cursor", ABSURD)
def test_an_unsigned_message_reusing_an_applied_id_does_not_move_the_cursor(
    provider: ProviderServer, tmp_path: Path, cursor: int
) -> None:
    prover = FakeProver()
    client = edge(tmp_path, provider.port, prover=prover)
    enroll(client)
    r1 = provider.service.create_request("dev-1", mask())
    assert [(o.request_id, o.status) for o in client.poll()] == [(r1.request_id, "accepted")]
    before = client.store.cursor
    # No signature at all: only the id of a request the client has applied, and a huge cursor.
    out = client.process(pb.SignedDeletionRequest(request_id=r1.request_id, cursor=cursor))
    assert out.status == "skipped"
    assert client.store.cursor == before
    # A genuine request issued afterwards is still delivered and processed.
    r2 = provider.service.create_request("dev-1", mask())
    assert [(o.request_id, o.status) for o in client.poll()] == [(r2.request_id, "accepted")]
    assert prover.calls == [r1.request_id, r2.request_id]
    # Re-deliveries of applied requests still get past them (the cursor recorded with the receipt).
    assert {o.status for o in client.poll_all(from_cursor=0)} == {"skipped"}
    assert client.store.cursor == 2
    client.close()


@pytest.mark.parametrize("cursor", ABSURD[1:])
def test_a_genuine_request_with_an_absurd_cursor_never_makes_poll_raise(
    provider: ProviderServer, tmp_path: Path, cursor: int
) -> None:
    prover = FakeProver()
    client = edge(tmp_path, provider.port, prover=prover)
    enroll(client)
    expired = provider.service.create_request("dev-1", mask(), ttl_s=-1)
    real = provider.service.create_request("dev-1", mask())
    # A correctly signed but expired request replayed with a cursor no poll can be made after.
    out = client.process(_with_cursor(_delivered(provider, expired.request_id), cursor))
    assert out.status == "refused"
    assert client.store.cursor == 0
    # The same for a request the client would otherwise prove: refused, nothing proved or stored.
    out = client.process(_with_cursor(_delivered(provider, real.request_id), cursor))
    assert (out.status, prover.calls) == ("refused", [])
    assert "cursor" in out.reason
    assert client.store.cursor == 0
    assert client.store.receipts() == []
    # Polling still works, and both genuine deliveries are handled as usual.
    outcomes = client.poll()
    assert [(o.request_id, o.status) for o in outcomes] == [
        (expired.request_id, "refused"),
        (real.request_id, "accepted"),
    ]
    assert client.store.cursor == 2
    assert client.poll() == []
    client.close()


def test_a_genuine_request_with_a_plausible_forged_cursor_is_refused(
    provider: ProviderServer, tmp_path: Path
) -> None:
    """Replayed with a cursor inside the pollable range (ahead of requests the client has not seen), a
    genuine request would make the client skip them; its delivery signature names another cursor."""
    prover = FakeProver()
    client = edge(tmp_path, provider.port, prover=prover)
    enroll(client)
    first = provider.service.create_request("dev-1", mask())
    second = provider.service.create_request("dev-1", mask())
    genuine = _delivered(provider, second.request_id)
    for cursor in (genuine.cursor + 1, 1_000):
        out = client.process(_with_cursor(genuine, cursor))
        assert (out.status, prover.calls) == ("refused", [])
        assert "cursor" in out.reason
        assert client.store.cursor == 0
    # Another request's genuine delivery statement does not vouch for this one either.
    other = _delivered(provider, first.request_id)
    borrowed = pb.SignedDeletionRequest()
    borrowed.CopyFrom(genuine)
    borrowed.cursor, borrowed.delivery, borrowed.delivery_signature = (
        other.cursor,
        other.delivery,
        other.delivery_signature,
    )
    assert client.process(borrowed).status == "refused"
    # The honest deliveries, in order, are processed as usual.
    assert [(o.request_id, o.status) for o in client.poll()] == [
        (first.request_id, "accepted"),
        (second.request_id, "accepted"),
    ]
    assert client.store.cursor == genuine.cursor
    client.close()


def test_the_same_delivery_on_two_threads_is_proved_once(provider: ProviderServer, tmp_path: Path) -> None:
    class SlowProver(FakeProver):
        def prove(self, request: VerifiedRequest) -> UpdateResult:
            time.sleep(0.5)  # both threads are inside process() before either finishes
            return super().prove(request)

    prover = SlowProver()
    client = edge(tmp_path, provider.port, prover=prover)
    enroll(client)
    r1 = provider.service.create_request("dev-1", mask())
    msg = _delivered(provider, r1.request_id)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        try:
            outcomes.append(client.process(msg))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert prover.calls == [r1.request_id]
    assert sorted(o.status for o in outcomes) == ["accepted", "skipped"]
    assert [r.request_id for r in client.store.receipts()] == [r1.request_id]
    assert client.store.cursor == 1
    client.close()


def test_store_finish_is_idempotent_per_request_id(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "s.db")
    first = AppliedRecord("r1", 3, "accepted", "", "sub-1", b"canon", b"sig", 0)
    second = AppliedRecord("r1", 9, "rejected", "late", "sub-2", b"other", b"sig2", 5)
    assert store.finish(first, 1, [{"name": "a", "block": 0, "point_hex": "00"}]) == first
    assert store.finish(second, 2, [{"name": "b", "block": 0, "point_hex": "11"}]) == first
    assert store.applied("r1") == first
    assert store.receipts() == [first]
    assert store.cursor == 3
    assert store.get_json("commitments") == [{"name": "a", "block": 0, "point_hex": "00"}]
    store.close()
