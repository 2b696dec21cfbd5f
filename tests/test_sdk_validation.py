"""Malformed input to the mask, the Fisher factors, Group-OBS and the edge client: each is refused with the
module's own error (never a bare TypeError/KeyError/ValueError), and one request the client cannot
process neither escapes ``process()`` nor holds back the requests after it."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.bench.postgres import free_port
from zkunlearn.circuits.mask import LayerMask, Mask, MaskError
from zkunlearn.client.checks import _tensor
from zkunlearn.client.fisher import (
    BlockFactors,
    FisherError,
    factors_from_gradients,
    fit_rows,
    layer_factors,
    per_sample_gradients,
)
from zkunlearn.client.group_obs import GroupObsError, apply_group_obs
from zkunlearn.client.reference import reference_apply_group_obs
from zkunlearn.client.refit import OutputRefitError
from zkunlearn.client.sdk import (
    Commitment,
    EdgeClient,
    ForgedRequestError,
    RequestRefusedError,
    UpdateResult,
    VerifiedRequest,
)
from zkunlearn.client.store import ClientStore
from zkunlearn.client.transport import ChannelConfig
from zkunlearn.client.unlearning import UnlearningError
from zkunlearn.proofs.backend import point_from_tag
from zkunlearn.proofs.deletion import DeletionError
from zkunlearn.proofs.statements import DOMAIN_DELETION_REQUEST, DOMAIN_DELIVERY, StatementSigner
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.v1 import provider_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_POLICY, FakeProver, FakeVerifier  # noqa: E402

# -- circuits/mask.py ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "blocks", "match"),
    [
        ((16,), {0: 3}, "offsets of block 0 of layer 'w' must be a sequence"),
        ((16,), {0: "13"}, "offsets of block 0 .* got str"),
        ((16,), {0: b"\x01"}, "offsets of block 0 .* got bytes"),
        (16, {0: (1,)}, "shape of layer 'w' must be a sequence"),
        (None, {0: (1,)}, "shape of layer 'w' must be a sequence"),
        ((16,), None, "blocks must map block index -> offsets, got NoneType"),
        ((16,), [(0, (1,))], "blocks must map block index -> offsets, got list"),
    ],
)
def test_layer_mask_refuses_wrong_types_with_mask_error(shape: object, blocks: object, match: str) -> None:
    with pytest.raises(MaskError, match=match):
        LayerMask("w", shape, 8, blocks)  # type: ignore[arg-type]


@pytest.mark.parametrize("offsets", [(-1,), (-3, 1), (1, -2), (0, 5, -1)])
def test_negative_offsets_are_out_of_range_not_duplicate_or_unsorted(offsets: tuple[int, ...]) -> None:
    with pytest.raises(MaskError, match=r"offset -\d out of range for block 0"):
        LayerMask("w", (16,), 8, {0: offsets})


def test_from_dense_refuses_a_non_integer_block_size() -> None:
    with pytest.raises(MaskError, match="block size of layer 'w' must be an integer"):
        LayerMask.from_dense("w", np.ones(4, bool), "2")  # type: ignore[arg-type]


# -- client/fisher.py ---------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.tanh(self.fc1(x)))
        return out


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize(
    ("n", "curvature"),
    [(4, "empirical"), (40, "empirical"), (40, "ggn"), (40, "fisher")],  # row path and Gram path
)
def test_a_layer_named_twice_is_refused_before_any_gradient(n: int, curvature: str) -> None:
    x, y = _data(n)
    layers = ["fc1.weight", "fc2.weight", "fc1.weight"]
    with pytest.raises(FisherError, match=r"'fc1\.weight' is named more than once"):
        layer_factors(_Net(), layers, x, y, nn.functional.cross_entropy, 16, curvature=curvature)  # type: ignore[arg-type]


def test_per_sample_gradients_refuses_a_repeated_parameter_instead_of_doubling_its_rows() -> None:
    x, y = _data(5)
    with pytest.raises(FisherError, match=r"'fc2\.weight' is named more than once"):
        per_sample_gradients(_Net(), ["fc2.weight", "fc2.weight"], x, y, nn.functional.cross_entropy)
    with pytest.raises(FisherError, match="not the string"):
        layer_factors(_Net(), "fc1.weight", x, y, nn.functional.cross_entropy, 16)


def _short_last_block(rng: np.random.Generator, rows: int) -> BlockFactors:
    """21 weights in blocks of 8: the last block has 5 real columns and 3 of zero padding."""
    return factors_from_gradients("w", rng.normal(size=(rows, 21)), 8, (3, 7))


@pytest.mark.parametrize("rows", [3, 4, 10])  # fewer rows than m (padded), equal, more (SVD)
def test_fit_rows_normalises_over_the_real_weights_of_a_short_last_block(rows: int) -> None:
    m = 4
    factors = _short_last_block(np.random.default_rng(rows), rows)
    fitted = fit_rows(factors.factors, m, numel=21)
    diag = np.einsum("nib,nib->nb", fitted, fitted).reshape(-1) / m
    assert diag[:21].mean() == pytest.approx(1.0, rel=1e-12)
    assert np.all(fitted[-1][:, 5:] == 0.0)  # the padding stays exactly zero
    # What the relation sees, G^T G, is unchanged up to that one scale.
    if rows <= m:
        gram = np.einsum("nib,nic->nbc", fitted, fitted)
        want = np.einsum("nib,nic->nbc", factors.factors, factors.factors)
        assert np.allclose(gram * np.mean(want.diagonal(axis1=1, axis2=2).reshape(-1)[:21]) / m, want)


def test_fit_rows_numel_checks_and_unchanged_default() -> None:
    rng = np.random.default_rng(0)
    full = rng.normal(size=(3, 6, 8))
    # A layer whose size is a multiple of the block (all the SDK commits): bit for bit the old figure.
    assert np.array_equal(fit_rows(full, 4), fit_rows(full, 4, numel=24))
    with pytest.raises(FisherError, match="numel 16 does not fit 3 blocks of 8"):
        fit_rows(full, 4, numel=16)
    with pytest.raises(FisherError, match="numel 25 does not fit"):
        fit_rows(full, 4, numel=25)
    with pytest.raises(FisherError, match="columns past numel 21 are not zero"):
        fit_rows(full, 4, numel=21)
    with pytest.raises(FisherError, match="numel must be an integer"):
        fit_rows(full, 4, numel=21.0)  # type: ignore[arg-type]


# -- client/group_obs.py ------------------------------------------------------------------------------


def test_group_obs_refuses_factors_whose_padding_is_not_zero() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 7))
    factors = _short_last_block(rng, 6)
    mask = LayerMask("w", (3, 7), 8, {2: (0, 3)})
    new, _ = apply_group_obs(weight, factors, mask, 0.1)  # zero padding: the per-block reference
    assert np.allclose(new, reference_apply_group_obs(weight, factors, mask, 0.1), rtol=0, atol=1e-12)
    noisy = BlockFactors("w", 8, factors.factors.copy(), 1.0, (3, 7))
    noisy.factors[-1][:, 5:] = rng.normal(size=(6, 3))
    with pytest.raises(GroupObsError, match="past its 5 weights are not zero"):
        apply_group_obs(weight, noisy, mask, 0.1)
    # Also when the mask does not touch the last block: the factor itself is malformed.
    with pytest.raises(GroupObsError, match="not zero"):
        apply_group_obs(weight, noisy, LayerMask("w", (3, 7), 8, {0: (1,)}), 0.1)


# -- client/checks.py: _tensor ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "data", "match"),
    [
        ([2**32, 2**32], b"", "does not match 0 bytes"),  # np.prod wrapped this to 0
        ([2**62, 4, 1], b"", "does not match 0 bytes"),
        ([1] * 70, bytes(8), "cannot be used"),  # numpy arrays have at most 64 dimensions
        ([0, 2**62], b"", "cannot be used"),
    ],
)
def test_tensor_refuses_shapes_that_do_not_fit_their_bytes(shape: list[int], data: bytes, match: str) -> None:
    with pytest.raises(ForgedRequestError, match=match):
        _tensor(pb.Tensor(shape=shape, float64_le=data), "forget features")
    assert _tensor(pb.Tensor(shape=[2, 1], float64_le=np.array([1.0, 2.0]).tobytes()), "x").tolist() == [
        [1.0],
        [2.0],
    ]


# -- client/sdk.py: process ---------------------------------------------------------------------------

PROVIDER = StatementSigner.generate()


class _Prover:
    """Raises what it is given for requests naming ``fc9``; proves the others like the fake prover."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls: list[str] = []
        self.fake = FakeProver()

    def prove(self, request: VerifiedRequest) -> UpdateResult:
        self.calls.append(request.request_id)
        if "fc9" in request.layers:
            raise self.error
        return self.fake.prove(request)


