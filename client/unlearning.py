"""The edge client's fixed-point Group-OBS prover (with the optional output refit), and what every
prover shares: enrollment's curvature factors, mask checks and proving options.

Each prover keeps a durable committed state (:mod:`zkunlearn.client.committed_state`): exactly the
tensors and blinding behind the commitments the provider holds. ``prove`` always derives the update
from that state, never from the live model, so a crash between updating and submitting cannot make the
client prove an update on top of an update; the live model is written from the committed state after
each update.

Group-OBS: per targeted layer, weights are scaled by ``2**e`` (unit spread), G is normalised to unit
mean diagonal (:mod:`zkunlearn.client.fisher`), blocks are solved in float64
(:mod:`zkunlearn.client.group_obs`), then rounded to the circuit's grid; only the batches the mask
touches are proved. The other provers: :mod:`.unlearning_exact` (exact Group-OBS),
:mod:`.analytic_exact` and :mod:`.analytic_unlearner` (analytic heads).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from zkunlearn.circuits.activations import activate
from zkunlearn.circuits.mask import LayerMask
from zkunlearn.client.committed_state import (
    CommittedStateProver,
    UnlearningError,
    already_answered,
    commit_tensor,
    input_scale,
    load_state,
    model_param,
    on_grid,
    refuse_overwrite,
    save_state,
)
from zkunlearn.client.fisher import (
    BlockFactors,
    Curvature,
    FisherError,
    fit_rows,
    layer_factors,
    with_shifted_copies,
)
from zkunlearn.client.group_obs import apply_group_obs
from zkunlearn.client.refit import OutputRefitError, capture_inputs, committed_rows, refit_following_layer
from zkunlearn.client.sdk import Commitment, UpdateResult, VerifiedRequest
from zkunlearn.proofs.artifacts import ClientCircuit
from zkunlearn.proofs.deletion import (
    GroupObsSpec,
    RefitSpec,
    commitment_name,
    layer_batches,
    request_digest,
    touched_batches,
)
from zkunlearn.proofs.fixedpoint import felts, random_blinding, theta_exponent
from zkunlearn.proofs.layout import BlockLayout, DeletionError, layer_layout
from zkunlearn.proofs.prover import (
    ProveJob,
    ProveResult,
    group_obs_tensors,
    new_group_obs_batch,
    prove_parallel,
)

F64 = npt.NDArray[np.float64]
LossFn = Callable[[Tensor, Tensor], Tensor]


def _staging_copy(model: nn.Module, staged: set[str]) -> nn.Module:
    """A copy of ``model`` to stage writes on, so that a refused enrollment never reaches the live
    model. Only the parameters named in ``staged`` are copied; every other parameter and buffer is
    shared (only read), so the copy costs the staged layers' memory, not the whole model's."""
    params = dict(model.named_parameters(remove_duplicate=False))
    copied = {id(p) for name, p in params.items() if name in staged}  # tied weights included
    buffers = [b for _name, b in model.named_buffers(remove_duplicate=False)]
    memo: dict[int, Any] = {id(t): t for t in [*params.values(), *buffers] if id(t) not in copied}
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # a model holding something uncopyable (a lock, a file)
        raise UnlearningError(f"cannot stage the enrollment on a copy of the model: {exc}") from exc


def enrollment_factors(
    model: nn.Module,
    spec: BlockLayout,
    layers: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    exclude: Tensor | None,
    curvature: Curvature,
    reconstruction_weight: float,
    fisher_shift: int,
) -> dict[str, BlockFactors]:
    """The enrolled layers' blockwise curvature factors, after refusing layers the spec cannot cut into
    whole blocks (:func:`zkunlearn.proofs.layout.layer_layout`; see :meth:`GroupObsUnlearner.enroll`
    for the curvature options)."""
    for layer in layers:
        try:
            layer_layout(layer, model_param(model, layer).numel(), spec)
        except DeletionError as exc:
            raise UnlearningError(str(exc)) from exc
    try:
        curv_inputs, curv_targets, curv_exclude = with_shifted_copies(inputs, targets, exclude, fisher_shift)
        return layer_factors(
            model, list(layers), curv_inputs, curv_targets, loss_fn, spec.block, curv_exclude,
            curvature=curvature, reconstruction_weight=reconstruction_weight,
        )  # fmt: skip
    except FisherError as exc:
        raise UnlearningError(f"cannot build the Fisher factor: {exc}") from exc


def check_mask_layer(layer_mask: LayerMask, meta: dict[str, Any], spec: BlockLayout) -> None:
    """The mask must describe the enrolled layer as it is: a mask of another shape with the same
    number of weights would otherwise be laid over the layer's flat order and zero other weights
    than the provider meant."""
    name = layer_mask.layer
    if name not in meta["layers"]:
        raise UnlearningError(f"the mask names {name!r}, which this client did not enroll")
    enrolled = tuple(int(n) for n in meta["layers"][name]["shape"])
    if tuple(layer_mask.shape) != enrolled:
        raise UnlearningError(
            f"the mask's layer {name!r} has shape {tuple(layer_mask.shape)}; the enrolled layer is {enrolled}"
        )
    if layer_mask.block_size != spec.block:
        raise UnlearningError(
            f"the mask's layer {name!r} has block size {layer_mask.block_size}, "
            f"the circuit's block is {spec.block}"
        )
    layer_batches(layer_mask, spec)


def _check_published(spec: GroupObsSpec | RefitSpec, where: str, **values: npt.ArrayLike) -> None:
    """Refuse values above the provider's published magnitudes (``<name>_bound`` on its spec): its
    tolerance and its circuit's range checks assume them, so an honest proof over larger ones could
    fail to generate or be rejected -- better said here, by name, than as a witness error minutes into
    proving."""
    for name, value in values.items():
        array = np.asarray(value, dtype=np.float64)
        peak = float(np.max(np.abs(array))) if array.size else 0.0
        bound = float(getattr(spec, f"{name}_bound"))
        if peak > bound:
            raise UnlearningError(
                f"{where}: |{name}| reaches {peak:.3g}, above the published {name}_bound {bound:.3g}; "
                "the provider must publish larger bounds for this model"
            )


@dataclass(frozen=True)
class ProveOptions:
    """How to prove: ``workers`` jobs at once, each worker's resident memory capped at
    ``memory_limit_mb`` (``None``: no cap); see :func:`zkunlearn.proofs.prover.prove_parallel`."""

    workers: int = 1
    memory_limit_mb: int | None = 4096
    progress: bool = True


class GroupObsUnlearner(CommittedStateProver):
    """Group-OBS update + proof for the targeted layers of one model (an ``UpdateProver``)."""

    #: Refuse to submit a proof whose input commitment is not the committed one (a corrupted state
    #: would only earn a rejection). Dishonest test clients turn it off to reach the provider.
    self_check: bool = True

    def __init__(
        self,
        model: nn.Module,
        spec: GroupObsSpec,
        circuit: ClientCircuit,
        state_dir: Path,
        options: ProveOptions | None = None,
        refits: Sequence[tuple[RefitSpec, ClientCircuit]] = (),
    ) -> None:
        self.model = model
        self.spec = spec
        self.circuit = circuit
        self.state_dir = Path(state_dir)
        self.options = options or ProveOptions()
        self.scale = input_scale(circuit)
        self.refits = tuple(refits)  # in the provider's published order: the proofs follow it

    # -- enrollment --------------------------------------------------------------------------------

    def enroll(
        self,
        layers: Sequence[str],
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        exclude: Tensor | None = None,
        curvature: Curvature = "ggn",
        reconstruction_weight: float = 0.0,
        fisher_shift: int = 0,
        *,
        replace: bool = False,
    ) -> list[Commitment]:
        """Fix the committed state (weights on the grid, Fisher factors, blinding) and commit to it.

        A ``state_dir`` that already holds a committed state is refused unless ``replace=True``.

        ``exclude`` marks client samples left out of the Fisher (e.g. of a kind the provider may ask to
        forget): the factor is committed now, before any request, so it must already leave them out.
        ``curvature`` (:mod:`zkunlearn.client.fisher`): the default Gauss-Newton factor recovers more
        accuracy than the empirical Fisher on classifiers; models with sequence outputs use ``"fisher"``
        (sampled labels) or ``"empirical"``. The circuit checks the update against whichever factor
        is committed. ``reconstruction_weight`` adds the layers' reconstruction curvature to it
        (:func:`zkunlearn.client.fisher.layer_factors`; the code LM benchmark's setting uses 0.3).
        ``fisher_shift`` (image models) adds copies of the images moved that many pixels to the
        curvature's inputs (:func:`zkunlearn.client.fisher.shifted_copies`; the ViT's setting uses 1);
        the output refit's committed rows stay the client's own samples.
        """
        spec, scale = self.spec, self.scale
        refuse_overwrite(self.state_dir, replace)
        if inputs.shape[0] < 1:
            raise UnlearningError("enrollment needs client samples for the Fisher factor")
        # Everything is computed and checked before the state is saved, and the live model is written
        # from the saved state only: a refused enrollment leaves the model exactly as it was.
        arrays: dict[str, F64] = {}
        meta: dict[str, Any] = {
            "layers": {},
            "last_request": None,
            "curvature": curvature,
            "reconstruction_weight": reconstruction_weight,
            "fisher_shift": fisher_shift,
        }
        for layer in layers:
            numel = model_param(self.model, layer).numel()
            try:
                padded = layer_layout(layer, numel, spec).padding_blocks
            except DeletionError as exc:
                raise UnlearningError(str(exc)) from exc
            if padded:  # padded batches are a rule of the exact relation only
                raise UnlearningError(
                    f"{layer}: {numel} weights are not a multiple of batch x block = {spec.batch_weights} "
                    "(the fixed-point relation has no padding blocks; the exact relation pads)"
                )
        all_factors = enrollment_factors(
            self.model, spec, layers, inputs, targets, loss_fn, exclude, curvature, reconstruction_weight,
            fisher_shift,
        )  # fmt: skip
        fitted = {n: fit_rows(f.factors, spec.m) for n, f in all_factors.items()}
        to_commit: list[tuple[str, int, ClientCircuit, F64]] = []
        for layer in layers:
            param = model_param(self.model, layer)
            n_batches = param.numel() // spec.batch_weights
            factors = all_factors[layer]
            g = fitted[layer]  # (n_blocks, m, B), unit mean diagonal
            weight = param.detach().double().cpu().numpy().reshape(-1)
            if not np.isfinite(weight).all():
                raise UnlearningError(f"{layer} has non-finite weights; they cannot be committed")
            exponent = theta_exponent(weight, max_abs=spec.theta_bound)
            theta = on_grid(weight * 2.0**exponent, scale).reshape(n_batches, spec.batch, spec.block)
            g = on_grid(g, scale).reshape(n_batches, spec.batch, spec.m, spec.block)
            _check_published(spec, f"enrolling {layer}", g=g)
            theta_blind = np.stack(
                [
                    np.stack([random_blinding(spec.n_blind, scale) for _ in range(spec.batch)])
                    for _ in range(n_batches)
                ]
            )
            g_blind = np.stack(
                [
                    np.stack([random_blinding(spec.block, scale) for _ in range(spec.batch)])
                    for _ in range(n_batches)
                ]
            )
            for b in range(n_batches):
                theta_tensor = np.concatenate([theta[b], theta_blind[b]], axis=1)
                to_commit.append((commitment_name("theta", layer), b, self.circuit, theta_tensor))
                g_tensor = np.concatenate([g[b], g_blind[b][:, None, :]], axis=1)
                to_commit.append((commitment_name("g", layer), b, self.circuit, g_tensor))
            arrays |= {
                f"{layer}/theta": theta,
                f"{layer}/g": g,
                f"{layer}/theta_blind": theta_blind,
                f"{layer}/g_blind": g_blind,
            }
            meta["layers"][layer] = {
                "exponent": exponent,
                "g_scale": factors.scale,
                "shape": list(param.shape),
            }
        refits = [(refit, circuit) for refit, circuit in self.refits if refit.masked in layers]
        if refits:
            retained = inputs if exclude is None else inputs[~exclude.to(torch.bool)]
            # A refit's rows are the inputs of its masked layer as the model computes them once the
            # layers before it hold their committed values: stage those writes on a copy.
            staged = set(layers)
            for refit, _circuit in refits:
                staged |= {f"{refit.following}.weight", f"{refit.following}.bias"}
                staged |= {refit.masked_bias} if refit.masked_bias else set()
            scratch = _staging_copy(self.model, staged)
            self._write_params(scratch, arrays, meta)
            for refit, circuit in refits:
                to_commit += self._enroll_refit(refit, circuit, retained, meta, arrays, scratch)
        commitments = [
            Commitment(name, b, commit_tensor(circuit, t, scale)) for name, b, circuit, t in to_commit
        ]
        meta["commitments"] = [c.to_json() for c in commitments]
        save_state(self.state_dir, arrays, meta)
        self.load_model()
        return commitments

    def _enroll_refit(
        self,
        refit: RefitSpec,
        circuit: ClientCircuit,
        retained: Tensor,
        meta: dict[str, Any],
        arrays: dict[str, F64],
        model: nn.Module,
    ) -> list[tuple[str, int, ClientCircuit, F64]]:
        """The refit's inputs to commit: ``n`` rows of the masked layer's inputs (evenly spaced over the
        retained data, pre-scaled by the layer's ``2**-e``), its bias and the following layer. Read
        from, and written to, ``model``: the staging copy, never the live model."""
        scale, masked_module = self.scale, refit.masked.rsplit(".", 1)[0]
        try:
            z = capture_inputs(model, [masked_module], retained)[masked_module].numpy()
            following = model.get_submodule(refit.following)
        except (OutputRefitError, AttributeError) as exc:
            raise UnlearningError(f"refit {refit.masked} -> {refit.following}: {exc}") from exc
        if not isinstance(following, nn.Linear) or following.bias is None:
            raise UnlearningError(f"refit target {refit.following!r} must be an nn.Linear with a bias")
        if z.shape[0] < refit.n or z.shape[1] != refit.d_in:
            raise UnlearningError(
                f"refit of {refit.following} needs {refit.n} rows of width {refit.d_in}; "
                f"the retained data gives {z.shape[0]} of width {z.shape[1]}"
            )
        if tuple(following.weight.shape) != (refit.d_out, refit.hidden):
            raise UnlearningError(
                f"{refit.following} is {tuple(following.weight.shape)}, the circuit expects "
                f"({refit.d_out}, {refit.hidden})"
            )
        exponent = int(meta["layers"][refit.masked]["exponent"])
        rows = committed_rows(z.shape[0], refit.n)
        z_scaled = on_grid(z[rows] * 2.0**-exponent, scale)
        bias = (
            model_param(model, refit.masked_bias).detach() if refit.masked_bias else torch.zeros(refit.hidden)
        )
        b1 = on_grid(bias.double().cpu().numpy().reshape(1, -1), scale)
        v = np.hstack(
            [following.weight.detach().double().numpy(), following.bias.detach().double().numpy()[:, None]]
        )
        v = on_grid(v, scale)
        if list(meta["layers"][refit.masked]["shape"]) != [refit.hidden, refit.d_in]:
            raise UnlearningError(
                f"{refit.masked} is {meta['layers'][refit.masked]['shape']}, the circuit expects "
                f"[{refit.hidden}, {refit.d_in}]"
            )
        theta = arrays[f"{refit.masked}/theta"].reshape(refit.hidden, refit.d_in)
        # z_scaled theta^T = z W1^T: the pre-activations the circuit computes, with its activation.
        hidden = activate(torch.from_numpy(z_scaled @ theta.T + b1), refit.activation).numpy()  # type: ignore[arg-type]
        outputs = np.hstack([hidden, np.ones((refit.n, 1))]) @ v.T
        _check_published(
            refit,
            f"refit of {refit.following}",
            z=z_scaled,
            w=max(np.abs(theta).max(), np.abs(b1).max()),
            v=v,
            h=hidden,
            y=outputs,
        )
        key = f"refit/{refit.following}"
        arrays |= {
            f"{key}/z": z_scaled,
            f"{key}/z_blind": random_blinding(refit.d_in, scale)[None, :],
            f"{key}/b1": b1,
            f"{key}/b1_blind": random_blinding(refit.hidden, scale)[None, :],
            f"{key}/v": v,
            f"{key}/v_blind": random_blinding(refit.hidden + 1, scale)[None, :],
        }
        meta.setdefault("refits", {})[refit.following] = {"masked": refit.masked, "bias": refit.masked_bias}
        self._write_refit_params(refit, arrays, model)
        return [
            (
                commitment_name(kind, name),
                0,
                circuit,
                np.vstack([arrays[f"{key}/{kind}"], arrays[f"{key}/{kind}_blind"]]),
            )
            for kind, name in (("z", refit.masked), ("b1", refit.masked), ("v", refit.following))
        ]

    def _write_refit_params(self, refit: RefitSpec, arrays: dict[str, F64], model: nn.Module) -> None:
        """``model``'s following layer (and the masked layer's bias) from the committed state."""
        key = f"refit/{refit.following}"
        following = model.get_submodule(refit.following)
        if not isinstance(following, nn.Linear) or following.bias is None:
            raise UnlearningError(f"refit target {refit.following!r} must be an nn.Linear with a bias")
        v = arrays[f"{key}/v"]
        with torch.no_grad():
            following.weight.copy_(torch.from_numpy(v[:, :-1]).to(following.weight.dtype))
            following.bias.copy_(torch.from_numpy(v[:, -1]).to(following.bias.dtype))
            if refit.masked_bias:
                param = model_param(model, refit.masked_bias)
                param.copy_(torch.from_numpy(arrays[f"{key}/b1"][0]).to(param.dtype))

    def committed_factor(self, layer: str) -> F64:
        """The curvature factor every later proof of ``layer`` is checked against, one ``(m, B)``
        slab per block on the fixed-point grid, in rows of unit mean diagonal.

        The provider cannot tell one honest curvature from another (any G satisfies the relation),
        so a wrong factor committed at enrollment — another curvature, a missing reconstruction
        term — only ever shows as lost accuracy. This lets the device's owner check what was
        committed against what it meant to commit; blinding factors stay private.
        """
        arrays, meta = load_state(self.state_dir)
        if layer not in meta.get("layers", {}):
            raise UnlearningError(
                f"no committed factor for layer {layer!r}; enrolled layers: {sorted(meta.get('layers', {}))}"
            )
        g = arrays[f"{layer}/g"]
        return g.reshape(-1, self.spec.m, self.spec.block).copy()

    # -- deletion ----------------------------------------------------------------------------------

    def compensate(self, theta: F64, g: F64, layer_mask: LayerMask, lam: float) -> tuple[F64, F64]:
        """The Group-OBS update of one layer (scaled units): new weights and the per-block witnesses."""
        flat = theta.reshape(-1)
        n_blocks = flat.size // self.spec.block
        factors = BlockFactors(
            layer_mask.layer, self.spec.block, g.reshape(n_blocks, self.spec.m, self.spec.block), 1.0
        )
        new, updates = apply_group_obs(flat.reshape(layer_mask.shape), factors, layer_mask, lam)
        w = np.zeros((n_blocks, self.spec.m))
        whole = {b for b, offsets in layer_mask.blocks.items() if len(offsets) == layer_mask.block_length(b)}
        for block, update in updates.items():
            # w witnesses the edit's row space on the unmasked coordinates only; a block masked whole
            # has none, and its Woodbury weights (-G delta / (m lam), large when a whole row is removed)
            # would only strain the published w bound.
            if block not in whole:
                w[block] = update.w
        return np.asarray(new, dtype=np.float64).reshape(theta.shape), w

    def prove(self, request: VerifiedRequest) -> UpdateResult:
        arrays, meta = load_state(self.state_dir)
        done = already_answered(meta, request.request_id)
        if done is not None:
            self.load_model()  # the answer's weights, if a failure cut the first attempt short of this
            return done
        mine = {(c["name"], c["block"]): c["point_hex"] for c in meta["commitments"]}
        theirs = {(c.name, c.block): c.point_hex for c in request.before_commitments}
        if theirs and theirs != mine:
            raise UnlearningError("the provider's record of our commitments differs from our committed state")
        spec, scale = self.spec, self.scale
        for layer_mask in request.mask.layers:
            self._check_mask_layer(layer_mask, meta)
        batches = touched_batches(request.mask, spec)
        if not batches:
            raise UnlearningError("the request's mask touches no weights")
        digest = request_digest(request.canonical)
        jobs: list[ProveJob] = []
        pending: list[tuple[str, int, Any]] = []
        new_theta: dict[str, F64] = {}
        for layer_mask in request.mask.layers:
            name = layer_mask.layer
            theta, g = arrays[f"{name}/theta"], arrays[f"{name}/g"]
            after, w = self.compensate(theta, g, layer_mask, spec.lam)
            after = on_grid(after, scale)
            dense = layer_mask.dense().reshape(theta.shape).astype(bool)
            after[dense] = 0.0  # exactly zero: r_mask has no tolerance
            new_theta[name] = after
            w = w.reshape(theta.shape[0], spec.batch, spec.m)
            for layer_name, b in batches:
                if layer_name != name:
                    continue
                _check_published(spec, f"{name} batch {b}", theta=after[b], w=w[b])
                batch = new_group_obs_batch(
                    theta[b],
                    after[b],
                    g[b],
                    dense[b],
                    w[b],
                    scale=scale,
                    n_blind=spec.n_blind,
                    theta_blind=arrays[f"{name}/theta_blind"][b],
                    g_blind=arrays[f"{name}/g_blind"][b],
                )
                tensors = group_obs_tensors(batch, digest, scale, spec.n_blind)
                c = self.circuit
                jobs.append(ProveJob(tensors, c.compiled, c.vk, c.pk, c.srs.path, label=f"{name}#{b}"))
                pending.append((name, b, batch))
        # Refits read theta' with the blinding its Group-OBS proof committed it with.
        after_blind = {name: arrays[f"{name}/theta_blind"].copy() for name in new_theta}
        for name, b, batch in pending:
            after_blind[name][b] = batch.theta_after_blind
        refit_updates: list[tuple[RefitSpec, F64, F64]] = []
        touched_layers = {name for name, _ in batches}  # the provider expects refits for exactly these
        for refit, circuit in self.refits:
            if refit.masked in touched_layers:
                job, v_new, v_blind = self._refit_job(
                    refit, circuit, arrays, meta, new_theta[refit.masked], after_blind[refit.masked]
                )
                jobs.append(job)
                refit_updates.append((refit, v_new, v_blind))
        results: list[ProveResult] = prove_parallel(
            jobs,
            workers=self.options.workers,
            memory_limit_mb=self.options.memory_limit_mb,
            progress=self.options.progress,
        )
        after_commitments = dict(mine)
        for (refit, v_new, v_blind), result in zip(refit_updates, results[len(pending) :], strict=True):
            if self.self_check and result.commitments[0] != mine[(commitment_name("z", refit.masked), 0)]:
                raise UnlearningError(f"refit of {refit.following}: the proof's z is not our committed z")
            after_commitments[(commitment_name("v", refit.following), 0)] = result.commitments[-1]
            arrays[f"refit/{refit.following}/v"] = v_new
            arrays[f"refit/{refit.following}/v_blind"] = v_blind
        for (name, b, batch), result in zip(pending, results[: len(pending)], strict=True):
            if self.self_check and result.commitments[0] != mine[(commitment_name("theta", name), b)]:
                raise UnlearningError(f"{name} batch {b}: the proof's theta is not our committed theta")
            after_commitments[(commitment_name("theta", name), b)] = result.commitments[1]
            arrays[f"{name}/theta_blind"][b] = batch.theta_after_blind
        for name, after in new_theta.items():
            arrays[f"{name}/theta"] = after
        return self._save_answer(request.request_id, after_commitments, results, arrays, meta)

    def _check_mask_layer(self, layer_mask: LayerMask, meta: dict[str, Any]) -> None:
        check_mask_layer(layer_mask, meta, self.spec)

    def _refit_job(
        self,
        refit: RefitSpec,
        circuit: ClientCircuit,
        arrays: dict[str, F64],
        meta: dict[str, Any],
        theta_after: F64,
        after_blind: F64,
    ) -> tuple[ProveJob, F64, F64]:
        """The refit of one pair from committed values only, and the job that proves it."""
        scale, key = self.scale, f"refit/{refit.following}"
        if refit.following not in meta.get("refits", {}):
            raise UnlearningError(f"the refit of {refit.following} was not enrolled")
        exponent = int(meta["layers"][refit.masked]["exponent"])
        theta = arrays[f"{refit.masked}/theta"]  # (n_batches, batch, block), scaled by 2**e
        shape = (refit.hidden, refit.d_in)
        v0 = arrays[f"{key}/v"]
        try:
            fit = refit_following_layer(
                arrays[f"{key}/z"] * 2.0**exponent,
                theta.reshape(shape) * 2.0**-exponent,
                arrays[f"{key}/b1"][0],
                theta_after.reshape(shape) * 2.0**-exponent,
                v0[:, :-1],
                v0[:, -1],
                refit.activation,  # type: ignore[arg-type]
                refit.rel_lam,
            )
        except OutputRefitError as exc:
            raise UnlearningError(f"refit of {refit.following}: {exc}") from exc
        v_new = on_grid(np.hstack([fit.weight, fit.bias[:, None]]), scale)
        _check_published(refit, f"refit of {refit.following}", v=v_new)
        v_blind = random_blinding(refit.hidden + 1, scale)[None, :]
        before_blind = arrays[f"{refit.masked}/theta_blind"]
        n_batches = theta.shape[0]
        tensors = [
            np.vstack([arrays[f"{key}/z"], arrays[f"{key}/z_blind"]]),
            *(np.concatenate([theta[b], before_blind[b]], axis=1) for b in range(n_batches)),
            np.vstack([arrays[f"{key}/b1"], arrays[f"{key}/b1_blind"]]),
            *(np.concatenate([theta_after[b], after_blind[b]], axis=1) for b in range(n_batches)),
            np.vstack([v0, arrays[f"{key}/v_blind"]]),
            np.vstack([v_new, v_blind]),
        ]
        job = ProveJob(
            [felts(t, scale) for t in tensors],
            circuit.compiled,
            circuit.vk,
            circuit.pk,
            circuit.srs.path,
            label=f"refit {refit.following}",
        )
        return job, v_new, v_blind

    def load_model(self) -> None:
        """Write the committed weights into the live model (e.g. after a restart)."""
        arrays, meta = load_state(self.state_dir)
        self._write_params(self.model, arrays, meta)
        for refit, _circuit in self.refits:
            if refit.following in meta.get("refits", {}):
                self._write_refit_params(refit, arrays, self.model)

    def _write_params(self, model: nn.Module, arrays: dict[str, F64], meta: dict[str, Any]) -> None:
        for name, info in meta["layers"].items():
            param = model_param(model, name)
            value = arrays[f"{name}/theta"].reshape(info["shape"]) / 2.0 ** int(info["exponent"])
            with torch.no_grad():
                param.copy_(torch.from_numpy(value).to(param.dtype))
