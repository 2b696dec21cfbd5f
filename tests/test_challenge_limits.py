"""Challenge is the one call anyone may make before authenticating: per address and per id limits.

A challenge writes nothing (its nonce is stateless), so the limits bound only the HMAC work a caller
can ask for. Over a limit the answer is UNAVAILABLE, which clients retry with backoff; other ids and a
caller that waits are served.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grpc
import pytest
from zkunlearn.provider.ratelimit import RateLimiter
from zkunlearn.v1 import provider_pb2 as pb
from zkunlearn.v1 import provider_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_grpc import start  # noqa: E402


def test_a_bucket_refills_at_its_rate_and_keys_are_independent() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])  # burst 4
    assert [limiter.allow("a") for _ in range(5)] == [True] * 4 + [False]
    assert limiter.allow("b")
    now[0] += 0.5  # one token back
    assert [limiter.allow("a"), limiter.allow("a")] == [True, False]
    assert all(RateLimiter(0.0).allow("a") for _ in range(1000))  # 0: no limit


def test_a_bounded_number_of_buckets_is_kept() -> None:
    limiter = RateLimiter(1.0, max_keys=3)
    for key in "abcdef":
        limiter.allow(key)
    assert len(limiter._buckets) == 3


def _code(stub: pb_grpc.ProviderStub, client_id: str) -> grpc.StatusCode:
    try:
        stub.Challenge(pb.ChallengeRequest(client_id=client_id), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.grpc
def test_challenges_are_limited_per_id_and_per_address(tmp_path: Path) -> None:
    server = start(
        tmp_path, **{"limits.challenge_rate_per_subject": 2.0, "limits.challenge_rate_per_peer": 5.0}
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ProviderStub(channel)
            # One id: a burst of 4, then refused as retryable.
            assert [_code(stub, "victim") for _ in range(5)] == [grpc.StatusCode.OK] * 4 + [
                grpc.StatusCode.UNAVAILABLE
            ]
            # The address has 10 in its burst, 5 used: other ids get the rest, then the address is limited.
            codes = [_code(stub, f"other-{i}") for i in range(6)]
            assert codes == [grpc.StatusCode.OK] * 5 + [grpc.StatusCode.UNAVAILABLE]
            time.sleep(1.1)  # the honest control: a caller that waits is served again
            assert _code(stub, "victim") == grpc.StatusCode.OK
    finally:
        server.stop(0)
