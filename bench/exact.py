"""Proof-cost benchmark of the exact relations beside the fixed-point ones, in one run.

``run_exact_bench(out_path)`` writes ``bench/results/proofs_exact.json``: per circuit (fixed point at
one block; exact deletion and enrollment at 1 and ``batch`` blocks) rows, rows per covered weight,
logrows, setup/prove/verify seconds, peak RSS and proof bytes, every proof made by the SDK's own
worker processes and verified with the provider's keys; then a throughput run of ``proofs`` exact
deletion proofs and as many enrollment proofs on ``workers`` workers; and the analytic head's circuits
(:mod:`zkunlearn.bench.exact_analytic`). Every number is measured here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from zkunlearn.bench.exact_analytic import analytic_rows
from zkunlearn.bench.proofs import LAM, _build, _inputs
from zkunlearn.bench.threads import one_thread_per_job
from zkunlearn.client.group_obs_exact import exact_update
from zkunlearn.proofs.artifacts import CircuitArtifacts
from zkunlearn.proofs.backend import EzklBackend
from zkunlearn.proofs.exact import (
    ExactGroupObsSpec,
    IntArray,
    field_blinding,
    g_fro_sq,
    g_tensor,
    mask_tensor,
    quantise_exact,
    theta_tensor,
)
from zkunlearn.proofs.exact_circuits import ExactGroupObsVerifier, build_exact_circuits
from zkunlearn.proofs.prover import ProveJob, ProveResult, prove_parallel
from zkunlearn.proofs.srs import SrsInfo, dev_srs
from zkunlearn.proofs.verifier import InMemoryReplayGuard


def _honest(spec: ExactGroupObsSpec, rng: np.random.Generator, density: float) -> dict[str, Any]:
    """One batch of committed blocks (normalised like a layer's) and its honest exact update."""
    n, b, m = spec.batch, spec.block, spec.m
    theta = quantise_exact(np.clip(rng.normal(0, 0.7, size=(n, b)), -3.5, 3.5), spec.theta_bits)
    g_float = rng.normal(size=(n, m, b))
    g = quantise_exact(g_float / np.sqrt(np.sum(g_float**2) / (m * n * b)), spec.g_bits)
    mask = np.zeros((n, b), dtype=bool)
    for i in range(n):
        mask[i, rng.choice(b, round(density * b), replace=False)] = True
    return {"theta": theta, "g": g, "mask": mask, "update": exact_update(spec, theta, g, mask)}


def _blind(rows: int, width: int) -> list[list[int]]:
    return [field_blinding(width) for _ in range(rows)]


def _jobs(
    spec: ExactGroupObsSpec, arts: tuple[CircuitArtifacts, CircuitArtifacts], case: dict[str, Any], label: str
) -> tuple[ProveJob, ProveJob, dict[str, Any]]:
    n = spec.batch
    theta = theta_tensor(case["theta"], _blind(n, spec.n_blind))
    g = g_tensor(case["g"], _blind(n, spec.block))
    request = hashlib.sha256(label.encode()).digest()
    after: IntArray = case["update"].theta_after
    deletion_inputs = [
        theta,
        theta_tensor(after, _blind(n, spec.n_blind)),
        g,
        mask_tensor(case["mask"], request, spec.n_blind),
        theta_tensor(case["update"].w, _blind(n, spec.n_blind)),
    ]
    deletion, enrollment = arts
    return (
        ProveJob(deletion_inputs, deletion.compiled, deletion.vk, deletion.pk, deletion.srs.path, label),
        ProveJob([g], enrollment.compiled, enrollment.vk, enrollment.pk, enrollment.srs.path, label),
        {"request": request, "mask": case["mask"], "g_fro_sq": g_fro_sq(case["g"]), "theta": theta},
    )


def _verify_deletion(
    verifier: ExactGroupObsVerifier, result: ProveResult, enrolled: ProveResult, context: dict[str, Any]
) -> float:
    t0 = time.perf_counter()
    verdict = verifier.verify(
        result.proof,
        request_id=result.label,
        enrolled_theta=verifier.commit(context["theta"]),
        enrolled_g=enrolled.commitments[0],
        mask_commitment=verifier.mask_commitment(context["mask"], context["request"]),
        claimed_theta_after=result.commitments[1],
        g_fro_sq=context["g_fro_sq"],
        replay=InMemoryReplayGuard(),
    )
    if not verdict.ok:
        raise RuntimeError(f"honest exact deletion {result.label} refused: {verdict}")
    return time.perf_counter() - t0


def _row(
    name: str, arts: CircuitArtifacts, covered: int, res: ProveResult, setup_s: float, verify_s: float
) -> dict[str, Any]:
    rows = int(arts.settings_dict["num_rows"])
    return {
        "circuit": name,
        "covered_weights": covered,
        "logrows": arts.logrows,
        "num_rows": rows,
        "inner_cols": int(arts.settings_dict["run_args"]["num_inner_cols"]),
        "rows_per_weight": round(rows / covered, 1),
        "setup_s": round(setup_s, 2),
        "prove_s": round(res.prove_s, 2),
        "verify_s": round(verify_s, 3),
        "peak_rss_mb": round(res.peak_rss_mb, 1),
        "proof_bytes": len(res.proof.transcript),
        "pk_mb": round(arts.pk.stat().st_size / 2**20, 1),
        "worker_baseline_rss_mb": res.extra.get("baseline_rss_mb"),
        "worker_overhead_s": res.extra.get("overhead_s"),
    }


def run_exact_bench(
    out_path: Path = Path("bench/results/proofs_exact.json"),
    *,
    block: int = 64,
    m: int = 16,
    lam: float = 0.001,
    batch: int = 8,
    density: float = 0.625,
    proofs: int = 6,
    workers: int = 2,
    memory_limit_mb: int = 4096,
    seed: int = 0,
) -> dict[str, Any]:
    one_thread_per_job()
    rng = np.random.default_rng(seed)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "srs": "dev (INSECURE, ezkl.gen_srs)",
        "load_avg_before": [round(v, 2) for v in load_before],
        "circuits": [],
    }
    backend = EzklBackend()
    with tempfile.TemporaryDirectory(prefix="zkexact-") as tmp:
        work = Path(tmp)
        cache: dict[int, SrsInfo] = {}

        def srs_for(logrows: int) -> SrsInfo:
            if logrows not in cache:
                cache[logrows] = dev_srs(work / "srs", logrows)
            return cache[logrows]

        # The fixed-point relation, same block shape, one block per proof.
        arts, setup_s = _build("group_obs", block, m, 1, work, srs_for)
        job = ProveJob(_inputs("group_obs", block, m, 1, rng), arts.compiled, arts.vk, arts.pk, arts.srs.path)
        (res,) = prove_parallel([job], workers=1, memory_limit_mb=memory_limit_mb, progress=False)
        t0 = time.perf_counter()
        if not backend.verify(res.proof, arts.settings, arts.vk, arts.srs.path, res.commitments):
            raise RuntimeError("honest fixed-point proof did not verify")
        result["circuits"].append(_row("fixed-point", arts, block, res, setup_s, time.perf_counter() - t0))
        result["fixed_point_lam"] = LAM

        specs = {n: ExactGroupObsSpec.from_lam(block, m, n, lam) for n in sorted({1, batch})}
        built: dict[int, tuple[CircuitArtifacts, CircuitArtifacts]] = {}
        for n, spec in specs.items():
            t0 = time.perf_counter()
            built[n] = build_exact_circuits(spec, work / f"exact{n}", srs_for)
            setup_s = time.perf_counter() - t0
            verifier = ExactGroupObsVerifier(spec, *built[n])
            deletion_job, enrollment_job, context = _jobs(
                spec, built[n], _honest(spec, rng, density), f"one{n}"
            )
            deletion, enrollment = prove_parallel(
                [deletion_job, enrollment_job], workers=1, memory_limit_mb=memory_limit_mb, progress=False
            )
            verify_s = _verify_deletion(verifier, deletion, enrollment, context)
            t0 = time.perf_counter()
            enrolled = verifier.verify_enrollment(enrollment.proof, g_commit=enrollment.commitments[0])
            enroll_verify_s = time.perf_counter() - t0
            if not enrolled.ok:
                raise RuntimeError(f"honest enrollment refused: {enrolled}")
            covered = n * block
            result["circuits"].append(_row(f"exact x{n}", built[n][0], covered, deletion, setup_s, verify_s))
            result["circuits"].append(
                _row(f"exact enrollment x{n}", built[n][1], covered, enrollment, 0.0, enroll_verify_s)
            )
        result["analytic"] = analytic_rows(work, srs_for, rng, memory_limit_mb=memory_limit_mb)
        spec = specs[batch]
        result["exact_spec"] = {k: v for k, v in spec.__dict__.items()}
        verifier = ExactGroupObsVerifier(spec, *built[batch])
        cases = [
            _jobs(spec, built[batch], _honest(spec, rng, density), f"throughput{j}") for j in range(proofs)
        ]
        t0 = time.perf_counter()
        enrollments = prove_parallel(
            [c[1] for c in cases], workers=workers, memory_limit_mb=memory_limit_mb, progress=False
        )
        enroll_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        deletions = prove_parallel(
            [c[0] for c in cases], workers=workers, memory_limit_mb=memory_limit_mb, progress=False
        )
        prove_s = time.perf_counter() - t0
        verify_s = sum(
            _verify_deletion(verifier, d, e, c[2])
            for d, e, c in zip(deletions, enrollments, cases, strict=True)
        )
        covered = proofs * batch * block
        total_bytes = sum(len(r.proof.transcript) for r in deletions)
        result["throughput"] = {
            "proofs": proofs,
            "blocks_per_proof": batch,
            "covered_weights": covered,
            "workers": workers,
            "total_prove_s": round(prove_s, 2),
            "weights_per_s": round(covered / prove_s, 1),
            "peak_rss_mb_per_worker": round(max(r.peak_rss_mb for r in deletions), 1),
            "total_verify_s": round(verify_s, 3),
            "total_proof_bytes": total_bytes,
            "proof_bytes_per_weight": round(total_bytes / covered, 2),
            "enroll_s": round(enroll_s, 2),
            "enroll_weights_per_s": round(covered / enroll_s, 1),
            "enroll_peak_rss_mb_per_worker": round(max(r.peak_rss_mb for r in enrollments), 1),
        }
    result["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(run_exact_bench(), indent=2))
