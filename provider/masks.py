"""Deletion-mask scores and selection: which weights of the global model carry the forget set.

Scores (per weight, higher = more specific to the forget set):

* ``"zkapex"``: ZK-APEX's published score. Per dataset ``s = g*w - lambda_H * diag(F) * w^2`` with ``g``
  the mean gradient, ``diag(F) = damping + mean(g_i^2)`` from per-sample gradients; final score
  ``s_forget / (c * s_retain + eps)`` (c = 2, eps = 1e-12, lambda_H = 0.45, damping 1e-8, 480 samples).
  Kept for comparison: methods.md found it no better than random at 4 %, because tiny retain scores
  dominate the ratio.
* ``"fisher-ratio"``: ``F_forget / (c * F_retain + eps)`` on the Fisher diagonals (Selective Synaptic
  Dampening's criterion), the one that removed the class in the prototype.
* ``"salun"``: ``|mean forget gradient|`` (SalUn's saliency).
* ``"random"``: uniform scores from ``seed``, the control every other score must beat.

Neuron scores rank whole rows (output units): ``Imp(D_forget, n) / (Imp(D_retain, n) + eps)`` with
``Imp`` the mean positive activation of unit ``n``, since after ReLU/GELU only the positive part
reaches the next layer; a unit strongly *off* on retain data is not important to it.

Selection (``structure``):

* ``"unstructured"``: global top ``round(fraction * N)`` weights across the targeted layers.
* ``"block"``: same budget, concentrated in the fewest Group-OBS blocks: blocks are ranked by the mean of
  the global *ranks* of the weights they would lose and filled with their top ``density`` by score (the
  last one partially). Ranks rather than raw scores because ratio scores have huge outliers (near-zero
  denominators) that would let one weight decide a block. Fewer touched blocks = fewer blocks to solve
  and to prove. At ``density = 1`` blocks are masked whole, and a whole block leaves Group-OBS nothing
  to compensate with: its recovery there is mask-only's. ``density < 1`` keeps unmasked weights in every
  touched block, trading touched blocks (proof cost) for compensation (measured in docs/benchmarks.md).
* ``"neuron"``: the top ``round(fraction * rows)`` rows across the targeted layers, masked entirely.

This module computes its own per-sample gradients: the provider never imports the client SDK.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.provider.proof_budget import block_cap

from zkunlearn.errors import MalformedError

__all__ = [
    "MaskSelectionError",
    "compute_mask",
    "neuron_scores",
    "select_blocks",
    "select_neurons",
    "select_unstructured",
    "weight_scores",
]

Score = Literal["zkapex", "fisher-ratio", "salun", "random"]
Structure = Literal["unstructured", "block", "neuron"]
LossFn = Callable[[Tensor, Tensor], Tensor]
Data = tuple[Tensor, Tensor]
F64 = npt.NDArray[np.float64]

SCORES: tuple[str, ...] = ("zkapex", "fisher-ratio", "salun", "random")
STRUCTURES: tuple[str, ...] = ("unstructured", "block", "neuron")


class MaskSelectionError(MalformedError):
    """Unknown score/structure, bad fraction, unknown layer or unusable data for mask selection."""


def _params(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if not layers:
        raise MaskSelectionError("no layers targeted")
    missing = [name for name in layers if name not in named]
    if missing:
        raise MaskSelectionError(f"model has no parameters {missing}")
    if len(set(layers)) != len(layers):
        raise MaskSelectionError(f"duplicate layers in {list(layers)}")
    return {name: named[name] for name in layers}


def _check_int(value: object, what: str, minimum: int | None = None) -> int:
    """Counts and sizes must be true integers: ``True`` would count as 1 and ``1.5`` would be rounded or
    truncated somewhere downstream, silently changing how much is scored or masked."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MaskSelectionError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise MaskSelectionError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MaskSelectionError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_data(data: Data, what: str) -> Data:
    if not (isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
        raise MaskSelectionError(f"{what} set must be an (inputs, targets) pair of tensors")
    x, y = data
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise MaskSelectionError(f"{what} set needs matching, non-empty inputs/targets: {x.shape}, {y.shape}")
    return x, y


def _grad_moments(
    model: nn.Module, layers: Sequence[str], data: Data, loss_fn: LossFn, max_samples: int, chunk: int = 128
) -> tuple[dict[str, F64], dict[str, F64]]:
    """Mean gradient and mean squared per-sample gradient, accumulated chunk by chunk (no (m, numel) copy)."""
    x, y = _check_data(data, "gradient")
    x, y = x[:max_samples], y[:max_samples]
    named = dict(model.named_parameters())
    wanted = {name: named[name].detach() for name in layers}
    fixed: dict[str, Tensor] = {k: v.detach() for k, v in named.items() if k not in wanted}
    fixed.update(dict(model.named_buffers()))

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    s1 = {name: np.zeros(tuple(wanted[name].shape)) for name in layers}
    s2 = {name: np.zeros(tuple(wanted[name].shape)) for name in layers}
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, x.shape[0], chunk):
            g = per_sample(wanted, x[lo : lo + chunk], y[lo : lo + chunk])
            for name in layers:
                gi = g[name].detach().to(torch.float64)
                s1[name] += gi.sum(0).numpy()
                s2[name] += (gi * gi).sum(0).numpy()
    finally:
        model.train(was_training)
    n = x.shape[0]
    return {k: v / n for k, v in s1.items()}, {k: v / n for k, v in s2.items()}


