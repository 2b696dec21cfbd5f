"""Proof-cost benchmark: per-shape setup/prove/verify cost and one real small deletion.

``run_proofs_bench(out_path)`` writes ``bench/results/proofs.json``. Every number is measured here;
nothing is extrapolated. The deletion part proves a real Group-OBS deletion of ``deletion_blocks``
blocks (honest solver output) in parallel workers and verifies every proof with the provider's keys.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from zkunlearn.bench.threads import one_thread_per_job
from zkunlearn.circuits import analytic as an
from zkunlearn.circuits import group_obs as go
from zkunlearn.circuits.export import export_relation
from zkunlearn.client.analytic import AnalyticHead
from zkunlearn.client.group_obs import solve_block
from zkunlearn.proofs.artifacts import CircuitArtifacts, build_provider_artifacts
from zkunlearn.proofs.backend import CircuitConfig
from zkunlearn.proofs.deletion import GroupObsSpec
from zkunlearn.proofs.fixedpoint import felts, group_obs_tolerance, normalise_factor, random_blinding
from zkunlearn.proofs.prover import ProveJob, group_obs_tensors, new_group_obs_batch, prove_parallel
from zkunlearn.proofs.srs import SrsInfo, dev_srs
from zkunlearn.proofs.verifier import GroupObsVerifier, InMemoryReplayGuard

SCALE = 13
LAM = 0.05
DEFAULT_SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("group_obs", 16, 8, 2),
    ("group_obs", 32, 16, 2),
    # The demo's ViT block shape at 1, 2 and 4 blocks per proof: the batch trade-off plot.
    ("group_obs", 64, 16, 1),
    ("group_obs", 64, 16, 2),
    ("group_obs", 64, 16, 4),
    ("analytic", 8, 3, 4),
)


def _honest_group_obs(rng: np.random.Generator, n: int, b: int, m: int, masked: int) -> tuple[Any, ...]:
    th, ta, gs, ms, ws = [], [], [], [], []
    for _ in range(n):
        theta = np.clip(rng.normal(size=b), -3, 3)
        g, _ = normalise_factor(rng.normal(size=(m, b)))
        mask = np.zeros(b, bool)
        mask[rng.choice(b, masked, replace=False)] = True
        upd = solve_block(theta, g, mask, LAM)
        th.append(theta)
        ta.append(upd.theta_after)
        gs.append(g)
        ms.append(mask)
        ws.append(upd.w)
    return tuple(np.array(v) for v in (th, ta, gs, ms, ws))


def _build(relation: str, p1: int, p2: int, p3: int, work: Path, srs: Any) -> tuple[CircuitArtifacts, float]:
    t0 = time.perf_counter()
    config = CircuitConfig()
    if relation == "group_obs":
        # The range-check legs the product's circuit gets for this shape at the default bounds.
        spec = GroupObsSpec(block=p1, m=p2, batch=p3, lam=LAM)
        legs = spec.decomp_legs(config.input_scale, config.decomp_base)
        config = replace(config, decomp_legs=max(config.decomp_legs, legs))
        onnx = export_relation(
            go.GroupObsCheck(p1, p2, LAM),
            go.example_inputs(p3, p1, p2),
            work / f"go_{p1}_{p2}_{p3}.onnx",
            go.INPUT_NAMES,
            go.OUTPUT_NAMES,
        )
    else:
        onnx = export_relation(
            an.AnalyticCheck(p1, p2, p3),
            an.example_inputs(p1, p2, p3),
            work / f"an_{p1}_{p2}_{p3}.onnx",
            an.INPUT_NAMES,
            an.OUTPUT_NAMES,
        )
    arts = build_provider_artifacts(onnx, work / "cache", srs, config)
    return arts, time.perf_counter() - t0


def _inputs(relation: str, p1: int, p2: int, p3: int, rng: np.random.Generator) -> list[list[str]]:
    if relation == "group_obs":
        th, ta, gs, ms, ws = _honest_group_obs(rng, p3, p1, p2, max(1, p1 // 8))
        batch = new_group_obs_batch(th, ta, gs, ms, ws, scale=SCALE, n_blind=go.N_BLIND)
        return group_obs_tensors(batch, hashlib.sha256(b"bench").digest(), SCALE, go.N_BLIND)
    d, k, n_u = p1, p2, p3
    x, y = rng.normal(size=(3 * n_u, d)) * 0.5, rng.normal(size=(3 * n_u, k))
    head = AnalyticHead(d, k, gamma=1.0)
    head.learn(x, y)
    r, w = head.R.copy(), head.W.copy()
    head.unlearn(x[:n_u], y[:n_u])
    tensors = (r, head.R, w, head.W, x[:n_u], y[:n_u])
    return [felts(np.vstack([t, random_blinding(t.shape[1], SCALE)[None]]), SCALE) for t in tensors]


def run_proofs_bench(
    out_path: Path = Path("bench/results/proofs.json"),
    *,
    shapes: tuple[tuple[str, int, int, int], ...] = DEFAULT_SHAPES,
    deletion_blocks: int = 4,
    deletion_batch: int = 2,
    deletion_block: int = 16,
    deletion_m: int = 8,
    workers: int = 2,
    memory_limit_mb: int = 8192,
    seed: int = 0,
    vit: bool = True,
) -> dict[str, Any]:
    """Measure each shape (group_obs: block, m, batch; analytic: d, k, n_u) and one small real deletion."""
    one_thread_per_job()
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"shapes": [], "srs": "dev (INSECURE, ezkl.gen_srs)"}
    with tempfile.TemporaryDirectory(prefix="zkbench-") as tmp:
        work = Path(tmp)
        srs_cache: dict[int, SrsInfo] = {}

        def srs(k: int) -> SrsInfo:
            if k not in srs_cache:
                srs_cache[k] = dev_srs(work / "srs", k)
            return srs_cache[k]

        from zkunlearn.proofs.backend import EzklBackend

        backend = EzklBackend()
        for relation, p1, p2, p3 in shapes:
            arts, setup_s = _build(relation, p1, p2, p3, work, srs)
            job = ProveJob(_inputs(relation, p1, p2, p3, rng), arts.compiled, arts.vk, arts.pk, arts.srs.path)
            res = prove_parallel([job], workers=1, memory_limit_mb=memory_limit_mb, progress=False)[0]
            t0 = time.perf_counter()
            ok = backend.verify(res.proof, arts.settings, arts.vk, arts.srs.path, res.commitments)
            verify_s = time.perf_counter() - t0
            if not ok:
                raise RuntimeError(f"honest {relation} proof did not verify")
            entry = {
                "relation": relation,
                "block": p1 if relation == "group_obs" else None,
                "m": p2 if relation == "group_obs" else None,
                "batch": p3 if relation == "group_obs" else 1,
                "analytic_dkn": [p1, p2, p3] if relation == "analytic" else None,
                "logrows": arts.logrows,
                "num_rows": int(arts.settings_dict["num_rows"]),
                "setup_s": round(setup_s, 3),
                "prove_s": round(res.prove_s, 3),
                "verify_s": round(verify_s, 4),
                "peak_rss_mb": round(res.peak_rss_mb, 1),
                "proof_bytes": len(res.proof.transcript),
                "pk_mb": round(arts.pk.stat().st_size / 2**20, 1),
            }
            result["shapes"].append(entry)

        # A real (small) deletion: honest Group-OBS updates, proved in parallel, verified by the provider.
        n_proofs = -(-deletion_blocks // deletion_batch)
        arts, _ = _build("group_obs", deletion_block, deletion_m, deletion_batch, work, srs)
        tol = group_obs_tolerance(
            deletion_block, deletion_m, LAM, SCALE, theta_bound=4.0, g_bound=4.0, w_bound=4.0
        )
        verifier = GroupObsVerifier(arts, n_blocks=deletion_batch, n_blind=go.N_BLIND, tolerance=tol)
        masked = max(1, deletion_block // 8)
        jobs, scen = [], []
        for j in range(n_proofs):
            th, ta, gs, ms, ws = _honest_group_obs(rng, deletion_batch, deletion_block, deletion_m, masked)
            batch = new_group_obs_batch(th, ta, gs, ms, ws, scale=SCALE, n_blind=go.N_BLIND)
            req = hashlib.sha256(f"deletion-{j}".encode()).digest()
            tensors = group_obs_tensors(batch, req, SCALE, go.N_BLIND)
            enrolled = (verifier.commit(tensors[0]), verifier.commit(tensors[2]))
            jobs.append(ProveJob(tensors, arts.compiled, arts.vk, arts.pk, arts.srs.path, label=f"batch{j}"))
            scen.append((batch, req, enrolled))
        t0 = time.perf_counter()
        results = prove_parallel(jobs, workers=workers, memory_limit_mb=memory_limit_mb)
        total_prove_s = time.perf_counter() - t0
        guard = InMemoryReplayGuard()
        t0 = time.perf_counter()
        for j, (res, (batch, req, (th_c, g_c))) in enumerate(zip(results, scen, strict=True)):
            verdict = verifier.verify(
                res.proof,
                request_id=f"deletion-{j}",
                enrolled_theta=th_c,
                enrolled_g=g_c,
                mask_commitment=verifier.mask_commitment(batch.mask, req),
                claimed_theta_after=res.commitments[1],
                replay=guard,
            )
            if not verdict.ok:
                raise RuntimeError(f"honest deletion proof {j} refused: {verdict}")
            guard.record(verdict.proof_digest, f"deletion-{j}")
        total_verify_s = time.perf_counter() - t0
        covered = n_proofs * deletion_batch * deletion_block
        total_bytes = sum(len(r.proof.transcript) for r in results)
        result["vit_deletion"] = {
            "measured": True,
            "note": "real small deletion (random blocks, honest Group-OBS), not a ViT-size extrapolation",
            "block": deletion_block,
            "m": deletion_m,
            "batch": deletion_batch,
            "covered_weights": covered,
            "masked_weights": n_proofs * deletion_batch * masked,
            "touched_blocks": n_proofs * deletion_batch,
            "proofs": n_proofs,
            "total_prove_s": round(total_prove_s, 3),
            "workers": workers,
            "peak_rss_mb_per_worker": round(max(r.peak_rss_mb for r in results), 1),
            "total_proof_bytes": total_bytes,
            "total_verify_s": round(total_verify_s, 3),
            "weights_per_s": round(covered / total_prove_s, 2),
            "proof_bytes_per_weight": round(total_bytes / covered, 2),
        }
        if vit:
            result["small_deletion"] = result.pop("vit_deletion")
            result["vit_deletion"] = measure_vit_deletion(
                work / "vit", workers=workers, memory_limit_mb=memory_limit_mb
            )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    plot_batch_tradeoff(result, out_path.with_suffix(".png"))
    return result


def measure_vit_deletion(work: Path, *, workers: int, memory_limit_mb: int | None) -> dict[str, Any]:
    """The fixed-point relation's ViT deletion on its proof-budget mask: every touched batch proved and
    verified (the demo's scenario and client code, one honest Group-OBS client of update kind 1).
    """
    from zkunlearn.circuits.mask import Mask
    from zkunlearn.client.sdk import VerifiedRequest
    from zkunlearn.client.unlearning import GroupObsUnlearner, ProveOptions
    from zkunlearn.proofs.artifacts import client_artifacts
    from zkunlearn.proofs.deletion import DeletionCircuits, touched_batches, verify_deletion
    from zkunlearn.proofs.layout import covered_weights

    from zkunlearn.scenario import Scenario
    from zkunlearn.tasks.train import cross_entropy

    scenario = Scenario(quick=False)
    spec = scenario.group_obs_spec
    mask: Mask = scenario.deletion_mask(budget=True)
    circuits = DeletionCircuits.build(work / "circuits", group_obs=spec, analytic=None)
    assert circuits.group_obs is not None
    arts = circuits.group_obs[1]
    circuit = client_artifacts(
        arts.compiled.read_bytes(), arts.settings.read_bytes(), arts.srs, work / "client"
    )
    model = scenario.personalized(100)
    unlearner = GroupObsUnlearner(
        model, spec, circuit, work / "state", ProveOptions(workers=workers, memory_limit_mb=memory_limit_mb)
    )
    data = scenario.task.client_after_request
    t0 = time.perf_counter()
    commitments = unlearner.enroll(
        list(scenario.layers), data.x, data.y, cross_entropy, fisher_shift=scenario.fisher_shift
    )
    enroll_s = time.perf_counter() - t0
    canonical = b"zkunlearn-bench/vit-deletion"
    request = VerifiedRequest(
        request_id="bench",
        client_id="bench",
        model_id=scenario.model_id,
        update_kind=1,
        layers=tuple(scenario.layers),
        mask=mask,
        mask_bytes=mask.to_bytes(),
        forget_features=None,
        forget_labels=None,
        issued_ms=0,
        expires_ms=0,
        cursor=0,
        before_commitments=tuple(commitments),
        payload={},
        canonical=canonical,
        signature=b"",
    )
    t0 = time.perf_counter()
    update = unlearner.prove(request)
    total_prove_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    verdict = verify_deletion(
        circuits,
        update_kind=1,
        request_id="bench",
        request_canonical=canonical,
        mask_bytes=mask.to_bytes(),
        forget_features=None,
        forget_labels=None,
        before=commitments,
        after=update.after_commitments,
        proofs=update.proofs,
    )
    total_verify_s = time.perf_counter() - t0
    if not verdict.ok:
        raise RuntimeError(f"the honest ViT deletion was refused: {verdict.reason}")
    stats = unlearner.last_proof_stats()
    batches = touched_batches(mask, spec)
    covered = covered_weights(mask, spec)
    total_bytes = sum(len(p) for p in update.proofs)
    return {
        "measured": True,
        "note": "zkunlearn demo's ViT deletion: fisher-ratio head row + 6 budgeted batches of blocks.3.fc1",
        "block": spec.block,
        "m": spec.m,
        "batch": spec.batch,
        "logrows": arts.logrows,
        "covered_weights": covered,
        "masked_weights": mask.masked_count(),
        "touched_blocks": len(batches) * spec.batch,
        "proofs": len(update.proofs),
        "enroll_s": round(enroll_s, 1),
        "total_prove_s": round(total_prove_s, 1),
        "workers": workers,
        "peak_rss_mb_per_worker": round(max(stats["peak_rss_mb"] or [0.0]), 1),
        "total_proof_bytes": total_bytes,
        "total_verify_s": round(total_verify_s, 2),
        "weights_per_s": round(covered / total_prove_s, 2),
        "proof_bytes_per_weight": round(total_bytes / covered, 1),
    }


def plot_batch_tradeoff(result: dict[str, Any], path: Path) -> None:
    """Blocks per proof vs proving time, memory and proof bytes per covered weight (one block size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["shapes"] if r["relation"] == "group_obs"]
    sizes = sorted({(r["block"], r["m"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for block, m in sizes:
        series = sorted((r for r in rows if (r["block"], r["m"]) == (block, m)), key=lambda r: r["batch"])
        batch = [r["batch"] for r in series]
        covered = [r["batch"] * r["block"] for r in series]
        label = f"B={block}, m={m}"
        axes[0].plot(
            batch, [r["prove_s"] / c for r, c in zip(series, covered, strict=True)], "o-", label=label
        )
        axes[1].plot(batch, [r["peak_rss_mb"] for r in series], "o-", label=label)
        axes[2].plot(
            batch, [r["proof_bytes"] / c for r, c in zip(series, covered, strict=True)], "o-", label=label
        )
    for ax, title in zip(
        axes,
        ("prove seconds per covered weight", "peak RSS per proof (MB)", "proof bytes per covered weight"),
        strict=True,
    ):
        ax.set_xlabel("blocks per proof")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(run_proofs_bench(), indent=2))
