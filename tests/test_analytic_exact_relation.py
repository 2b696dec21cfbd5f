"""The exact analytic relation without ezkl: reference outputs, honest completeness, the slack an
adversary gets (found by search, held to the derived bound) and the no-ops it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zkunlearn.proofs.analytic_exact import (
    ExactAnalyticSpec,
    factor_of,
    gram,
    quantise_rows,
    ridge_weights,
    z_binding,
)
from zkunlearn.proofs.fixedpoint import FIELD_MODULUS, FixedPointError

from tests.analytic_exact_cases import (
    accepted,
    best_factor_residual,
    digits_features,
    head_scale,
    largest_accepted_step,
    make_deletion,
    synthetic_features,
    worst_directions,
)

SPECS = {
    "d4 k3": ExactAnalyticSpec(4, 3, 2),
    "d8 k10 (demo)": ExactAnalyticSpec(8, 10, 4),
    "d32 k10": ExactAnalyticSpec(32, 10, 8),
    "d8 k10 gamma 2^-4": ExactAnalyticSpec(8, 10, 4, gamma=2.0**-4),
}


def _class_rows(labels: np.ndarray, cls: int, n: int) -> np.ndarray:
    return np.where(labels == cls)[0][:n]


def test_specs_refuse_what_the_field_or_the_decomposition_cannot_hold() -> None:
    with pytest.raises(ValueError, match="integer >= 4"):
        ExactAnalyticSpec(4, 3, 2, gamma=1e-3)  # gamma * 4**8 is not an integer
    with pytest.raises(ValueError, match="float32-exact"):
        ExactAnalyticSpec(4, 3, 2, w_bits=48)  # the head's offset passes the decomposition
    for spec in SPECS.values():
        assert max(spec.worst_case_outputs()) < FIELD_MODULUS // 2
        # The certificate's margin: eta + |E| / 2**(2l) stays within gamma / 2 at the threshold.
        assert spec.eta_q + math.sqrt(spec.e_threshold) / 4.0**spec.l_bits <= spec.gamma_q / 2


def test_reference_outputs_match_the_torch_relation() -> None:
    """The Python-int reference is what the exported module computes (float64, values below 2**53)."""
    spec = SPECS["d4 k3"]
    rng = np.random.default_rng(4)
    n = spec.n
    parts = {
        "m": rng.integers(-900, 900, size=(n, n)),
        "m_after": rng.integers(-900, 900, size=(n, n)),
        "w": rng.integers(-900, 900, size=(spec.d, spec.k)),
        "z": rng.integers(-30, 30, size=(spec.n_u, n)),
        "factor": rng.integers(-900, 900, size=(n, n)),
    }
    rel = spec.relation().double()
    pad = {name: np.vstack([v, rng.integers(-5, 5, size=(1, v.shape[1]))]) for name, v in parts.items()}
    with torch.no_grad():
        got = rel(*(torch.tensor(pad[k], dtype=torch.float64) for k in ("m", "m_after", "w", "z", "factor")))
    obj = {k: v.astype(object) for k, v in parts.items()}
    from zkunlearn.proofs.analytic_exact import reference_outputs

    want = reference_outputs(spec, obj["m"], obj["m_after"], obj["w"], obj["z"], obj["factor"])
    values = [int(v) for v in got.numpy()]
    assert values[:-2] == list(want.eq)
    # The sums reach ~2**60: float64 holds them to its 53 bits.
    assert values[-2] == pytest.approx(want.r_sq, rel=1e-12)
    assert values[-1] == pytest.approx(want.e_sq, rel=1e-12)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("source", ["synthetic", "digits"])
def test_honest_deletions_stay_under_the_thresholds(name: str, source: str) -> None:
    spec = SPECS[name]
    x, y = synthetic_features(spec, 400, 1) if source == "synthetic" else digits_features(spec)
    case = make_deletion(spec, x, y, _class_rows(y, 1, spec.n_u))
    out = case.outputs(spec)
    assert all(v == 0 for v in out.eq)
    assert out.r_sq <= spec.r_threshold * 1e-6  # the thresholds cover the worst case, far from these
    assert out.e_sq <= spec.e_threshold * 0.01


@given(seed=st.integers(0, 2**31), n=st.integers(20, 200), n_forget=st.integers(1, 4))
@settings(max_examples=30, deadline=None)
def test_honest_deletions_stay_under_the_thresholds_property(seed: int, n: int, n_forget: int) -> None:
    spec = SPECS["d8 k10 (demo)"]
    x, y = synthetic_features(spec, n, seed)
    forget = np.random.default_rng(seed).choice(n, size=n_forget, replace=False)
    case = make_deletion(spec, x, y, forget)
    assert accepted(spec, case.outputs(spec))
    # Enrollment is the same relation with no forget rows.
    enrolled = make_deletion(spec, x, y, np.array([], dtype=np.int64))
    assert accepted(spec, enrolled.outputs(spec, z=np.zeros((0, spec.n), dtype=object)))


@pytest.mark.parametrize("name", ["d4 k3", "d8 k10 (demo)", "d32 k10"])
@pytest.mark.parametrize("source", ["synthetic", "digits"])
def test_adversarial_slack_is_below_one_percent_of_the_heads_spread(name: str, source: str) -> None:
    """The largest edit of ``W'`` that still verifies, along the directions the check constrains least,
    in units of the head's standard deviation: under the derived bound, and under 0.01."""
    spec = SPECS[name]
    x, y = synthetic_features(spec, 400, 2) if source == "synthetic" else digits_features(spec)
    case = make_deletion(spec, x, y, _class_rows(y, 2, spec.n_u))
    scale = head_scale(spec, case.w_after)
    for label, direction in worst_directions(spec, case).items():
        steps = largest_accepted_step(spec, case, direction)
        slack = steps / 2.0**spec.w_bits
        assert slack <= spec.slack_bound(), (label, slack, spec.slack_bound())
        assert slack / scale <= 0.01, (label, slack / scale)
        # The search's edit is accepted and a slightly larger one is not: the root is the boundary.
        edited = case.w_after + np.rint(direction * steps * 0.999).astype(np.int64).astype(object)
        assert accepted(spec, case.outputs(spec, w=edited)), label
        beyond = case.w_after + np.rint(direction * steps * 1.01 + np.sign(direction)).astype(
            np.int64
        ).astype(object)
        assert not accepted(spec, case.outputs(spec, w=beyond)), label


