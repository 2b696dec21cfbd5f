"""Analytic (RLS) head: unlearning equals ridge retrained on the retained rows, to float64 precision."""

from __future__ import annotations

import numpy as np
import pytest
from zkunlearn.client.analytic import AnalyticError, AnalyticHead
from zkunlearn.client.reference import reference_ridge


def _data(n: int = 120, d: int = 16, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    Y = np.eye(c)[rng.integers(0, c, n)] + 0.1 * rng.normal(size=(n, c))
    return X, Y


@pytest.mark.parametrize("gamma", [1e-2, 1.0, 10.0])
def test_learn_equals_ridge_and_unlearn_equals_retrain(gamma: float) -> None:
    X, Y = _data()
    head = AnalyticHead(16, 4, gamma)
    head.learn(X, Y)
    assert np.max(np.abs(head.W - reference_ridge(X, Y, gamma))) < 1e-9
    forget = np.zeros(len(X), dtype=bool)
    forget[[3, 17, 18, 40, 99]] = True
    W_before, R_before = head.W.copy(), head.R.copy()
    head.unlearn(X[forget], Y[forget])
    ref = reference_ridge(X[~forget], Y[~forget], gamma)
    assert np.max(np.abs(head.W - ref)) < 1e-9 * max(1.0, np.abs(ref).max())
    assert np.allclose(head.R, np.linalg.inv(X[~forget].T @ X[~forget] + gamma * np.eye(16)), atol=1e-9)
    # The verifier's residual from the pre-request state vanishes; a wrong head does not pass.
    assert np.max(np.abs(head.unlearn_residual(W_before, R_before, X[forget], Y[forget]))) < 1e-10
    head.W[0, 0] += 1e-3
    assert np.max(np.abs(head.unlearn_residual(W_before, R_before, X[forget], Y[forget]))) > 1e-4
    assert head.n_learned == len(X) - forget.sum()


def test_several_learn_and_unlearn_batches() -> None:
    X, Y = _data(n=200, seed=1)
    gamma = 0.5
    head = AnalyticHead(16, 4, gamma)
    for lo in range(0, 200, 37):  # uneven batches
        head.learn(X[lo : lo + 37], Y[lo : lo + 37])
    alive = np.ones(200, dtype=bool)
    rng = np.random.default_rng(2)
    for size in (1, 7, 20, 3):
        idx = rng.choice(np.flatnonzero(alive), size=size, replace=False)
        head.unlearn(X[idx], Y[idx])
        alive[idx] = False
        ref = reference_ridge(X[alive], Y[alive], gamma)
        assert np.max(np.abs(head.W - ref)) < 1e-9
    # Relearning a forgotten row after unlearning is again exact.
    back = np.flatnonzero(~alive)[:5]
    head.learn(X[back], Y[back])
    alive[back] = True
    assert np.max(np.abs(head.W - reference_ridge(X[alive], Y[alive], gamma))) < 1e-9
    assert np.allclose(head.predict(X[:3]), X[:3] @ head.W)


def test_large_batches_are_chunked_exactly_and_refusal_is_atomic() -> None:
    X, Y = _data(n=700, d=8, c=2, seed=5)
    head = AnalyticHead(8, 2, 1.0)
    head.learn(X, Y)  # 700 rows > 256: three chunks
    assert np.max(np.abs(head.W - reference_ridge(X, Y, 1.0))) < 1e-9
    W, R = head.W.copy(), head.R.copy()
    # 600 genuine rows, then one never learned: the first two chunks would succeed, the request must not.
    rows = np.vstack([X[:600], 1e3 * X[:1]])
    with pytest.raises(AnalyticError, match="never learned"):
        head.unlearn(rows, np.zeros((601, 2)))
    assert np.array_equal(head.W, W)
    assert np.array_equal(head.R, R)
    assert head.n_learned == 700
    head.unlearn(X[:600], Y[:600])
    assert np.max(np.abs(head.W - reference_ridge(X[600:], Y[600:], 1.0))) < 1e-9


def test_unlearning_everything_returns_to_init() -> None:
    X, Y = _data(n=60, seed=3)
    head = AnalyticHead(16, 4, 2.0)
    head.learn(X[:30], Y[:30])
    head.learn(X[30:], Y[30:])
    head.unlearn(X[10:60], Y[10:60])
    head.unlearn(X[:10], Y[:10])
    assert np.max(np.abs(head.W)) < 1e-10
    assert np.max(np.abs(head.R - np.eye(16) / 2.0)) < 1e-10
    assert head.n_learned == 0


def test_refuses_unlearning_data_never_learned() -> None:
    X, Y = _data(n=40, seed=4)
    head = AnalyticHead(16, 4, 0.1)
    head.learn(X[:20], Y[:20])
    W, R = head.W.copy(), head.R.copy()
    # A large row orthogonal to nothing learned: I - x R x^T < 0.
    with pytest.raises(AnalyticError, match="never learned"):
        head.unlearn(10 * X[30:31], Y[30:31])
    # The same row twice when it was learned once: X^T X + gamma I - 2 x x^T is indefinite.
    with pytest.raises(AnalyticError, match="never learned"):
        head.unlearn(np.repeat(X[:1], 2, axis=0), np.repeat(Y[:1], 2, axis=0))
    # More rows than were ever learned.
    with pytest.raises(AnalyticError, match="only 20 were learned"):
        head.unlearn(X[:21], Y[:21])
    # A refused request leaves the state untouched.
    assert np.array_equal(head.W, W)
    assert np.array_equal(head.R, R)


def test_refuses_bad_inputs() -> None:
    with pytest.raises(AnalyticError, match="gamma"):
        AnalyticHead(4, 2, 0.0)
    with pytest.raises(AnalyticError, match="gamma"):
        AnalyticHead(4, 2, float("nan"))
    with pytest.raises(AnalyticError, match="positive"):
        AnalyticHead(0, 2, 1.0)
    head = AnalyticHead(4, 2, 1.0)
    with pytest.raises(AnalyticError, match=r"X must be \(k, 4\)"):
        head.learn(np.zeros((3, 5)), np.zeros((3, 2)))
    with pytest.raises(AnalyticError, match=r"Y must be \(3, 2\)"):
        head.learn(np.zeros((3, 4)), np.zeros((3, 3)))
    bad = np.zeros((3, 4))
    bad[1, 1] = np.inf
    with pytest.raises(AnalyticError, match="NaN or inf"):
        head.learn(bad, np.zeros((3, 2)))
    with pytest.raises(AnalyticError, match="NaN or inf"):
        head.learn(np.zeros((3, 4)), np.full((3, 2), np.nan))
