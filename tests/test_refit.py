"""Output refit after Group-OBS: the fast Gram/Cholesky solver against a dense float64 least-squares
reference, on random layers and on real models, plus the properties that make it safe to run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.client.reference import reference_output_refit
from zkunlearn.client.refit import (
    OutputRefitError,
    RefitPair,
    apply_output_refit,
    capture_inputs,
    committed_rows,
    refit_following_layer,
)

from zkunlearn.tasks.models import CodeLM, CodeLMConfig, ViT, ViTConfig


def _layers(n: int, d_in: int, hidden: int, d_out: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(hidden, d_in)) / np.sqrt(d_in)
    keep = rng.random(w1.shape) > 0.4  # a 40 % mask, like the ViT benchmark's
    return {
        "z": rng.normal(size=(n, d_in)),
        "w1_before": w1,
        "b1": 0.1 * rng.normal(size=hidden),
        "w1_after": w1 * keep + 0.05 * rng.normal(size=w1.shape) * keep,
        "w2": rng.normal(size=(d_out, hidden)) / np.sqrt(hidden),
        "b2": 0.1 * rng.normal(size=d_out),
    }


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize(
    ("n", "d_in", "hidden", "d_out", "rel_lam"),
    [
        (500, 8, 32, 8, 0.03),  # n >> hidden
        (20, 8, 32, 6, 0.03),  # n < hidden: only the ridge makes the solution unique
        (300, 16, 64, 16, 1e-4),  # weak damping
        (300, 16, 64, 16, 1.0),  # strong damping
        (9000, 4, 8, 3, 0.01),  # more rows than one accumulation chunk
    ],
)
def test_fast_matches_dense_reference(
    activation: str, n: int, d_in: int, hidden: int, d_out: int, rel_lam: float
) -> None:
    layers = _layers(n, d_in, hidden, d_out, seed=n + hidden)
    fast = refit_following_layer(**layers, activation=activation, rel_lam=rel_lam)  # type: ignore[arg-type]
    ref_w, ref_b = reference_output_refit(**layers, activation=activation, rel_lam=rel_lam)
    assert _rel_err(fast.weight, ref_w) < 1e-8
    assert _rel_err(fast.bias, ref_b) < 1e-8
    assert fast.rows == n


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_refit_never_increases_the_output_error(activation: str) -> None:
    """The ridge objective at the old weights is the old error, so the optimum's error is no larger."""
    layers = _layers(400, 8, 32, 8, seed=3)
    res = refit_following_layer(**layers, activation=activation, rel_lam=0.03)  # type: ignore[arg-type]
    assert res.error_after < res.error_before
    assert res.error_after < 0.5 * res.error_before  # and on a 40 % mask it recovers most of it


def test_unchanged_masked_layer_leaves_the_following_layer_unchanged() -> None:
    layers = _layers(200, 8, 32, 8, seed=4)
    layers["w1_after"] = layers["w1_before"].copy()
    res = refit_following_layer(**layers, activation="gelu", rel_lam=0.03)
    assert np.max(np.abs(res.weight - layers["w2"])) < 1e-10
    assert np.max(np.abs(res.bias - layers["b2"])) < 1e-10
    assert res.error_before < 1e-12  # zero up to the Gram form's round-off


