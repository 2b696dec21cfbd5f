"""The exact Group-OBS relation without ezkl: its reference outputs, honest completeness, and the slack
an adversary gets, found by search and held to the derived bound (docs/protocol.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zkunlearn.client.group_obs import GroupObsError
from zkunlearn.client.group_obs_exact import bounded_factor, exact_update
from zkunlearn.client.unlearning_exact import commit_layer
from zkunlearn.proofs.exact import ExactGroupObsSpec, exact_outputs, exact_request_binding, quantise_exact
from zkunlearn.proofs.fixedpoint import FixedPointError

from tests.exact_cases import (
    accepted,
    edited,
    largest_accepted_edit,
    make_batch,
    outputs,
    real_factor_batch,
    worst_direction,
)

SPECS = {
    "B16 m8 lam2^-10": ExactGroupObsSpec.from_lam(16, 8, 2, 2.0**-10),
    "B64 m16 lam0.001": ExactGroupObsSpec.from_lam(64, 16, 2, 0.001),
    "B64 m16 lam0.1": ExactGroupObsSpec.from_lam(64, 16, 2, 0.1),
    "B64 m32 lam0.001": ExactGroupObsSpec.from_lam(64, 32, 1, 0.001),
}


def test_dyadic_lam_is_close_and_exact() -> None:
    for lam in (0.001, 0.1, 2.0**-10, 0.37):
        spec = ExactGroupObsSpec.from_lam(64, 16, 1, lam)
        assert spec.lam == spec.lam_num / 2**spec.lam_shift
        assert abs(spec.lam - lam) / lam < 1 / 256, (lam, spec.lam)  # 8 significant bits at least


def test_scales_the_circuit_cannot_hold_are_refused() -> None:
    with pytest.raises(ValueError, match="negative power of two"):
        ExactGroupObsSpec(16, 8, 1, 1, 10, theta_bits=20, g_bits=6, w_bits=40)
    with pytest.raises(ValueError, match="no room"):
        ExactGroupObsSpec(16, 8, 1, 1, 10, g_bits=13)
    with pytest.raises(ValueError, match="g_range_bits"):
        ExactGroupObsSpec(16, 8, 1, 1, 10, g_range_bits=16)
    with pytest.raises(ValueError, match="float32-exact integer"):
        ExactGroupObsSpec(16, 8, 1, 2**20 + 1, 10)


def test_reference_outputs_match_the_torch_relation() -> None:
    """The Python-int reference is what the exported module computes (float64, values below 2**53)."""
    spec = ExactGroupObsSpec.from_lam(16, 8, 2, 2.0**-10, theta_bits=14, w_bits=14, g_bits=6)
    batch = make_batch(spec, 3)
    rel = spec.relation().double()
    pad = np.zeros((spec.batch, spec.n_blind))

    def t(a: object, extra: np.ndarray | None = None) -> torch.Tensor:
        arr = np.asarray(a, dtype=np.float64)
        return torch.tensor(arr if extra is None else np.concatenate([arr, extra], axis=-1))

    g = np.concatenate([np.asarray(batch.g, dtype=np.float64), np.zeros((spec.batch, 1, spec.block))], axis=1)
    w = np.asarray(batch.update.w, dtype=np.float64).copy()
    w[0, 0] += 5  # not the honest witness: outputs are non-trivial
    got = rel(
        t(batch.theta, pad), t(batch.update.theta_after, pad), t(g), t(batch.mask, pad), t(w, pad)
    ).numpy()
    want = outputs(batch, batch.update.theta_after, quantise_exact(w, 0))
    assert np.array_equal(got, np.array(want, dtype=np.float64))


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("kind", ["dense", "low-rank", "heavy"])
@pytest.mark.parametrize("density", [1 / 16, 0.25, 0.625, 1.0])
def test_honest_updates_stay_under_the_thresholds(name: str, kind: str, density: float) -> None:
    """Completeness: for random factors of three shapes and masks from one weight to the whole block,
    the honest client's exact outputs stay under the derived thresholds (the worst ratio is printed)."""
    spec = SPECS[name]
    worst = 0.0
    for seed in range(3):
        batch = make_batch(spec, seed, kind=kind, density=density)
        assert accepted(batch, batch.update.theta_after, batch.update.w)
        for (kept, s_w, s_row, below), g_sq in zip(batch.update.outputs, batch.g_fro_sq, strict=True):
            limit = spec.thresholds(g_sq)
            assert kept == 0
            assert below == 0
            worst = max(worst, s_w / limit.w, s_row / limit.row)
    print(f"{name} {kind} density {density}: worst honest output / threshold = {worst:.3g}")
    assert worst <= 1.0


