"""Honest and adversarial inputs of the exact Group-OBS relation, shared by its fast and its ezkl tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from zkunlearn.client.fisher import fit_rows, layer_factors
from zkunlearn.client.group_obs_exact import ExactUpdate, exact_update
from zkunlearn.proofs.exact import ExactGroupObsSpec, IntArray, exact_outputs, g_fro_sq, quantise_exact


@dataclass(frozen=True)
class Batch:
    """Committed integers of ``n`` blocks and the honest update of one request."""

    spec: ExactGroupObsSpec
    theta: IntArray
    g: IntArray
    mask: np.ndarray
    update: ExactUpdate
    sigma: float  # std of the layer's normalised weights: the unit of slack

    @property
    def g_fro_sq(self) -> list[int]:
        return g_fro_sq(self.g)


def _normalise_layer(g: np.ndarray) -> np.ndarray:
    """Unit mean diagonal of ``G^T G / m`` over all blocks of the layer (the client's normalisation)."""
    n, m, b = g.shape
    return g / np.sqrt(float(np.sum(g * g)) / (m * n * b))


def synthetic_factor(rng: np.random.Generator, n: int, m: int, b: int, kind: str) -> np.ndarray:
    """``dense``: i.i.d. rows; ``low-rank``: one dominant direction plus noise; ``heavy``: one block
    carries most of the layer's curvature (blocks are normalised together, as a layer's are)."""
    g = rng.normal(size=(n, m, b))
    if kind == "low-rank":
        g = np.einsum("ni,nj->nij", rng.normal(size=(n, m)), rng.normal(size=(n, b))) * 3 + 0.05 * g
    elif kind == "heavy":
        g[0] *= 6.0
    return _normalise_layer(g)


def make_batch(
    spec: ExactGroupObsSpec,
    seed: int,
    *,
    kind: str = "dense",
    density: float = 0.25,
    g_float: np.ndarray | None = None,
    theta_float: np.ndarray | None = None,
) -> Batch:
    rng = np.random.default_rng(seed)
    n, b, m = spec.batch, spec.block, spec.m
    theta_f = np.clip(rng.normal(0, 0.7, size=(n, b)), -3.5, 3.5) if theta_float is None else theta_float
    g_f = synthetic_factor(rng, n, m, b, kind) if g_float is None else g_float
    mask = np.zeros((n, b), dtype=bool)
    for i in range(n):
        mask[i, rng.choice(b, max(1, round(density * b)), replace=False)] = True
    theta = quantise_exact(theta_f, spec.theta_bits)
    g = quantise_exact(g_f, spec.g_bits)
    return Batch(spec, theta, g, mask, exact_update(spec, theta, g, mask), float(np.std(theta_f)))


def real_factor_batch(spec: ExactGroupObsSpec, seed: int = 0) -> Batch:
    """Blocks of a small MLP trained on scikit-learn's digits, with its Gauss-Newton factor."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:600] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:600], dtype=torch.long)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    factors = layer_factors(
        model, ["0.weight"], x[:256], y[:256], nn.functional.cross_entropy, spec.block, curvature="ggn"
    )
    g_all = fit_rows(factors["0.weight"].factors, spec.m)
    weight = model[0].weight.detach().double().numpy().reshape(-1, spec.block)
    exponent = -int(np.floor(np.log2(np.std(weight)))) - 1
    rng = np.random.default_rng(seed)
    pick = rng.choice(weight.shape[0], spec.batch, replace=False)
    return make_batch(spec, seed, g_float=g_all[pick], theta_float=weight[pick] * 2.0**exponent)


def outputs(batch: Batch, theta_after: IntArray, w: IntArray) -> list[tuple[int, int, int, int]]:
    return exact_outputs(batch.spec, batch.theta, theta_after, batch.g, batch.mask, w)


def accepted(batch: Batch, theta_after: IntArray, w: IntArray) -> bool:
    """What the verifier decides from a proof with these outputs."""
    for (kept, s_w, s_row, below), g_sq in zip(outputs(batch, theta_after, w), batch.g_fro_sq, strict=True):
        limit = batch.spec.thresholds(g_sq)
        if kept != 0 or below != 0 or s_w > limit.w or s_row > limit.row:
            return False
    return True


def edited(batch: Batch, block: int, direction: np.ndarray, alpha: float) -> tuple[IntArray, IntArray]:
    """The honest update moved by ``alpha * direction`` on block ``block``'s kept weights (normalised
    units), with the row-space witness ``w`` re-fitted to hide the edit as well as it can be hidden:
    the weighted least-squares ``w`` for both residuals at their thresholds."""
    spec = batch.spec
    g = np.asarray(batch.g[block], dtype=np.float64) / 2.0**spec.g_bits
    keep = ~batch.mask[block]
    p = np.where(keep, alpha * direction, 0.0)
    r_w, r_row = spec.residual_bounds(batch.g_fro_sq[block])
    a, c = 1.0 / r_w**2, 1.0 / r_row**2
    g_u = g[:, keep]
    mlam = spec.m * spec.lam
    lhs = a * mlam**2 * np.eye(spec.m) + c * g_u @ g_u.T
    rhs = -a * mlam * (g @ p) + c * g_u @ p[keep]
    v = np.linalg.solve(lhs, rhs)
    theta_after = np.array(batch.update.theta_after, dtype=object)
    w = np.array(batch.update.w, dtype=object)
    theta_after[block] = theta_after[block] + quantise_exact(p, spec.theta_bits)
    w[block] = w[block] + quantise_exact(v, spec.w_bits)
    return theta_after, w


def worst_direction(batch: Batch, block: int) -> np.ndarray:
    """The unit edit of the kept weights that the relation constrains least: the top singular direction
    of ``G_U^T (m lam I + G_U G_U^T)^-1`` (docs/protocol.md)."""
    spec = batch.spec
    g = np.asarray(batch.g[block], dtype=np.float64) / 2.0**spec.g_bits
    keep = ~batch.mask[block]
    g_u = g[:, keep]
    amp = g_u.T @ np.linalg.inv(spec.m * spec.lam * np.eye(spec.m) + g_u @ g_u.T)
    u, _s, _vt = np.linalg.svd(amp, full_matrices=False)
    out = np.zeros(spec.block)
    out[keep] = u[:, 0]
    return out


def largest_accepted_edit(batch: Batch, block: int, direction: np.ndarray, upper: float) -> float:
    """Binary search for the largest ``alpha`` whose edit (with the best ``w``) is still accepted."""
    lo, hi = 0.0, upper
    if accepted(batch, *edited(batch, block, direction, hi)):
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if accepted(batch, *edited(batch, block, direction, mid)):
            lo = mid
        else:
            hi = mid
    return lo
