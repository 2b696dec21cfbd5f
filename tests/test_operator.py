"""The operator path: issue deletions, read status and receipts through the Operator service.

Real gRPC over loopback, real signatures, the fake proof backend (the proofs themselves are covered
elsewhere). The integration test runs two provider replicas on one database (SQLite and PostgreSQL):
the CLI issues a deletion through one, a client watching the other receives it, answers it, and the
CLI then reads its accepted receipt.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner
from zkunlearn.proofs.statements import DOMAIN_OPERATOR_AUTH, DOMAIN_RPC_AUTH, StatementSigner
from zkunlearn.provider.operator import DeletionOrder
from zkunlearn.provider.operator_client import OperatorCallError, OperatorClient
from zkunlearn.provider.planning import ForgetSelection, MaskOptions
from zkunlearn.provider.server import ProviderServer
from zkunlearn.v1 import operator_pb2 as opb
from zkunlearn.v1 import operator_pb2_grpc as opb_grpc
from zkunlearn.v1 import provider_pb2 as pb
from zkunlearn.v1 import provider_pb2_grpc as pb_grpc

from zkunlearn.cli import app

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_TOML  # noqa: E402
from tests.test_grpc import edge, enroll, start  # noqa: E402

pytestmark = pytest.mark.grpc
PLANNER = "tests.operator_cases:planner"


def _start(tmp: Path, operator: StatementSigner, **config: Any) -> ProviderServer:
    return start(
        tmp,
        **{"operator.public_keys": [operator.public_bytes().hex()], "planners.m1.factory": PLANNER, **config},
    )


@pytest.fixture
def operator_key() -> StatementSigner:
    return StatementSigner.generate()


@pytest.fixture
def provider(tmp_path: Path, operator_key: StatementSigner) -> Iterator[ProviderServer]:
    server = _start(tmp_path, operator_key)
    yield server
    server.stop(0)


def _operator(provider: ProviderServer, key: StatementSigner) -> OperatorClient:
    return OperatorClient(f"127.0.0.1:{provider.port}", key, timeout_s=30.0)


def _order(client_ids: tuple[str, ...] = (), **selection: Any) -> DeletionOrder:
    chosen = ForgetSelection(**(selection or {"forget_class": 1}))
    return DeletionOrder("m1", client_ids, chosen, MaskOptions())


def test_an_order_reaches_every_client_of_the_model_and_status_and_receipts_follow(
    provider: ProviderServer, operator_key: StatementSigner, tmp_path: Path
) -> None:
    obs, analytic = edge(tmp_path, provider.port, "obs"), edge(tmp_path, provider.port, "an")
    enroll(obs, "dev-obs", kind=1)
    enroll(analytic, "dev-an", kind=2)
    with _operator(provider, operator_key) as operator:
        created = operator.create_requests(_order())
        by_client = {r.client_id: r for r in created.requests}
        assert sorted(by_client) == ["dev-an", "dev-obs"]
        assert by_client["dev-obs"].masked_weights == 8  # a quarter of fc1's 32 weights
        assert by_client["dev-an"].forget_samples == 20  # class 1 of the planner's 60 samples
        assert [(o.request_id, o.status) for o in obs.poll()] == [
            (by_client["dev-obs"].request_id, "accepted")
        ]
        delivered = analytic.poll()
        assert [o.status for o in delivered] == ["accepted"]
        stored = provider.service.state.get_request(by_client["dev-an"].request_id)
        assert stored is not None
        assert b'"shape":[20,4]' in stored.canonical  # the head's features
        status = operator.status()
        assert (status.clients, status.requests, status.answered_requests) == (2, 2, 2)
        assert (status.accepted_submissions, status.rejected_submissions) == (2, 0)
        assert list(status.model_ids) == ["m1"]
        listed = operator.receipts()
        assert listed.log_size == 2
        assert sorted(r.client_id for r in listed.receipts) == ["dev-an", "dev-obs"]
        assert {r.verdict for r in listed.receipts} == {pb.VERDICT_ACCEPTED}
        assert [r.receipt.leaf_index for r in operator.receipts(1, 5).receipts] == [1]


def test_a_watching_client_is_woken_by_an_order_not_by_the_poll_period(
    tmp_path: Path, operator_key: StatementSigner
) -> None:
    """The stream is pushed: with a 60 s re-read period the order still arrives well before it."""
    provider = _start(tmp_path, operator_key, watch_poll_s=60.0)
    try:
        client = edge(tmp_path, provider.port)
        enroll(client)
        got: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            client.watch(stop, max_requests=1)
            got.append(time.monotonic())

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.5)  # the stream is open and idle
        with _operator(provider, operator_key) as operator:
            issued = time.monotonic()
            operator.create_requests(_order())
        watcher.join(30)
        stop.set()
        assert got, "the watcher received nothing within 30 s"
        assert got[0] - issued < 30.0  # a poll-driven delivery would take 60 s
    finally:
        provider.stop(0)


def _raw_auth(
    key: StatementSigner, stub: Any, rpc: str, fields: dict[str, Any], nonce: bytes | None = None
) -> Any:
    nonce = nonce or stub.Challenge(opb.OperatorChallengeRequest(key_id=key.key_id)).nonce
    statement = key.sign(DOMAIN_OPERATOR_AUTH, {"rpc": rpc, "nonce": bytes(nonce).hex(), **fields})
    return opb.OperatorAuth(
        key_id=key.key_id, nonce=nonce, canonical=statement.canonical, signature=statement.signature
    )


def test_only_an_operator_key_signing_this_very_call_once_can_issue(
    provider: ProviderServer, operator_key: StatementSigner, tmp_path: Path
) -> None:
    client = edge(tmp_path, provider.port)
    enroll(client)
    channel = grpc.insecure_channel(f"127.0.0.1:{provider.port}")
    stub = opb_grpc.OperatorStub(channel)
    order = _order()
    fields = order.signed_fields()

    def call(auth: Any, forget_class: int = 1) -> grpc.StatusCode:
        try:
            stub.CreateRequests(
                opb.CreateRequestsRequest(auth=auth, model_id="m1", forget_class=forget_class)
            )
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    # A client's enrolled key is not an operator key, even with a well-formed operator statement.
    client_key = StatementSigner.from_private_bytes(client.store.get("private_key") or b"")
    assert call(_raw_auth(client_key, stub, "CreateRequests", fields)) == grpc.StatusCode.UNAUTHENTICATED
    # The operator's key in the client-auth domain (a signature meant for another purpose).
    nonce = stub.Challenge(opb.OperatorChallengeRequest(key_id=operator_key.key_id)).nonce
    wrong_domain = operator_key.sign(
        DOMAIN_RPC_AUTH, {"rpc": "CreateRequests", "nonce": nonce.hex(), **fields}
    )
    auth = opb.OperatorAuth(
        key_id=operator_key.key_id,
        nonce=nonce,
        canonical=wrong_domain.canonical,
        signature=wrong_domain.signature,
    )
    assert call(auth) == grpc.StatusCode.UNAUTHENTICATED
    # Signed for class 1, sent for class 2.
    assert call(_raw_auth(operator_key, stub, "CreateRequests", fields), forget_class=2) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Signed as GetStatus, used for CreateRequests.
    assert call(_raw_auth(operator_key, stub, "GetStatus", {})) == grpc.StatusCode.PERMISSION_DENIED
    # A nonce issued to a client id is not an operator nonce.
    client_nonce = pb_grpc.ProviderStub(channel).Challenge(pb.ChallengeRequest(client_id="dev-1")).nonce
    forged = _raw_auth(operator_key, stub, "CreateRequests", fields, nonce=client_nonce)
    assert call(forged) == grpc.StatusCode.UNAUTHENTICATED
    assert provider.service.state.summary().requests == 0
    # The honest control, then its replay.
    honest = _raw_auth(operator_key, stub, "CreateRequests", fields)
    assert call(honest) == grpc.StatusCode.OK
    assert call(honest) == grpc.StatusCode.UNAUTHENTICATED
    assert provider.service.state.summary().requests == 1
    # Types count: a signed `true` is not the call's 1 (another language's verifier would not equate them).
    for signed, code in ((True, grpc.StatusCode.PERMISSION_DENIED), (1, grpc.StatusCode.OK)):
        auth = _raw_auth(operator_key, stub, "ListReceipts", {"start": 0, "max_items": signed})
        try:
            stub.ListReceipts(opb.ListReceiptsRequest(auth=auth, start=0, max_items=1))
            got = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            got = exc.code()
        assert got == code
    channel.close()


BAD_ORDERS: dict[str, tuple[dict[str, Any], grpc.StatusCode]] = {
    "unknown model": ({"model_id": "m9"}, grpc.StatusCode.NOT_FOUND),
    "unknown client among good ones": ({"client_ids": ("dev-1", "ghost")}, grpc.StatusCode.NOT_FOUND),
    "client named twice": ({"client_ids": ("dev-1", "dev-1")}, grpc.StatusCode.INVALID_ARGUMENT),
    "class the model lacks": ({"forget_class": 7}, grpc.StatusCode.INVALID_ARGUMENT),
    "sample id out of range": ({"sample_ids": (3, 60)}, grpc.StatusCode.INVALID_ARGUMENT),
    "repeated sample ids": ({"sample_ids": (3, 3)}, grpc.StatusCode.INVALID_ARGUMENT),
    "samples of another shape": (
        {"features": np.zeros((2, 5)), "labels": np.zeros(2, dtype=np.int64)},
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "a label the model lacks": (
        {"features": np.zeros((2, 8)), "labels": np.array([0, 3])},
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown structure": ({"options": MaskOptions(structure="rows")}, grpc.StatusCode.INVALID_ARGUMENT),
    "fraction of everything": (
        {"options": MaskOptions(fraction_ppm=1_000_000)},
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ORDERS))
def test_a_bad_order_is_refused_by_name_and_writes_nothing(
    provider: ProviderServer, operator_key: StatementSigner, tmp_path: Path, case: str
) -> None:
    client = edge(tmp_path, provider.port)
    enroll(client)
    change, code = BAD_ORDERS[case]
    selection_keys = {"forget_class", "sample_ids", "features", "labels"}
    selection = {k: v for k, v in change.items() if k in selection_keys} or {"forget_class": 1}
    order = DeletionOrder(
        change.get("model_id", "m1"),
        change.get("client_ids", ()),
        ForgetSelection(**selection),
        change.get("options", MaskOptions()),
    )
    with _operator(provider, operator_key) as operator, pytest.raises(OperatorCallError) as refused:
        operator.create_requests(order)
    assert refused.value.code == code
    assert "\n" not in str(refused.value)
    assert "Traceback" not in str(refused.value)
    assert provider.service.state.summary().requests == 0


def test_nan_samples_sent_past_the_cli_are_refused(
    provider: ProviderServer, operator_key: StatementSigner
) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{provider.port}")
    stub = opb_grpc.OperatorStub(channel)
    features = np.full((1, 8), np.nan)
    samples = opb.ForgetSamples(
        features=pb.Tensor(shape=[1, 8], float64_le=features.tobytes()),
        labels=pb.Tensor(shape=[1], float64_le=np.zeros(1).tobytes()),
    )
    auth = opb.OperatorAuth(key_id=operator_key.key_id)  # checked after the body: the body is refused first
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateRequests(opb.CreateRequestsRequest(auth=auth, model_id="m1", samples=samples))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in (refused.value.details() or "")
    channel.close()


# -- the CLI against two replicas ----------------------------------------------------------------


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _config(tmp: Path, db_url: str, key_file: Path, operator: StatementSigner) -> Path:
    path = tmp / "provider.toml"
    path.write_text(
        "\n".join(
            [
                f'state = "{db_url}"',
                f'key_file = "{tmp / "provider.key"}"',
                "[operator]",
                f'public_keys = ["{operator.public_bytes().hex()}"]',
                f'key_file = "{key_file}"',
                "[planners.m1]",
                f'factory = "{PLANNER}"',
                ALL_KINDS_TOML,
            ]
        )
    )
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+pysqlite:///{tmp_path / 'shared.db'}"
    else:
        yield request.getfixturevalue("postgres_db_url")


def test_cli_issues_through_one_replica_and_a_client_of_the_other_gets_an_accepted_receipt(
    tmp_path: Path, db_url: str
) -> None:
    key_file = tmp_path / "operator.key"
    made = _cli("provider", "operator-key", "--out", str(key_file))
    assert made.exit_code == 0, made.output
    operator = StatementSigner.load(key_file)
    assert made.stdout.strip() == operator.public_bytes().hex()
    common = {
        "state": db_url,
        "operator.public_keys": [operator.public_bytes().hex()],
        "planners.m1.factory": PLANNER,
    }
    a = start(tmp_path, replica_id="a", **common)
    b = start(tmp_path, replica_id="b", **common)
    try:
        client = edge(tmp_path, b.port)
        enroll(client)
        outcomes: list[Any] = []
        watcher = threading.Thread(target=lambda: outcomes.extend(client.watch(max_requests=1)))
        watcher.start()
        config = _config(tmp_path, db_url, key_file, operator)
        issued = _cli(
            "provider",
            "request",
            "--config",
            str(config),
            "--target",
            f"127.0.0.1:{a.port}",
            "--class",
            "2",
            "--json",
        )
        assert issued.exit_code == 0, issued.output
        created = json.loads(issued.stdout)
        assert [r["client_id"] for r in created["requests"]] == ["dev-1"]
        watcher.join(20)
        assert [(o.request_id, o.status) for o in outcomes] == [
            (created["requests"][0]["request_id"], "accepted")
        ]
        shown = _cli(
            "provider", "status", "--config", str(config), "--target", f"127.0.0.1:{b.port}", "--json"
        )
        assert shown.exit_code == 0, shown.output
        status = json.loads(shown.stdout)
        assert (status["requests"], status["answered_requests"], status["log_size"]) == (1, 1, 1)
        listed = _cli(
            "provider",
            "receipts",
            "list",
            "--config",
            str(config),
            "--target",
            f"127.0.0.1:{a.port}",
            "--json",
        )
        assert listed.exit_code == 0, listed.output
        receipts = json.loads(listed.stdout)["receipts"]
        assert [(r["client_id"], r["verdict"]) for r in receipts] == [("dev-1", "accepted")]
        one = _cli(
            "provider", "receipts", "show", "0", "--config", str(config), "--target", f"127.0.0.1:{b.port}"
        )
        assert one.exit_code == 0, one.output
        assert json.loads(one.stdout)["request_id"] == created["requests"][0]["request_id"]
    finally:
        a.stop(0)
        b.stop(0)


def test_cli_refuses_bad_operator_input_in_one_line(
    provider: ProviderServer, operator_key: StatementSigner, tmp_path: Path
) -> None:
    key_file = tmp_path / "operator.key"
    operator_key.save(key_file)
    config = _config(tmp_path, f"sqlite+pysqlite:///{tmp_path / 'provider.db'}", key_file, operator_key)
    target = ["--config", str(config), "--target", f"127.0.0.1:{provider.port}"]
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "no-y.npz", x=np.zeros((2, 8)))
    np.savez(tmp_path / "nan.npz", x=np.full((2, 8), np.nan), y=np.zeros(2))
    np.savez(tmp_path / "fractional.npz", x=np.zeros((2, 8)), y=np.array([0.5, 1.0]))
    stranger = tmp_path / "stranger.key"
    StatementSigner.generate().save(stranger)
    cases = {
        "cannot read forget samples": ["--samples", str(tmp_path / "garbage.npz")],
        "arrays 'x' and 'y'": ["--samples", str(tmp_path / "no-y.npz")],
        "NaN or infinity": ["--samples", str(tmp_path / "nan.npz")],
        "whole class numbers": ["--samples", str(tmp_path / "fractional.npz")],
        "exactly one of": ["--class", "1", "--ids", "3"],
        "--ids must be": ["--ids", "3,x"],
        "--fraction must be": ["--class", "1", "--fraction", "1.5"],
        "not an operator key": ["--class", "1", "--key", str(stranger)],
        "cannot load the operator key": ["--class", "1", "--key", str(tmp_path / "missing.key")],
        "unknown client": ["--class", "1", "--client", "ghost"],
    }
    for expected, args in cases.items():
        result = _cli("provider", "request", *target, *args)
        assert result.exit_code != 0, (expected, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (expected, result.stderr)
        assert expected in lines[0], (expected, result.stderr)
        assert result.stdout == ""
    assert provider.service.state.summary().requests == 0
    provider_key = _cli("provider", "key", "--config", str(config), "--json")
    assert provider_key.exit_code == 0, provider_key.output
    pinned = json.loads(provider_key.stdout)
    assert bytes.fromhex(pinned["public_key"]) == provider.service.signer.public_bytes()
    refused = _cli("provider", "operator-key", "--out", str(key_file))
    assert refused.exit_code != 0
    assert "exists" in refused.stderr  # an existing key is never overwritten


def test_the_operator_client_speaks_mutual_tls(tmp_path: Path, operator_key: StatementSigner) -> None:
    from zkunlearn.provider.config import ProviderConfig
    from zkunlearn.provider.operator_client import OperatorSetupError

    from tests.test_grpc import _pki

    pki = _pki(tmp_path)
    tls = {
        "tls.cert_file": pki["server.pem"],
        "tls.key_file": pki["server.key"],
        "tls.client_ca_file": pki["ca.pem"],
    }
    server = _start(tmp_path, operator_key, **tls)
    key_file = tmp_path / "operator.key"
    operator_key.save(key_file)
    try:
        base = {**tls, "operator.key_file": str(key_file), "operator.ca_file": pki["ca.pem"]}
        base["operator.server_name"] = "localhost"
        target = f"127.0.0.1:{server.port}"
        with pytest.raises(OperatorSetupError, match="requires client certificates"):
            OperatorClient.from_config(ProviderConfig.load(None, base), target=target)
        mutual = {
            **base,
            "operator.cert_file": pki["client.pem"],
            "operator.cert_key_file": pki["client.key"],
        }
        with OperatorClient.from_config(ProviderConfig.load(None, mutual), target=target) as operator:
            assert operator.status().clients == 0
        plain = OperatorClient(target, operator_key, timeout_s=3.0)  # no TLS at all: the handshake fails
        with pytest.raises(OperatorCallError) as refused:
            plain.status()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        plain.close()
    finally:
        server.stop(0)