def _masked_and_compensated(model: nn.Module, fc1: list[str], seed: int) -> nn.Module:
    """Stand-in for Group-OBS: 40 % of each fc1 zeroed, the rest nudged (the refit only reads W1')."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in fc1:
            w = out.get_submodule(name).weight
            keep = torch.rand(w.shape, generator=gen) > 0.4
            w.mul_(keep).add_(0.01 * torch.randn(w.shape, generator=gen) * keep)
    return out


@pytest.mark.parametrize("kind", ["vit", "code-lm"])
def test_real_models_match_reference_and_touch_only_the_following_layers(kind: str) -> None:
    torch.manual_seed(0)
    model: nn.Module
    if kind == "vit":
        model = ViT(ViTConfig(width=16, depth=2, heads=2, mlp_ratio=4))
        inputs = torch.rand(12, 1, 28, 28)
    else:
        model = CodeLM(CodeLMConfig(hidden=16, layers=2, heads=2, ffn=32, context=16))
        inputs = torch.randint(0, 256, (6, 16))
    pairs = [RefitPair(*p) for p in model.refit_pairs]  # type: ignore[operator]
    fc1 = [p.masked for p in pairs]
    compensated = _masked_and_compensated(model, fc1, seed=1)
    refit, results = apply_output_refit(
        model, compensated, pairs, inputs, 0.03, [f"{n}.weight" for n in fc1] + ["head.weight"]
    )
    z = capture_inputs(model, fc1, inputs)
    for pair in pairs:
        m1, f2 = model.get_submodule(pair.masked), model.get_submodule(pair.following)
        ref_w, ref_b = reference_output_refit(
            z[pair.masked].numpy(),
            m1.weight.detach().double().numpy(),
            m1.bias.detach().double().numpy(),
            compensated.get_submodule(pair.masked).weight.detach().double().numpy(),
            f2.weight.detach().double().numpy(),
            f2.bias.detach().double().numpy(),
            pair.activation,
            0.03,
        )
        assert _rel_err(results[pair.following].weight, ref_w) < 1e-8
        assert _rel_err(results[pair.following].bias, ref_b) < 1e-8
        assert results[pair.following].error_after < results[pair.following].error_before
    following = {f"{p.following}.{k}" for p in pairs for k in ("weight", "bias")}
    before = dict(compensated.named_parameters())
    for name, param in refit.named_parameters():
        if name not in following:
            assert torch.equal(param, before[name]), name
        else:
            assert not torch.equal(param, before[name]), name


def test_committed_rows_span_the_data_and_refuse_impossible_counts() -> None:
    rows = committed_rows(9_000, 256)
    assert rows.shape == (256,)
    assert rows[0] == 0
    assert rows[-1] == 8_999
    assert np.all(np.diff(rows) > 0)  # distinct, in order: no row fitted twice
    assert np.ptp(np.diff(rows)) <= 1  # evenly spaced: every sample and token position is covered
    assert np.array_equal(committed_rows(5, 5), np.arange(5))
    for n in (0, 6):
        with pytest.raises(OutputRefitError, match=f"cannot commit {n} rows out of 5"):
            committed_rows(5, n)


def test_apply_with_rows_fits_exactly_the_committed_rows() -> None:
    """The benchmark's figure at ``rows=n`` is the regression the protocol proves: the same rows."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(width=16, depth=1, heads=2, mlp_ratio=4))
    inputs = torch.rand(10, 1, 28, 28)
    pair = RefitPair(*model.refit_pairs[0])
    compensated = _masked_and_compensated(model, [pair.masked], seed=3)
    _, results = apply_output_refit(model, compensated, [pair], inputs, 0.03, [], rows=64)
    z = capture_inputs(model, [pair.masked], inputs)[pair.masked]
    m1, f2 = model.get_submodule(pair.masked), model.get_submodule(pair.following)
    expected = refit_following_layer(
        z[torch.from_numpy(committed_rows(z.shape[0], 64))],
        m1.weight, m1.bias, compensated.get_submodule(pair.masked).weight, f2.weight, f2.bias,
        pair.activation, 0.03,
    )  # fmt: skip
    got = results[pair.following]
    assert got.rows == 64 < z.shape[0]
    assert np.array_equal(got.weight, expected.weight)
    assert np.array_equal(got.bias, expected.bias)
    _, every_row = apply_output_refit(model, compensated, [pair], inputs, 0.03, [])
    assert not np.allclose(every_row[pair.following].weight, got.weight)
    with pytest.raises(OutputRefitError, match="cannot commit"):
        apply_output_refit(model, compensated, [pair], inputs, 0.03, [], rows=z.shape[0] + 1)


def test_refit_brings_the_outputs_back_on_the_clients_data() -> None:
    torch.manual_seed(0)
    model = ViT(ViTConfig(width=16, depth=2, heads=2, mlp_ratio=4))
    inputs = torch.rand(40, 1, 28, 28)
    pairs = [RefitPair(*p) for p in model.refit_pairs]
    compensated = _masked_and_compensated(model, [p.masked for p in pairs], seed=2)
    refit, _ = apply_output_refit(model, compensated, pairs, inputs, 0.01, [])
    with torch.no_grad():
        target = model(inputs)
        assert torch.dist(refit(inputs), target) < 0.5 * torch.dist(compensated(inputs), target)


