"""Mask scores find the unit that only serves the forget class; selection respects budget and structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.provider.masks import (
    MaskSelectionError,
    compute_mask,
    neuron_scores,
    select_blocks,
    select_neurons,
    select_unstructured,
    weight_scores,
)

LOSS = nn.functional.cross_entropy
Data = tuple[torch.Tensor, torch.Tensor]
SPECIAL = 5  # the hidden unit that fires only for class 0 (the forget class)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def _problem(
    n: int = 64,
) -> tuple[_MLP, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = _MLP().double()
    with torch.no_grad():
        # Every other unit is always on (positive bias, small weights) and serves all classes alike.
        model.fc1.weight.normal_(0, 0.1)
        model.fc1.bias.fill_(1.0)
        # The special unit: on only when input feature 0 is high, i.e. only for class-0 samples.
        model.fc1.weight[SPECIAL] = 0.0
        model.fc1.weight[SPECIAL, 0] = 3.0
        model.fc1.bias[SPECIAL] = -1.5
        model.fc2.weight.normal_(0, 0.3)
        model.fc2.weight[:, SPECIAL] = torch.tensor([2.0, -1.0, -1.0, -1.0], dtype=torch.float64)

    def samples(cls: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = 0.1 * torch.randn(n, 8, dtype=torch.float64)
        x[:, cls] += 1.0
        return x, torch.full((n,), cls)

    forget = samples(0)
    parts = [samples(c) for c in (1, 2, 3)]
    retain = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return model, forget, retain


def test_the_synthetic_unit_really_is_forget_only() -> None:
    model, forget, retain = _problem()
    with torch.no_grad():
        on_forget = torch.relu(model.fc1(forget[0]))[:, SPECIAL]
        on_retain = torch.relu(model.fc1(retain[0]))[:, SPECIAL]
    assert bool((on_forget > 0.5).all())
    assert bool((on_retain == 0).all())


@pytest.mark.parametrize("structure", ["unstructured", "block"])
def test_fisher_ratio_selects_the_forget_unit(structure: str) -> None:
    model, forget, retain = _problem()
    # Budget of exactly one row of fc1 (8 of 128 weights); B = 8 makes the row one block.
    mask = compute_mask(
        model,
        ["fc1.weight"],
        forget,
        retain,
        LOSS,
        "fisher-ratio",
        fraction=8 / 128,
        block_size=8,
        structure=structure,
    )
    dense = mask.dense("fc1.weight")
    assert dense.sum() == 8
    assert dense[SPECIAL].all()


def test_fisher_ratio_scores_rank_the_unit_first() -> None:
    model, forget, retain = _problem()
    s = weight_scores(model, ["fc1.weight", "fc2.weight"], forget, retain, LOSS, "fisher-ratio")
    assert s["fc1.weight"].shape == (16, 8)
    assert s["fc2.weight"].shape == (4, 16)
    row_best = s["fc1.weight"].max(axis=1)
    assert int(np.argmax(row_best)) == SPECIAL
    others = np.delete(s["fc1.weight"], SPECIAL, axis=0)
    assert s["fc1.weight"][SPECIAL].min() > 100 * others.max()


def _loop_moments(model: nn.Module, data: Data, name: str) -> tuple[np.ndarray, np.ndarray]:
    param = dict(model.named_parameters())[name]
    grads = []
    for i in range(data[0].shape[0]):
        model.zero_grad()
        LOSS(model(data[0][i : i + 1]), data[1][i : i + 1]).backward()  # type: ignore[no-untyped-call]
        assert param.grad is not None
        grads.append(param.grad.detach().double().numpy().copy())
    g = np.stack(grads)
    return g.mean(0), (g**2).mean(0)


def test_scores_equal_their_formulas_on_per_sample_loops() -> None:
    model, forget, retain = _problem(n=10)
    name = "fc2.weight"
    gf, ff = _loop_moments(model, forget, name)
    gr, fr = _loop_moments(model, retain, name)
    w = model.fc2.weight.detach().numpy()
    got = {
        sc: weight_scores(model, [name], forget, retain, LOSS, sc)[name]
        for sc in ("zkapex", "fisher-ratio", "salun")
    }
    assert np.allclose(got["fisher-ratio"], ff / (2.0 * fr + 1e-12), rtol=1e-9)
    assert np.allclose(got["salun"], np.abs(gf), rtol=1e-9, atol=1e-15)
    s_f = gf * w - 0.45 * (1e-8 + ff) * w**2
    s_r = gr * w - 0.45 * (1e-8 + fr) * w**2
    assert np.allclose(got["zkapex"], s_f / (2.0 * s_r + 1e-12), rtol=1e-7)


def test_neuron_scores_on_a_conv_layer_use_channels() -> None:
    torch.manual_seed(0)
    first = nn.Conv2d(1, 4, 3)
    conv = nn.Sequential(first, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        first.bias.copy_(torch.tensor([-100.0, 0.0, 0.0, 0.0]))  # type: ignore[union-attr]  # channel 0 never fires
    f = (x, torch.zeros(6, dtype=torch.long))
    scores = neuron_scores(conv, ["0.weight"], f, f)["0.weight"]
    assert scores.shape == (4,)
    assert scores[0] == 0.0
    assert np.allclose(scores[1:], 1.0)
    mask = select_neurons({"0.weight": scores}, {"0.weight": (4, 1, 3, 3)}, 0.5, 9)
    dense = mask.dense("0.weight")
    assert not dense[0].any()
    assert dense.sum() == 2 * 9


def test_neuron_mask_selects_the_unit() -> None:
    model, forget, retain = _problem()
    rows = neuron_scores(model, ["fc1.weight"], forget, retain)["fc1.weight"]
    assert int(np.argmax(rows)) == SPECIAL
    mask = compute_mask(
        model, ["fc1.weight"], forget, retain, LOSS, fraction=1 / 16, block_size=8, structure="neuron"
    )
    dense = mask.dense("fc1.weight")
    assert dense[SPECIAL].all()
    assert dense.sum() == 8


@pytest.mark.parametrize("score", ["zkapex", "fisher-ratio", "salun", "random"])
@pytest.mark.parametrize("fraction", [0.04, 0.3])
def test_every_score_respects_the_budget(score: str, fraction: float) -> None:
    model, forget, retain = _problem(n=24)
    layers = ["fc1.weight", "fc2.weight"]
    total = 128 + 64
    for structure in ("unstructured", "block"):
        mask = compute_mask(model, layers, forget, retain, LOSS, score, fraction, 16, structure, seed=1)
        assert mask.masked_count() == round(fraction * total)
        mask.validate_against({"fc1.weight": (16, 8), "fc2.weight": (4, 16)}, 16)


def test_random_score_is_seeded() -> None:
    model, forget, retain = _problem(n=8)
    a = compute_mask(model, ["fc1.weight"], forget, retain, LOSS, "random", 0.3, seed=1)
    b = compute_mask(model, ["fc1.weight"], forget, retain, LOSS, "random", 0.3, seed=1)
    c = compute_mask(model, ["fc1.weight"], forget, retain, LOSS, "random", 0.3, seed=2)
    assert a.digest() == b.digest() != c.digest()


def test_block_structure_touches_fewer_blocks_at_the_same_budget() -> None:
    rng = np.random.default_rng(0)
    scores = {"a": rng.random((32, 64)), "b": rng.random((16, 40))}
    B, fraction = 64, 0.1
    total = 32 * 64 + 16 * 40
    loose = select_unstructured(scores, fraction, B)
    packed = select_blocks(scores, fraction, B)
    k = round(fraction * total)
    assert loose.masked_count() == packed.masked_count() == k
    n_loose = sum(len(lm.blocks) for lm in loose.layers)
    n_packed = sum(len(lm.blocks) for lm in packed.layers)
    assert n_packed == math.ceil(k / B)
    assert n_packed < n_loose


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_block_density_caps_every_block_and_keeps_the_budget(density: float) -> None:
    rng = np.random.default_rng(1)
    scores = {"a": rng.random((32, 64)), "b": rng.random((16, 40))}
    B, fraction = 64, 0.1
    k = round(fraction * (32 * 64 + 16 * 40))
    cap = math.floor(density * B)
    mask = select_blocks(scores, fraction, B, density)
    assert mask.masked_count() == k
    per_block = [len(ix) for lm in mask.layers for ix in lm.blocks.values()]
    assert max(per_block) <= cap  # every touched block keeps weights to compensate with
    assert len(per_block) == math.ceil(k / cap)  # and no more blocks are touched than the cap forces
    whole = select_blocks(scores, fraction, B)
    assert len(per_block) > sum(len(lm.blocks) for lm in whole.layers)


def test_block_density_one_masks_whole_blocks_and_picks_each_blocks_best_weights() -> None:
    scores = np.zeros(32)
    scores[16:32] = np.linspace(1, 2, 16)  # block 1 outranks block 0
    assert select_blocks({"w": scores}, 16 / 32, 16).touched_blocks("w") == [1]
    half = select_blocks({"w": scores}, 8 / 32, 16, density=0.5)
    assert half.touched_blocks("w") == [1]
    assert np.flatnonzero(half.dense("w")).tolist() == list(range(24, 32))  # the block's top half by score


def test_class_rows_remove_the_forget_class_row_whole_outside_the_budget() -> None:
    """The head's forget-class row goes whole, by neuron score; the fraction's budget and the block cap
    apply to the hidden layer alone, so capped hidden blocks and whole head rows never compete."""
    model, forget, retain = _problem()
    layers = ["fc1.weight", "fc2.weight"]
    fraction, block, density = 0.25, 8, 0.5
    mask = compute_mask(
        model, layers, forget, retain, LOSS, "fisher-ratio", fraction, block, "block",
        density=density, class_rows={"fc2.weight": 1},
    )  # fmt: skip
    head = mask.dense("fc2.weight")
    assert head[0].all()  # class 0 is the forget class
    assert not head[1:].any()
    hidden = mask.layer("fc1.weight")
    assert hidden.masked_count() == round(fraction * 16 * 8)
    assert max(len(ix) for ix in hidden.blocks.values()) <= density * block


def test_class_rows_refusals() -> None:
    model, forget, retain = _problem(n=8)
    layers = ["fc1.weight", "fc2.weight"]
    with pytest.raises(MaskSelectionError, match="not targeted"):
        compute_mask(model, ["fc1.weight"], forget, retain, LOSS, class_rows={"fc2.weight": 1})
    with pytest.raises(MaskSelectionError, match=r"must be in 1\.\.3, got 4"):
        compute_mask(model, layers, forget, retain, LOSS, class_rows={"fc2.weight": 4})
    with pytest.raises(MaskSelectionError, match="no layer for the fraction"):
        compute_mask(model, ["fc2.weight"], forget, retain, LOSS, class_rows={"fc2.weight": 1})


def test_block_density_refusals() -> None:
    scores = {"w": np.arange(32.0)}
    with pytest.raises(MaskSelectionError, match="density must be in"):
        select_blocks(scores, 0.25, 16, density=0.0)
    with pytest.raises(MaskSelectionError, match="density must be in"):
        select_blocks(scores, 0.25, 16, density=float("nan"))
    with pytest.raises(MaskSelectionError, match=r"more than blocks capped at density 0\.25"):
        select_blocks(scores, 0.5, 16, density=0.25)  # 16 weights asked, two blocks of at most 4 hold 8
    model, forget, retain = _problem(n=8)
    with pytest.raises(MaskSelectionError, match="density caps blocks"):
        compute_mask(model, ["fc1.weight"], forget, retain, LOSS, structure="unstructured", density=0.5)


def test_block_selection_prefers_the_block_of_high_ranks_over_one_outlier() -> None:
    scores = np.zeros(32)
    scores[3] = 1e12  # one outlier in block 0
    scores[16:32] = np.linspace(1, 2, 16)  # block 1: uniformly high
    mask = select_blocks({"w": scores}, 16 / 32, 16)
    assert mask.touched_blocks("w") == [1]


def test_unstructured_selection_is_exact_top_k_with_deterministic_ties() -> None:
    scores = {"w": np.array([[0.5, 3.0, 1.0], [3.0, np.nan, 2.0]])}
    mask = select_unstructured(scores, 3 / 6, 4)
    assert np.array_equal(mask.dense("w"), np.array([[False, True, False], [True, False, True]]))
    assert select_unstructured(scores, 0.0, 4).masked_count() == 0
    assert select_unstructured(scores, 1e-6, 4).masked_count() == 1  # a positive budget masks something


def test_refusals() -> None:
    model, forget, retain = _problem(n=8)
    with pytest.raises(MaskSelectionError, match="unknown score"):
        compute_mask(model, ["fc1.weight"], forget, retain, LOSS, "magic")
    with pytest.raises(MaskSelectionError, match="unknown structure"):
        compute_mask(model, ["fc1.weight"], forget, retain, LOSS, structure="diagonal")
    with pytest.raises(MaskSelectionError, match="fraction"):
        compute_mask(model, ["fc1.weight"], forget, retain, LOSS, fraction=1.5)
    with pytest.raises(MaskSelectionError, match="no parameters"):
        compute_mask(model, ["fc9.weight"], forget, retain, LOSS)
    with pytest.raises(MaskSelectionError, match="no layers"):
        compute_mask(model, [], forget, retain, LOSS)
    with pytest.raises(MaskSelectionError, match="block size"):
        select_unstructured({"w": np.ones(4)}, 0.5, 0)
    with pytest.raises(MaskSelectionError, match=">= 2-D"):
        neuron_scores(model, ["fc1.bias"], forget, retain)
    with pytest.raises(MaskSelectionError, match="row scores"):
        select_neurons({"w": np.ones(3)}, {"w": (4, 2)}, 0.5, 4)
    with pytest.raises(MaskSelectionError, match="non-empty"):
        weight_scores(model, ["fc1.weight"], (forget[0][:0], forget[1][:0]), retain, LOSS)
