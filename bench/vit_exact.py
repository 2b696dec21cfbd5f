"""The ViT benchmark's Group-OBS deletion, proven under the exact relation end to end.

``measure_vit_exact_deletion`` takes one seed of ``bench unlearning``'s ViT task, its headline mask and
curvature data (block size, shifted copies) and the task's certified rank and damping, then runs
the SDK as a device would: ``ExactGroupObsUnlearner.enroll`` (commitments and enrollment proofs for the
four ``fc1`` layers and the head), the provider's enrollment check, ``prove`` for the deletion and the
provider's verdict with its own keys. The model the proofs certify is evaluated with the benchmark's
metrics beside the unproven full-rank Group-OBS at the task's own damping on the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from zkunlearn.bench.unlearning_data import prepare
from zkunlearn.bench.unlearning_masks import make_mask
from zkunlearn.bench.unlearning_methods import client_fisher_data, group_obs
from zkunlearn.bench.unlearning_metrics import evaluate, measured
from zkunlearn.bench.unlearning_settings import SETTINGS
from zkunlearn.client.fisher import Curvature
from zkunlearn.client.sdk import VerifiedRequest
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.client.unlearning_exact import ExactGroupObsUnlearner
from zkunlearn.proofs.commit_memo import CommitmentMemo
from zkunlearn.proofs.deletion import (
    UPDATE_KIND_GROUP_OBS_EXACT,
    DeletionCircuits,
    prepare_deletion,
    verify_deletion,
)
from zkunlearn.proofs.exact import ExactGroupObsSpec
from zkunlearn.proofs.exact_deletion import EnrolledNorms, verify_exact_enrollment
from zkunlearn.proofs.layout import covered_weights, layer_layout
from zkunlearn.proofs.verify_pool import PooledEzklBackend, VerifierPool

from zkunlearn.tasks.train import cross_entropy


def measure_vit_exact_deletion(
    work: Path,
    *,
    seed: int = 12,
    batch: int | None = None,
    workers: int = 2,
    memory_limit_mb: int = 1024,
) -> dict[str, Any]:
    """One seed's headline deletion at the task's certified rank and damping, proven and verified; its
    cost and the certified model's metrics beside the unproven full-rank update's. ``batch``: blocks per
    proof (default: the certified configuration's)."""
    s = SETTINGS["vit"]
    if s.certified is None:
        raise RuntimeError("the ViT task has no certified configuration (SETTINGS['vit'].certified)")
    prep = prepare("vit", seed, quick=False)
    variant = prep.variants["disjoint"]
    mask = make_mask(prep, s.mask, s.block_size, s.mask_samples)
    batch = s.certified.batch if batch is None else batch
    spec = ExactGroupObsSpec.from_lam(s.block_size, s.certified.m, batch, s.certified.lam)
    t0 = time.perf_counter()
    published = DeletionCircuits.build(work / "circuits", group_obs=None, analytic=None, exact=spec)
    setup_s = time.perf_counter() - t0
    assert published.exact is not None
    _spec, deletion_arts, enrollment_arts = published.exact
    (x, y), exclude = client_fisher_data(
        variant["client_train"], variant["client_forget_mask"], s.fisher_samples
    )
    layers = list(prep.layers)
    unlearner = ExactGroupObsUnlearner(
        copy.deepcopy(variant["personalized"]),
        spec,
        deletion_arts.as_client(),
        enrollment_arts.as_client(),
        work / "state",
        ProveOptions(workers=workers, memory_limit_mb=memory_limit_mb),
    )
    with measured() as enroll_cost:
        enrollment = unlearner.enroll(
            layers,
            x,
            y,
            cross_entropy,
            exclude,
            curvature=cast(Curvature, s.curvature),
            fisher_shift=s.fisher_shift,
        )
    model = prep.global_model
    layouts = {name: layer_layout(name, model.get_parameter(name).numel(), spec) for name in layers}
    canonical = f"zkunlearn-bench/vit-exact-deletion/{seed}".encode()
    request = VerifiedRequest(
        "bench", "bench", "vit-mnist", UPDATE_KIND_GROUP_OBS_EXACT, tuple(layers), mask, mask.to_bytes(),
        None, None, 0, 2**62, 1, tuple(enrollment.commitments), {}, canonical, b"",
    )  # fmt: skip
    with measured() as prove_cost:
        update = unlearner.prove(request)
    # The provider's checks, as its verifier runs them: on `workers` ezkl processes with the mask
    # commitments prepared when the request was issued (the accept path), and, on the same proofs in
    # the same run, without that preparation on the pool and in one process.
    verify_s: dict[str, float] = {}
    enroll_verify_s: dict[str, float] = {}
    with VerifierPool(workers) as pool:
        pooled = published.with_backend(PooledEzklBackend(pool))
        prepared = published.with_backend(PooledEzklBackend(pool, commit_memo=CommitmentMemo()))

        def judge(label: str, circuits: DeletionCircuits, norms: EnrolledNorms) -> None:
            t0 = time.perf_counter()
            verdict = verify_deletion(
                circuits,
                update_kind=UPDATE_KIND_GROUP_OBS_EXACT,
                request_id="bench",
                request_canonical=canonical,
                mask_bytes=mask.to_bytes(),
                forget_features=None,
                forget_labels=None,
                before=enrollment.commitments,
                after=update.after_commitments,
                proofs=update.proofs,
                enrolled_norms=norms,
            )
            verify_s[label] = time.perf_counter() - t0
            if not verdict.ok:
                raise RuntimeError(f"the honest ViT deletion was refused: {verdict.reason}")

        for label, circuits in (("pool", pooled), ("one", published)):
            _spec, verifier = circuits.exact_verifier()
            t0 = time.perf_counter()
            enrolled = verify_exact_enrollment(
                verifier,
                layers=layers,
                commitments=enrollment.commitments,
                proofs=enrollment.proofs,
                layer_blocks={name: layout.blocks for name, layout in layouts.items()},
            )
            enroll_verify_s[label] = time.perf_counter() - t0
            if not enrolled.ok:
                raise RuntimeError(f"the honest ViT enrollment was refused: {enrolled.reason}")
            judge(label, circuits, enrolled.norms)
        t0 = time.perf_counter()
        prepare_deletion(
            prepared,
            update_kind=UPDATE_KIND_GROUP_OBS_EXACT,
            request_canonical=canonical,
            mask_bytes=mask.to_bytes(),
        )
        prepare_s = time.perf_counter() - t0
        judge("prepared", prepared, enrolled.norms)
    views = variant["views"]
    full_rank_model, _info = group_obs(
        variant["personalized"], mask, prep.layers, variant["client_train"], variant["client_forget_mask"],
        s.lam, s.block_size, n_samples=s.fisher_samples, compare_naive=False, curvature=s.curvature,
        fisher_shift=s.fisher_shift,
    )  # fmt: skip
    metrics = {
        "personalized": evaluate(variant["personalized"], views, seed),
        "proven_exact": evaluate(unlearner.model, views, seed),
        "full_rank_unproven": evaluate(full_rank_model, views, seed),
        "retrain": evaluate(variant["gold"], views, seed),
    }
    stats = unlearner.last_proof_stats()
    covered = covered_weights(mask, spec)
    enrolled_weights = sum(layout.weights for layout in layouts.values())
    total_bytes = sum(len(p) for p in update.proofs)
    prove_s = float(prove_cost["seconds"])
    return {
        "measured": True,
        "mask": "benchmark",
        "note": "bench unlearning ViT headline mask at the task's certified rank and damping, one seed, "
        "proven under the exact relation; the full-rank update at the task's own damping beside it",
        "seed": seed,
        "mask_spec": {
            "score": s.mask.score,
            "fraction": s.mask.fraction,
            "structure": s.mask.structure,
            "density": s.mask.density,
            "head_rows": s.mask.head_rows,
        },
        "layers": layers,
        "block": spec.block,
        "m": spec.m,
        "batch": spec.batch,
        "lam": spec.lam,
        "logrows": deletion_arts.logrows,
        "setup_s": round(setup_s, 1),
        "masked_weights": mask.masked_count(),
        "covered_weights": covered,
        "rows_per_weight": round(int(deletion_arts.settings_dict["num_rows"]) / spec.batch_weights, 1),
        "proofs": len(update.proofs),
        "workers": workers,
        "total_prove_s": round(prove_s, 1),
        "weights_per_s": round(covered / prove_s, 1),
        "peak_rss_mb_per_worker": round(max(stats["peak_rss_mb"] or [0.0]), 1),
        "verify_processes": workers,
        "total_verify_s": round(verify_s["prepared"], 2),
        "total_verify_s_unprepared": round(verify_s["pool"], 2),
        "total_verify_s_one_process": round(verify_s["one"], 2),
        "prepare_s": round(prepare_s, 2),
        "total_proof_bytes": total_bytes,
        "proof_encoding": "binary (Proof.to_bytes)",
        "proof_bytes_per_weight": round(total_bytes / covered, 2),
        "enrolled_weights": enrolled_weights,
        "enroll_s": round(float(enroll_cost["seconds"]), 1),
        "enroll_weights_per_s": round(enrolled_weights / float(enroll_cost["seconds"]), 1),
        "enroll_verify_s": round(enroll_verify_s["pool"], 2),
        "enroll_verify_s_one_process": round(enroll_verify_s["one"], 2),
        "enroll_proofs": len(enrollment.proofs),
        "enroll_peak_rss_mb_per_worker": max(unlearner.enrollment_proof_stats()["peak_rss_mb"], default=0.0),
        "metrics": metrics,
        "torch_threads": torch.get_num_threads(),
    }


def evaluate_certified(
    *, seeds: Sequence[int], ranks: Sequence[int] = (16, 32), lam: float | None = None
) -> dict[str, Any]:
    """Recovery of the configuration the proofs certify, over ``seeds`` of the ViT task.

    Per seed and committed rank ``m``: each enrolled layer's weights after
    :func:`zkunlearn.client.unlearning_exact.certified_weights` (the SDK's own quantisation, factor
    fitting and exact update, without the proofs), beside mask-only, the benchmark's full-rank Group-OBS
    and retrain-then-personalize, on the headline mask and curvature data; recovery as in ``bench
    unlearning`` (only where the mask costs at least ``RECOVERY_MIN_GAP``).
    """
    from zkunlearn.client.fisher import layer_factors
    from zkunlearn.client.unlearning_exact import certified_weights

    from zkunlearn.tasks.metrics import RECOVERY_MIN_GAP, mean_interval, mean_std, recovery
    from zkunlearn.tasks.train import masked_copy

    s = SETTINGS["vit"]
    lam = s.lam if lam is None else lam
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        prep = prepare("vit", seed, quick=False)
        variant = prep.variants["disjoint"]
        mask = make_mask(prep, s.mask, s.block_size, s.mask_samples)
        views = variant["views"]
        dense = {name: torch.as_tensor(mask.dense(name)) for name in prep.layers}
        (x, y), exclude = client_fisher_data(
            variant["client_train"], variant["client_forget_mask"], s.fisher_samples, s.fisher_shift
        )
        personalized = variant["personalized"]
        factors = layer_factors(
            personalized, list(prep.layers), x, y, cross_entropy, s.block_size, exclude,
            curvature=cast(Curvature, s.curvature),
        )  # fmt: skip
        full, _info = group_obs(
            personalized, mask, prep.layers, variant["client_train"], variant["client_forget_mask"], lam,
            s.block_size, n_samples=s.fisher_samples, compare_naive=False, curvature=s.curvature,
            fisher_shift=s.fisher_shift,
        )  # fmt: skip
        row: dict[str, Any] = {
            "seed": seed,
            "personalized": evaluate(personalized, views, seed)["personal_acc"],
            "mask_only": evaluate(masked_copy(personalized, dense), views, seed)["personal_acc"],
            "full_rank": evaluate(full, views, seed)["personal_acc"],
            "retrain": evaluate(variant["gold"], views, seed)["personal_acc"],
        }
        for m in ranks:
            spec = ExactGroupObsSpec.from_lam(s.block_size, m, 1, lam)
            model = copy.deepcopy(personalized)
            for name in prep.layers:
                param = model.get_parameter(name)
                new = certified_weights(
                    spec, param.detach().double().numpy().reshape(-1), factors[name].factors, mask.layer(name)
                )
                with torch.no_grad():
                    param.copy_(torch.from_numpy(new.reshape(param.shape)).to(param.dtype))
            row[f"certified_m{m}"] = evaluate(model, views, seed)["personal_acc"]
        for key in ("full_rank", *(f"certified_m{m}" for m in ranks)):
            row[f"recovery_{key}"] = recovery(row["personalized"], row["mask_only"], row[key])
        rows.append(row)
        shown = ", ".join(f"{k} {row[k]:.4f}" for k in row if k != "seed" and not k.startswith("recovery"))
        print(f"seed {seed} ({len(rows)}/{len(seeds)}): personal accuracy {shown}", flush=True)
    summary: dict[str, Any] = {}
    for key in ("full_rank", *(f"certified_m{m}" for m in ranks)):
        values = [r[f"recovery_{key}"] for r in rows]
        summary[key] = {
            "recovery": mean_std(values),
            "recovery_ci95": mean_interval(values),
            "personal_acc": mean_std([r[key] for r in rows]),
        }
    summary["retrain"] = {"personal_acc": mean_std([r["retrain"] for r in rows])}
    return {
        "seeds": list(seeds),
        "ranks": list(ranks),
        "lam": lam,
        "mask_spec": dataclasses.asdict(s.mask),
        "recovery_min_gap": RECOVERY_MIN_GAP,
        "rows": rows,
        "summary": summary,
    }
