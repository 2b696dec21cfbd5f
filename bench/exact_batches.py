"""Blocks per exact Group-OBS proof, side by side in one run: what the ViT deletion needs and what a
sample of proofs costs at each batch size.

``zkunlearn bench exact-batches`` (:func:`run_batch_comparison`) writes ``bench/results/exact_batches.json``:

* ``vit_layout``: per batch size, the ViT benchmark's enrolled layers cut by the one layout rule
  (:func:`zkunlearn.proofs.layout.layer_layout`, padding included) and its headline mask (one seed):
  deletion proofs, covered weights, enrollment proofs, padding blocks. No proof is made.
* ``sample``: per batch size, ``blocks`` blocks' worth of honest exact deletion proofs and as many
  enrollment proofs (B, m and damping of the ViT's certified configuration) on ``workers`` processes,
  every deletion verified with the provider's keys; seconds, weights per second, peak RSS per worker,
  verification seconds. The batch sizes run one after the other in the same process, so they share the
  machine's state.
* ``projected``: the sample's rates applied to the ViT layout (an estimate, labelled as one; the
  benchmark itself is ``zkunlearn bench vit-deletion``).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from zkunlearn.bench.exact import _honest, _jobs, _verify_deletion
from zkunlearn.bench.threads import one_thread_per_job
from zkunlearn.proofs.exact import ExactGroupObsSpec
from zkunlearn.proofs.exact_circuits import ExactGroupObsVerifier, build_exact_circuits
from zkunlearn.proofs.layout import covered_weights, layer_layout, touched_batches
from zkunlearn.proofs.prover import prove_parallel
from zkunlearn.proofs.srs import SrsInfo, dev_srs


def vit_layout(batches: Sequence[int], seed: int = 12) -> dict[str, Any]:
    """The ViT deletion's proof counts at each batch size (headline mask of ``seed``; no proving)."""
    from zkunlearn.bench.unlearning_data import prepare
    from zkunlearn.bench.unlearning_masks import make_mask
    from zkunlearn.bench.unlearning_settings import SETTINGS

    s = SETTINGS["vit"]
    assert s.certified is not None
    prep = prepare("vit", seed, quick=False)
    mask = make_mask(prep, s.mask, s.block_size, s.mask_samples)
    sizes = {name: prep.global_model.get_parameter(name).numel() for name in prep.layers}
    out: dict[str, Any] = {"seed": seed, "layers": sizes, "masked_weights": mask.masked_count()}
    for batch in batches:
        spec = ExactGroupObsSpec.from_lam(s.block_size, s.certified.m, batch, s.certified.lam)
        layouts = [layer_layout(name, numel, spec) for name, numel in sizes.items()]
        out[str(batch)] = {
            "deletion_proofs": len(touched_batches(mask, spec)),
            "covered_weights": covered_weights(mask, spec),
            "enrollment_proofs": sum(layout.batches for layout in layouts),
            "enrolled_weights": sum(layout.weights for layout in layouts),
            "padding_blocks": sum(layout.padding_blocks for layout in layouts),
        }
    return out


def proof_sample(
    work: Path, batch: int, *, blocks: int, workers: int, memory_limit_mb: int, rng: np.random.Generator
) -> dict[str, Any]:
    """``blocks / batch`` deletion and enrollment proofs at ``batch`` blocks per proof."""
    from zkunlearn.bench.unlearning_settings import SETTINGS

    s = SETTINGS["vit"]
    assert s.certified is not None
    spec = ExactGroupObsSpec.from_lam(s.block_size, s.certified.m, batch, s.certified.lam)
    cache: dict[int, SrsInfo] = {}

    def srs_for(logrows: int) -> SrsInfo:
        if logrows not in cache:
            cache[logrows] = dev_srs(work / "srs", logrows)
        return cache[logrows]

    t0 = time.perf_counter()
    arts = build_exact_circuits(spec, work / f"exact{batch}", srs_for)
    setup_s = time.perf_counter() - t0
    verifier = ExactGroupObsVerifier(spec, *arts)
    n_proofs = blocks // batch
    cases = [_jobs(spec, arts, _honest(spec, rng, 0.625), f"b{batch}-{j}") for j in range(n_proofs)]
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
        _verify_deletion(verifier, d, e, c[2]) for d, e, c in zip(deletions, enrollments, cases, strict=True)
    )
    weights = n_proofs * batch * spec.block
    return {
        "batch": batch,
        "logrows": arts[0].logrows,
        "deletion_rows": int(arts[0].settings_dict["num_rows"]),
        "rows_per_weight": round(int(arts[0].settings_dict["num_rows"]) / (batch * spec.block), 1),
        "setup_s": round(setup_s, 1),
        "proofs": n_proofs,
        "weights": weights,
        "prove_s": round(prove_s, 2),
        "weights_per_s": round(weights / prove_s, 1),
        "peak_rss_mb_per_worker": round(max(r.peak_rss_mb for r in deletions), 1),
        "verify_s": round(verify_s, 3),
        "verify_s_per_proof": round(verify_s / n_proofs, 4),
        "enroll_s": round(enroll_s, 2),
        "enroll_weights_per_s": round(weights / enroll_s, 1),
        "enroll_peak_rss_mb_per_worker": round(max(r.peak_rss_mb for r in enrollments), 1),
    }


def run_batch_comparison(
    out_path: Path = Path("bench/results/exact_batches.json"),
    *,
    batches: Sequence[int] = (2, 8),
    blocks: int = 32,
    workers: int = 2,
    memory_limit_mb: int = 1024,
    seed: int = 0,
) -> dict[str, Any]:
    one_thread_per_job()
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "srs": "dev (INSECURE, ezkl.gen_srs)",
        "load_avg_before": [round(v, 2) for v in os.getloadavg()],
        "vit_layout": vit_layout(batches),
        "sample": {},
        "projected": {},
    }
    with tempfile.TemporaryDirectory(prefix="zkbatches-") as tmp:
        for batch in batches:
            sample = proof_sample(
                Path(tmp), batch, blocks=blocks, workers=workers, memory_limit_mb=memory_limit_mb, rng=rng
            )
            result["sample"][str(batch)] = sample
            layout = result["vit_layout"][str(batch)]
            result["projected"][str(batch)] = {
                "note": "estimate: this sample's rates over the ViT layout, not a benchmark run",
                "prove_s": round(layout["covered_weights"] / sample["weights_per_s"], 0),
                "verify_s_one_process": round(layout["deletion_proofs"] * sample["verify_s_per_proof"], 2),
                # Padding blocks are proven at full cost: every enrollment proof covers batch x B.
                "enroll_s": round(
                    layout["enrollment_proofs"]
                    * sample["weights"]
                    / sample["proofs"]
                    / sample["enroll_weights_per_s"],
                    0,
                ),
            }
    result["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
