"""Forgetting read below a model's outputs: a linear probe on its features and a loss-score
membership attack. The benchmark (``bench/forgetting.py``) judges both against retraining; the demo
reports them before and after a deletion.

- ``probe_accuracy``: a ridge classifier on standardised features, cross-validated over fixed folds of
  held-out data that includes the forgotten kind, scored on that kind. A model that hides a class only
  at its output (a zeroed head row) keeps its probe accuracy.
- ``auc``: the Mann-Whitney AUC of member scores against non-member scores; with a score of minus the
  per-sample loss it is the loss attack's AUC (0.5: members look like non-members).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zkunlearn.errors import MalformedError

Pair = tuple[Tensor, Tensor]
Array = npt.NDArray[np.float64]

# The probe: a ridge classifier on standardised features (one-vs-rest least squares, closed form),
# cross-validated over PROBE_FOLDS fixed folds of the held-out data.
PROBE_RIDGE = 1.0
PROBE_FOLDS = 5
PROBE_SEED = 104729


class ForgettingError(MalformedError):
    """The forgetting metrics were given inconsistent or empty data."""


def per_sample_loss(model: nn.Module, pair: Pair) -> Array:
    """Cross-entropy of each sample (the mean over tokens for a language model), eval mode."""
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, pair[0].shape[0], 256):
            out = model(pair[0][i : i + 256]).double()
            y = pair[1][i : i + 256]
            nll = -F.log_softmax(out, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            losses.append(nll.mean(-1) if nll.dim() == 2 else nll)
    return torch.cat(losses).numpy()


def model_features(model: nn.Module, x: Tensor) -> Array | None:
    """The model's penultimate features of ``x`` (its ``features`` method), flattened; None without one."""
    features = getattr(model, "features", None)
    if features is None:
        return None
    model.eval()
    with torch.no_grad():
        f = torch.cat([features(x[i : i + 256]) for i in range(0, x.shape[0], 256)])
    return f.double().reshape(f.shape[0], -1).numpy()


def probe_accuracy(model: nn.Module, data: Pair, kind: int | None, folds: int = PROBE_FOLDS) -> float | None:
    """Cross-validated accuracy of a linear probe on ``model``'s features of held-out ``data``:
    ``folds`` fixed folds, each probe fit on the others, scored on the fold's samples of class
    ``kind`` (every sample if None). None where the model exposes no ``features``."""
    feats = model_features(model, data[0])
    if feats is None:
        return None
    return feature_probe_accuracy(feats, data[1].numpy(), kind, folds)


def feature_probe_accuracy(
    feats: Array, y: npt.NDArray[np.int64], kind: int | None, folds: int = PROBE_FOLDS
) -> float:
    """:func:`probe_accuracy` on features already computed."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(y.tolist())) < 2:
        raise ForgettingError("the probe needs two or more classes to fit")
    on_kind = np.ones_like(y, dtype=bool) if kind is None else y == kind
    if not on_kind.any():
        raise ForgettingError(f"the probe's data holds no sample of class {kind}")
    order = np.random.default_rng(PROBE_SEED).permutation(y.size)
    hits = 0
    for k in range(folds):
        test, train = order[k::folds], np.concatenate([order[j::folds] for j in range(folds) if j != k])
        probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=PROBE_RIDGE))
        probe.fit(feats[train], y[train])
        scored = test[on_kind[test]]
        if scored.size:
            hits += int(np.sum(probe.predict(feats[scored]) == y[scored]))
    return hits / int(on_kind.sum())


def auc(members: Array, nonmembers: Array) -> float:
    """P(member score > non-member score) + half the ties (the Mann-Whitney AUC)."""
    from scipy.stats import rankdata  # type: ignore[import-untyped]

    if members.size == 0 or nonmembers.size == 0:
        raise ForgettingError(f"AUC needs both sides non-empty, got {members.size} and {nonmembers.size}")
    ranks = rankdata(np.concatenate([members, nonmembers]))
    n_m, n_n = members.size, nonmembers.size
    return float((ranks[:n_m].sum() - n_m * (n_m + 1) / 2) / (n_m * n_n))


def loss_attack_auc(model: nn.Module, members: Pair, nonmembers: Pair) -> float:
    """The loss attack's AUC (lower loss = member) of ``members`` against ``nonmembers``."""
    return auc(-per_sample_loss(model, members), -per_sample_loss(model, nonmembers))
