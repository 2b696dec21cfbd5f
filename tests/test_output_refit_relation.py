"""The output-refit check relation: honest refits pass, each kind of lie shows in its residual, and the
relation exports to an ONNX model that matches torch and uses only the checked ops."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from zkunlearn.circuits import output_refit as orf
from zkunlearn.circuits.export import export_relation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.refit_cases import honest_relu_pair

N, D_IN, HIDDEN, D_OUT, REL_LAM = 24, 4, 8, 3, 0.05


def _honest(seed: int) -> dict[str, np.ndarray]:
    return honest_relu_pair(seed, N, D_IN, HIDDEN, D_OUT, REL_LAM)


def _inputs(values: dict[str, np.ndarray], seed: int = 0) -> list[torch.Tensor]:
    """Each tensor with its trailing blinding row (random: the relation must ignore it)."""
    rng = np.random.default_rng(1000 + seed)
    out = []
    for name in orf.INPUT_NAMES:
        v = values[name]
        v = v[None] if v.ndim == 1 else v
        out.append(torch.tensor(np.vstack([v, rng.normal(size=(1, v.shape[1]))]), dtype=torch.float64))
    return out


def _maxima(values: dict[str, np.ndarray]) -> np.ndarray:
    check = orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM).double()
    with torch.no_grad():
        return np.asarray(check(*_inputs(values)).numpy()[0])


def test_honest_refit_satisfies_every_residual() -> None:
    for seed in range(5):
        assert np.max(_maxima(_honest(seed))) < 1e-12


def test_blinding_rows_are_ignored() -> None:
    values = _honest(0)
    check = orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM).double()
    with torch.no_grad():
        a = check(*_inputs(values, seed=1))
        b = check(*_inputs(values, seed=2))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("lie", "residual"),
    [
        ("v_after", "normal_equations"),  # a following layer that is not the refit
        ("v_before", "normal_equations"),  # refit towards other personalized weights
        ("w1_after", "complementarity"),  # activations from weights other than the proven W1'
        ("z", "complementarity"),  # activations of other data than the committed inputs
    ],
)
def test_each_lie_shows_in_its_residual(lie: str, residual: str) -> None:
    values = _honest(3)
    values[lie] = values[lie] + 0.05 * np.random.default_rng(7).normal(size=values[lie].shape)
    got = dict(zip(orf.RESIDUALS, _maxima(values), strict=True))
    assert got[residual] > 1e-4, got


def test_sign_conditions_pin_relu() -> None:
    """h*(h-p) = 0 alone also admits h = p where p < 0; the sign residuals refuse that."""
    values = _honest(4)
    p = values["z"] @ values["w1_after"].T + values["b1"]
    values["h_after"] = p.copy()  # identity instead of ReLU: complementarity holds exactly
    got = dict(zip(orf.RESIDUALS, _maxima(values), strict=True))
    assert got["complementarity"] < 1e-12
    assert got["nonnegative"] > 1e-3
    values["h_after"] = np.maximum(p, 0.0) + 0.5 * (p < 0)  # above zero where it should be zero
    got = dict(zip(orf.RESIDUALS, _maxima(values), strict=True))
    assert got["complementarity"] > 1e-3


def test_gelu_is_refused_until_it_can_be_bound() -> None:
    with pytest.raises(ValueError, match="lookups"):
        orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM, activation="gelu")
    with pytest.raises(ValueError, match="rel_lam"):
        orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, 0.0)


def test_onnx_matches_torch_with_checked_ops(tmp_path: Path) -> None:
    path = export_relation(
        orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM),
        orf.example_inputs(N, D_IN, HIDDEN, D_OUT),
        tmp_path / "refit.onnx",
        orf.INPUT_NAMES,
        orf.OUTPUT_NAMES,
        atol=1e-3,
    )
    outs = onnx.load(str(path)).graph.output
    assert [d.dim_value for d in outs[0].type.tensor_type.shape.dim] == [1, len(orf.RESIDUALS)]
