"""Forgetting measured beyond output accuracy, each judged against the retrained model of the same seed:

- ``probe_acc``: a linear probe (ridge classifier) on the penultimate features, cross-validated on
  held-out client-domain data that includes the forgotten kind; its accuracy on the samples of that
  kind (``probe_acc_provider``: the same on the provider's held-out data, the deleted data's domain).
  A model that hides a class only at its output (a zeroed head row) keeps its probe accuracy.
- ``relearn_steps``: full-batch SGD steps on a handful of forget samples (with as many retained ones)
  until the forget accuracy returns to a fixed level; capped, ``relearn_capped`` says the cap was hit.
- ``mia_auc``: a loss-score membership attack, the AUC of the deleted training samples against held-out
  non-members of the same kind, with a 95 % bootstrap interval over the samples. The retrained model of
  the same seed, which never saw the deleted samples, is the reference: ``mia_auc_gap`` is the AUC minus
  retrain's on the same samples, with a paired bootstrap interval, so "at retrain's level" is the
  statement that this interval covers 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from zkunlearn.tasks.forgetting import (
    PROBE_FOLDS,
    Array,
    ForgettingError,
    Pair,
    auc,
    per_sample_loss,
    probe_accuracy,
)

__all__ = [
    "FORGETTING_FIELDS",
    "PROBE_FOLDS",
    "RELEARN_CAP",
    "ForgettingError",
    "ForgettingViews",
    "MiaReference",
    "auc",
    "bootstrap_auc",
    "forgetting_metrics",
    "mia_auc",
    "per_sample_loss",
    "probe_accuracy",
    "relearn_batch",
    "relearn_steps",
]

# The relearn protocol, fixed for every task and method: 16 forget samples and 16 retained ones as one
# batch, plain SGD, until the forget accuracy reaches RELEARN_LEVEL, at most RELEARN_CAP steps.
RELEARN_SAMPLES = 16
RELEARN_LR = 0.003
RELEARN_LEVEL = 0.5
RELEARN_CAP = 200
BOOTSTRAP_ROUNDS = 1000


@dataclass
class ForgettingViews:
    """What the forgetting metrics look at for one (task, deletion, seed, variant).

    ``probe_client`` is client-domain data of every class (the forgotten kind included) held out from
    all training, ``probe_provider`` the same in the provider's domain (None where the task has no
    classes); ``probe_kind`` the class whose probe accuracy is reported (None: every sample).
    ``relearn_train`` is the relearn batch, ``relearn_check`` what its forget accuracy is read on.
    ``mia_forget`` are the deleted training samples, ``mia_heldout`` non-members of the same kind.
    """

    probe_client: Pair | None
    probe_provider: Pair | None
    probe_kind: int | None
    relearn_train: Pair
    relearn_check: Pair
    mia_forget: Pair
    mia_heldout: Pair


def _accuracy(model: nn.Module, pair: Pair) -> float:
    with torch.no_grad():
        out = torch.cat([model(pair[0][i : i + 256]) for i in range(0, pair[0].shape[0], 256)])
    return float((out.argmax(-1) == pair[1]).float().mean())


def relearn_steps(
    model: nn.Module,
    train: Pair,
    check: Pair,
    *,
    lr: float = RELEARN_LR,
    level: float = RELEARN_LEVEL,
    cap: int = RELEARN_CAP,
    seed: int = 0,
) -> int:
    """Full-batch SGD steps on ``train`` (every parameter of a copy) until the accuracy on ``check``
    reaches ``level``; 0 if it starts there, ``cap`` if it never gets there within ``cap`` steps."""
    from zkunlearn.tasks.train import cross_entropy

    torch.manual_seed(seed)
    learner = copy.deepcopy(model)
    if _accuracy(learner.eval(), check) >= level:
        return 0
    opt = torch.optim.SGD(learner.parameters(), lr=lr)
    for step in range(1, cap + 1):
        learner.train()
        opt.zero_grad()
        cross_entropy(learner(train[0]), train[1]).backward()  # type: ignore[no-untyped-call]
        opt.step()
        if _accuracy(learner.eval(), check) >= level:
            return step
    return cap


def _bootstrap_counts(n_forget: int, n_heldout: int, seed: int) -> tuple[Array, Array]:
    """How often each sample is drawn in each of ``BOOTSTRAP_ROUNDS`` resamples (with replacement)."""
    rng = np.random.default_rng(seed)
    forget = rng.multinomial(n_forget, np.full(n_forget, 1.0 / n_forget), size=BOOTSTRAP_ROUNDS)
    heldout = rng.multinomial(n_heldout, np.full(n_heldout, 1.0 / n_heldout), size=BOOTSTRAP_ROUNDS)
    return forget.astype(np.float64), heldout.astype(np.float64)


def bootstrap_auc(members: Array, nonmembers: Array, counts: tuple[Array, Array]) -> Array:
    """The AUC of each bootstrap resample given by ``counts`` (draws per sample, one row a resample)."""
    wins = (members[:, None] > nonmembers[None, :]) + 0.5 * (members[:, None] == nonmembers[None, :])
    cf, ch = counts
    out: Array = np.einsum("bi,ij,bj->b", cf, wins, ch) / (members.size * nonmembers.size)
    return out


@dataclass(frozen=True)
class MiaReference:
    """The retrained model's losses on the deleted and held-out samples, and the bootstrap resamples
    every model of the same (task, deletion, seed, variant) is scored on (so gaps are paired)."""

    forget_loss: Array
    heldout_loss: Array
    counts: tuple[Array, Array]

    @classmethod
    def of(cls, retrain: nn.Module, views: ForgettingViews, seed: int) -> MiaReference:
        f, h = per_sample_loss(retrain, views.mia_forget), per_sample_loss(retrain, views.mia_heldout)
        return cls(f, h, _bootstrap_counts(f.size, h.size, seed))


def mia_auc(model: nn.Module, views: ForgettingViews, ref: MiaReference) -> dict[str, float]:
    """The loss attack's AUC (lower loss = member), its bootstrap interval, and the paired gap to retrain."""
    f, h = -per_sample_loss(model, views.mia_forget), -per_sample_loss(model, views.mia_heldout)
    rf, rh = -ref.forget_loss, -ref.heldout_loss
    value = auc(f, h)
    boot = bootstrap_auc(f, h, ref.counts)
    gaps = boot - bootstrap_auc(rf, rh, ref.counts)
    return {
        "mia_auc": value,
        "mia_auc_low": float(np.percentile(boot, 2.5)),
        "mia_auc_high": float(np.percentile(boot, 97.5)),
        "mia_auc_gap": value - auc(rf, rh),
        "mia_auc_gap_low": float(np.percentile(gaps, 2.5)),
        "mia_auc_gap_high": float(np.percentile(gaps, 97.5)),
    }


