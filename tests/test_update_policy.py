"""The provider accepts the sound update kinds (3, 4) by default and the loose fixed-point kinds (1, 2)
only when its operator opts in: over real gRPC, a refused enrollment next to an accepted control."""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from zkunlearn.client.sdk import Commitment, EdgeClient
from zkunlearn.client.store import ClientStore
from zkunlearn.proofs.backend import point_from_tag
from zkunlearn.provider.config import ConfigError, ProviderConfig
from zkunlearn.provider.models import (
    SOUND_UPDATE_KINDS,
    UPDATE_KIND_ANALYTIC,
    UPDATE_KIND_ANALYTIC_EXACT,
    UPDATE_KIND_GROUP_OBS,
    UPDATE_KIND_GROUP_OBS_EXACT,
    CommitmentRef,
)
from zkunlearn.provider.server import ProviderServer, build_server
from zkunlearn.provider.service import VerificationResult

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import FakeProver, FakeVerifier  # noqa: E402
from tests.test_grpc import channel  # noqa: E402

pytestmark = [pytest.mark.grpc]

GROUP_OBS = [
    Commitment("theta:fc1", 0, point_from_tag(b"theta")),
    Commitment("g:fc1", 0, point_from_tag(b"g")),
]
ANALYTIC = [Commitment("m:head", 0, point_from_tag(b"m")), Commitment("w:head", 0, point_from_tag(b"w"))]


def _enrollment_proof(commitments: tuple[CommitmentRef, ...] | list[Commitment]) -> bytes:
    """The fake enrollment proof: a hash over the commitments it speaks for."""
    body = "|".join(f"{c.name}#{c.block}={c.point_hex}" for c in commitments)
    return hashlib.sha256(b"enrollment:" + body.encode()).digest()


class FakeEnrollmentVerifier(FakeVerifier):
    """Accepts an exact enrollment whose single proof is the hash over exactly its commitments."""

    def verify_enrollment(
        self,
        model_id: str,
        layers: tuple[str, ...],
        commitments: tuple[CommitmentRef, ...],
        proofs: tuple[bytes, ...],
    ) -> VerificationResult:
        if proofs != (_enrollment_proof(commitments),):
            return VerificationResult(False, "enrollment proof does not match the commitments")
        return VerificationResult(True, "")


def _serve(tmp: Path, policy: list[str] | None) -> ProviderServer:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "state": str(tmp / "provider.db"),
        "key_file": str(tmp / "provider.key"),
        "grace_s": 0.5,
    }
    if policy is not None:
        settings["policy.update_kinds"] = policy
    return build_server(ProviderConfig.load(None, settings), verifier=FakeEnrollmentVerifier())


@pytest.fixture
def default_provider(tmp_path: Path) -> Iterator[ProviderServer]:
    server = _serve(tmp_path, None)
    yield server
    server.stop(0)


def _enroll(server: ProviderServer, tmp: Path, client_id: str, kind: int) -> None:
    client = EdgeClient(channel(server.port), ClientStore(tmp / f"{client_id}.db"), FakeProver())
    try:
        if kind in (UPDATE_KIND_GROUP_OBS, UPDATE_KIND_GROUP_OBS_EXACT):
            layers, commitments = ["fc1"], GROUP_OBS
        else:
            layers, commitments = ["head"], ANALYTIC
        proofs = [_enrollment_proof(commitments)] if kind in SOUND_UPDATE_KINDS else []
        client.enroll(client_id, "m1", layers, kind, commitments, proofs)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("loose", "name", "instead"),
    [
        (UPDATE_KIND_GROUP_OBS, "GROUP_OBS (1)", "GROUP_OBS_EXACT (3)"),
        (UPDATE_KIND_ANALYTIC, "ANALYTIC (2)", "ANALYTIC_EXACT (4)"),
    ],
)
def test_default_policy_refuses_loose_kinds_and_accepts_exact_ones(
    default_provider: ProviderServer, tmp_path: Path, loose: int, name: str, instead: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _enroll(default_provider, tmp_path, "loose", loose)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = refused.value.details() or ""
    for part in (name, "does not certify the deletion", "docs/protocol.md", f"use {instead} instead"):
        assert part in message, message
    assert default_provider.state.get_client("loose") is None

    # The honest controls: both exact kinds enroll on the same provider.
    _enroll(default_provider, tmp_path, "exact-obs", UPDATE_KIND_GROUP_OBS_EXACT)
    _enroll(default_provider, tmp_path, "exact-an", UPDATE_KIND_ANALYTIC_EXACT)
    enrolled = default_provider.state.get_client("exact-obs")
    assert enrolled is not None
    assert enrolled.update_kind == UPDATE_KIND_GROUP_OBS_EXACT
    analytic = default_provider.state.get_client("exact-an")
    assert analytic is not None
    assert analytic.update_kind == UPDATE_KIND_ANALYTIC_EXACT


def test_opting_in_accepts_the_named_loose_kind_only_and_logs_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="zkunlearn.provider.update_policy"):
        server = _serve(tmp_path, ["group_obs", "group_obs_exact"])
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("GROUP_OBS (1)" in w and "does not certify" in w for w in warnings), warnings
        _enroll(server, tmp_path, "benchmark", UPDATE_KIND_GROUP_OBS)
        record = server.state.get_client("benchmark")
        assert record is not None
        assert record.update_kind == UPDATE_KIND_GROUP_OBS
        with pytest.raises(grpc.RpcError) as refused:  # not opted into: still refused
            _enroll(server, tmp_path, "analytic", UPDATE_KIND_ANALYTIC)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as not_offered:  # a sound kind left out of the list
            _enroll(server, tmp_path, "exact-an", UPDATE_KIND_ANALYTIC_EXACT)
        assert "does not accept update kind ANALYTIC_EXACT (4)" in (not_offered.value.details() or "")
    finally:
        server.stop(0)


def test_default_config_accepts_the_exact_kinds_and_refuses_bad_policies() -> None:
    assert ProviderConfig.load(None).service_config().update_kinds == {3, 4}
    opted = ProviderConfig.load(None, {"policy.update_kinds": ["analytic", "analytic_exact"]})
    assert opted.service_config().update_kinds == {2, 4}
    with pytest.raises(ConfigError, match=r"policy\.update_kinds holds .group_obs_fast., not an update kind"):
        ProviderConfig.load(None, {"policy.update_kinds": ["group_obs_fast"]})
    with pytest.raises(ConfigError, match=r"policy\.update_kinds must name at least one"):
        ProviderConfig.load(None, {"policy.update_kinds": []})
    with pytest.raises(ConfigError, match=r"policy\.update_kinds must be a list"):
        ProviderConfig.load(None, {"policy.update_kinds": "group_obs"})


def test_circuits_of_a_loose_kind_are_published_only_on_the_same_opt_in() -> None:
    refused = {"artifacts": {"m1/group_obs": {"index": "circuits.json"}}}
    with pytest.raises(ConfigError, match=r"publishes a circuit of update kind GROUP_OBS \(1\)"):
        ProviderConfig.load(None, refused)
    opted = ProviderConfig.load(None, {**refused, "policy.update_kinds": ["group_obs", "group_obs_exact"]})
    assert set(opted.artifacts) == {"m1/group_obs"}
    exact = ProviderConfig.load(None, {"artifacts": {"m1/group_obs_exact": {"index": "circuits.json"}}})
    assert set(exact.artifacts) == {"m1/group_obs_exact"}
