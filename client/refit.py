"""Output refit: after Group-OBS edits a masked layer, re-solve the *next* linear layer in closed form.

Why it exists: Group-OBS is block-diagonal. Each block compensates only its own masked weights, in a
linearisation that breaks down when a large share of a layer is masked. On the ViT, almost all of the
accuracy Group-OBS leaves lost comes from one layer (``blocks.0.fc1``, 45 % masked), and only updates
that let *other* weights absorb the damage get it back (``bench/results/unlearning_diagnosis.md``).
The layer right after the masked one is the natural place: for a two-layer MLP ``y = W2 act(W1 z + b1)
+ b2`` whose ``W1`` was edited, the best ``W2`` for reproducing the personalized model's outputs on the
client's own data is a ridge regression, exact (no linearisation: the masked hidden activations are
computed, not approximated) and cheap (one SPD solve of size ``hidden + 1`` per layer).

Per pair (masked layer ``W1``, following layer ``[W2 | b2]``), with ``z`` the masked layer's inputs in
the *personalized* model on the client's retained data (``n`` rows: every token of every sample),

    H  = act(z W1'^T + b1),  H1 = [H, 1]          (hidden activations after the edit)
    T  = act(z W1^T + b1) W2^T + b2               (the MLP's output before the request)
    A  = H1^T H1 / n,  C = T^T H1 / n,  lam = rel_lam * mean(diag A)
    [W2' | b2'] = (C + lam [W2 | b2]) (A + lam I)^{-1}

i.e. the minimiser of ``||H1 V^T - T||^2 / n + lam ||V - [W2 | b2]||^2``. The ridge pulls towards the
personalized weights, not towards zero, so with little data the layer stays where it was. Every
input is fixed before the request except ``W1'`` (the proven Group-OBS output) and the mask, so the
refit is a deterministic function of committed values: the client chooses nothing after seeing the
request. ``zkunlearn.circuits.output_refit`` checks exactly these normal equations, and ``act`` is the
circuit's own (``zkunlearn.circuits.activations``: ReLU exactly, GELU within a certified 7e-5 of the erf
form), so the client solves the very regression the proof checks.

The following layer must not itself be masked: a refit towards the personalized outputs would write
the masked weights back. ``apply_output_refit`` refuses such a pair.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from zkunlearn.circuits.activations import ACTIVATIONS, Activation, activate

from zkunlearn.errors import MalformedError

__all__ = [
    "ACTIVATIONS",
    "OutputRefitError",
    "RefitPair",
    "RefitResult",
    "apply_output_refit",
    "capture_inputs",
    "committed_rows",
    "refit_following_layer",
]

F64 = npt.NDArray[np.float64]
# Rows of z per chunk when accumulating the Gram matrices: bounds peak memory (~chunk x hidden doubles).
_CHUNK_ROWS = 8192


class OutputRefitError(MalformedError):
    """The refit's inputs are inconsistent (shapes, names, a masked following layer, non-finite data)."""


@dataclass(frozen=True)
class RefitPair:
    """A masked linear layer, the linear layer its activations feed, and the activation between them."""

    masked: str  # module name, e.g. "blocks.0.fc1"
    following: str  # module name, e.g. "blocks.0.fc2"
    activation: Activation

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise OutputRefitError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.masked == self.following:
            raise OutputRefitError(f"pair refits {self.masked!r} onto itself")


@dataclass(frozen=True)
class RefitResult:
    """The new ``[W2 | b2]`` and how well it reproduces the personalized outputs on the client's data."""

    weight: F64  # (d_out, hidden)
    bias: F64  # (d_out,)
    lam: float  # absolute damping used (rel_lam * mean diag of A)
    rows: int  # n, the rows of z
    error_before: float  # ||H1 [W2|b2]^T - T||^2 / (n d_out): the masked layer's damage at the output
    error_after: float  # the same with the refit weights


