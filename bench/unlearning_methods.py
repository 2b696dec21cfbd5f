"""The unlearning methods the benchmark compares on a client's personalized model: Group-OBS (and its
output refit), the fine-tune confined to Group-OBS's support, and the analytic head. Each returns the
updated model and what the update reports about itself (``update_s``, ``peak_rss_mb``, ...);
``run_job`` (bench/unlearning_runner.py) applies them under the names in ``METHODS``."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from zkunlearn.bench.forgetting import MiaReference
from zkunlearn.bench.unlearning_data import Prepared
from zkunlearn.bench.unlearning_metrics import evaluate, measured
from zkunlearn.bench.unlearning_settings import SETTINGS, CertifiedSpec


def group_obs_support(mask: Any, layers: Sequence[str]) -> dict[str, Tensor]:
    """The weights Group-OBS may change: the unmasked ones of the blocks the mask touches.

    A block the mask leaves alone gets no compensation (the Fisher is block-diagonal), so a fine-tune
    that may move it is not confined to Group-OBS's support.
    """
    out: dict[str, Tensor] = {}
    for name in layers:
        lm = mask.layer(name)
        touched = np.zeros(lm.n_blocks * lm.block_size, dtype=bool)
        for block in lm.blocks:
            touched[int(block) * lm.block_size : (int(block) + 1) * lm.block_size] = True
        dense = np.asarray(mask.dense(name), dtype=bool)
        out[name] = torch.as_tensor(touched[: dense.size].reshape(dense.shape) & ~dense)
    return out


def compensated_copy(
    model: nn.Module, factors: Mapping[str, Any], masks: Mapping[str, Any], lam: float
) -> nn.Module:
    """A copy of ``model`` with Group-OBS applied to each layer in ``masks`` (a ``LayerMask`` per name)."""
    from zkunlearn.client.group_obs import apply_group_obs

    out = copy.deepcopy(model)
    named = dict(out.named_parameters())
    for name, layer_mask in masks.items():
        new, _ = apply_group_obs(named[name].detach(), factors[name], layer_mask, lam)
        with torch.no_grad():
            named[name].copy_(torch.from_numpy(new).to(named[name].dtype))
    return out


def client_fisher_data(
    data: tuple[Tensor, Tensor], exclude: Tensor, n_samples: int, shift: int = 0
) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """The client samples its curvature is computed on: ``n_samples`` kept ones plus the excluded ones
    (``layer_factors`` drops those), a fixed draw so every update sees the same data; with ``shift``,
    followed by their copies moved that many pixels (``client.fisher.shifted_copies``)."""
    from zkunlearn.client.fisher import with_shifted_copies

    if data[0].shape[0] > n_samples + int(exclude.sum()):
        pick = torch.randperm(data[0].shape[0], generator=torch.Generator().manual_seed(0))
        pick = pick[: n_samples + int(exclude.sum())]
        data, exclude = (data[0][pick], data[1][pick]), exclude[pick]
    x, y, exclude = with_shifted_copies(data[0], data[1], exclude, shift)
    return (x, y), exclude


def group_obs(
    model: nn.Module,
    mask: Any,
    layers: Sequence[str],
    data: tuple[Tensor, Tensor],
    exclude: Tensor,
    lam: float,
    block_size: int,
    *,
    n_samples: int = 1024,
    compare_naive: bool = True,
    curvature: str = "empirical",
    reconstruction_weight: float = 0.0,
    fisher_shift: int = 0,
    factors_out: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Client-side compensation: Fisher factors without the forget-class samples, then batched solves.

    ``factors_out``, if given, receives the curvature factors (for :func:`group_obs_certified` to reuse).
    """
    from zkunlearn.client.fisher import layer_factors
    from zkunlearn.client.group_obs import apply_group_obs
    from zkunlearn.client.reference import naive_group_obs_explicit_inverse

    from zkunlearn.tasks.train import cross_entropy

    data, exclude = client_fisher_data(data, exclude, n_samples, fisher_shift)
    out = copy.deepcopy(model)
    named = dict(out.named_parameters())
    info = {"fisher_s": 0.0, "solve_s": 0.0, "naive_s": 0.0, "naive_max_diff": 0.0}
    with measured() as m:
        t0 = time.perf_counter()
        factors = layer_factors(
            model, list(layers), data[0], data[1], cross_entropy, block_size, exclude,
            curvature=curvature, reconstruction_weight=reconstruction_weight,  # type: ignore[arg-type]
        )  # fmt: skip
        t1 = time.perf_counter()
        info["fisher_s"] = t1 - t0
        if factors_out is not None:
            factors_out.update(factors)
        for name in layers:
            new, _ = apply_group_obs(named[name].detach(), factors[name], mask.layer(name), lam)
            with torch.no_grad():
                named[name].copy_(torch.from_numpy(new).to(named[name].dtype))
        info["solve_s"] = time.perf_counter() - t1
    info["update_s"] = m["seconds"]
    info["peak_rss_mb"] = m["peak_rss_mb"]
    if compare_naive:
        for name in layers:
            t0 = time.perf_counter()
            ref = naive_group_obs_explicit_inverse(
                model.get_parameter(name).detach(), factors[name], mask.layer(name), lam
            )
            info["naive_s"] += time.perf_counter() - t0
            diff = float(np.max(np.abs(ref - named[name].detach().double().numpy())))
            info["naive_max_diff"] = max(info["naive_max_diff"], diff)
    return out, info