def test_refuses_bad_inputs() -> None:
    layers = _layers(50, 4, 8, 3, seed=5)
    with pytest.raises(OutputRefitError, match="rel_lam"):
        refit_following_layer(**layers, activation="gelu", rel_lam=0.0)
    with pytest.raises(OutputRefitError, match="rel_lam"):
        refit_following_layer(**layers, activation="gelu", rel_lam=float("nan"))
    with pytest.raises(OutputRefitError, match="activation"):
        refit_following_layer(**layers, activation="tanh", rel_lam=0.1)  # type: ignore[arg-type]
    bad = dict(layers, w1_after=layers["w1_after"].copy())
    bad["w1_after"][0, 0] = np.nan
    with pytest.raises(OutputRefitError, match="w1_after contains NaN"):
        refit_following_layer(**bad, activation="gelu", rel_lam=0.1)
    with pytest.raises(OutputRefitError, match="shape mismatch"):
        refit_following_layer(**dict(layers, z=layers["z"][:, :3]), activation="gelu", rel_lam=0.1)
    with pytest.raises(OutputRefitError, match="shape mismatch"):
        refit_following_layer(**dict(layers, b2=layers["b2"][:2]), activation="gelu", rel_lam=0.1)
    with pytest.raises(OutputRefitError, match="no rows"):
        refit_following_layer(**dict(layers, z=layers["z"][:0]), activation="gelu", rel_lam=0.1)
    with pytest.raises(OutputRefitError, match="activation"):
        RefitPair("a", "b", "tanh")  # type: ignore[arg-type]
    with pytest.raises(OutputRefitError, match="onto itself"):
        RefitPair("a", "a", "relu")


def test_apply_refuses_unsafe_or_inconsistent_pairs() -> None:
    torch.manual_seed(0)
    model = ViT(ViTConfig(width=16, depth=1, heads=2, mlp_ratio=4))
    inputs = torch.rand(4, 1, 28, 28)
    pair = RefitPair("blocks.0.fc1", "blocks.0.fc2", "gelu")
    # A masked following layer would be fitted back towards the weights the mask removed.
    with pytest.raises(OutputRefitError, match="would undo the mask"):
        apply_output_refit(model, model, [pair], inputs, 0.1, ["blocks.0.fc2.weight"])

    def refit(*pairs: RefitPair) -> object:
        return apply_output_refit(model, model, list(pairs), inputs, 0.1, [])

    with pytest.raises(OutputRefitError, match="same following layer"):
        refit(pair, RefitPair("blocks.0.qkv", "blocks.0.fc2", "gelu"))
    with pytest.raises(OutputRefitError, match="no submodule"):
        refit(RefitPair("blocks.9.fc1", "blocks.9.fc2", "gelu"))
    with pytest.raises(OutputRefitError, match=r"not nn\.Linear"):
        refit(RefitPair("blocks.0.norm2", "blocks.0.fc2", "gelu"))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.get_submodule("blocks.0.fc1").bias.add_(1.0)
    with pytest.raises(OutputRefitError, match="bias changed"):
        apply_output_refit(model, moved, [pair], inputs, 0.1, [])


def test_refit_values_above_the_published_bounds_are_refused() -> None:
    """The provider's tolerance assumes its published magnitudes; the client says which one it exceeds."""
    from zkunlearn.client.unlearning import UnlearningError, _check_published
    from zkunlearn.proofs.deletion import RefitSpec

    spec = RefitSpec("fc1.weight", None, "fc2", 4, 3, 4, 2, 0.05, "relu", h_bound=2.0)
    _check_published(spec, "refit of fc2", z=1.0, h=2.0)
    refused = r"refit of fc2: \|h\| reaches 2.5, above the published h_bound 2"
    with pytest.raises(UnlearningError, match=refused):
        _check_published(spec, "refit of fc2", z=1.0, h=np.array([[0.5, -2.5]]))