def _f64(t: npt.ArrayLike | Tensor, what: str, ndim: int) -> Tensor:
    out = t.detach().cpu() if isinstance(t, Tensor) else torch.as_tensor(np.asarray(t))
    out = out.to(torch.float64)
    if out.ndim != ndim:
        raise OutputRefitError(f"{what} must have {ndim} dimensions, got shape {tuple(out.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise OutputRefitError(f"{what} contains NaN or inf")
    return out


def refit_following_layer(
    z: npt.ArrayLike | Tensor,
    w1_before: npt.ArrayLike | Tensor,
    b1: npt.ArrayLike | Tensor,
    w1_after: npt.ArrayLike | Tensor,
    w2: npt.ArrayLike | Tensor,
    b2: npt.ArrayLike | Tensor,
    activation: Activation,
    rel_lam: float,
) -> RefitResult:
    """The ridge refit of ``[W2 | b2]`` (see the module docstring), float64 throughout.

    The Gram matrices are accumulated over chunks of rows, so memory is ``O(chunk x hidden +
    hidden^2)`` whatever ``n``; the solve is one Cholesky of ``A + lam I`` (SPD for any ``lam > 0``).
    """
    if activation not in ACTIVATIONS:
        raise OutputRefitError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not (math.isfinite(rel_lam) and rel_lam > 0):
        raise OutputRefitError(f"rel_lam must be a positive finite number, got {rel_lam}")
    zz = _f64(z, "z", 2)
    w1o, w1n = _f64(w1_before, "w1_before", 2), _f64(w1_after, "w1_after", 2)
    bb1, ww2, bb2 = _f64(b1, "b1", 1), _f64(w2, "w2", 2), _f64(b2, "b2", 1)
    hidden, d_in = w1o.shape
    if zz.shape[0] == 0:
        raise OutputRefitError("z has no rows: the refit needs the client's data")
    if zz.shape[1] != d_in or w1n.shape != w1o.shape or bb1.shape != (hidden,):
        raise OutputRefitError(
            f"shape mismatch: z {tuple(zz.shape)}, w1_before {tuple(w1o.shape)}, "
            f"w1_after {tuple(w1n.shape)}, b1 {tuple(bb1.shape)}"
        )
    if ww2.shape[1] != hidden or bb2.shape != (ww2.shape[0],):
        raise OutputRefitError(
            f"shape mismatch: w2 {tuple(ww2.shape)} must be (d_out, {hidden}), "
            f"b2 {tuple(bb2.shape)} must be (d_out,)"
        )
    v0 = torch.cat([ww2, bb2[:, None]], dim=1)  # (d_out, hidden + 1)
    n = zz.shape[0]
    A = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
    C = torch.zeros(ww2.shape[0], hidden + 1, dtype=torch.float64)
    tt = torch.zeros((), dtype=torch.float64)
    for lo in range(0, n, _CHUNK_ROWS):
        chunk = zz[lo : lo + _CHUNK_ROWS]
        ones = torch.ones(chunk.shape[0], 1, dtype=torch.float64)
        h1 = torch.cat([activate(chunk @ w1n.T + bb1, activation), ones], dim=1)
        target = activate(chunk @ w1o.T + bb1, activation) @ ww2.T + bb2
        A += h1.T @ h1
        C += target.T @ h1
        tt += (target * target).sum()
    A /= n
    C /= n
    tt /= n
    lam = rel_lam * float(A.diagonal().mean())
    system = A + lam * torch.eye(hidden + 1, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise OutputRefitError(f"refit system is not positive definite (rel_lam {rel_lam} too small?)")
    v = torch.cholesky_solve((C + lam * v0).T, chol).T

    def error(vv: Tensor) -> float:  # ||H1 V^T - T||^2 / n from the Gram matrices alone
        return float(tt - 2 * (vv * C).sum() + (vv @ A * vv).sum()) / ww2.shape[0]

    return RefitResult(
        weight=v[:, :-1].numpy().copy(),
        bias=v[:, -1].numpy().copy(),
        lam=lam,
        rows=n,
        error_before=error(v0),
        error_after=error(v),
    )


def capture_inputs(
    model: nn.Module, modules: Sequence[str], inputs: Tensor, *, batch_size: int = 256
) -> dict[str, Tensor]:
    """Every row each named linear module sees on ``inputs`` (eval mode, no grad), as float64 ``(n, d_in)``.

    For a transformer a "row" is one token of one sample; the refit fits all of them.
    """
    seen: dict[str, list[Tensor]] = {name: [] for name in modules}
    hooks = []
    for name in modules:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise OutputRefitError(f"model has no submodule {name!r}") from exc
        if not isinstance(module, nn.Linear):
            raise OutputRefitError(f"{name!r} is a {type(module).__name__}, not nn.Linear")

        def keep(_m: nn.Module, args: tuple[Tensor, ...], _out: Tensor, name: str = name) -> None:
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64))

        hooks.append(module.register_forward_hook(keep))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for lo in range(0, inputs.shape[0], batch_size):
                model(inputs[lo : lo + batch_size])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def committed_rows(total: int, n: int) -> npt.NDArray[np.int64]:
    """Indices of the ``n`` rows of ``z`` (out of ``total``) that enrollment commits and the proof fits.

    Evenly spaced, so they cover every sample and token position the client saw rather than its first
    ``n`` tokens; a deterministic function of ``(total, n)``, so the SDK and the benchmark fit the same
    rows.
    """
    if not 1 <= n <= total:
        raise OutputRefitError(f"cannot commit {n} rows out of {total}: the refit needs 1 <= n <= rows")
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def apply_output_refit(
    personalized: nn.Module,
    compensated: nn.Module,
    pairs: Sequence[RefitPair],
    inputs: Tensor,
    rel_lam: float,
    masked_layers: Sequence[str],
    *,
    rows: int | None = None,
) -> tuple[nn.Module, Mapping[str, RefitResult]]:
    """A copy of ``compensated`` with each pair's following layer refit; ``masked_layers`` are parameter
    names of the mask (``"blocks.0.fc1.weight"``), checked so no pair refits a masked layer.

    ``inputs`` are the client's retained samples (the same ones its curvature was computed on, without
    the data the request told it to leave out). ``rows``: fit only the ``committed_rows`` of each
    masked layer's inputs, as the protocol does (it commits ``n`` rows, not every token); ``None`` fits
    all of them.
    """
    masked_modules = {name.removesuffix(".weight").removesuffix(".bias") for name in masked_layers}
    for pair in pairs:
        if pair.following in masked_modules:
            raise OutputRefitError(
                f"{pair.following!r} is masked: refitting it towards the personalized outputs "
                "would undo the mask"
            )
    if len({p.following for p in pairs}) != len(pairs):
        raise OutputRefitError("two pairs refit the same following layer")
    z = capture_inputs(personalized, [p.masked for p in pairs], inputs)
    out = copy.deepcopy(compensated)
    results: dict[str, RefitResult] = {}
    for pair in pairs:
        before = personalized.get_submodule(pair.masked)
        after = out.get_submodule(pair.masked)
        following = out.get_submodule(pair.following)
        if not isinstance(following, nn.Linear) or following.bias is None:
            raise OutputRefitError(f"{pair.following!r} must be an nn.Linear with a bias")
        if not isinstance(before, nn.Linear) or before.bias is None or not isinstance(after, nn.Linear):
            raise OutputRefitError(f"{pair.masked!r} must be an nn.Linear with a bias")
        if after.bias is None or not torch.equal(before.bias, after.bias):
            raise OutputRefitError(f"{pair.masked!r}'s bias changed: the relation keeps b1 as personalized")
        layer_inputs = z[pair.masked]
        if rows is not None:
            layer_inputs = layer_inputs[torch.from_numpy(committed_rows(layer_inputs.shape[0], rows))]
        res = refit_following_layer(
            layer_inputs, before.weight, before.bias, after.weight,
            following.weight, following.bias, pair.activation, rel_lam,
        )  # fmt: skip
        with torch.no_grad():
            following.weight.copy_(torch.from_numpy(res.weight).to(following.weight.dtype))
            following.bias.copy_(torch.from_numpy(res.bias).to(following.bias.dtype))
        results[pair.following] = res
    return out, results
