"""Proof cost of the exact analytic relation beside the fixed-point one, at the demo's head shape.

Called by :func:`zkunlearn.bench.exact.run_exact_bench` so both relations are measured in one run:
per circuit rows, rows per head weight, logrows, setup/prove/verify seconds, peak RSS and proof bytes;
for the exact relation both the enrollment proof and a deletion proof, each verified with the
provider's keys.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from zkunlearn.bench.proofs import _build, _inputs
from zkunlearn.proofs.analytic_exact import (
    ExactAnalyticSpec,
    blinding_row,
    enrollment_binding,
    factor_of,
    gram,
    quantise_rows,
    ridge_weights,
    row_tensor,
    z_tensor,
)
from zkunlearn.proofs.analytic_exact_circuits import ExactAnalyticVerifier, build_analytic_exact
from zkunlearn.proofs.artifacts import CircuitArtifacts
from zkunlearn.proofs.backend import EzklBackend
from zkunlearn.proofs.prover import ProveJob, ProveResult, prove_parallel
from zkunlearn.proofs.srs import SrsInfo
from zkunlearn.proofs.verifier import InMemoryReplayGuard


def _row(
    name: str, arts: CircuitArtifacts, weights: int, res: ProveResult, setup_s: float, verify_s: float
) -> dict[str, Any]:
    rows = int(arts.settings_dict["num_rows"])
    return {
        "circuit": name,
        "head_weights": weights,
        "logrows": arts.logrows,
        "num_rows": rows,
        "rows_per_weight": round(rows / weights, 1),
        "setup_s": round(setup_s, 2),
        "prove_s": round(res.prove_s, 2),
        "verify_s": round(verify_s, 3),
        "peak_rss_mb": round(res.peak_rss_mb, 1),
        "proof_bytes": len(res.proof.transcript),
    }


def analytic_rows(
    work: Path,
    srs_for: Callable[[int], SrsInfo],
    rng: np.random.Generator,
    *,
    d: int = 8,
    k: int = 10,
    n_u: int = 4,
    n_rows: int = 1000,
    memory_limit_mb: int = 4096,
) -> list[dict[str, Any]]:
    """Fixed-point and exact analytic circuits at ``(d, k, n_u)``; the exact head learns ``n_rows``."""
    out = []
    arts, setup_s = _build("analytic", d, k, n_u, work, srs_for)
    job = ProveJob(_inputs("analytic", d, k, n_u, rng), arts.compiled, arts.vk, arts.pk, arts.srs.path)
    (res,) = prove_parallel([job], workers=1, memory_limit_mb=memory_limit_mb, progress=False)
    t0 = time.perf_counter()
    if not EzklBackend().verify(res.proof, arts.settings, arts.vk, arts.srs.path, res.commitments):
        raise RuntimeError("honest fixed-point analytic proof did not verify")
    out.append(_row("analytic fixed-point", arts, d * k, res, setup_s, time.perf_counter() - t0))

    spec = ExactAnalyticSpec(d, k, n_u)
    t0 = time.perf_counter()
    exact = build_analytic_exact(spec, work / "analytic-exact", srs_for)
    setup_s = time.perf_counter() - t0
    verifier = ExactAnalyticVerifier(spec, exact)
    x = np.clip(rng.normal(size=(n_rows, d)), -spec.x_bound / 2, spec.x_bound / 2)
    y = rng.integers(0, k, size=n_rows)
    m = gram(quantise_rows(spec, x, y))
    forget = np.where(y == 0)[0][:n_u]
    m_after = m - gram(quantise_rows(spec, x[forget], y[forget]))
    digest = hashlib.sha256(b"bench-analytic").digest()

    def tensor(values: Any) -> list[str]:
        return row_tensor(values, blinding_row(np.asarray(values).shape[1]))

    m_felts = tensor(m)
    jobs = [
        [
            m_felts,
            m_felts,
            tensor(ridge_weights(spec, m)),
            z_tensor(spec, None, enrollment_binding()),
            tensor(factor_of(spec, m)),
        ],
        [
            m_felts,
            tensor(m_after),
            tensor(ridge_weights(spec, m_after)),
            z_tensor(spec, quantise_rows(spec, x[forget], y[forget]), digest),
            tensor(factor_of(spec, m_after)),
        ],
    ]
    enrolled, deleted = prove_parallel(
        [ProveJob(inputs, exact.compiled, exact.vk, exact.pk, exact.srs.path) for inputs in jobs],
        workers=1,
        memory_limit_mb=memory_limit_mb,
        progress=False,
    )
    t0 = time.perf_counter()
    verdict = verifier.verify_enrollment(
        enrolled.proof, m_commit=enrolled.commitments[0], w_commit=enrolled.commitments[2]
    )
    enroll_verify_s = time.perf_counter() - t0
    if not verdict.ok:
        raise RuntimeError(f"honest exact analytic enrollment refused: {verdict}")
    t0 = time.perf_counter()
    verdict = verifier.verify(
        deleted.proof,
        request_id="bench",
        enrolled_m=deleted.commitments[0],
        claimed_m_after=deleted.commitments[1],
        claimed_w=deleted.commitments[2],
        forget_commitment=verifier.forget_commitment(x[forget], y[forget], digest),
        replay=InMemoryReplayGuard(),
    )
    verify_s = time.perf_counter() - t0
    if not verdict.ok:
        raise RuntimeError(f"honest exact analytic deletion refused: {verdict}")
    out.append(_row("analytic exact (deletion)", exact, d * k, deleted, setup_s, verify_s))
    out.append(_row("analytic exact (enrollment)", exact, d * k, enrolled, 0.0, enroll_verify_s))
    for row in out:
        row.update(d=d, k=k, n_u=n_u)
    out[1]["slack_bound"] = spec.slack_bound()
    return out
