"""Exact analytic unlearning of a ridge-regression head (ACU-style recursive least squares).

A frozen backbone maps inputs to features ``X``; the head ``W`` is ridge regression with penalty
``gamma``. Unlearning is *exact*: the head afterwards equals ridge regression retrained on the
retained rows, which is what makes it provable with a small residual check
``W' - W - R X_u^T (X_u W' - Y_u) = 0`` (and ``R' - R - R' X_u^T X_u R = 0`` for the state
``R = (X^T X + gamma I)^{-1}``) instead of a retraining transcript.

A head built by :meth:`AnalyticHead.learn` keeps the Gram ``A = X^T X + gamma I`` and ``B = X^T Y``
and adds or subtracts each batch's ``X^T X`` and ``X^T Y``; ``R`` and ``W`` are re-solved from them by
Cholesky. The textbook rank-``k`` Woodbury recursions on ``R`` itself (methods.md) are algebraically
the same, but they start from ``R = I / gamma`` and subtract nearly equal matrices: their absolute
error is ~1e-16 / gamma, which at gamma = 1e-4 and features of scale 10 left ``W`` 6-17 % off the
retrained ridge. Re-solving from the Gram is as accurate as retraining itself: relative error about
``cond(X_keep^T X_keep + gamma I) * 1e-16``, i.e. ~1e-9 or better unless the retained rows leave
``A`` near-singular (then ridge retrained from scratch is just as uncertain).

A head whose ``R`` or ``W`` is *set* (the committed fixed-point state an
:class:`~zkunlearn.client.analytic_unlearner.AnalyticUnlearner` proves from) has no Gram; it updates ``R`` by
Woodbury, because the circuit checks the downdate against exactly that ``R``:
  learn   (X, Y):    K = (I + X R X^T)^{-1};  R <- R - R X^T K X R;  W <- W + R X^T (Y - X W)
  unlearn (Xu, Yu):  S = Xu R Xu^T;  R' = R + R Xu^T (I - S)^{-1} Xu R;  W' = W - R' Xu^T (Yu - Xu W)
with the ``k x k`` systems solved by Cholesky, never inverted.

Rows can only be unlearned if they are "covered" by what was learned: ``X^T X + gamma I - Xu^T Xu``
must keep every eigenvalue at least ``gamma`` (Gram path; refused below ``gamma / 2``, which leaves
room for rounding) or stay positive definite (Woodbury path); otherwise the request asks to forget
data never learned and is refused. A row never learned but inside the span of learned ones cannot be
told apart from the Gram and is not refused.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import scipy.linalg  # type: ignore[import-untyped]

from zkunlearn.errors import MalformedError

__all__ = ["AnalyticError", "AnalyticHead"]

F64 = npt.NDArray[np.float64]
# Smallest pivot of I - S, relative to 1, accepted as positive definite (Woodbury path). Rows that were
# learned give pivots >= gamma / (gamma + ||x||^2)-ish; this only refuses what is numerically singular.
_SINGULAR_TOL = 1e-10


class AnalyticError(MalformedError):
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
        # X^T X + gamma I and X^T Y of the rows learned; None once R or W were set from outside.
        self._gram: F64 | None = gamma * np.eye(d)
        self._xty: F64 | None = np.zeros((d, c))
        # Solved lazily from the Gram (None = not solved since the last change): many small learn
        # batches then cost O(k d^2) each, not a d^3 solve each.
        self._R: F64 | None = np.eye(d) / gamma
        self._W: F64 | None = np.zeros((d, c))
        # Rows currently learned: unlearning more than this can only be forgetting data never learned.
        self.n_learned = 0

    # -- state ------------------------------------------------------------------------------------

    @property
    def R(self) -> F64:  # noqa: N802 -- the state's name in the ACU papers and the circuit
        """``(X^T X + gamma I)^{-1}`` of the rows learned."""
        if self._R is None:
            self._solve()
        assert self._R is not None
        return self._R

    @R.setter
    def R(self, value: npt.ArrayLike) -> None:  # noqa: N802
        """Adopt an outside state (e.g. the committed grid values): later updates downdate this very
        ``R`` by Woodbury, the relation the circuit checks, not a Gram it no longer matches."""
        value = self._matrix(value, (self.d, self.d), "R")
        self._detach()
        self._R = value

    @property
    def W(self) -> F64:  # noqa: N802
        """The head, ``R X^T Y``."""
        if self._W is None:
            self._solve()
        assert self._W is not None
        return self._W

    @W.setter
    def W(self, value: npt.ArrayLike) -> None:  # noqa: N802
        value = self._matrix(value, (self.d, self.c), "W")
        self._detach()
        self._W = value

    def _detach(self) -> None:
        # Solve first: the other half of the state is still the Gram's, and must survive it.
        if self._gram is not None and (self._R is None or self._W is None):
            self._solve()
        self._gram = self._xty = None

    def _matrix(self, value: npt.ArrayLike, shape: tuple[int, int], what: str) -> F64:
        try:
            out = np.array(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise AnalyticError(f"{what} must be a float array: {exc}") from exc
        if out.shape != shape:
            raise AnalyticError(f"{what} must be {shape}, got {out.shape}")
        if not np.isfinite(out).all():
            raise AnalyticError(f"{what} contains NaN or inf")
        return out

    def _solve(self) -> None:
        assert self._gram is not None
        assert self._xty is not None
        lower = _cholesky(self._gram)
        if lower is None:  # learn only adds PSD terms and unlearn checks; only overflow gets here
            raise AnalyticError("X^T X + gamma I is not numerically positive definite (features overflow?)")
        inv_lower = scipy.linalg.solve_triangular(lower, np.eye(self.d), lower=True)
        self._R = np.asarray(inv_lower.T @ inv_lower, dtype=np.float64)  # symmetric by construction
        self._W = np.asarray(scipy.linalg.cho_solve((lower, True), self._xty), dtype=np.float64)

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

    # -- learning and unlearning ------------------------------------------------------------------

    def learn(self, X: npt.ArrayLike, Y: npt.ArrayLike) -> None:
        x, y = self._check(X, Y, "learn")
        assert y is not None
        if self._gram is not None and self._xty is not None:
            gram, xty = self._gram + x.T @ x, self._xty + x.T @ y
            if not np.isfinite(gram).all() or not np.isfinite(xty).all():
                raise AnalyticError("learn: X^T X or X^T Y overflows float64; scale the features down")
            self._gram, self._xty, self._R, self._W = gram, xty, None, None
            self.n_learned += x.shape[0]
            return
        # The k x k system costs k^3: split a big batch into chunks of <= max(d, 256) rows. The recursion
        # is exact, so chunking changes nothing but the cost.
        step = max(self.d, 256)
        for lo in range(0, x.shape[0], step):
            self._woodbury_learn(x[lo : lo + step], y[lo : lo + step])

    def _woodbury_learn(self, x: F64, y: F64) -> None:
        R, W = self.R, self.W
        RXt = R @ x.T  # (d, k)
        M = np.eye(x.shape[0]) + x @ RXt  # I + X R X^T, SPD
        # R X^T M^{-1} X R = Z^T Z with Z = L^{-1} X R: symmetric by construction, no inverse formed.
        Z = np.linalg.solve(np.linalg.cholesky(M), RXt.T)
        self._R = _sym(R - Z.T @ Z)
        self._W = W + self._R @ x.T @ (y - x @ W)
        self.n_learned += x.shape[0]

    def unlearn(self, X_u: npt.ArrayLike, Y_u: npt.ArrayLike) -> None:
        """Remove rows exactly; all or nothing (a refused request leaves the head as it was)."""
        x, y = self._check(X_u, Y_u, "unlearn")
        assert y is not None
        k = x.shape[0]
        if k > self.n_learned:
            raise AnalyticError(f"cannot unlearn {k} rows: only {self.n_learned} were learned")
        if self._gram is not None and self._xty is not None:
            self._gram_unlearn(x, y)
            return
        saved = (self._R, self._W, self.n_learned)
        step = max(self.d, 256)
        try:
            # Removing a subset of removable rows never breaks positive definiteness, so chunks fail
            # exactly when the whole request would.
            for lo in range(0, k, step):
                self._woodbury_unlearn(x[lo : lo + step], y[lo : lo + step])
        except AnalyticError:
            self._R, self._W, self.n_learned = saved
            raise

    def _gram_unlearn(self, x: F64, y: F64) -> None:
        assert self._gram is not None
        assert self._xty is not None
        gram, xty = self._gram - x.T @ x, self._xty - x.T @ y
        # What is left is X_keep^T X_keep + gamma I >= gamma I if these rows were learned. Half of gamma
        # is the margin for rounding, ~1e-16 ||A||: a gamma below that cannot be honoured in float64.
        if _cholesky(gram - 0.5 * self.gamma * np.eye(self.d)) is None:
            scale = float(np.abs(np.diag(self._gram)).max())
            hint = (
                f"; or gamma = {self.gamma:g} is below float64's resolution of X^T X (~{1e-15 * scale:.1e})"
                if 1e-15 * scale > 0.05 * self.gamma
                else ""
            )
            raise AnalyticError(
                "unlearning would leave X^T X + gamma I - X_u^T X_u with an eigenvalue below gamma / 2: "
                f"these rows (or this many copies of them) were never learned{hint}"
            )
        self._gram, self._xty, self._R, self._W = gram, xty, None, None
        self.n_learned -= x.shape[0]

    def _woodbury_unlearn(self, x: F64, y: F64) -> None:
        k = x.shape[0]
        R, W = self.R, self.W
        RXt = R @ x.T
        M = np.eye(k) - x @ RXt  # I - S
        L = _cholesky((M + M.T) / 2)
        if L is None or float(np.min(np.diag(L))) ** 2 < _SINGULAR_TOL:
            raise AnalyticError(
                "unlearning would make I - X_u R X_u^T singular or indefinite: "
                "these rows (or this many copies of them) were never learned"
            )
        Z = np.linalg.solve(L, RXt.T)
        R_new = _sym(R + Z.T @ Z)
        self._W = W - R_new @ x.T @ (y - x @ W)
        self._R = R_new
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


def _cholesky(A: F64) -> F64 | None:
    """The lower Cholesky factor, or None where ``A`` is not numerically positive definite."""
    try:
        return np.asarray(np.linalg.cholesky(A), dtype=np.float64)
    except np.linalg.LinAlgError:
        return None


def _sym(A: F64) -> F64:
    """Keep R exactly symmetric: round-off asymmetry would otherwise accumulate over many requests."""
    out: F64 = (A + A.T) / 2
    return out