# Every field ``forgetting_metrics`` reports (a missing probe is None).
FORGETTING_FIELDS = (
    "probe_acc", "probe_acc_provider", "relearn_steps", "relearn_capped", "mia_auc", "mia_auc_low",
    "mia_auc_high", "mia_auc_gap", "mia_auc_gap_low", "mia_auc_gap_high",
)  # fmt: skip


def forgetting_metrics(
    model: nn.Module, views: ForgettingViews, ref: MiaReference, seed: int
) -> dict[str, float | int | bool | None]:
    """Probe accuracy, relearn steps and the calibrated MIA of one model."""
    probe = probe_provider = None
    if views.probe_client is not None:
        probe = probe_accuracy(model, views.probe_client, views.probe_kind)
    if views.probe_provider is not None:
        probe_provider = probe_accuracy(model, views.probe_provider, views.probe_kind)
    steps = relearn_steps(model, views.relearn_train, views.relearn_check, seed=seed)
    return {
        "probe_acc": probe,
        "probe_acc_provider": probe_provider,
        "relearn_steps": steps,
        "relearn_capped": steps >= RELEARN_CAP,
        **mia_auc(model, views, ref),
    }


def relearn_batch(forget: Pair, retain: Pair, seed: int, n: int = RELEARN_SAMPLES) -> Pair:
    """``n`` forget samples and ``n`` retained ones, a fixed draw per seed."""
    gen = torch.Generator().manual_seed(seed + 7919)
    fi = torch.randperm(forget[0].shape[0], generator=gen)[:n]
    ri = torch.randperm(retain[0].shape[0], generator=gen)[:n]
    return torch.cat([forget[0][fi], retain[0][ri]]), torch.cat([forget[1][fi], retain[1][ri]])
