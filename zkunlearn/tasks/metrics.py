"""Unlearning metrics: accuracies, membership inference efficacy and recovery of personalization.

MIA follows the usual unlearning protocol (SalUn, ZK-APEX): an attack is fit on retain samples
(members) against test samples (non-members) and then asked about the forget set; the fraction it calls
non-member is the efficacy. A model that truly never saw the forget set scores like the gold model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch.nn.functional as F
from torch import Tensor

from zkunlearn.errors import MalformedError

Array = npt.NDArray[np.float64]

# The mask must cost at least this much personalization accuracy for recovery to mean anything:
# below it the ratio divides noise by noise.
RECOVERY_MIN_GAP = 0.05


class MetricError(MalformedError):
    """Inputs to a metric are inconsistent (shapes, empty sets, a single class)."""


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy; logits (N, C) against (N,), or (N, T, V) against (N, T) per token."""
    if logits.shape[:-1] != y.shape:
        raise MetricError(f"logits {tuple(logits.shape)} do not match targets {tuple(y.shape)}")
    if y.numel() == 0:
        raise MetricError("accuracy of an empty set")
    return float((logits.argmax(-1) == y).float().mean())


def recovery(personalized: float, mask_only: float, compensated: float) -> float | None:
    """Share of the accuracy the mask took away that compensation gives back.

    None when the mask costs less than ``RECOVERY_MIN_GAP``: then there is nothing to recover and the
    ratio is dominated by noise.
    """
    gap = personalized - mask_only
    if gap < RECOVERY_MIN_GAP:
        return None
    return (compensated - mask_only) / gap


def _per_sample(logits: Tensor, y: Tensor) -> tuple[Array, Array, Array]:
    """Loss, true-class confidence and prediction entropy of each sample (per-token means for LMs)."""
    logp = F.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    conf = nll.neg().exp()
    ent = -(logp.exp() * logp).sum(-1)
    if logits.dim() == 3:
        nll, conf, ent = nll.mean(-1), conf.mean(-1), ent.mean(-1)
    return nll.numpy(), conf.numpy(), ent.numpy()


@dataclass(frozen=True)
class MIAResult:
    """Fraction of the forget set each attack predicts to be a non-member."""

    loss_lr: float
    conf_svc: float


def mia_efficacy(
    retain: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    forget: tuple[Tensor, Tensor],
    *,
    seed: int = 0,
    max_per_side: int = 1000,
) -> MIAResult:
    """Fit member (retain) vs non-member (test) attacks on model outputs, apply them to the forget set.

    Each argument is (logits, targets) of the model under attack. The two sides are subsampled to
    the same size so the attack's prior is 50/50 and an uninformative attack scores ~0.5 everywhere.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    feats = [_per_sample(*pair) for pair in (retain, test, forget)]
    sizes = [f[0].shape[0] for f in feats]
    if min(sizes) == 0:
        raise MetricError(f"MIA needs non-empty retain/test/forget sets, got sizes {sizes}")
    rng = np.random.default_rng(seed)
    n = min(sizes[0], sizes[1], max_per_side)
    pick_r = rng.choice(sizes[0], n, replace=False)
    pick_t = rng.choice(sizes[1], n, replace=False)
    labels = np.concatenate([np.ones(n), np.zeros(n)])

    def stack(
        kind: Sequence[int], f: tuple[Array, Array, Array], pick: npt.NDArray[np.int64] | None
    ) -> Array:
        cols = np.stack([f[k] for k in kind], axis=1)
        return cols if pick is None else cols[pick]

    # Loss-threshold attack: logistic regression on log-loss (log keeps tiny losses distinguishable).
    def loss_feature(f: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        return (np.log(f[0] + 1e-12), f[1], f[2])

    lf = [loss_feature(f) for f in feats]
    x_lr = np.concatenate([stack([0], lf[0], pick_r), stack([0], lf[1], pick_t)])
    lr = make_pipeline(StandardScaler(), LogisticRegression())
    lr.fit(x_lr, labels)
    lr_nonmember = float(np.mean(lr.predict(stack([0], lf[2], None)) == 0))

    x_svc = np.concatenate([stack([1, 2], feats[0], pick_r), stack([1, 2], feats[1], pick_t)])
    svc = make_pipeline(StandardScaler(), SVC(C=1.0, kernel="rbf", gamma="scale"))
    svc.fit(x_svc, labels)
    svc_nonmember = float(np.mean(svc.predict(stack([1, 2], feats[2], None)) == 0))
    return MIAResult(loss_lr=lr_nonmember, conf_svc=svc_nonmember)


def _counted(values: Sequence[float | None]) -> list[float]:
    """The seeds that count: a None (recovery undefined there) or NaN is left out, not averaged as 0."""
    return [v for v in values if v is not None and not math.isnan(v)]


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and (population) std over seeds, ignoring None; ``n`` says how many seeds counted."""
    vals = _counted(values)
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(vals, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": len(vals)}


def mean_interval(values: Sequence[float | None], level: float = 0.95) -> dict[str, float] | None:
    """Student-t confidence interval of the mean over seeds, ignoring None; None below two seeds.

    A target such as "recovery >= 90 % on the mean over seeds" is a statement about the mean, and with
    a handful of seeds whose per-seed values spread by 10 points the mean itself is uncertain by
    several: the interval says whether a mean near the target is above it or merely next to it.
    """
    if not 0.0 < level < 1.0:
        raise MetricError(f"confidence level must lie in (0, 1), got {level}")
    vals = _counted(values)
    if len(vals) < 2:
        return None
    from scipy import stats  # type: ignore[import-untyped]

    arr = np.asarray(vals, dtype=np.float64)
    half = float(stats.t.ppf(0.5 + level / 2.0, len(vals) - 1) * arr.std(ddof=1) / math.sqrt(len(vals)))
    return {"low": float(arr.mean()) - half, "high": float(arr.mean()) + half, "level": level}
