"""Training loops for the global, personalized, fine-tuned and retrained-from-scratch models.

Models are cached under ``~/.cache/zkunlearn/models/<hash>.pt`` where the hash covers everything that
decides the weights (model config, data identity, seed, epochs, learning rate, code version), so a
rerun of the benchmark only pays for what changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zkunlearn.errors import MalformedError
from zkunlearn.tasks.data import cache_root, save_atomically

LossFn = Callable[[Tensor, Tensor], Tensor]

# Bump when a training loop changes in a way that changes the weights it produces.
CACHE_VERSION = "2"


class TrainError(MalformedError):
    """Training was asked for something it cannot do."""


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Classification or next-token loss: flattens (N, T, V) logits against (N, T) targets."""
    if out.dim() == 3:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def cache_dir() -> Path:
    path = cache_root() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(spec: Mapping[str, Any]) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached(model: nn.Module, spec: Mapping[str, Any], build: Callable[[nn.Module], None]) -> nn.Module:
    """Load ``model``'s weights for ``spec`` from disk, or run ``build(model)`` in place and store them."""
    path = cache_dir() / f"{cache_key(spec)}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    build(model)
    save_atomically(model.state_dict(), path)
    return model


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
    loss_fn: LossFn = cross_entropy,
    frozen_zero: Mapping[str, Tensor] | None = None,
    trainable: Sequence[str] | None = None,
    movable: Mapping[str, Tensor] | None = None,
) -> list[float]:
    """AdamW with a cosine schedule; returns the mean loss of each epoch.

    ``frozen_zero`` maps parameter names to boolean masks of weights that must stay exactly zero (the
    deletion mask kept during fine-tuning): their gradients are dropped and they are re-zeroed after
    every step, since AdamW's weight decay and momentum would otherwise move them. ``trainable`` names
    the only parameters the optimizer may move (default: all). ``movable`` narrows a trainable
    parameter to the weights its boolean mask marks: the others are put back after every step (a
    support finer than whole tensors, such as Group-OBS's touched blocks).
    """
    if x.shape[0] != y.shape[0]:
        raise TrainError(f"{x.shape[0]} inputs but {y.shape[0]} targets")
    if x.shape[0] == 0:
        raise TrainError("no training samples")
    if epochs < 0:
        raise TrainError(f"epochs must be >= 0, got {epochs}")
    named = dict(model.named_parameters())
    frozen = {}
    for name, keep_zero in (frozen_zero or {}).items():
        if name not in named:
            raise TrainError(f"frozen mask names unknown parameter {name!r}")
        frozen[name] = (named[name], torch.as_tensor(keep_zero, dtype=torch.bool))
    unknown = sorted(set(trainable or ()) - named.keys())
    if unknown:
        raise TrainError(f"trainable names unknown parameters {unknown}")
    held: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for name, may_move in (movable or {}).items():
        if name not in named:
            raise TrainError(f"movable mask names unknown parameter {name!r}")
        stay = ~torch.as_tensor(may_move, dtype=torch.bool)
        held[name] = (named[name], stay, named[name].detach()[stay].clone())
    params = list(model.parameters()) if trainable is None else [named[n] for n in trainable]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * ((x.shape[0] + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history: list[float] = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        total, count = 0.0, 0
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            for param, keep_zero in frozen.values():
                if param.grad is not None:
                    param.grad[keep_zero] = 0.0
            opt.step()
            sched.step()
            with torch.no_grad():
                for weights, stay, value in held.values():
                    weights[stay] = value
                for param, keep_zero in frozen.values():
                    param[keep_zero] = 0.0
            total += float(loss.detach()) * idx.shape[0]
            count += idx.shape[0]
        history.append(total / count)
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Logits in eval mode, batched so large test sets fit in memory."""
    model.eval()
    outs = [model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def train_cached(
    make: Callable[[], nn.Module],
    spec: Mapping[str, Any],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    start_from: nn.Module | None = None,
) -> nn.Module:
    """Train ``make()`` (or a copy of ``start_from``) on (x, y), reusing a cached result for ``spec``.

    ``spec`` must identify the data and any starting model; the loop's own settings are added here.
    """
    full = {**spec, "epochs": epochs, "lr": lr, "seed": seed, "batch_size": batch_size}
    if start_from is None:
        torch.manual_seed(seed)
        model = make()
    else:
        model = copy.deepcopy(start_from)

    def build(m: nn.Module) -> None:
        fit(m, x, y, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size)

    return cached(model, full, build)


def masked_copy(model: nn.Module, dense: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` with the masked weights set to zero (the "mask-only" baseline)."""
    out = copy.deepcopy(model)
    named = dict(out.named_parameters())
    with torch.no_grad():
        for name, keep_zero in dense.items():
            if name not in named:
                raise TrainError(f"mask names unknown parameter {name!r}")
            named[name][torch.as_tensor(keep_zero, dtype=torch.bool)] = 0.0
    return out


def finetune_masked(
    model: nn.Module,
    dense: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    trainable: Sequence[str] | None = None,
    movable: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Mask, then fine-tune on the client's remaining data with the masked weights held at zero.

    ``trainable`` limits the fine-tune to those parameters, ``movable`` to those weights of them.
    Group-OBS may change only the unmasked weights of the blocks a mask touches: a fine-tune with
    exactly that ``movable`` is what a gradient method finds on its support; one of the masked layers
    as a whole moves more weights than Group-OBS ever can.
    """
    out = masked_copy(model, dense)
    fit(
        out, x, y, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size, frozen_zero=dense,
        trainable=trainable, movable=movable,
    )  # fmt: skip
    return out
