"""Honest states and adversarial edits of the exact analytic relation, shared by its tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from zkunlearn.proofs.analytic_exact import (
    AnalyticOutputs,
    ExactAnalyticSpec,
    IntArray,
    factor_of,
    gram,
    quantise_rows,
    reference_outputs,
    ridge_weights,
)


@dataclass(frozen=True)
class Deletion:
    """An enrolled Gram, the forget rows, and the honest client's answer."""

    m: IntArray
    z_u: IntArray
    m_after: IntArray
    w_after: IntArray
    factor: IntArray
    labels: np.ndarray
    features: np.ndarray
    forget: np.ndarray

    def outputs(self, spec: ExactAnalyticSpec, **override: IntArray) -> AnalyticOutputs:
        parts = {
            "m": self.m,
            "m_after": self.m_after,
            "w": self.w_after,
            "z": self.z_u,
            "factor": self.factor,
        }
        parts.update(override)
        return reference_outputs(spec, parts["m"], parts["m_after"], parts["w"], parts["z"], parts["factor"])


def digits_features(spec: ExactAnalyticSpec, n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits through a seeded projection to ``d`` features inside the spec's bound."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data[:n] / 16.0
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(x.shape[1], spec.d)) / np.sqrt(x.shape[1])
    feats = x @ proj
    feats = feats / np.quantile(np.abs(feats), 0.99) * spec.x_bound / 4
    y = digits.target[:n] % spec.k
    return np.clip(feats, -spec.x_bound / 2, spec.x_bound / 2), y


def synthetic_features(spec: ExactAnalyticSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.05, 1.0, size=spec.d)  # uneven feature spreads: an ill-conditioned Gram
    x = np.clip(rng.normal(size=(n, spec.d)) * scales, -spec.x_bound, spec.x_bound)
    return x, rng.integers(0, spec.k, size=n)


def make_deletion(
    spec: ExactAnalyticSpec, features: np.ndarray, labels: np.ndarray, forget: np.ndarray
) -> Deletion:
    z = quantise_rows(spec, features, labels)
    m = gram(z)
    z_u = z[forget]
    m_after = m - gram(z_u)
    return Deletion(
        m, z_u, m_after, ridge_weights(spec, m_after), factor_of(spec, m_after), labels, features, forget
    )


def accepted(spec: ExactAnalyticSpec, out: AnalyticOutputs) -> bool:
    return (
        all(v == 0 for v in out.eq)
        and 0 <= out.r_sq <= spec.r_threshold
        and 0 <= out.e_sq <= spec.e_threshold
    )


def head_scale(spec: ExactAnalyticSpec, w: IntArray) -> float:
    """The standard deviation of the head's entries, in head units."""
    return float(np.std(np.asarray(w, dtype=np.float64) / 2.0**spec.w_bits))


def gram_a(spec: ExactAnalyticSpec, m_after: IntArray) -> np.ndarray:
    return np.asarray(m_after, dtype=object)[: spec.d, : spec.d].astype(np.float64) + spec.gamma_q * np.eye(
        spec.d
    )


def largest_accepted_step(spec: ExactAnalyticSpec, case: Deletion, direction: np.ndarray) -> float:
    """Largest ``t`` (grid steps of ``W``) for which ``W_q + t V`` still meets the ``R`` threshold, ``V`` a
    unit-Frobenius ``d x k`` direction: the root of ``|R + t A' V|^2 = threshold``."""
    a = gram_a(spec, case.m_after)
    d = spec.d
    r = (
        np.asarray(case.m_after, dtype=object)[:d, :d]
        + spec.gamma_q * np.eye(d, dtype=np.int64).astype(object)
    ).dot(case.w_after) - (1 << spec.w_bits) * np.asarray(case.m_after, dtype=object)[:d, d:]
    r_f = r.astype(np.float64)
    av = a @ direction
    qa, qb, qc = float(np.sum(av * av)), float(np.sum(r_f * av)), float(np.sum(r_f * r_f)) - spec.r_threshold
    return (-qb + math.sqrt(qb * qb - qa * qc)) / qa


def worst_directions(spec: ExactAnalyticSpec, case: Deletion) -> dict[str, np.ndarray]:
    """Unit edits the ``R`` check constrains least: the least-curved direction of ``A'`` in one column,
    and the single entry whose column of ``A'`` is shortest."""
    a = gram_a(spec, case.m_after)
    _, vecs = np.linalg.eigh(a)
    least = np.zeros((spec.d, spec.k))
    least[:, 0] = vecs[:, 0]
    entry = np.zeros((spec.d, spec.k))
    entry[int(np.argmin(np.linalg.norm(a, axis=0))), 0] = 1.0
    return {"least-curved direction": least, "single entry": entry}


def best_factor_residual(spec: ExactAnalyticSpec, m_after: IntArray) -> float:
    """The smallest ``|E|_F`` any real factor reaches: ``2**(2l)`` times the negative part of
    ``M' + eta_q I`` (the best ``L L^T`` is its positive part)."""
    shifted = np.asarray(m_after, dtype=object).astype(np.float64) + spec.eta_q * np.eye(spec.n)
    vals = np.linalg.eigvalsh((shifted + shifted.T) / 2)
    return 4.0**spec.l_bits * float(np.sqrt(np.sum(np.minimum(vals, 0.0) ** 2)))
