"""The analytic (ridge / RLS) unlearning update as a check relation.

State: ``R = (X^T X + gamma I)^-1`` (``d x d``) and head ``W`` (``d x k``). Unlearning a batch
``(X_u, Y_u)`` gives ``R' = R + R X_u^T (I - X_u R X_u^T)^-1 X_u R`` and ``W'`` with
``W' - W - R X_u^T (X_u W' - Y_u) = 0``. The circuit checks, without any inverse:

* ``r_w = W' - W - R X_u^T (X_u W' - Y_u)``     -- ``W'`` is the retrained ridge solution;
* ``r_r = R' - R - R' X_u^T (X_u R)``            -- ``R'`` is the downdated inverse.

``r_r`` follows from ``R' (R^-1 - X_u^T X_u) = I`` multiplied on the right by ``R``; it binds ``R'``,
the state the *next* deletion is checked against. Without it a client could report any ``R'``
commitment, which would be enrolled and make every later proof check against a wrong inverse (the
first ``W'`` would still be exact, later ones would not be retraining-equivalent). With it the chain
of enrolled states stays exact up to fixed-point tolerance.

Outputs are per-row maxima ``(d, 2)`` = ``max_j |r_w[i, j]|, max_j |r_r[i, j]|``. Committed tensors
``R, R', W, W', X_u, Y_u`` each carry one trailing row that the relation ignores (blinding, or the
request binding for ``X_u``/``Y_u``), as in :mod:`.group_obs`.
"""

from __future__ import annotations

import torch
from torch import nn


class AnalyticCheck(nn.Module):
    """Residual maxima of the analytic unlearning relation.

    Inputs: ``r``, ``r_after`` ``(d + 1, d)``; ``w``, ``w_after`` ``(d + 1, k)``; ``x_u`` ``(n_u + 1, d)``;
    ``y_u`` ``(n_u + 1, k)``. The last row of each is ignored. Output ``(d, 2)``.
    """

    def __init__(self, d: int, k: int, n_u: int) -> None:
        super().__init__()
        if min(d, k, n_u) < 1:
            raise ValueError(f"d, k, n_u must be >= 1 (got {d}, {k}, {n_u})")
        self.d, self.k, self.n_u = d, k, n_u

    def residuals(
        self,
        r: torch.Tensor,
        r_after: torch.Tensor,
        w: torch.Tensor,
        w_after: torch.Tensor,
        x_u: torch.Tensor,
        y_u: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two residual matrices (for tests; never a circuit output)."""
        d, n = self.d, self.n_u
        rm, rm2 = r[:d], r_after[:d]
        wm, wm2 = w[:d], w_after[:d]
        xu, yu = x_u[:n], y_u[:n]
        xt = xu.transpose(0, 1)
        r_w = wm2 - wm - torch.matmul(rm, torch.matmul(xt, torch.matmul(xu, wm2) - yu))
        r_r = rm2 - rm - torch.matmul(rm2, torch.matmul(xt, torch.matmul(xu, rm)))
        return r_w, r_r

    def forward(
        self,
        r: torch.Tensor,
        r_after: torch.Tensor,
        w: torch.Tensor,
        w_after: torch.Tensor,
        x_u: torch.Tensor,
        y_u: torch.Tensor,
    ) -> torch.Tensor:
        r_w, r_r = self.residuals(r, r_after, w, w_after, x_u, y_u)
        return torch.stack([torch.abs(r_w).amax(dim=1), torch.abs(r_r).amax(dim=1)], dim=1)


def example_inputs(
    d: int, k: int, n_u: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape-correct zero inputs for tracing/export."""
    return (
        torch.zeros(d + 1, d),
        torch.zeros(d + 1, d),
        torch.zeros(d + 1, k),
        torch.zeros(d + 1, k),
        torch.zeros(n_u + 1, d),
        torch.zeros(n_u + 1, k),
    )


INPUT_NAMES = ("r", "r_after", "w", "w_after", "x_u", "y_u")
OUTPUT_NAMES = ("residual_max",)
