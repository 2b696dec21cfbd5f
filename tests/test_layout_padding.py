"""The one layout rule (proofs/layout.py): whole blocks, ceil(blocks / batch) batches, the last batch
padded with whole zero blocks that map to no weight and carry no mask (no ezkl: the proofs over padded
batches are in test_exact_padding)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zkunlearn.circuits.mask import LayerMask, Mask, MaskError
from zkunlearn.client.group_obs_exact import exact_update
from zkunlearn.client.unlearning_exact import certified_weights, commit_layer
from zkunlearn.proofs.exact import ExactGroupObsSpec, exact_outputs
from zkunlearn.proofs.layout import (
    DeletionError,
    batch_mask_rows,
    covered_weights,
    layer_batches,
    layer_layout,
    touched_batches,
)
from zkunlearn.provider.proof_budget import BudgetError, select_within_budget

SPEC = ExactGroupObsSpec.from_lam(16, 8, 2, 2.0**-10)  # B 16, m 8, 2 blocks per batch


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 40), batch=st.integers(1, 9), width=st.integers(1, 3))
def test_pad_then_unpad_is_the_identity_and_padding_is_zero(blocks: int, batch: int, width: int) -> None:
    spec = ExactGroupObsSpec.from_lam(4, 1, batch, 0.1)
    layout = layer_layout("l", blocks * 4, spec)
    assert layout.batches == -(-blocks // batch)
    assert layout.padding_blocks == layout.padded_blocks - blocks == (-blocks) % batch < batch
    assert sum(layout.real_blocks(b) for b in range(layout.batches)) == blocks
    values = np.arange(1, blocks * width + 1, dtype=np.int64).reshape(blocks, width)
    padded = layout.pad(values)
    assert padded.shape == (layout.batches, batch, width)
    assert np.all(padded.reshape(-1, width)[blocks:] == 0)
    np.testing.assert_array_equal(layout.unpad(padded), values)


def test_a_layer_not_cut_into_whole_blocks_is_refused_by_name() -> None:
    with pytest.raises(DeletionError, match=r"fc\.weight has 40 weights, not a multiple of the block size"):
        layer_layout("fc.weight", 40, SPEC)
    with pytest.raises(DeletionError, match="never padding inside a block"):
        layer_layout("fc.weight", 8, SPEC)


def test_a_mask_cannot_mark_a_padding_block_and_the_batch_mask_is_zero_there() -> None:
    # 3 blocks of 16, 2 per batch: block 3 exists only as padding of batch 1.
    with pytest.raises(MaskError, match="block 3 out of range"):
        LayerMask("fc", (6, 8), 16, {3: (0,)})
    layer = LayerMask("fc", (6, 8), 16, {2: (0, 15), 0: (4,)})
    assert layer_batches(layer, SPEC) == 2
    rows = batch_mask_rows(layer, 1, SPEC)
    assert rows[0].sum() == 2
    assert not rows[1].any()
    mask = Mask((layer,))
    assert touched_batches(mask, SPEC) == [("fc", 0), ("fc", 1)]
    assert covered_weights(mask, SPEC) == 48  # 2 + 1 blocks of weights, the padding block not counted


def test_the_device_commits_zero_padding_and_its_update_leaves_it_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, 48)
    factors = rng.normal(0, 1, (3, 12, 16))
    _exponent, theta, g = commit_layer(SPEC, weight, factors, "fc")
    assert theta.shape == (2, 2, 16)
    assert g.shape == (2, 2, 8, 16)
    assert not np.any(theta[1, 1])
    assert not np.any(g[1, 1])
    # The factor is normalised over the layer's own 3 blocks (unit mean diagonal), not the padding.
    g_real = g.reshape(4, 8, 16)[:3].astype(np.float64) / 2.0**SPEC.g_bits
    assert abs(float(np.mean(g_real**2)) - 1.0) < SPEC.g_norm_tolerance
    layer = LayerMask("fc", (6, 8), 16, {2: (1, 5)})
    update = exact_update(SPEC, theta[1], g[1], batch_mask_rows(layer, 1, SPEC))
    assert update.outputs[1] == (0, 0, 0, 0)  # what the verifier demands of a padding block
    assert not np.any(update.theta_after[1])
    assert not np.any(update.w[1])
    after = certified_weights(SPEC, weight, factors, layer)
    assert after.shape == (48,)
    assert after[32 + 1] == 0.0
    assert after[32 + 5] == 0.0


def test_a_one_step_padding_edit_would_pass_a_real_block_s_thresholds() -> None:
    """Why padding is held to exactly zero outputs: with its zero G, the rounding thresholds of a
    block of weights (``thresholds(0)``) would let theta' move by a grid step and w be nonzero."""
    theta = np.zeros((2, 16), dtype=object)
    g = np.zeros((2, 8, 16), dtype=object)
    mask = np.zeros((2, 16), dtype=bool)
    after, w = theta.copy(), np.zeros((2, 8), dtype=object)
    after[1, 3], w[1, 0] = 1, 1
    _kept, s_w, s_row, _below = exact_outputs(SPEC, theta, after, g, mask, w)[1]
    limit = SPEC.thresholds(0)
    assert 0 < s_w <= limit.w
    assert 0 < s_row <= limit.row


def test_the_proof_budget_selects_batches_of_a_padded_layer() -> None:
    scores = np.zeros((6, 8))
    scores.reshape(-1)[32:48] = 1.0  # block 2: the only block of weights in batch 1
    mask = select_within_budget({"fc": scores}, block_size=16, batch=2, max_batches=1, density=0.25)
    assert mask.layer("fc").touched_blocks() == [2]
    with pytest.raises(BudgetError, match="not a multiple of the block size"):
        select_within_budget({"fc": np.zeros(40)}, block_size=16, batch=2, max_batches=1, density=0.25)
