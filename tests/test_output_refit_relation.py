"""The output-refit check relation: honest refits pass, each kind of lie shows in its residual, the
in-circuit activations are what they claim (GELU within its certified bound), and the relation exports
to an ONNX model that matches torch and uses only the checked ops."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from zkunlearn.circuits import output_refit as orf
from zkunlearn.circuits.export import export_relation
from zkunlearn.proofs.fixedpoint import FixedPointError, dequantise, output_refit_tolerance, quantise

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scipy.special import ndtr  # type: ignore[import-untyped]
from zkunlearn.circuits import activations

from tests.refit_cases import declared_bounds, honest_pair, relation_inputs

N, D_IN, HIDDEN, D_OUT, REL_LAM = 24, 4, 8, 3, 0.05


def _honest(seed: int, activation: activations.Activation = "relu") -> dict[str, np.ndarray]:
    return honest_pair(seed, N, D_IN, HIDDEN, D_OUT, REL_LAM, activation)


def _inputs(values: dict[str, np.ndarray], seed: int = 0, block: int = D_IN) -> list[torch.Tensor]:
    """The committed layout, blinding random (the relation must ignore it)."""
    rng = np.random.default_rng(1000 + seed)
    arrays = relation_inputs(values, block=block, batch=2, n_blind=orf.N_BLIND, rng=rng)
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


def _check(activation: activations.Activation = "relu", block: int = D_IN) -> orf.OutputRefitCheck:
    return orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM, activation, block=block, batch=2).double()


def _maxima(
    values: dict[str, np.ndarray], activation: activations.Activation = "relu", block: int = D_IN
) -> np.ndarray:
    with torch.no_grad():
        return np.asarray(_check(activation, block)(*_inputs(values, block=block)).numpy()[0])


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_honest_refit_satisfies_the_normal_equations(activation: activations.Activation) -> None:
    """The client's refit and the circuit share one activation, so the residual is float round-off."""
    for seed in range(5):
        assert np.max(_maxima(_honest(seed, activation), activation)) < 1e-12


def test_blinding_rows_are_ignored() -> None:
    values = _honest(0)
    with torch.no_grad():
        a = _check()(*_inputs(values, seed=1))
        b = _check()(*_inputs(values, seed=2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("block", [2, 8, 16])
def test_any_group_obs_block_layout_reads_the_same_weights(block: int) -> None:
    """Half-row, two-row and four-row blocks: the relation reassembles W1 row-major either way."""
    values = _honest(1, "gelu")
    assert _maxima(values, "gelu", block)[0] < 1e-12
    assert _maxima(dict(values, v_after=values["v_after"] + 0.05), "gelu", block)[0] > 1e-4


def test_layout_errors_are_refused() -> None:
    with pytest.raises(ValueError, match="split into batches"):
        orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM, block=3)
    with pytest.raises(ValueError, match="expected"):
        _check()(*_inputs(_honest(0))[:-1])


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize(
    "lie",
    [
        "v_after",  # a following layer that is not the refit
        "v_before",  # refit towards other personalized weights
        "w1_after",  # activations from weights other than the proven W1'
        "w1_before",  # targets from another personalized layer
        "z",  # activations of other data than the committed inputs
        "b1",
    ],
)
def test_each_lie_shows_in_the_residual(lie: str, activation: activations.Activation) -> None:
    values = _honest(3, activation)
    values[lie] = values[lie] + 0.05 * np.random.default_rng(7).normal(size=values[lie].shape)
    assert _maxima(values, activation)[0] > 1e-4


def test_the_refit_of_one_activation_fails_the_other() -> None:
    """The activation is part of the statement: a ReLU refit does not pass as a GELU one."""
    assert _maxima(_honest(2, "relu"), "gelu")[0] > 1e-3


def test_relu_is_exact_and_gelu_within_its_certified_bound() -> None:
    x = torch.linspace(-60.0, 60.0, 2_400_001, dtype=torch.float64)
    assert torch.equal(activations.relu(x), torch.relu(x))
    exact = x * torch.from_numpy(ndtr(x.numpy()))
    err = (activations.gelu_certified(x) - exact).abs()
    assert float(err.max()) <= activations.GELU_ERROR_BOUND
    # The clamp is where the tail error lives: check both sides of it densely too.
    clamp = activations.GELU_CLAMP
    a = torch.linspace(clamp - 0.5, clamp + 0.5, 100_001, dtype=torch.float64)
    for p in (a, -a):
        err = (activations.gelu_certified(p) - p * torch.from_numpy(ndtr(p.numpy()))).abs()
        assert float(err.max()) <= activations.GELU_ERROR_BOUND
    # torch's own erf GELU agrees to the same bound (the models' inference activation).
    assert float((activations.gelu_certified(x) - torch.nn.functional.gelu(x)).abs().max()) <= 7e-5


def test_unknown_activation_and_bad_ridge_are_refused() -> None:
    with pytest.raises(ValueError, match="activation"):
        orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM, activation="tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation"):
        activations.activate(torch.zeros(2), "tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rel_lam"):
        orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, 0.0)


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_onnx_matches_torch_with_checked_ops(tmp_path: Path, activation: activations.Activation) -> None:
    check = orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM, activation, block=2 * D_IN, batch=2)
    path = export_relation(
        check,
        check.example_inputs(),
        tmp_path / "refit.onnx",
        check.input_names(),
        orf.OUTPUT_NAMES,
        atol=1e-3,
    )
    outs = onnx.load(str(path)).graph.output
    assert [d.dim_value for d in outs[0].type.tensor_type.shape.dim] == [1, len(orf.RESIDUALS)]


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_rounded_inputs_stay_within_the_derived_tolerance(activation: activations.Activation) -> None:
    """Inputs rounded to the circuit's grid (scale 13) move the honest residual far less than the
    derived bound allows; a refit moved by the bound's size is caught. Rounding *every* input after a
    float solve is more error than the SDK's flow has (it solves from the committed grid values, so
    the bound charges no input rounding but ``V'``'s): the margin holds even so."""
    scale = 13
    for seed in range(10):
        values = _honest(seed, activation)
        tol = output_refit_tolerance(
            N, HIDDEN, REL_LAM, scale, activation, **declared_bounds(values, activation)
        )
        rounded = [dequantise(quantise(a.numpy(), scale), scale) for a in _inputs(values)]
        with torch.no_grad():
            got = float(_check(activation)(*[torch.tensor(a) for a in rounded])[0, 0])
        assert 0 < got <= tol / 10
        moved = dict(values, v_after=values["v_after"] + 2 * tol / REL_LAM)
        assert _maxima(moved, activation)[0] > tol


def test_tolerance_grows_with_scale_and_refuses_bad_arguments() -> None:
    bounds = {"v_bound": 1.0, "h_bound": 2.0, "y_bound": 2.0}
    relu13 = output_refit_tolerance(N, HIDDEN, REL_LAM, 13, "relu", **bounds)
    assert output_refit_tolerance(N, HIDDEN, REL_LAM, 15, "relu", **bounds) < relu13 / 3
    assert output_refit_tolerance(N, HIDDEN, REL_LAM, 13, "gelu", **bounds) > relu13
    assert output_refit_tolerance(N, HIDDEN, REL_LAM, 13, "relu", worst_case=True, **bounds) >= relu13
    with pytest.raises(FixedPointError, match="activation"):
        output_refit_tolerance(N, HIDDEN, REL_LAM, 13, "tanh", **bounds)
    with pytest.raises(FixedPointError, match="bounds"):
        output_refit_tolerance(N, HIDDEN, REL_LAM, 13, "relu", **dict(bounds, h_bound=0.0))
