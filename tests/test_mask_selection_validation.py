"""Mask selection scores every call of a module, refuses layers whose rows are not output units and bad
arguments with its own errors, and caps blocks without losing a weight to float error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask, Mask, MaskError
from zkunlearn.provider.masks import (
    MaskSelectionError,
    compute_mask,
    neuron_scores,
    select_blocks,
    select_neurons,
    select_unstructured,
    weight_scores,
)
from zkunlearn.provider.proof_budget import block_cap, select_within_budget

LOSS = nn.functional.cross_entropy


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def _mlp_data(n: int = 10) -> tuple[_MLP, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(n, 4, dtype=torch.float64)
    return _MLP().double(), (x, torch.randint(0, 3, (n,)))


class _Shared(nn.Module):
    """One layer applied twice per forward (a shared/tied block)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.relu(self.fc(x)))
        return out


def test_a_module_called_twice_is_scored_over_both_calls() -> None:
    model = _Shared().double()
    with torch.no_grad():  # swap units 0 and 1: x = e0 fires unit 1 on the first call, unit 0 on the second
        model.fc.weight.copy_(torch.tensor([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64))
    forget = (torch.tensor([[1.0, 0, 0]], dtype=torch.float64), torch.zeros(1, dtype=torch.long))
    retain = (torch.tensor([[0, 0, 1.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.long))
    scores = neuron_scores(model, ["fc.weight"], forget, retain, eps=1.0)["fc.weight"]
    # Each call's activations count: units 0 and 1 each fire in one of the two calls.
    np.testing.assert_allclose(scores, [0.5, 0.5, 0.0])


class _Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ct = nn.ConvTranspose2d(3, 3, 2)
        self.fc = nn.Linear(27, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.ct(x).flatten(1))
        return out


class _Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.emb(x).mean(1))
        return out


@pytest.mark.parametrize("score", ["fisher-ratio", "random"])
def test_neuron_rows_must_be_output_units(score: str) -> None:
    """A transposed conv's weight dim 0 is its *input* channel and an embedding's rows are tokens: a
    neuron mask on them would remove rows chosen by other units' scores, even when the counts agree."""
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    data = (x, torch.randint(0, 2, (4,)))
    with pytest.raises(MaskSelectionError, match=r"'ct\.weight' belongs to 'ct' of type ConvTranspose2d"):
        compute_mask(_Transposed().double(), ["ct.weight"], data, data, LOSS, score, 0.34, 4, "neuron")
    tokens = (torch.randint(0, 4, (5, 3)), torch.randint(0, 2, (5,)))
    with pytest.raises(MaskSelectionError, match="of type Embedding"):
        neuron_scores(_Embedded().double(), ["emb.weight"], tokens, tokens)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x)
        out: torch.Tensor = self.head(a.mean(1))
        return out


def test_a_module_whose_forward_never_runs_is_refused() -> None:
    # MultiheadAttention reads out_proj.weight functionally: the submodule's hook never fires.
    torch.manual_seed(0)
    data = (torch.randn(6, 5, 4), torch.randint(0, 3, (6,)))
    with pytest.raises(MaskSelectionError, match=r"\['attn\.out_proj\.weight'\] produced no output"):
        neuron_scores(_Attention(), ["attn.out_proj.weight"], data, data)


@pytest.mark.parametrize("max_samples", [0, -1, 1.5, True, "8"])
def test_max_samples_must_be_a_positive_int(max_samples: object) -> None:
    model, data = _mlp_data()
    with pytest.raises(MaskSelectionError, match="max_samples must be"):
        weight_scores(model, ["fc1.weight"], data, data, LOSS, "fisher-ratio", max_samples=max_samples)  # type: ignore[arg-type]


def test_all_nan_scores_are_refused_not_turned_into_a_mask() -> None:
    nan = np.full((2, 4), np.nan)
    with pytest.raises(MaskSelectionError, match=r"every score .* is NaN"):
        select_unstructured({"w": nan}, 0.25, 4)
    with pytest.raises(MaskSelectionError, match=r"every score .* is NaN"):
        select_blocks({"w": nan}, 0.25, 4)
    with pytest.raises(MaskSelectionError, match=r"every score .* is NaN"):
        select_neurons({"w": np.full(2, np.nan)}, {"w": (2, 4)}, 0.5, 4)
    # One NaN among real scores still ranks last rather than refusing the selection.
    assert select_unstructured({"w": np.array([np.nan, 1.0, 2.0, 3.0])}, 0.5, 4).masked_count() == 2


def test_selection_arguments_of_the_wrong_type_get_mask_selection_errors() -> None:
    scores = {"a": np.arange(8.0)}
    with pytest.raises(MaskSelectionError, match="block size must be an integer"):
        select_blocks(scores, 0.5, 4.0)  # type: ignore[arg-type]
    with pytest.raises(MaskSelectionError, match="block size must be an integer"):
        select_unstructured(scores, 0.5, 4.0)  # type: ignore[arg-type]
    for fraction in ("0.5", None, True):
        with pytest.raises(MaskSelectionError, match="fraction must be a real number"):
            select_unstructured(scores, fraction, 4)  # type: ignore[arg-type]
    with pytest.raises(MaskSelectionError, match="block density must be a real number"):
        select_blocks(scores, 0.5, 4, density="1")  # type: ignore[arg-type]
    with pytest.raises(MaskSelectionError, match=r"shapes has no entry for the scored layers \['a'\]"):
        select_neurons({"a": np.ones(3)}, {}, 0.5, 4)
    with pytest.raises(MaskSelectionError, match="scores must map layer name"):
        select_unstructured([np.ones(3)], 0.5, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [1.5, True, "1", np.float64(1.0)])
def test_class_rows_must_be_integers(rows: object) -> None:
    model, data = _mlp_data()
    with pytest.raises(MaskSelectionError, match=r"class_rows\['fc2\.weight'\] must be an integer"):
        compute_mask(
            model, ["fc1.weight", "fc2.weight"], data, data, LOSS, fraction=0.1, block_size=6,
            class_rows={"fc2.weight": rows},  # type: ignore[dict-item]
        )  # fmt: skip
    # A numpy integer is an integer: it removes exactly that many rows.
    mask = compute_mask(
        model, ["fc1.weight", "fc2.weight"], data, data, LOSS, fraction=0.1, block_size=6,
        class_rows={"fc2.weight": np.int64(1)},  # type: ignore[dict-item]
    )  # fmt: skip
    assert int(mask.dense("fc2.weight").any(1).sum()) == 1


@pytest.mark.parametrize(("density", "B", "cap"), [(0.29, 100, 29), (0.57, 100, 57), (0.58, 100, 58)])
def test_block_cap_survives_float_error_in_both_selections(density: float, B: int, cap: int) -> None:
    assert density * B < cap  # the float product falls short: floor() alone would lose a weight
    assert block_cap(density, B) == cap
    rng = np.random.default_rng(0)
    scores = {"w": rng.random(4 * B)}
    # Exactly four full blocks' worth: feasible only if every block takes its whole cap.
    blocks = select_blocks(scores, 4 * cap / (4 * B), B, density)
    assert sorted(len(ix) for ix in blocks.layer("w").blocks.values()) == [cap] * 4
    budget = select_within_budget(scores, block_size=B, batch=1, max_batches=2, density=density)
    assert [len(ix) for ix in budget.layer("w").blocks.values()] == [cap, cap]


def test_block_cap_forgives_float_error_only() -> None:
    assert block_cap(0.29, 100) == 29  # 28.999999999999996 in floats
    assert block_cap(0.5, 64) == 32
    assert block_cap(1 / 3, 6) == 2  # a computed k/B lands on k, not k - 1
    assert block_cap(0.289, 100) == 28  # a genuinely lower density is not rounded up
    assert block_cap(0.001, 16) == 1  # at least one weight


def test_mask_refuses_unencodable_names_and_non_int_versions() -> None:
    with pytest.raises(MaskError, match="not encodable as UTF-8"):
        LayerMask("\ud800", (4,), 2, {})
    with pytest.raises(MaskError, match="not encodable as UTF-8"):
        LayerMask.from_dense("\udcff", np.zeros(4, bool), 2)
    for version in (1.0, True):
        with pytest.raises(MaskError, match="mask version must be an integer"):
            Mask((), version=version)  # type: ignore[arg-type]
    m = Mask((), version=np.int64(1))  # type: ignore[arg-type]
    assert type(m.version) is int
    assert m.to_bytes() == Mask(()).to_bytes()


def test_mask_containers_of_the_wrong_kind_get_mask_errors() -> None:
    with pytest.raises(MaskError, match="mask layers must be a sequence of LayerMask, got NoneType"):
        Mask(None)  # type: ignore[arg-type]
    with pytest.raises(MaskError, match="dense masks must map layer name"):
        Mask.from_dense([np.zeros(3, bool)], 2)  # type: ignore[arg-type]
    mask = Mask((LayerMask("a", (4,), 2, {}),))
    with pytest.raises(MaskError, match="model shape of layer 'a' must be a sequence of integers"):
        mask.validate_against({"a": 4})  # type: ignore[dict-item]
    with pytest.raises(MaskError, match="model shapes must map layer name"):
        mask.validate_against([("a", (4,))])  # type: ignore[arg-type]
    mask.validate_against({"a": (np.int64(4),)}, 2)
