"""Per-sample gradients and the low-rank factors of the client's blockwise empirical Fisher.

Group-OBS needs, per block ``b`` of ``B`` weights, the damped empirical Fisher
``F_b = lam*I + G_b^T G_b / m`` where the rows of ``G_b`` are per-sample gradients restricted to the block.
On an edge device the ``B x B`` matrices (ZK-APEX: 5.4 GB for one ViT layer) are the wrong thing to
store, so only the factor ``G`` (``m x B`` per block) is kept and solvers work in the Woodbury form.

``G`` is normalised so the mean diagonal of ``G^T G / m`` over the layer is 1: ``lam`` then means the
same thing on every layer and model (methods.md: lam of 1e-2..1e-1 of the mean diagonal works, 1e-4
overshoots). The OBS update is invariant to scaling ``F``, so normalising changes nothing else.

Which curvature (``curvature=``):

* ``"empirical"``: rows are per-sample loss gradients at the client's own labels (ZK-APEX's choice).
  At a model that fits its training data, these gradients vanish with the loss (``p - e_y -> 0``), so
  the Fisher mostly describes the few samples the model still gets wrong.
* ``"ggn"``: the Gauss-Newton matrix of the cross-entropy, ``J^T (diag p - p p^T) J``, factored
  exactly with ``C`` rows per sample, ``sqrt(p_c) (dz_c - sum_k p_k dz_k)``. It is the Hessian of the
  loss minus the part that needs second derivatives of the network, it needs no labels, and it does
  not degenerate at an interpolating model. Measured on the ViT task's tuning seeds
  (bench/results/unlearning_fisher_tuning.md): 89.8 % recovery vs 87.9 % for the empirical Fisher at
  its best damping, and the GGN keeps its plateau over 1e-4..1e-3 where the empirical Fisher drifts.
* ``"fisher"``: the model's own Fisher, one row per sample with labels drawn from its predictive
  distribution (every position of a sequence gets its own draw; seeded, so enrollment is
  reproducible). Its expectation is the same Gauss-Newton matrix, at the cost of one gradient per
  sample instead of ``C``: the choice for language models, whose exact GGN would need a row per
  position and vocabulary entry. Measured: +2 points of recovery over the empirical Fisher on the
  code LM; on the confident ViT classifier worse than both others (almost every draw is the true
  label, and the rare other draws dominate the estimate).

Any of them may be combined with the layer's **reconstruction** curvature
(``reconstruction_weight=w``): ``F <- F + w * (I_out (x) E[x x^T])`` restricted to each block, both
terms at unit mean diagonal, where ``x`` runs over every row the linear layer sees (every token of a
sequence). It is the Hessian OBC and SparseGPT prune with (keep each neuron's pre-activation), here a
trust region in activation space beside the loss curvature, which is only trusted near the weights it
was measured at. It needs no labels and no gradients, and the relation the circuit checks is
unchanged: the combined matrix is factored like any other. Measured on the code LM (whose first fc1
alone can be fully recovered by a fine-tune of its own unmasked weights, so the curvature, not the
relation, is the limit there): see ``SETTINGS["code-lm"]`` in bench/unlearning_settings.py.

A factor with more rows than the block has columns carries nothing a ``B``-row factor does not, so
when the rows outnumber ``B`` the per-block Gram matrices are accumulated chunk by chunk and factored
(``sqrt(Lambda) V^T``): ``GGN`` factors of ``m * C`` rows never exist in memory, the factor of every
block is at most ``B x B``, and ``F`` is the same to round-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args, overload

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from zkunlearn.client.fisher_factors import (
    BlockFactors,
    FisherError,
    factors_from_gradients,
    factors_from_gram,
    fit_rows,
)
from zkunlearn.client.refit import capture_inputs

__all__ = [
    "CURVATURES",
    "BlockFactors",
    "Curvature",
    "FisherError",
    "block_factors",
    "curvature_rows",
    "factors_from_gradients",
    "factors_from_gram",
    "fit_rows",
    "layer_factors",
    "per_sample_gradients",
    "reconstruction_factors",
    "shifted_copies",
    "with_shifted_copies",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Curvature = Literal["empirical", "ggn", "fisher"]
CURVATURES: tuple[str, ...] = get_args(Curvature)
# Samples per chunk of per-sample gradients while Gram matrices are accumulated (bounds peak memory).
_GRAM_CHUNK = 128


def per_sample_gradients(
    model: nn.Module,
    params: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """Gradient of ``loss_fn(model(x_i), y_i)`` w.r.t. each named parameter, for every sample ``i``.

    The model is evaluated in eval mode (dropout off, batch-norm statistics frozen) because the Fisher
    describes the deployed function, and vmap cannot batch train-mode batch-norm anyway. ``chunk_size``
    bounds the peak memory of the vmapped graph; results are the same for any chunking.
    """
    _check_names(params, "parameter")
    named = dict(model.named_parameters())
    missing = [p for p in params if p not in named]
    if missing:
        raise FisherError(f"model has no parameters {missing} (has {sorted(named)})")
    if not params:
        raise FisherError("no parameters requested")
    if inputs.shape[0] != targets.shape[0]:
        raise FisherError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    if inputs.shape[0] == 0:
        raise FisherError("no samples")
    wanted = {p: named[p].detach() for p in params}
    fixed = {k: v.detach() for k, v in named.items() if k not in wanted}
    fixed.update(dict(model.named_buffers()))

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **p}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    try:
        chunks: dict[str, list[Tensor]] = {p: [] for p in params}
        for start in range(0, inputs.shape[0], chunk_size):
            g = per_sample(wanted, inputs[start : start + chunk_size], targets[start : start + chunk_size])
            for p in params:
                chunks[p].append(g[p].detach())
    finally:
        model.train(was_training)
    return {p: torch.cat(v) for p, v in chunks.items()}


def block_factors(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    block_size: int,
    exclude: Tensor | npt.NDArray[np.bool_] | None = None,
    *,
    curvature: Curvature = "empirical",
) -> BlockFactors:
    """Per-block factors of the Fisher of parameter ``layer`` on the client's samples.

    ``exclude`` marks samples to leave out (True = out). methods.md: when the client's Fisher includes
    samples of the forgotten class, compensation pushes the deleted behaviour straight back (forget
    accuracy 0.36 -> 0.65-0.84); leaving them out is what makes recovery without relearning possible.
    ``curvature="ggn"`` and ``"fisher"`` ignore ``targets`` and ``loss_fn`` (the model's outputs are
    taken as the logits of a categorical cross-entropy); ``"ggn"`` needs ``(N, C)`` outputs.
    """
    return layer_factors(model, [layer], inputs, targets, loss_fn, block_size, exclude, curvature=curvature)[
        layer
    ]


def layer_factors(
    model: nn.Module,
    layers: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    block_size: int,
    exclude: Tensor | npt.NDArray[np.bool_] | None = None,
    *,
    curvature: Curvature = "empirical",
    seed: int = 0,
    reconstruction_weight: float = 0.0,
) -> dict[str, BlockFactors]:
    """``block_factors`` of several layers from one pass of per-sample gradients (the GGN's C passes
    through the network are the cost, not the per-layer Gram products).

    ``reconstruction_weight`` adds the layers' reconstruction curvature (module docstring); every
    layer must then be the weight of an ``nn.Linear``.
    """
    _check_names(layers, "layer")
    if block_size <= 0:
        raise FisherError(f"block size must be positive, got {block_size}")
    if curvature not in CURVATURES:
        raise FisherError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
    if not (math.isfinite(reconstruction_weight) and reconstruction_weight >= 0.0):
        raise FisherError(
            f"reconstruction weight must be a finite number >= 0, got {reconstruction_weight!r}"
        )
    linears = _linear_modules(model, layers) if reconstruction_weight > 0.0 else {}
    if exclude is not None:
        inputs, targets = _kept(inputs, targets, exclude)
    if inputs.shape[0] == 0:
        raise FisherError("no samples")
    rows_per_sample = _ggn_classes(model, inputs[:1]) if curvature == "ggn" else 1
    draws = torch.Generator().manual_seed(seed)
    if inputs.shape[0] * rows_per_sample <= block_size and not linears:
        rows = _curvature_rows(model, layers, inputs, targets, loss_fn, curvature, draws)
        return {n: factors_from_gradients(n, flat, block_size, shape) for n, (flat, shape) in rows.items()}
    grams: dict[str, npt.NDArray[np.float64]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    n_rows = 0
    for start in range(0, inputs.shape[0], _GRAM_CHUNK):
        chunk = slice(start, start + _GRAM_CHUNK)
        rows = _curvature_rows(model, layers, inputs[chunk], targets[chunk], loss_fn, curvature, draws)
        for name, (flat, shape) in rows.items():
            if not np.isfinite(flat).all():
                raise FisherError(f"per-sample gradients of {name!r} contain NaN or inf")
            blocks = _blocked(flat, block_size)
            part = np.einsum("rkb,rkc->kbc", blocks, blocks, optimize=True)
            grams[name] = grams[name] + part if name in grams else part
            shapes[name] = shape
        n_rows += next(iter(rows.values()))[0].shape[0]
    if not linears:
        return {n: factors_from_gram(n, grams[n], n_rows, shapes[n]) for n in layers}
    recons = _reconstruction_grams(model, linears, inputs, block_size)
    out = {}
    for name in layers:
        numel = math.prod(shapes[name])
        curv, recon = grams[name] / n_rows, recons[name]
        curv_diag, recon_diag = (float(_mean_diagonal(g, numel)) for g in (curv, recon))
        # Both terms at the curvature's mean diagonal before weighting, so ``w`` means the same on every
        # layer; ``factors_from_gram`` then normalises the sum (``scale`` keeps gradient units).
        combined = curv + (reconstruction_weight * curv_diag / recon_diag) * recon
        out[name] = factors_from_gram(name, combined, 1, shapes[name])
    return out


def curvature_rows(
    model: nn.Module,
    layers: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    curvature: Curvature = "empirical",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The curvature factor's raw rows per parameter, ``(rows, *shape)``, before blocking or scaling:
    per-sample gradients at the client's labels (empirical), at labels drawn from the model (fisher),
    or of one pseudo-loss per class (ggn, ``C`` rows per sample).

    ``layer_factors`` cuts these into per-tensor blocks; a relation whose blocks span tensors (e.g. a
    hidden neuron's fc1 row with its fc2 column, measured in ``bench/unlearning_diagnosis.py``) needs the
    rows themselves. Called chunk by chunk, pass one ``generator`` to every chunk, so that ``"fisher"``
    draws differ between chunks and the whole stays reproducible (default: seeded 0 per call).
    """
    if curvature not in CURVATURES:
        raise FisherError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
    if inputs.shape[0] == 0:
        raise FisherError("no samples")
    draws = generator if generator is not None else torch.Generator().manual_seed(0)
    if curvature == "fisher":
        logits = _eval_logits(model, inputs).double()
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        targets = torch.multinomial(probs, 1, generator=draws).reshape(logits.shape[:-1])
        loss_fn = _sampled_cross_entropy
    elif curvature == "ggn":
        n_classes = _ggn_classes(model, inputs[:1])
        inputs = inputs.repeat_interleave(n_classes, dim=0)
        targets = torch.arange(n_classes).repeat(inputs.shape[0] // n_classes)
        loss_fn = _ggn_row_loss
    return per_sample_gradients(model, list(layers), inputs, targets, loss_fn)


def reconstruction_factors(
    model: nn.Module,
    layers: Sequence[str],
    inputs: Tensor,
    block_size: int,
    exclude: Tensor | npt.NDArray[np.bool_] | None = None,
) -> dict[str, BlockFactors]:
    """Factors of the reconstruction curvature alone, ``I_out (x) E[x x^T]`` per block (module docstring).

    The term ``reconstruction_weight`` adds to the loss curvature, on its own: for diagnosis and for
    comparing with OBC/SparseGPT, whose pruning keeps exactly this.
    """
    if block_size <= 0:
        raise FisherError(f"block size must be positive, got {block_size}")
    linears = _linear_modules(model, layers)
    if exclude is not None:
        inputs, _ = _kept(inputs, inputs, exclude)
    grams = _reconstruction_grams(model, linears, inputs, block_size)
    return {
        name: factors_from_gram(name, grams[name], 1, tuple(int(d) for d in module.weight.shape))
        for name, module in linears.items()
    }


def shifted_copies(images: Tensor, pixels: int = 1) -> Tensor:
    """``images`` followed by four copies moved ``pixels`` down, up, right and left (zero fill).

    The Gauss-Newton curvature needs no labels, so a client can measure it on more inputs than it has:
    copies of its own images moved by a pixel are inputs its model meets in the same domain, and they
    fill in curvature directions a few hundred images leave flat. Measured on the ViT task
    (``SETTINGS["vit"]`` in bench/unlearning_settings.py). :func:`with_shifted_copies` carries targets and
    exclusions along.
    """
    if images.dim() != 4:
        raise FisherError(f"shifted copies need an (N, C, H, W) image batch, got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if not 1 <= pixels < min(height, width):
        raise FisherError(f"shift must be 1..{min(height, width) - 1} pixels for {height}x{width} images")
    copies = [images]
    for dy, dx in ((pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels)):
        moved = torch.zeros_like(images)
        moved[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = images[
            ..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
        ]
        copies.append(moved)
    return torch.cat(copies)


@overload
def with_shifted_copies(
    inputs: Tensor, targets: Tensor, exclude: Tensor, pixels: int
) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def with_shifted_copies(
    inputs: Tensor, targets: Tensor, exclude: None, pixels: int
) -> tuple[Tensor, Tensor, None]: ...
def with_shifted_copies(
    inputs: Tensor, targets: Tensor, exclude: Tensor | None, pixels: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A curvature's samples with :func:`shifted_copies` appended, each copy keeping its original's
    target and exclusion (a shifted forgotten-class image stays out); ``pixels == 0``: unchanged."""
    if pixels == 0:
        return inputs, targets, exclude
    copies = shifted_copies(inputs, pixels)
    reps = copies.shape[0] // inputs.shape[0]
    return copies, targets.repeat(reps), None if exclude is None else exclude.repeat(reps)


def _check_names(names: Sequence[str], what: str) -> None:
    """One factor per name: results are keyed by name, so a repeat would either be consumed twice
    (a bare ``KeyError`` deep in the gradient pass) or, in ``per_sample_gradients``, silently stack
    that parameter's rows twice and double its share of the Fisher."""
    if isinstance(names, str):
        raise FisherError(f"{what} names must be a sequence of names, not the string {names!r}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FisherError(f"{what} {name!r} is named more than once in {list(names)}")
        seen.add(name)


def _kept(inputs: Tensor, targets: Tensor, exclude: Tensor | npt.NDArray[np.bool_]) -> tuple[Tensor, Tensor]:
    keep = ~torch.as_tensor(exclude).to(torch.bool).reshape(-1)
    if keep.shape[0] != inputs.shape[0]:
        raise FisherError(f"exclude has {keep.shape[0]} entries for {inputs.shape[0]} samples")
    if not bool(keep.any()):
        raise FisherError("exclude leaves no samples for the Fisher")
    return inputs[keep], targets[keep]


def _linear_modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` each layer is the weight of (the reconstruction term is defined for those)."""
    out = {}
    for name in layers:
        owner, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError as exc:
            raise FisherError(f"model has no submodule {owner!r} (for layer {name!r})") from exc
        if leaf != "weight" or not isinstance(module, nn.Linear):
            raise FisherError(
                f"the reconstruction term needs the weight of an nn.Linear; {name!r} is "
                f"{leaf!r} of a {type(module).__name__}"
            )
        out[name] = module
    return out


def _reconstruction_grams(
    model: nn.Module, linears: Mapping[str, nn.Linear], inputs: Tensor, block_size: int
) -> dict[str, npt.NDArray[np.float64]]:
    """Per layer, the blocks of ``I_out (x) E[x x^T]`` over every row the layer sees on ``inputs``.

    The rows come from :func:`zkunlearn.client.refit.capture_inputs` (the hook the output refit uses).
    """
    if inputs.shape[0] == 0:
        raise FisherError("no samples")
    paths = {name: name.rpartition(".")[0] for name in linears}
    seen = capture_inputs(model, list(paths.values()), inputs)
    out = {}
    for name, module in linears.items():
        x = seen[paths[name]]
        numel = module.weight.numel()
        gram = _reconstruction_gram((x.T @ x / x.shape[0]).numpy(), numel, block_size)
        diag = float(_mean_diagonal(gram, numel))
        if not (math.isfinite(diag) and diag > 0.0):
            raise FisherError(f"the inputs of {name!r} are all zero or not finite: no reconstruction term")
        out[name] = gram
    return out


def _reconstruction_gram(
    covariance: npt.NDArray[np.float64], numel: int, block_size: int
) -> npt.NDArray[np.float64]:
    """Blocks of ``I_out (x) E[x x^T]`` (row-major weights): two weights couple iff they share a row."""
    n_in = covariance.shape[0]
    n_blocks = -(-numel // block_size)
    flat = np.arange(n_blocks * block_size).reshape(n_blocks, block_size)
    valid = flat < numel
    row, col = flat // n_in, flat % n_in
    same_row = (row[:, :, None] == row[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    out: npt.NDArray[np.float64] = np.where(same_row, covariance[col[:, :, None], col[:, None, :]], 0.0)
    return out


def _mean_diagonal(gram: npt.NDArray[np.float64], numel: int) -> np.floating[Any]:
    return np.mean(np.diagonal(gram, axis1=1, axis2=2).reshape(-1)[:numel])


def _eval_logits(model: nn.Module, inputs: Tensor) -> Tensor:
    """The deployed function's outputs (eval mode, no graph), restoring the model's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out: Tensor = model(inputs)
    finally:
        model.train(was_training)
    return out


def _ggn_classes(model: nn.Module, probe: Tensor) -> int:
    """The number of classes of a classifier's ``(N, C)`` logits (the GGN's rows per sample)."""
    out = _eval_logits(model, probe)
    if out.dim() != 2:
        raise FisherError(
            f"curvature 'ggn' factors (N, C) logits with C rows per sample; the model gives shape "
            f"{tuple(out.shape)} (sequence outputs would need a row per position and class)"
        )
    return int(out.shape[1])


def _ggn_row_loss(out: Tensor, cls: Tensor) -> Tensor:
    """``sqrt(p_c) (z_c - p . z)``, ``p`` fixed: over ``c`` its gradients factor ``J^T (diag p - pp^T) J``."""
    p = torch.softmax(out, dim=-1).detach()
    z_c = out.gather(-1, cls.unsqueeze(-1)).squeeze(-1)
    p_c = p.gather(-1, cls.unsqueeze(-1)).squeeze(-1)
    return (p_c.sqrt() * (z_c - (p * out).sum(-1))).sum()


def _sampled_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def _curvature_rows(
    model: nn.Module,
    layers: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    curvature: Curvature,
    draws: torch.Generator,
) -> dict[str, tuple[npt.NDArray[np.floating[Any]], tuple[int, ...]]]:
    """Per layer: :func:`curvature_rows` for these samples as ``(rows, numel)``, and the parameter's shape."""
    grads = curvature_rows(model, layers, inputs, targets, loss_fn, curvature=curvature, generator=draws)
    out = {}
    for name in layers:
        g = grads.pop(name)
        shape = tuple(int(d) for d in g.shape[1:])
        if g.dtype not in (torch.float32, torch.float64):
            g = g.to(torch.float64)  # numpy has no bfloat16
        out[name] = (g.reshape(g.shape[0], -1).numpy(), shape)
    return out


def _blocked(flat: npt.NDArray[np.floating[Any]], block_size: int) -> npt.NDArray[np.float64]:
    """``(rows, numel)`` as float64 ``(rows, n_blocks, B)``, the last block zero-padded."""
    m, numel = flat.shape
    n_blocks = -(-numel // block_size)
    out = np.zeros((m, n_blocks * block_size), dtype=np.float64)
    out[:, :numel] = flat
    return out.reshape(m, n_blocks, block_size)