def group_obs_certified(
    model: nn.Module,
    mask: Any,
    layers: Sequence[str],
    data: tuple[Tensor, Tensor],
    exclude: Tensor,
    certified: CertifiedSpec,
    block_size: int,
    *,
    n_samples: int = 1024,
    curvature: str = "empirical",
    reconstruction_weight: float = 0.0,
    fisher_shift: int = 0,
    factors: Mapping[str, Any] | None = None,
    factors_s: float = 0.0,
) -> tuple[nn.Module, dict[str, float]]:
    """The update the exact Group-OBS proofs certify: each layer's weights after
    :func:`zkunlearn.client.unlearning_exact.certified_weights` (the SDK's quantisation, rank-``m`` factor
    fit and exact solve, bit for bit what it proves), on the same curvature data as :func:`group_obs`.

    ``factors`` are :func:`group_obs`'s own on the same data (computed here if None); reusing them, the
    reported ``update_s`` adds the ``factors_s`` they took.
    """
    from zkunlearn.client.fisher import layer_factors
    from zkunlearn.client.unlearning_exact import certified_weights
    from zkunlearn.proofs.exact import ExactGroupObsSpec

    from zkunlearn.tasks.train import cross_entropy

    data, exclude = client_fisher_data(data, exclude, n_samples, fisher_shift)
    spec = ExactGroupObsSpec.from_lam(block_size, certified.m, 1, certified.lam)
    out = copy.deepcopy(model)
    with measured() as m:
        if factors is None:
            factors_s = 0.0
            factors = layer_factors(
                model, list(layers), data[0], data[1], cross_entropy, block_size, exclude,
                curvature=curvature, reconstruction_weight=reconstruction_weight,  # type: ignore[arg-type]
            )  # fmt: skip
        for name in layers:
            param = out.get_parameter(name)
            new = certified_weights(
                spec, param.detach().double().numpy().reshape(-1), factors[name].factors, mask.layer(name)
            )
            with torch.no_grad():
                param.copy_(torch.from_numpy(new.reshape(param.shape)).to(param.dtype))
    return out, {"update_s": m["seconds"] + factors_s, "peak_rss_mb": m["peak_rss_mb"]}