def _offline_client(tmp: Path, prover: _Prover) -> EdgeClient:
    """A client that never reaches a provider: refusals need no network."""
    store = ClientStore(tmp / "c.db")
    store.put("client_id", b"dev-1")
    store.put_json("enrollment", {"model_id": "m", "layers": ["fc1"], "update_kind": 1})
    return EdgeClient(
        ChannelConfig("127.0.0.1:9"), store, prover, provider_public_key=PROVIDER.public_bytes()
    )


def _signed(request_id: str, cursor: int, layer: str) -> pb.SignedDeletionRequest:
    mask = Mask((LayerMask(layer, (4, 8), 16, {0: (1,)}),)).to_bytes()
    statement = PROVIDER.sign(
        DOMAIN_DELETION_REQUEST,
        {
            "request_id": request_id,
            "client_id": "dev-1",
            "model_id": "m",
            "update_kind": 1,
            "layers": [layer],
            "issued_ms": 0,
            "expires_ms": int(time.time() * 1000) + 10**6,
            "mask_sha256": hashlib.sha256(mask).hexdigest(),
            "mask_bytes": len(mask),
        },
    )
    delivery = PROVIDER.sign(
        DOMAIN_DELIVERY,
        {
            "request_id": request_id,
            "client_id": "dev-1",
            "cursor": cursor,
            "request_sha256": hashlib.sha256(statement.canonical).hexdigest(),
        },
    )
    return pb.SignedDeletionRequest(
        request_id=request_id,
        cursor=cursor,
        mask=mask,
        canonical=statement.canonical,
        signature=statement.signature,
        delivery=delivery.canonical,
        delivery_signature=delivery.signature,
    )