@given(seed=st.integers(0, 2**31), density=st.floats(0.02, 1.0))
@settings(max_examples=40, deadline=None)
def test_honest_updates_stay_under_the_thresholds_property(seed: int, density: float) -> None:
    spec = SPECS["B16 m8 lam2^-10"]
    batch = make_batch(spec, seed, density=density)
    assert accepted(batch, batch.update.theta_after, batch.update.w)


def test_honest_updates_of_a_real_factor_stay_under_the_thresholds() -> None:
    for name in ("B16 m8 lam2^-10", "B64 m16 lam0.001"):
        batch = real_factor_batch(SPECS[name])
        assert accepted(batch, batch.update.theta_after, batch.update.w)


@pytest.mark.parametrize("name", ["B16 m8 lam2^-10", "B64 m16 lam0.001", "B64 m16 lam0.1"])
@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_adversarial_slack_is_below_one_percent_of_a_weights_spread(name: str, source: str) -> None:
    """Soundness, measured: the largest edit of any single kept weight, and along the least-constrained
    direction, that still passes (with ``w`` re-fitted to hide it), in units of the layer's weight
    standard deviation. The search must stay below the derived bound, and the bound below 1 %."""
    spec = SPECS[name]
    batch = real_factor_batch(spec) if source == "real" else make_batch(spec, 7, kind="low-rank")
    worst = 0.0
    for block in range(spec.batch):
        bound = spec.slack_bound(batch.g_fro_sq[block])
        keep = np.flatnonzero(~batch.mask[block])
        directions = [worst_direction(batch, block)]
        for j in keep[:: max(1, len(keep) // 6)]:
            unit = np.zeros(spec.block)
            unit[j] = 1.0
            directions.append(unit)
        for direction in directions:
            found = largest_accepted_edit(batch, block, direction, upper=4 * bound)
            assert found <= bound * 1.01, (found, bound)
            worst = max(worst, found / batch.sigma)
        assert bound / batch.sigma <= 0.01, bound / batch.sigma
    print(f"{name} {source}: slack_rel (search) = {worst:.3g}")
    assert worst <= 0.01


def test_a_small_edit_is_refused_where_the_old_tolerance_took_a_standard_deviation() -> None:
    """The edit the fixed-point relation admitted (about 0.7 of a weight's spread along the least curved
    direction) is refused; so is a 2 % edit of one weight."""
    batch = make_batch(SPECS["B64 m16 lam0.001"], 11)
    direction = worst_direction(batch, 0)
    assert accepted(batch, *edited(batch, 0, direction, 0.0))
    assert not accepted(batch, *edited(batch, 0, direction, 0.7 * batch.sigma))
    unit = np.zeros(batch.spec.block)
    unit[np.flatnonzero(~batch.mask[0])[0]] = 1.0
    assert not accepted(batch, *edited(batch, 0, unit, 0.02 * batch.sigma))


def test_doing_nothing_or_keeping_masked_weights_is_refused() -> None:
    batch = make_batch(SPECS["B16 m8 lam2^-10"], 5)
    kept_masked = np.array(batch.theta, dtype=object)  # theta' = theta: no deletion at all
    assert outputs(batch, kept_masked, batch.update.w)[0][0] > 0
    assert not accepted(batch, kept_masked, batch.update.w)
    mask_only = np.where(batch.mask, 0, np.array(batch.theta, dtype=object))  # no compensation
    assert not accepted(batch, mask_only, np.zeros_like(batch.update.w))


def test_a_witness_beyond_its_bound_cannot_be_produced() -> None:
    spec = ExactGroupObsSpec.from_lam(16, 8, 1, 2.0**-10, w_bound=2.0**-12)
    batch_spec = ExactGroupObsSpec.from_lam(16, 8, 1, 2.0**-10)
    theta = make_batch(batch_spec, 1).theta
    g = make_batch(batch_spec, 1).g
    mask = make_batch(batch_spec, 1).mask
    with pytest.raises(GroupObsError, match="does not fit the published spec"):
        exact_update(spec, theta, g, mask)


def test_quantisation_refuses_non_finite_and_out_of_bound_values() -> None:
    with pytest.raises(FixedPointError, match="non-finite"):
        quantise_exact([1.0, float("nan")], 20)
    with pytest.raises(FixedPointError, match="above the bound"):
        quantise_exact([65.0], 20, bound=64.0)


def test_request_binding_depends_on_request_block_and_position() -> None:
    a = exact_request_binding(b"a" * 32, 2, 4)
    b = exact_request_binding(b"b" * 32, 2, 4)
    assert a != b
    assert a[0] != a[1]
    assert len(set(a[0])) == 4
    with pytest.raises(FixedPointError):
        exact_request_binding(b"short", 1, 4)


def test_a_heavy_factor_is_clipped_into_the_enrollment_range_and_stays_normalised() -> None:
    """The SDK's factor fits the one-limb range the enrollment proof checks, at unit mean diagonal."""
    spec = SPECS["B64 m16 lam0.001"]
    rng = np.random.default_rng(5)
    g = rng.normal(size=(4, spec.m, spec.block))
    g[0, 0, :3] = 200.0  # three entries far above |G| <= g_bound, a small share of the layer's mass
    g /= np.sqrt(np.mean(g * g))
    assert np.max(np.abs(g)) > spec.g_bound
    fitted = bounded_factor(g, spec.g_bound, spec.g_norm_tolerance)
    assert np.max(np.abs(fitted)) <= spec.g_bound
    assert abs(float(np.mean(fitted * fitted)) - 1.0) <= spec.g_norm_tolerance / 4
    q = quantise_exact(fitted, spec.g_bits, bound=spec.g_bound)
    assert max(abs(int(v)) for v in np.ravel(q)) <= (1 << spec.g_range_bits) - 1
    # The quantised norm is what the provider holds to the normalisation (per block of B weights).
    total = sum(int(v) * int(v) for v in np.ravel(q))
    lo, hi = spec.normalisation_range(g.shape[0] * g.shape[2] // spec.block)
    assert lo <= total <= hi


def test_a_factor_too_concentrated_for_the_range_is_refused_by_name() -> None:
    spec = SPECS["B64 m16 lam0.001"]
    g = np.zeros((4, spec.m, spec.block))
    g[0, 0, 0] = 1.0  # a layer's whole curvature in one entry: sqrt(4 m B) = 64 > g_bound
    g /= np.sqrt(np.mean(g * g))
    with pytest.raises(GroupObsError, match="g_range_bits"):
        bounded_factor(g, spec.g_bound, spec.g_norm_tolerance)


def test_a_block_without_curvature_commits_one_grid_step_and_its_deletion_is_accepted() -> None:
    """A unit that never fires on the client's data has no curvature: its block still commits a factor
    the provider accepts (``||G_q||_F > 0``, layer normalisation kept), and its deletion verifies."""
    spec = ExactGroupObsSpec.from_lam(16, 8, 2, 0.1)
    rng = np.random.default_rng(3)
    factors = rng.normal(size=(4, 12, 16))
    factors[1] = 0.0
    _exponent, theta, g = commit_layer(spec, rng.normal(size=64), factors)
    g_sq = (g.astype(np.int64) ** 2).sum(axis=(2, 3)).reshape(-1)
    assert (g_sq > 0).all()
    assert g_sq[1] == 1
    lo, hi = spec.normalisation_range(4)
    assert lo <= int(g_sq.sum()) <= hi
    mask = np.zeros((2, 16), dtype=bool)
    mask[1, :5] = True  # in the block without curvature
    update = exact_update(spec, theta[0], g[0], mask)
    assert (update.theta_after[1, :5] == 0).all()
    for (kept, s_w, s_row, below), block_sq in zip(
        exact_outputs(spec, theta[0], update.theta_after, g[0], mask, update.w), g_sq[:2], strict=True
    ):
        limit = spec.thresholds(int(block_sq))
        assert kept == 0
        assert below == 0
        assert s_w <= limit.w
        assert s_row <= limit.row