def test_no_ops_and_near_misses_are_refused() -> None:
    """W' = W, a Gram never downdated, a refit that keeps the forgotten rows, and a head 1 % of its spread
    off in its least-constrained entry: each refused next to the accepted honest answer."""
    spec = SPECS["d8 k10 (demo)"]
    x, y = digits_features(spec)
    case = make_deletion(spec, x, y, _class_rows(y, 3, spec.n_u))
    assert accepted(spec, case.outputs(spec))
    w_before = ridge_weights(spec, case.m)
    assert not accepted(spec, case.outputs(spec, w=w_before))  # W' = W: the refit kept the forgotten rows
    kept = case.outputs(spec, m_after=case.m, w=w_before, factor=factor_of(spec, case.m))
    assert any(v != 0 for v in kept.eq)  # M' = M: never downdated
    scale = head_scale(spec, case.w_after)
    entry = worst_directions(spec, case)["single entry"]
    nudged = case.w_after + np.rint(entry * 0.01 * scale * 2.0**spec.w_bits).astype(np.int64).astype(object)
    assert not accepted(spec, case.outputs(spec, w=nudged))


def test_forgetting_rows_never_learned_cannot_be_certified() -> None:
    """Rows outside what the Gram holds (here: of a class the client never learned) leave M' indefinite:
    the client refuses, and no factor meets the threshold. (Rows inside the span of learned ones cannot be
    told apart from learned rows by any Gram-based check.)"""
    spec = SPECS["d8 k10 (demo)"]
    x, y = digits_features(spec)
    learned = np.where(y != 7)[0][:300]
    m = gram(quantise_rows(spec, x[learned], y[learned]))
    strangers = _class_rows(y, 7, spec.n_u)
    m_after = m - gram(quantise_rows(spec, x[strangers], y[strangers]))
    with pytest.raises(FixedPointError, match="not all learned"):
        factor_of(spec, m_after)
    assert best_factor_residual(spec, m_after) ** 2 > spec.e_threshold
    # The same rows, once learned, are forgotten with a certificate.
    learned_too = np.concatenate([learned, strangers])
    m = gram(quantise_rows(spec, x[learned_too], y[learned_too]))
    factor_of(spec, m - gram(quantise_rows(spec, x[strangers], y[strangers])))


@pytest.mark.parametrize(
    "state",
    ["negative definite", "indefinite", "zero minus a row"],
)
def test_a_degenerate_enrolled_state_cannot_be_certified(state: str) -> None:
    spec = SPECS["d8 k10 (demo)"]
    n = spec.n
    if state == "negative definite":
        m = -spec.gamma_q * np.eye(n)
    elif state == "indefinite":
        rng = np.random.default_rng(0)
        s = rng.normal(size=(n, n))
        m = np.rint((s + s.T) * 4.0**spec.feature_bits)
    else:
        row = quantise_rows(spec, np.ones((1, spec.d)), np.array([0]))
        m = -gram(row).astype(np.float64)
    assert best_factor_residual(spec, m.astype(np.int64).astype(object)) ** 2 > spec.e_threshold


def test_quantisation_refuses_bad_rows() -> None:
    spec = SPECS["d4 k3"]
    with pytest.raises(FixedPointError, match="past the published bound"):
        quantise_rows(spec, np.full((1, 4), 5.0), np.array([0]))
    with pytest.raises(FixedPointError, match="not finite"):
        quantise_rows(spec, np.array([[np.nan, 0, 0, 0]]), np.array([0]))
    with pytest.raises(FixedPointError, match="class indices"):
        quantise_rows(spec, np.zeros((1, 4)), np.array([3]))
    with pytest.raises(FixedPointError, match="rows must be"):
        quantise_rows(spec, np.zeros((1, 5)), np.array([0]))


def test_request_binding_depends_on_the_request() -> None:
    a, b = z_binding(b"a" * 32, 7), z_binding(b"b" * 32, 7)
    assert len(set(a)) == 7
    assert not set(a) & set(b)
    with pytest.raises(FixedPointError):
        z_binding(b"short", 7)