def _chained(error: Exception, cause: BaseException) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "error",
    [
        UnlearningError("the mask names 'fc9', which this client did not enroll"),
        DeletionError("1-D forget labels must be class indices in [0, 3)"),
        MaskError("mask names unknown layer 'fc9'"),
        RequestRefusedError("this prover will never handle 'fc9'"),
        _chained(UnlearningError("refit of fc2: no solution"), OutputRefitError("singular system")),
    ],
)
def test_a_request_the_prover_refuses_is_recorded_and_the_cursor_moves_on(
    tmp_path: Path, error: Exception
) -> None:
    prover = _Prover(error)
    client = _offline_client(tmp_path, prover)
    for attempt in range(2):  # delivered again (a rewound poll): refused again, not proved twice over
        out = client.process(_signed("r1", 3, "fc9"))
        assert (out.request_id, out.status) == ("r1", "refused")
        assert type(error).__name__ in out.reason
        assert str(error) in out.reason
        assert client.store.cursor == 3
        assert client.store.pending("r1") is None
        assert client.store.applied("r1") is None
        assert prover.calls == ["r1"] * (attempt + 1)
    client.close()


@pytest.mark.parametrize(
    "error",
    [
        OSError("disk went away"),
        MemoryError(),
        RuntimeError("proving worker crashed"),
        _chained(UnlearningError("cannot read committed state in /x: ..."), OSError("EIO")),
    ],
)
def test_a_momentary_prover_failure_raises_and_keeps_the_request(tmp_path: Path, error: Exception) -> None:
    prover = _Prover(error)
    client = _offline_client(tmp_path, prover)
    with pytest.raises(type(error)):
        client.process(_signed("r1", 3, "fc9"))
    assert client.store.cursor == 0  # tried again on the next poll
    # ...while a refusal from the same client does move on (the old code let both escape).
    prover.error = UnlearningError("the mask names 'fc9', which this client did not enroll")
    assert client.process(_signed("r1", 3, "fc9")).status == "refused"
    assert client.store.cursor == 3
    client.close()


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[ProviderServer]:
    config = ProviderConfig.load(
        None,
        {
            **ALL_KINDS_POLICY,
            "listen": f"127.0.0.1:{free_port()}",
            "state": str(tmp_path / "provider.db"),
            "key_file": str(tmp_path / "provider.key"),
            "submit_wait_s": 10.0,
            "grace_s": 0.5,
        },
    )
    server = build_server(config, verifier=FakeVerifier())
    yield server
    server.stop(0)


@pytest.mark.grpc
def test_one_unprocessable_request_does_not_block_the_ones_after_it(
    provider: ProviderServer, tmp_path: Path
) -> None:
    """The provider only knows layer names; a mask whose shape the client's layer does not have is
    refused by the prover. Before, that exception escaped poll() and the request came first again on
    every later poll, so no deletion after it was ever carried out."""

    class ShapeChecking(FakeProver):
        def prove(self, request: VerifiedRequest) -> UpdateResult:
            if request.mask.layer("fc1").shape != (4, 8):
                raise UnlearningError(f"layer 'fc1': mask shape {request.mask.layer('fc1').shape} != (4, 8)")
            return super().prove(request)

    prover = ShapeChecking()
    client = EdgeClient(
        ChannelConfig(f"127.0.0.1:{provider.port}", call_timeout_s=15.0),
        ClientStore(tmp_path / "c.db"),
        prover,
    )
    before = [
        Commitment("theta", 0, point_from_tag(b"theta")),
        Commitment("gradient_factor", 0, point_from_tag(b"g")),
    ]
    client.enroll("dev-1", "m1", ["fc1"], 1, before)  # two, as the fake prover answers
    bad = provider.service.create_request("dev-1", Mask((LayerMask("fc1", (2, 16), 16, {0: (1,)}),)))
    good = provider.service.create_request("dev-1", Mask((LayerMask("fc1", (4, 8), 16, {1: (2,)}),)))
    outcomes = client.poll_all()
    assert [(o.request_id, o.status) for o in outcomes] == [
        (bad.request_id, "refused"),
        (good.request_id, "accepted"),
    ]
    assert "mask shape (2, 16)" in outcomes[0].reason
    assert client.store.cursor == 2
    assert client.poll() == []  # nothing is re-delivered: the client is not stuck
    client.close()