def weight_scores(
    model: nn.Module,
    layers: Sequence[str],
    forget: Data,
    retain: Data,
    loss_fn: LossFn,
    score: str = "fisher-ratio",
    *,
    seed: int = 0,
    lambda_h: float = 0.45,
    ratio_c: float = 2.0,
    eps: float = 1e-12,
    damping: float = 1e-8,
    max_samples: int = 480,
) -> dict[str, F64]:
    """Per-weight scores (float64, each the parameter's shape) for the targeted layers."""
    # Checked even for "random": a caller's bad argument should not depend on the score to surface, and
    # ``x[:0]`` / ``x[:-1]`` would otherwise average over no sample (NaN everywhere) or silently drop one.
    max_samples = _check_int(max_samples, "max_samples", 1)
    params = _params(model, layers)
    if score == "random":
        rng = np.random.default_rng(seed)
        return {name: rng.random(tuple(p.shape)) for name, p in params.items()}
    if score not in SCORES:
        raise MaskSelectionError(f"unknown score {score!r} (choose from {SCORES})")
    g_f, f_f = _grad_moments(model, layers, forget, loss_fn, max_samples)
    if score == "salun":
        return {name: np.abs(g_f[name]) for name in layers}
    g_r, f_r = _grad_moments(model, layers, retain, loss_fn, max_samples)
    out: dict[str, F64] = {}
    for name in layers:
        if score == "fisher-ratio":
            out[name] = f_f[name] / (ratio_c * f_r[name] + eps)
        else:  # zkapex
            w = params[name].detach().to(torch.float64).numpy()
            s_f = g_f[name] * w - lambda_h * (damping + f_f[name]) * w * w
            s_r = g_r[name] * w - lambda_h * (damping + f_r[name]) * w * w
            out[name] = s_f / (ratio_c * s_r + eps)
    return out


def _row_modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """The module owning each targeted weight, refused unless weight dim 0 is its output unit.

    A neuron is scored from the module's output channel and masked as weight row ``[i]``; that is the
    same unit only for ``nn.Linear`` and ordinary convolutions. A transposed convolution's weight is
    ``(in, out, ...)`` and an embedding's rows are tokens, so their "rows" would be chosen by the scores
    of other units (silently, whenever the two counts happen to agree).
    """
    params = _params(model, layers)
    modules: dict[str, nn.Module] = {}
    for name in layers:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf != "weight" or params[name].ndim < 2:
            raise MaskSelectionError(f"neuron scores need a >= 2-D weight parameter, got {name!r}")
        is_conv = isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
        if not (isinstance(module, nn.Linear) or is_conv):
            raise MaskSelectionError(
                f"neuron structure needs weight rows that are output units (nn.Linear or a non-transposed "
                f"convolution); {name!r} belongs to {owner or '<model>'!r} of type {type(module).__name__}"
            )
        modules[name] = module
    return modules


