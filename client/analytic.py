"""Exact analytic unlearning of a ridge-regression head (ACU-style recursive least squares).

A frozen backbone maps inputs to features ``X``; the head ``W`` is ridge regression with penalty
``gamma``. The state ``R = (X^T X + gamma I)^{-1}`` lets both learning and unlearning a batch be
rank-``k`` Woodbury updates, and unlearning is *exact*: the head afterwards equals ridge regression
retrained on the retained rows (float64, ~1e-9), which is what makes it provable with a small
residual check ``W' - W - R X_u^T (X_u W' - Y_u) = 0`` instead of a retraining transcript.

Recursions (methods.md):
  learn   (X, Y):    K = (I + X R X^T)^{-1};  R <- R - R X^T K X R;  W <- W + R X^T (Y - X W)
  unlearn (Xu, Yu):  S = Xu R Xu^T;  R' = R + R Xu^T (I - S)^{-1} Xu R;  W' = W - R' Xu^T (Yu - Xu W)

The ``k x k`` systems are solved by Cholesky, never inverted. ``I - S`` is positive definite exactly
when the rows being removed are "covered" by what was learned (``X^T X + gamma I - Xu^T Xu`` stays
positive definite); when it is not, the request asks to forget data never learned and is refused.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["AnalyticError", "AnalyticHead"]

F64 = npt.NDArray[np.float64]
# Smallest pivot of I - S, relative to 1, accepted as positive definite. Rows that were learned give
# pivots >= gamma / (gamma + ||x||^2)-ish; this only refuses what is numerically singular or worse.
_SINGULAR_TOL = 1e-10


class AnalyticError(ValueError):
    """Bad shapes/values, or an unlearning request that cannot be honoured exactly."""


class AnalyticHead:
    """Ridge head with exact learn/unlearn; float64 throughout."""

    def __init__(self, d: int, c: int, gamma: float) -> None:
        if d <= 0 or c <= 0:
            raise AnalyticError(f"feature and output sizes must be positive, got d={d}, c={c}")
        gamma = float(gamma)
        if not (math.isfinite(gamma) and gamma > 0):
            raise AnalyticError(f"gamma must be a positive finite number, got {gamma}")
        self.d, self.c, self.gamma = d, c, gamma
        self.R: F64 = np.eye(d) / gamma
        self.W: F64 = np.zeros((d, c))
        # Rows currently learned: unlearning more than this can only be forgetting data never learned.
        self.n_learned = 0

    def _check(self, X: npt.ArrayLike, Y: npt.ArrayLike | None, what: str) -> tuple[F64, F64 | None]:
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise AnalyticError(f"{what}: X must be (k, {self.d}), got {x.shape}")
        if not np.isfinite(x).all():
            raise AnalyticError(f"{what}: X contains NaN or inf")
        if Y is None:
            return x, None
        y = np.asarray(Y, dtype=np.float64)
        if y.ndim == 1 and self.c == 1:
            y = y[:, None]
        if y.shape != (x.shape[0], self.c):
            raise AnalyticError(f"{what}: Y must be ({x.shape[0]}, {self.c}), got {y.shape}")
        if not np.isfinite(y).all():
            raise AnalyticError(f"{what}: Y contains NaN or inf")
        return x, y

    def learn(self, X: npt.ArrayLike, Y: npt.ArrayLike) -> None:
        x, y = self._check(X, Y, "learn")
        assert y is not None
        # The k x k system costs k^3: split a big batch into chunks of <= max(d, 256) rows. The recursion
        # is exact, so chunking changes nothing but the cost.
        step = max(self.d, 256)
        for lo in range(0, x.shape[0], step):
            self._learn(x[lo : lo + step], y[lo : lo + step])

    def _learn(self, x: F64, y: F64) -> None:
        RXt = self.R @ x.T  # (d, k)
        M = np.eye(x.shape[0]) + x @ RXt  # I + X R X^T, SPD
        # R X^T M^{-1} X R = Z^T Z with Z = L^{-1} X R: symmetric by construction, no inverse formed.
        Z = np.linalg.solve(np.linalg.cholesky(M), RXt.T)
        self.R = _sym(self.R - Z.T @ Z)
        self.W = self.W + self.R @ x.T @ (y - x @ self.W)
        self.n_learned += x.shape[0]

    def unlearn(self, X_u: npt.ArrayLike, Y_u: npt.ArrayLike) -> None:
        """Remove rows exactly; all or nothing (a refused request leaves the head as it was)."""
        x, y = self._check(X_u, Y_u, "unlearn")
        assert y is not None
        k = x.shape[0]
        if k > self.n_learned:
            raise AnalyticError(f"cannot unlearn {k} rows: only {self.n_learned} were learned")
        saved = (self.R, self.W, self.n_learned)
        step = max(self.d, 256)
        try:
            # Removing a subset of removable rows never breaks positive definiteness, so chunks fail
            # exactly when the whole request would.
            for lo in range(0, k, step):
                self._unlearn(x[lo : lo + step], y[lo : lo + step])
        except AnalyticError:
            self.R, self.W, self.n_learned = saved
            raise

    def _unlearn(self, x: F64, y: F64) -> None:
        k = x.shape[0]
        RXt = self.R @ x.T
        M = np.eye(k) - x @ RXt  # I - S
        M = (M + M.T) / 2
        try:
            L = np.linalg.cholesky(M)
        except np.linalg.LinAlgError:
            L = None
        if L is None or float(np.min(np.diag(L))) ** 2 < _SINGULAR_TOL:
            raise AnalyticError(
                "unlearning would make I - X_u R X_u^T singular or indefinite: "
                "these rows (or this many copies of them) were never learned"
            )
        Z = np.linalg.solve(L, RXt.T)
        R_new = _sym(self.R + Z.T @ Z)
        self.W = self.W - R_new @ x.T @ (y - x @ self.W)
        self.R = R_new
        self.n_learned -= k

    def predict(self, X: npt.ArrayLike) -> F64:
        x, _ = self._check(X, None, "predict")
        out: F64 = x @ self.W
        return out

    def unlearn_residual(self, W_before: F64, R_before: F64, X_u: npt.ArrayLike, Y_u: npt.ArrayLike) -> F64:
        """``W' - W - R X_u^T (X_u W' - Y_u)`` for the current ``W'``: zero iff the unlearning was exact.

        Uses only the state *before* the request, so a verifier holding that state can check it.
        """
        x, y = self._check(X_u, Y_u, "residual")
        assert y is not None
        out: F64 = self.W - W_before - R_before @ x.T @ (x @ self.W - y)
        return out


def _sym(A: F64) -> F64:
    """Keep R exactly symmetric: round-off asymmetry would otherwise accumulate over many requests."""
    out: F64 = (A + A.T) / 2
    return out
