"""The product's Group-OBS circuit holds every intermediate its published bounds allow.

A classifier's forgotten class row, removed whole, sets ``delta = -theta`` on a block whose curvature
is aligned with it: ``G delta`` and ``G^T G delta`` then reach tens while every input stays within the
published bounds. The circuit used to range-check products (at twice the input scale) to 16, so such an
honest witness failed to generate -- found by the ViT demo. Real circuits, real proof.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import pytest
from zkunlearn.client.group_obs import solve_block
from zkunlearn.proofs.deletion import GroupObsSpec
from zkunlearn.proofs.fixedpoint import normalise_factor
from zkunlearn.proofs.prover import ProveJob, group_obs_tensors, new_group_obs_batch, run_job
from zkunlearn.proofs.verifier import InMemoryReplayGuard

if TYPE_CHECKING:
    from tests.conftest import SharedCircuits

SPEC = GroupObsSpec(block=16, m=8, batch=1, lam=0.1)
SCALE = 13
OLD_CAPACITY = 1024.0**3 / 2.0 ** (2 * SCALE)  # 3 legs of base 1024 at twice the input scale: 16


def test_legs_cover_the_published_bounds() -> None:
    bound = SPEC.intermediate_bound()
    assert bound == SPEC.m * SPEC.g_bound * SPEC.block * SPEC.g_bound * 2 * SPEC.theta_bound
    legs = SPEC.decomp_legs(SCALE, 1024)
    assert 1024.0**legs > bound * 2.0 ** (2 * SCALE) >= 1024.0 ** (legs - 1)
    tighter = GroupObsSpec(block=16, m=8, batch=1, lam=0.1, theta_bound=0.001, g_bound=0.001, w_bound=0.001)
    assert tighter.decomp_legs(SCALE, 1024) < legs


def test_whole_aligned_block_proves_and_verifies(shared_circuits: SharedCircuits) -> None:
    circuits = shared_circuits.build(group_obs=SPEC)
    spec, verifier = circuits.group_obs_verifier()
    signs = np.where(np.arange(SPEC.block) % 3 == 0, -1.0, 1.0)
    theta = signs.copy()  # |theta| = 1, within theta_bound
    raw = np.zeros((SPEC.m, SPEC.block))
    raw[0] = signs  # all curvature along theta's own direction
    raw[1:] = 0.05 * np.random.default_rng(0).normal(size=(SPEC.m - 1, SPEC.block))
    g, _ = normalise_factor(raw)
    mask = np.ones(SPEC.block, bool)  # the row removed whole
    update = solve_block(theta, g, mask, SPEC.lam)
    delta = update.theta_after - theta
    assert np.abs(g).max() <= SPEC.g_bound
    assert np.abs(g @ delta).max() > OLD_CAPACITY
    assert np.abs(g.T @ (g @ delta)).max() > OLD_CAPACITY
    w = np.zeros(SPEC.m)  # no unmasked coordinate: the row-space witness is vacuous (as the SDK sends)
    batch = new_group_obs_batch(
        theta[None], update.theta_after[None], g[None], mask[None], w[None], scale=SCALE, n_blind=spec.n_blind
    )
    request = hashlib.sha256(b"whole-row").digest()
    tensors = group_obs_tensors(batch, request, SCALE, spec.n_blind)
    arts = circuits.group_obs[1]  # type: ignore[index]
    result = run_job(ProveJob(tensors, arts.compiled, arts.vk, arts.pk, arts.srs.path))
    verdict = verifier.verify(
        result.proof,
        request_id="whole-row",
        enrolled_theta=verifier.commit(tensors[0]),
        enrolled_g=verifier.commit(tensors[2]),
        mask_commitment=verifier.mask_commitment(batch.mask, request),
        claimed_theta_after=result.commitments[1],
        replay=InMemoryReplayGuard(),
    )
    assert verdict.ok, verdict


@pytest.mark.parametrize("name", ["theta", "g"])
def test_sdk_refuses_tensors_above_the_published_bounds(name: str) -> None:
    from zkunlearn.client.unlearning import UnlearningError, _check_published

    value = np.full((2, 3), 2.0 * getattr(SPEC, f"{name}_bound"))
    with pytest.raises(UnlearningError, match=rf"\|{name}\| reaches .* above the published {name}_bound"):
        _check_published(SPEC, "enrolling fc1.weight", **{name: value})
    _check_published(SPEC, "enrolling fc1.weight", **{name: value / 4})


def test_theta_exponent_fits_heavy_tails_under_the_bound() -> None:
    from zkunlearn.proofs.fixedpoint import FixedPointError, theta_exponent

    values = np.concatenate([np.random.default_rng(1).normal(0.0, 0.01, 999), [0.5]])  # a 50-sigma outlier
    plain = theta_exponent(values)
    fitted = theta_exponent(values, max_abs=SPEC.theta_bound)
    assert 0.5 * 2.0**plain > SPEC.theta_bound
    assert 0.5 * 2.0**fitted <= SPEC.theta_bound < 0.5 * 2.0 ** (fitted + 1)
    assert theta_exponent(values[:-1], max_abs=SPEC.theta_bound) == theta_exponent(values[:-1])
    with pytest.raises(FixedPointError, match="finite"):
        theta_exponent(np.array([1.0, np.inf]), max_abs=4.0)
