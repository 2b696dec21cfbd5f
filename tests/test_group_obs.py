"""Group-OBS: the fast batched solver against a dense float64 KKT reference, plus its refusals."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask
from zkunlearn.client.fisher import BlockFactors, block_factors, factors_from_gradients
from zkunlearn.client.group_obs import (
    BlockUpdate,
    GroupObsError,
    apply_group_obs,
    apply_mask_only,
    solve_block,
)
from zkunlearn.client.reference import (
    naive_group_obs_explicit_inverse,
    reference_apply_group_obs,
    reference_group_obs,
)

LAM = 0.05


def _random_mask(shape: tuple[int, ...], B: int, density: str | float, rng: np.random.Generator) -> LayerMask:
    """Touch ~70 % of blocks (so untouched blocks are exercised too), ``density`` of each touched block."""
    numel = int(np.prod(shape))
    n_blocks = -(-numel // B)
    blocks: dict[int, tuple[int, ...]] = {}
    for k in range(n_blocks):
        if rng.random() > 0.7 and k != 0:
            continue
        n = min(B, numel - k * B)
        if density == "one":
            count = 1
        elif density == "mixed":  # anything from one weight to the whole block (|U| = 0)
            count = int(rng.integers(1, n + 1)) if k % 3 else n
        else:
            count = max(1, round(float(density) * n))
        blocks[k] = tuple(sorted(int(i) for i in rng.choice(n, size=count, replace=False)))
    return LayerMask(layer="w", shape=shape, block_size=B, blocks=blocks)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def _torch_factors(B: int, m: int, seed: int) -> tuple[np.ndarray, BlockFactors]:
    torch.manual_seed(seed)
    model = _Tiny().double()
    x = torch.randn(m, 20, dtype=torch.float64)
    y = torch.randint(0, 5, (m,))
    bf = block_factors(model, "fc1.weight", x, y, nn.functional.cross_entropy, B)
    bf.layer = "w"
    return model.fc1.weight.detach().numpy().copy(), bf


def _random_factors(B: int, m: int, rng: np.random.Generator) -> tuple[np.ndarray, BlockFactors]:
    shape = (7, 37)  # 259 weights: the last block is short for every B tested
    # Correlated gradients (a random mixing) so F is far from diagonal.
    g = rng.normal(size=(m, 259)) @ (np.eye(259) + 0.3 * rng.normal(size=(259, 259)) / 16)
    return rng.normal(size=shape), factors_from_gradients("w", g, B, shape)


def _assert_kkt(theta: np.ndarray, g: np.ndarray, S: tuple[int, ...], up: BlockUpdate, lam: float) -> None:
    m, n = g.shape
    s = np.zeros(n, dtype=bool)
    s[list(S)] = True
    F = lam * np.eye(n) + g.T @ g / m
    # delta_S = -theta_S bit for bit, so the masked weights are exactly zero.
    assert np.array_equal(up.delta[s], -theta[s])
    assert np.all(up.theta_after[s] == 0.0)
    # Stationarity on the unmasked coordinates: (F delta)_U = 0.
    scale = np.linalg.norm(F, 2) * np.linalg.norm(up.delta) + 1e-300
    assert np.linalg.norm((F @ up.delta)[~s]) <= 1e-10 * scale
    # Row-space witness: delta_U = G_U^T w and w = -(G delta) / (m lam).
    assert np.allclose(
        up.delta[~s], g[:, ~s].T @ up.w, rtol=0, atol=1e-10 * (np.abs(up.delta).max() + 1e-300)
    )
    w_def = -(g @ up.delta) / (m * lam)
    assert np.allclose(up.w, w_def, rtol=0, atol=1e-9 * (np.abs(w_def).max() + 1e-300))


@pytest.mark.parametrize("source", ["random", "torch"])
@pytest.mark.parametrize("regime", ["m<B", "m>=B"])
@pytest.mark.parametrize("density", ["one", 0.1, 0.5, 0.9, "mixed"])
@pytest.mark.parametrize("B", [16, 64, 128])
def test_fast_matches_dense_kkt_reference(B: int, density: str | float, regime: str, source: str) -> None:
    tag = {"one": 99, "mixed": 98}[density] if isinstance(density, str) else int(density * 10)
    rng = np.random.default_rng([B, tag, len(regime)])
    m = B // 2 if regime == "m<B" else B + B // 4
    if source == "random":
        W, bf = _random_factors(B, m, rng)
    else:
        W, bf = _torch_factors(B, m, seed=B + m)
    mask = _random_mask(W.shape, B, density, rng)
    new_w, updates = apply_group_obs(W, bf, mask, LAM)
    ref = reference_apply_group_obs(W, bf, mask, LAM)
    assert np.linalg.norm(new_w - ref) <= 1e-8 * np.linalg.norm(ref)
    assert np.max(np.abs(new_w - ref)) <= 1e-8 * np.max(np.abs(ref))
    assert sorted(updates) == mask.touched_blocks()
    flat_old, flat_new = W.reshape(-1), new_w.reshape(-1)
    touched = np.zeros(W.size, dtype=bool)
    for k in mask.blocks:
        touched[k * B : k * B + mask.block_length(k)] = True
    assert np.array_equal(flat_new[~touched], flat_old[~touched])  # untouched blocks are left alone
    assert np.all(new_w[mask.dense()] == 0.0)
    for k, offsets in mask.blocks.items():
        n = mask.block_length(k)
        theta = flat_old[k * B : k * B + n]
        _assert_kkt(theta, bf.factors[k][:, :n], offsets, updates[k], LAM)
        assert np.array_equal(updates[k].theta_after, flat_new[k * B : k * B + n])


def test_chunking_and_block_order_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks are sorted by |U| and solved in chunks; results must land back on the right blocks."""
    from zkunlearn.client import group_obs

    rng = np.random.default_rng(11)
    W, bf = _random_factors(16, 12, rng)
    mask = _random_mask(W.shape, 16, "mixed", rng)
    whole, ups = apply_group_obs(W, bf, mask, LAM)
    monkeypatch.setattr(group_obs, "_CHUNK_ENTRIES", 1)  # one block per chunk
    one_by_one, ups1 = apply_group_obs(W, bf, mask, LAM)
    assert np.allclose(whole, one_by_one, rtol=0, atol=1e-12)
    assert np.max(np.abs(whole - reference_apply_group_obs(W, bf, mask, LAM))) < 1e-10
    for k in ups:
        assert np.allclose(ups[k].w, ups1[k].w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("lam", [1e-3, 1e-2, 1e-1, 1.0])
@pytest.mark.parametrize("m", [8, 64, 200])
def test_single_block_matches_reference_across_damping(lam: float, m: int) -> None:
    rng = np.random.default_rng(int(lam * 1000) + m)
    B = 64
    theta, G = rng.normal(size=B), rng.normal(size=(m, B))
    S = np.sort(rng.choice(B, size=20, replace=False))
    up = solve_block(theta, G, S, lam)
    ref = reference_group_obs(theta, G, S, lam)
    assert np.max(np.abs(up.theta_after - ref)) <= 1e-8 * np.max(np.abs(ref))
    # A boolean mask is the same request.
    s = np.zeros(B, dtype=bool)
    s[S] = True
    assert np.array_equal(solve_block(theta, G, s, lam).theta_after, up.theta_after)
    _assert_kkt(theta, G, tuple(S), up, lam)


def test_obs_objective_is_minimal_among_feasible_updates() -> None:
    """The update is the F-norm minimiser with delta_S = -theta_S: random feasible moves cost more."""
    rng = np.random.default_rng(3)
    B, m = 32, 16
    theta, G = rng.normal(size=B), rng.normal(size=(m, B))
    S = np.arange(0, B, 3)
    up = solve_block(theta, G, S, 0.1)
    F = 0.1 * np.eye(B) + G.T @ G / m
    best = up.delta @ F @ up.delta
    for _ in range(50):
        d = up.delta.copy()
        d[np.setdiff1d(np.arange(B), S)] += 1e-3 * rng.normal(size=B - S.size)
        assert d @ F @ d > best


def test_edge_cases_empty_and_full_masks() -> None:
    rng = np.random.default_rng(4)
    theta, G = rng.normal(size=16), rng.normal(size=(10, 16))
    none = solve_block(theta, G, np.zeros(0, dtype=np.int64), 0.1)
    assert np.array_equal(none.theta_after, theta)
    assert np.all(none.delta == 0)
    full = solve_block(theta, G, np.arange(16), 0.1)
    assert np.all(full.theta_after == 0)
    assert np.allclose(full.w, G @ theta / (10 * 0.1))


def test_accepts_torch_weight_and_returns_weight_shape() -> None:
    rng = np.random.default_rng(5)
    W, bf = _random_factors(16, 8, rng)
    mask = _random_mask(W.shape, 16, 0.5, rng)
    a, _ = apply_group_obs(torch.from_numpy(W).float(), bf, mask, LAM)
    b, _ = apply_group_obs(W.astype(np.float32), bf, mask, LAM)
    assert a.shape == W.shape
    assert a.dtype == np.float64
    assert np.array_equal(a, b)
    only = apply_mask_only(W, mask)
    assert np.all(only[mask.dense()] == 0)
    assert np.array_equal(only[~mask.dense()], W[~mask.dense()])


def test_refuses_bad_inputs() -> None:
    rng = np.random.default_rng(6)
    theta, G = rng.normal(size=16), rng.normal(size=(8, 16))
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(GroupObsError, match="lam"):
            solve_block(theta, G, [1], lam)
    with pytest.raises(GroupObsError, match="out of range"):
        solve_block(theta, G, [16], 0.1)
    with pytest.raises(GroupObsError, match="out of range"):
        solve_block(theta, G, [-1], 0.1)
    with pytest.raises(GroupObsError, match="duplicates"):
        solve_block(theta, G, [2, 2], 0.1)
    with pytest.raises(GroupObsError, match="integers"):
        solve_block(theta, G, [1.5], 0.1)
    with pytest.raises(GroupObsError, match="shape"):
        solve_block(theta, G[:, :15], [1], 0.1)
    with pytest.raises(GroupObsError, match="boolean mask"):
        solve_block(theta, G, np.zeros(15, dtype=bool), 0.1)
    bad = theta.copy()
    bad[3] = np.nan
    with pytest.raises(GroupObsError, match="NaN"):
        solve_block(bad, G, [1], 0.1)
    badg = G.copy()
    badg[0, 0] = np.inf
    with pytest.raises(GroupObsError, match="NaN or inf"):
        solve_block(theta, badg, [1], 0.1)
    with pytest.raises(GroupObsError, match="m = 0"):
        solve_block(theta, G[:0], [1], 0.1)

    W, bf = _random_factors(16, 8, rng)
    mask = _random_mask(W.shape, 16, 0.5, rng)
    with pytest.raises(GroupObsError, match="shape"):
        apply_group_obs(W.T, bf, mask, LAM)
    with pytest.raises(GroupObsError, match="block size"):
        apply_group_obs(W, bf, LayerMask("w", W.shape, 32, {0: (1,)}), LAM)
    with pytest.raises(GroupObsError, match="layer"):
        apply_group_obs(W, bf, LayerMask("other", W.shape, 16, {0: (1,)}), LAM)
    Wn = W.copy()
    Wn[0, 0] = np.nan
    with pytest.raises(GroupObsError, match="NaN"):
        apply_group_obs(Wn, bf, mask, LAM)
    # A mask mutated after validation (its blocks dict is a plain dict) is re-checked, not trusted.
    tampered = _random_mask(W.shape, 16, 0.5, rng)
    k0 = tampered.touched_blocks()[0]
    tampered.blocks[k0] = (16,)  # type: ignore[index]
    with pytest.raises(GroupObsError, match="out of range"):
        apply_group_obs(W, bf, tampered, LAM)
    tampered.blocks[k0] = (1, 1)  # type: ignore[index]
    with pytest.raises(GroupObsError, match="duplicate"):
        apply_group_obs(W, bf, tampered, LAM)
    short = BlockFactors("w", 16, bf.factors[:-1], bf.scale)
    with pytest.raises(GroupObsError, match="factors shape"):
        apply_group_obs(W, short, mask, LAM)


def test_timing_naive_explicit_inverse_vs_batched(capsys: pytest.CaptureFixture[str]) -> None:
    """Benchmark print for the lead's table (not an assertion on time): 256x1024 layer, B=64.

    CPU seconds (process time) are printed beside wall seconds: on a shared machine wall time mostly
    measures the neighbours.
    """
    torch.set_num_threads(1)
    rng = np.random.default_rng(7)
    shape, B = (256, 1024), 64
    W = rng.normal(size=shape)
    mask = LayerMask.from_dense("w", rng.random(shape) < 0.3, B)
    for m in (32, 64, 128):
        bf = factors_from_gradients("w", rng.normal(size=(m, W.size)), B, shape)
        fast_t, fast = _best_of(2, lambda: apply_group_obs(W, bf, mask, 0.05)[0])  # noqa: B023
        naive_t, naive = _best_of(1, lambda: naive_group_obs_explicit_inverse(W, bf, mask, 0.05))  # noqa: B023
        assert np.max(np.abs(fast - naive)) <= 1e-7 * np.max(np.abs(naive))
        with capsys.disabled():
            print(
                f"\n[group-obs timing] 256x1024, B=64, m={m}, {len(mask.blocks)} blocks, 30% mask: "
                f"batched {fast_t[0]:.3f} s wall / {fast_t[1]:.3f} s cpu, naive explicit inverse "
                f"{naive_t[0]:.3f} s wall / {naive_t[1]:.3f} s cpu ({naive_t[1] / fast_t[1]:.1f}x cpu)"
            )


def _best_of(n: int, fn: Callable[[], np.ndarray]) -> tuple[tuple[float, float], np.ndarray]:
    best = (float("inf"), float("inf"))
    out = np.zeros(0)
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - w0, time.process_time() - c0), key=lambda t: t[1])
    return best, out