def neuron_scores(
    model: nn.Module, layers: Sequence[str], forget: Data, retain: Data, *, eps: float = 1e-12
) -> dict[str, F64]:
    """Per-row scores ``Imp(forget, n) / (Imp(retain, n) + eps)`` from the owning module's outputs."""
    modules = _row_modules(model, layers)
    named = dict(model.named_parameters())
    rows = {name: int(named[name].shape[0]) for name in modules}

    def importance(data: Data, what: str) -> dict[str, F64]:
        x, _ = _check_data(data, what)
        # A module run several times per forward (a shared or tied layer) contributes every call: the
        # mean is over all its output positions, not whatever the last call left behind.
        total = {name: np.zeros(n) for name, n in rows.items()}
        count = dict.fromkeys(rows, 0)
        bad: list[str] = []
        hooks = []
        for name, module in modules.items():
            # Conv outputs keep channels in dim 1 (dim 0 when called unbatched: one fewer dim than the
            # weight), Linear outputs in the last dim.
            conv_ndim = named[name].ndim if isinstance(module, nn.modules.conv._ConvNd) else None

            def hook(
                _m: nn.Module, _i: object, out: Tensor, name: str = name, conv_ndim: int | None = conv_ndim
            ) -> None:
                dim = -1 if conv_ndim is None else 1 if out.ndim == conv_ndim else 0
                if out.ndim == 0 or out.shape[dim] != rows[name]:
                    bad.append(f"{name!r}: output {tuple(out.shape)} has no {rows[name]}-unit channel dim")
                    return
                a = out.detach().to(torch.float64).clamp_min(0).movedim(dim, -1).reshape(-1, rows[name])
                total[name] += a.sum(0).numpy()
                count[name] += a.shape[0]

            hooks.append(module.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        if bad:
            raise MaskSelectionError(f"cannot score neurons on the {what} set: {'; '.join(bad)}")
        if silent := [name for name, c in count.items() if c == 0]:
            raise MaskSelectionError(
                f"the modules owning {silent} produced no output on the {what} set: their weights are "
                "used without calling the module (e.g. nn.MultiheadAttention's out_proj), so their "
                "neurons cannot be scored by activation"
            )
        return {name: total[name] / count[name] for name in rows}

    imp_f, imp_r = importance(forget, "forget"), importance(retain, "retain")
    return {name: imp_f[name] / (imp_r[name] + eps) for name in layers}


def _check_fraction(fraction: float, block_size: int) -> None:
    fraction = _check_real(fraction, "fraction")
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise MaskSelectionError(f"fraction must be in [0, 1], got {fraction}")
    if _check_int(block_size, "block size") <= 0:
        raise MaskSelectionError(f"block size must be positive, got {block_size}")


def _check_density(density: float) -> float:
    density = _check_real(density, "block density")
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise MaskSelectionError(f"block density must be in (0, 1], got {density}")
    return density


def _flatten(scores: Mapping[str, npt.ArrayLike]) -> tuple[list[str], list[tuple[int, ...]], F64]:
    if not isinstance(scores, Mapping):
        raise MaskSelectionError(f"scores must map layer name -> array, got {type(scores).__name__}")
    names = list(scores)
    arrays = []
    for n in names:
        try:
            arrays.append(np.asarray(scores[n], dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise MaskSelectionError(f"scores of {n!r} are not a numeric array: {exc}") from exc
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    nan = np.isnan(flat)
    if flat.size and nan.all():
        # Every score 0/0 (no samples, or a model that outputs NaN): any mask would be an arbitrary
        # index order dressed up as a selection.
        raise MaskSelectionError(f"every score of {names} is NaN: nothing to select by")
    # A NaN score (0/0) carries no evidence: rank it last rather than let it sort unpredictably.
    flat = np.where(nan, -np.inf, flat)
    return names, [a.shape for a in arrays], flat


def _budget(fraction: float, n: int) -> int:
    k = round(fraction * n)
    return max(k, 1) if fraction > 0 and n > 0 else k


def _to_mask(names: list[str], shapes: list[tuple[int, ...]], chosen: npt.NDArray[np.bool_], B: int) -> Mask:
    dense: dict[str, npt.NDArray[np.bool_]] = {}
    lo = 0
    for name, shape in zip(names, shapes, strict=True):
        n = math.prod(shape)
        dense[name] = chosen[lo : lo + n].reshape(shape)
        lo += n
    return Mask.from_dense(dense, B)


def select_unstructured(scores: Mapping[str, npt.ArrayLike], fraction: float, block_size: int) -> Mask:
    """Global top ``round(fraction * N)`` weights; ties go to the lower flat index (deterministic)."""
    _check_fraction(fraction, block_size)
    names, shapes, flat = _flatten(scores)
    k = _budget(fraction, flat.size)
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argsort(-flat, kind="stable")[:k]] = True
    return _to_mask(names, shapes, chosen, block_size)


def select_blocks(
    scores: Mapping[str, npt.ArrayLike], fraction: float, block_size: int, density: float = 1.0
) -> Mask:
    """The same budget as ``select_unstructured`` packed into the fewest blocks, each masked at most to
    ``floor(density * B)`` weights (at least one, float error forgiven: ``proof_budget.block_cap``)."""
    _check_fraction(fraction, block_size)
    density = _check_density(density)
    names, shapes, flat = _flatten(scores)
    k = _budget(fraction, flat.size)
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size, dtype=np.float64)
    # Candidate blocks (blocks never cross layers), each with the weights it would lose: its top ``cap``
    # by score, ranked by their mean rank (a sum would disfavour a layer's short last block).
    picks: list[npt.NDArray[np.int64]] = []
    lo = 0
    cap = block_cap(density, block_size)
    for shape in shapes:
        n = math.prod(shape)
        for b in range(lo, lo + n, block_size):
            length = min(block_size, lo + n - b)
            picks.append(b + np.argsort(-flat[b : b + length], kind="stable")[:cap])
        lo += n
    totals = np.array([ranks[p].mean() for p in picks])
    chosen = np.zeros(flat.size, dtype=bool)
    left = k
    for i in np.argsort(-totals, kind="stable"):
        if left == 0:
            break
        take = picks[i][:left]  # already in score order, so a partial last block keeps its best
        chosen[take] = True
        left -= take.size
    if left:
        raise MaskSelectionError(
            f"fraction {fraction} needs {k} masked weights, more than blocks capped at density {density} "
            f"hold ({k - left}); raise the density or lower the fraction"
        )
    return _to_mask(names, shapes, chosen, block_size)


def select_neurons(
    row_scores: Mapping[str, npt.ArrayLike],
    shapes: Mapping[str, tuple[int, ...]],
    fraction: float,
    block_size: int,
) -> Mask:
    """Top ``round(fraction * rows)`` rows across the layers; every weight of a chosen row is masked."""
    _check_fraction(fraction, block_size)
    names, _, flat = _flatten(row_scores)
    if not isinstance(shapes, Mapping):
        raise MaskSelectionError(f"shapes must map layer name -> shape, got {type(shapes).__name__}")
    if missing := [name for name in names if name not in shapes]:
        raise MaskSelectionError(f"shapes has no entry for the scored layers {missing}")
    for name in names:
        shape = shapes[name]
        if not isinstance(shape, Sequence) or not shape:
            raise MaskSelectionError(f"{name!r}: shape must be a non-empty sequence of ints, got {shape!r}")
        n_rows = _check_int(shape[0], f"{name!r}: row count", 1)
        if np.asarray(row_scores[name]).shape != (n_rows,):
            raise MaskSelectionError(f"{name!r}: row scores must have shape ({n_rows},)")
    k = _budget(fraction, flat.size)
    rows = np.zeros(flat.size, dtype=bool)
    rows[np.argsort(-flat, kind="stable")[:k]] = True
    dense: dict[str, npt.NDArray[np.bool_]] = {}
    lo = 0
    for name in names:
        shape = tuple(shapes[name])
        picked = rows[lo : lo + shape[0]]
        lo += shape[0]
        dense[name] = np.broadcast_to(picked.reshape((-1,) + (1,) * (len(shape) - 1)), shape).copy()
    return Mask.from_dense(dense, block_size)


def compute_mask(
    model: nn.Module,
    layers: Sequence[str],
    forget: Data,
    retain: Data,
    loss_fn: LossFn,
    score: str = "fisher-ratio",
    fraction: float = 0.3,
    block_size: int = 64,
    structure: str = "unstructured",
    seed: int = 0,
    density: float = 1.0,
    class_rows: Mapping[str, int] | None = None,
) -> Mask:
    """Score the targeted layers of the provider's model and select a deletion mask.

    ``density`` is the ``"block"`` structure's per-block cap. ``class_rows`` names layers whose output
    rows are classes (a classifier head) with how many rows to remove whole, by neuron score (the
    forgotten classes' rows); they are kept out of ``fraction``'s budget and out of its structure, so a
    capped block mask of the hidden layers does not leave the forget class's row half alive, and whole
    head blocks do not compete with the hidden layers' capped ones.
    """
    if structure not in STRUCTURES:
        raise MaskSelectionError(f"unknown structure {structure!r} (choose from {STRUCTURES})")
    if score not in SCORES:
        raise MaskSelectionError(f"unknown score {score!r} (choose from {SCORES})")
    _check_fraction(fraction, block_size)
    density = _check_density(density)
    seed = _check_int(seed, "seed")
    if density != 1.0 and structure != "block":
        raise MaskSelectionError(f"density caps blocks of the 'block' structure, not {structure!r}")
    params = _params(model, layers)  # refuses no layers and unknown ones
    if class_rows is not None and not isinstance(class_rows, Mapping):
        raise MaskSelectionError(
            f"class_rows must map layer name -> row count, got {type(class_rows).__name__}"
        )
    rows = dict(class_rows or {})
    if unknown := sorted(set(rows) - set(layers)):
        raise MaskSelectionError(f"class_rows names layers that are not targeted: {unknown}")
    budgeted = [name for name in layers if name not in rows]
    if not budgeted:
        raise MaskSelectionError("class_rows leaves no layer for the fraction's budget")
    mask = _select(
        model, budgeted, forget, retain, loss_fn, score, fraction, block_size, structure, seed, density
    )
    if not rows:
        return mask
    shapes = {name: tuple(int(d) for d in params[name].shape) for name in rows}
    for name in rows:
        k = rows[name] = _check_int(rows[name], f"class_rows[{name!r}]")  # 1.5 would take round(1.5) rows
        if not 0 < k < shapes[name][0]:
            raise MaskSelectionError(f"class_rows[{name!r}] must be in 1..{shapes[name][0] - 1}, got {k}")
    row_scores = neuron_scores(model, list(rows), forget, retain)  # one forward pass for every head
    heads: list[LayerMask] = []
    for name, k in rows.items():
        heads += select_neurons(
            {name: row_scores[name]}, {name: shapes[name]}, k / shapes[name][0], block_size
        ).layers
    return Mask((*mask.layers, *heads))


def _select(
    model: nn.Module,
    layers: Sequence[str],
    forget: Data,
    retain: Data,
    loss_fn: LossFn,
    score: str,
    fraction: float,
    block_size: int,
    structure: str,
    seed: int,
    density: float,
) -> Mask:
    params = _params(model, layers)
    if structure == "neuron":
        shapes = {name: tuple(int(d) for d in p.shape) for name, p in params.items()}
        if score == "random":
            _row_modules(model, layers)  # random rows must still be output units
            rng = np.random.default_rng(seed)
            rs: dict[str, F64] = {name: rng.random(shapes[name][0]) for name in layers}
        else:
            rs = neuron_scores(model, layers, forget, retain)
        return select_neurons(rs, shapes, fraction, block_size)
    ws = weight_scores(model, layers, forget, retain, loss_fn, score, seed=seed)
    if structure == "block":
        return select_blocks(ws, fraction, block_size, density)
    return select_unstructured(ws, fraction, block_size)
