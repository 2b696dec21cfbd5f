"""The tuning grid the unlearning benchmark's ``SETTINGS`` were chosen with: Group-OBS recovery over
curvature, mask fraction, block size, damping and Fisher samples, on cached models."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from rich.progress import track
from zkunlearn.bench.threads import one_thread_per_job
from zkunlearn.bench.unlearning_data import prepare
from zkunlearn.bench.unlearning_masks import dense_masks, make_mask
from zkunlearn.bench.unlearning_methods import client_fisher_data, compensated_copy
from zkunlearn.bench.unlearning_metrics import Views, split_accuracy
from zkunlearn.bench.unlearning_settings import SETTINGS


def tuning_sweep(
    task: str,
    seeds: Sequence[int],
    fractions: Sequence[float],
    block_sizes: Sequence[int],
    lams: Sequence[float],
    fisher_samples: Sequence[int] | None = None,
    variant: str = "disjoint",
    curvatures: Sequence[str] | None = None,
    ranks: Sequence[int] = (0,),
    quick: bool = False,
    reconstruction_weights: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Group-OBS recovery over a grid of curvature (with a reconstruction term of each weight) x mask
    fraction x block size x damping x Fisher samples.

    This is how ``SETTINGS`` were chosen (on ``TUNING_SEEDS`` only). It reuses one trained (cached) set
    of models per seed, one set of Fisher factors per (m, B) and one mask per (B, fraction), so a grid of
    a hundred points costs minutes, not a hundred benchmark jobs. Rows carry the mask cost, so a reader
    can apply the >= 5-point rule.
    """
    from zkunlearn.client.fisher import layer_factors
    from zkunlearn.client.fisher_factors import BlockFactors, fit_rows

    from zkunlearn.tasks.train import cross_entropy, masked_copy

    one_thread_per_job()
    s = SETTINGS[task]
    rows: list[dict[str, Any]] = []
    for seed in track(seeds, description=f"tuning {task}"):
        prep = prepare(task, seed, quick=quick)
        v = prep.variants[variant]
        views: Views = v["views"]
        pers = v["personalized"]

        p_acc = split_accuracy(pers, views.personal_test)
        for m in fisher_samples or (s.fisher_draws(quick),):
            data, excl = client_fisher_data(v["client_train"], v["client_forget_mask"], m, s.fisher_shift)
            grid = [
                (c, w, b)
                for c in curvatures or (s.curvature,)
                for w in reconstruction_weights or (s.reconstruction_weight,)
                for b in block_sizes
            ]
            for curvature, weight, block in grid:
                full = layer_factors(
                    pers, list(prep.layers), data[0], data[1], cross_entropy, block, excl,
                    curvature=curvature, reconstruction_weight=weight,  # type: ignore[arg-type]
                )  # fmt: skip
                # rank 0: the whole factor; otherwise its rank-r truncation, as a proof with m = r
                # commits it (client/unlearning.py enroll).
                truncated = {
                    rank: full if not rank else {
                        n: BlockFactors(
                            n, block, fit_rows(f.factors, rank, numel=math.prod(f.shape)), f.scale, f.shape
                        )
                        for n, f in full.items()
                    }
                    for rank in ranks
                }  # fmt: skip
                for fraction in fractions:
                    # The setting's mask at this fraction (its structure, per-block cap and head rows kept).
                    spec = dataclasses.replace(s.mask, fraction=fraction)
                    mask = make_mask(prep, spec, block, s.mask_samples)
                    dense = dense_masks(mask, prep.layers)
                    efficacy = split_accuracy(masked_copy(prep.global_model, dense), views.forget_test)
                    m_acc = split_accuracy(masked_copy(pers, dense), views.personal_test)
                    for rank, factors in truncated.items():
                        for lam in lams:
                            model = compensated_copy(
                                pers, factors, {n: mask.layer(n) for n in prep.layers}, lam
                            )
                            obs = split_accuracy(model, views.personal_test)
                            cost = p_acc - m_acc
                            rows.append(
                                {
                                    "task": task, "variant": variant, "seed": seed, "fraction": fraction,
                                    "block_size": block, "lam": lam, "fisher_samples": m,
                                    "curvature": curvature, "reconstruction_weight": weight,
                                    "rank": rank or None,
                                    "fisher_rows": int((~excl).sum()),
                                    "personalized": p_acc, "mask_only": m_acc, "group_obs": obs,
                                    "mask_cost": cost,
                                    "recovery": (obs - m_acc) / cost if cost > 0 else None,
                                    "group_obs_forget_acc": split_accuracy(model, views.forget_test),
                                    "masked_global_forget_acc": efficacy,
                                    "retrain_forget_acc": split_accuracy(prep.gold_global, views.forget_test),
                                }
                            )  # fmt: skip
    return rows