def output_refit(
    personalized: nn.Module,
    compensated: nn.Module,
    layers: Sequence[str],
    data: tuple[Tensor, Tensor],
    exclude: Tensor,
    rel_lam: float,
    *,
    n_samples: int,
    rows: int | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Group-OBS's output refit (client/refit.py) on the same retained samples as its curvature, fitting
    ``rows`` committed rows of them (every row if ``None``)."""
    from zkunlearn.client.refit import RefitPair, apply_output_refit

    (x, _), out = client_fisher_data(data, exclude, n_samples)
    pairs = [RefitPair(*p) for p in personalized.refit_pairs]  # type: ignore[union-attr]
    with measured() as m:
        model, res = apply_output_refit(personalized, compensated, pairs, x[~out], rel_lam, layers, rows=rows)
    info = {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]}
    info["refit_error_ratio"] = float(
        np.mean([r.error_after / max(r.error_before, 1e-30) for r in res.values()])
    )
    return model, info


def analytic_unlearn(
    prep: Prepared, variant: dict[str, Any], gamma: float = 1.0
) -> tuple[nn.Module, dict[str, float]]:
    """ACU-style exact unlearning of a ridge head on the frozen global backbone.

    The head is learned on the provider's training set and the client's data, then the forget set (and,
    in the overlap variant, the client's forget-class samples) is unlearned in closed form. The backbone
    still carries whatever it learned from the forget set: only the head's unlearning is exact.
    """
    from zkunlearn.client.analytic import AnalyticHead

    backbone = copy.deepcopy(prep.global_model).eval()
    head_layer = backbone.get_submodule("head")
    if not isinstance(head_layer, nn.Linear):
        raise TypeError("the analytic baseline needs a model with a linear `head`")
    n_classes = head_layer.out_features

    def feats(x: Tensor) -> np.ndarray[Any, Any]:
        with torch.no_grad():
            f = torch.cat([backbone.features(x[i : i + 512]) for i in range(0, x.shape[0], 512)])  # type: ignore[operator]
        return np.concatenate([f.double().numpy(), np.ones((f.shape[0], 1))], axis=1)

    def onehot(y: Tensor) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any] = np.eye(n_classes)[y.numpy()]
        return out

    client_x, client_y = variant["client_train"]
    cf = variant["client_forget_mask"]
    px, py = prep.provider_retain
    fx, fy = prep.provider_forget
    head = AnalyticHead(feats(px[:1]).shape[1], n_classes, gamma)
    head.learn(feats(px), onehot(py))
    head.learn(feats(fx), onehot(fy))
    head.learn(feats(client_x), onehot(client_y))
    with measured() as m:
        head.unlearn(feats(fx), onehot(fy))
        if bool(cf.any()):
            head.unlearn(feats(client_x[cf]), onehot(client_y[cf]))

    weight = torch.from_numpy(head.W.T.copy()).float()

    class Headed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            # A parameter, so that fine-tuning (the relearn metric) can move the head as well.
            self.weight = nn.Parameter(weight)

        def features(self, x: Tensor) -> Tensor:
            return torch.as_tensor(self.backbone.features(x))  # type: ignore[operator]

        def forward(self, x: Tensor) -> Tensor:
            return torch.as_tensor(self.features(x) @ self.weight[:, :-1].T + self.weight[:, -1])

    return Headed(), {"update_s": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]}


def support_finetune(
    prep: Prepared,
    v: Mapping[str, Any],
    mask: Any,
    dense: Mapping[str, Tensor],
    seed: int,
    quick: bool,
    reference: MiaReference | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fine-tune confined to Group-OBS's own support: what a gradient method finds there."""
    from zkunlearn.tasks.train import finetune_masked

    s = SETTINGS[prep.task]
    with measured() as m:
        model = finetune_masked(
            v["personalized"], dense, v["after"][0], v["after"][1],
            epochs=1 if quick else s.support_epochs, lr=s.personal_lr, seed=seed, batch_size=64,
            trainable=prep.layers, movable=group_obs_support(mask, prep.layers),
        )  # fmt: skip
    return evaluate(model, v["views"], seed, reference), {
        "update_s": m["seconds"],
        "peak_rss_mb": m["peak_rss_mb"],
    }
