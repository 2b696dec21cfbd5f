"""Group-OBS under the exact relation on the device: enrollment with its proofs, then proven deletions.

State (``state_dir``, saved atomically as :mod:`zkunlearn.client.unlearning` saves it): per enrolled
layer the weights ``theta`` (normalised by ``2**e``, on the ``2**-theta_bits`` grid) and the factor
``g`` (unit mean diagonal over the layer, on ``2**-g_bits``), both float64 and exact on their grids;
and a secret seed from which every blinding element is derived (``sha512(seed, label) mod p``: full
field elements, so the commitments hide the weights). ``meta["theta_labels"]`` names the blinding of
each batch's current ``theta`` commitment.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from zkunlearn.circuits.mask import LayerMask
from zkunlearn.client.committed_state import (
    CommittedStateProver,
    UnlearningError,
    already_answered,
    load_state,
    model_param,
    refuse_overwrite,
    save_state,
)
from zkunlearn.client.fisher import (
    Curvature,
    LossFn,
    fit_rows,
)
from zkunlearn.client.group_obs import GroupObsError
from zkunlearn.client.group_obs_exact import ExactUpdate, bounded_factor, exact_update
from zkunlearn.client.sdk import Commitment, UpdateResult, VerifiedRequest
from zkunlearn.client.unlearning import ProveOptions, check_mask_layer, enrollment_factors
from zkunlearn.proofs.artifacts import ClientCircuit
from zkunlearn.proofs.backend import EzklBackend
from zkunlearn.proofs.deletion import (
    DeletionError,
    batch_mask_rows,
    commitment_name,
    encode_proof,
    request_digest,
    touched_batches,
)
from zkunlearn.proofs.exact import (
    ExactGroupObsSpec,
    IntArray,
    g_tensor,
    mask_tensor,
    quantise_exact,
    theta_tensor,
)
from zkunlearn.proofs.fixedpoint import FIELD_MODULUS, FixedPointError, theta_exponent
from zkunlearn.proofs.layout import layer_layout, mask_layout
from zkunlearn.proofs.prover import ProveJob, prove_parallel


def commit_layer(
    spec: ExactGroupObsSpec, weight: npt.ArrayLike, factors: npt.ArrayLike, layer: str = "layer"
) -> tuple[int, IntArray, IntArray]:
    """The integers a device commits for one layer (flat ``weight``, its ``(n_blocks, rows, B)``
    curvature factors): ``theta`` on ``2**-theta_bits`` after the layer's power-of-two exponent, shaped
    ``(n_batches, batch, B)``, and the factor fitted to ``m`` rows, bounded and normalised over the
    layer's own blocks, on ``2**-g_bits``, shaped ``(n_batches, batch, m, B)``; padding blocks
    (:func:`zkunlearn.proofs.layout.layer_layout`) are all zero in both. Returns ``(exponent, theta, g)``.

    A block whose factor rounds to all zeros (no curvature on the client's data: a unit that never
    fires) commits one grid step as its first entry: the provider refuses a real block with
    ``||G_q||_F = 0``, and one step adds a curvature of ``2**-2g / m`` on one weight, far below ``lam``.
    """
    flat = np.asarray(weight, dtype=np.float64).reshape(-1)
    layout = layer_layout(layer, flat.size, spec)
    exponent = theta_exponent(flat, max_abs=spec.theta_bound)
    theta = quantise_exact(flat * 2.0**exponent, spec.theta_bits).reshape(layout.blocks, spec.block)
    fitted = bounded_factor(
        fit_rows(np.asarray(factors, dtype=np.float64), spec.m), spec.g_bound, spec.g_norm_tolerance
    )
    g = quantise_exact(fitted, spec.g_bits, bound=spec.g_bound)
    real_blocks = g.reshape(layout.blocks, spec.m * spec.block)
    real_blocks[~real_blocks.any(axis=1), 0] = 1
    return exponent, layout.pad(theta), layout.pad(real_blocks.reshape(layout.blocks, spec.m, spec.block))


def certified_weights(
    spec: ExactGroupObsSpec, weight: npt.ArrayLike, factors: npt.ArrayLike, layer_mask: LayerMask
) -> npt.NDArray[np.float64]:
    """The layer's flat weights after the exact Group-OBS deletion a proof certifies: what
    :class:`ExactGroupObsUnlearner` enrolls (:func:`commit_layer`) and proves (``exact_update`` per
    touched batch), without the commitments and proofs. For evaluating the certified configuration."""
    layout = mask_layout(layer_mask, spec)
    exponent, theta, g = commit_layer(spec, weight, factors, layer_mask.layer)
    after = theta.copy()
    for b in range(theta.shape[0]):
        rows = batch_mask_rows(layer_mask, b, spec)
        if rows.any():
            after[b] = exact_update(spec, theta[b], g[b], rows).theta_after
    out: npt.NDArray[np.float64] = layout.unpad(after).astype(np.float64).reshape(-1) / 2.0 ** (
        spec.theta_bits + exponent
    )
    return out


@dataclass(frozen=True)
class ExactEnrollment:
    """What the provider needs to accept an exact enrollment: the commitments and, in layer then batch
    order, one enrollment proof per batch."""

    commitments: list[Commitment]
    proofs: list[bytes]


def _blinding(seed: bytes, label: str, rows: int, width: int) -> list[list[int]]:
    """Field elements from the state's secret seed: 512 bits reduced mod p (negligible bias)."""
    out = []
    for r in range(rows):
        row = []
        for i in range(width):
            digest = hashlib.sha512(seed + f"{label}/{r}/{i}".encode()).digest()
            row.append(int.from_bytes(digest, "big") % FIELD_MODULUS)
        out.append(row)
    return out


class ExactGroupObsUnlearner(CommittedStateProver):
    """Exact Group-OBS update + proofs for the targeted layers of one model (an ``UpdateProver``).

    ``self_check``: refuse to submit a proof whose ``theta`` is not the committed one (a subclass that
    tests the provider's checks turns it off).
    """

    self_check: bool = True

    def __init__(
        self,
        model: nn.Module,
        spec: ExactGroupObsSpec,
        deletion: ClientCircuit,
        enrollment: ClientCircuit,
        state_dir: Path,
        options: ProveOptions | None = None,
    ) -> None:
        self.model, self.spec = model, spec
        self.deletion_circuit, self.enrollment_circuit = deletion, enrollment
        self.state_dir = Path(state_dir)
        self.options = options or ProveOptions()

    # -- enrollment ------------------------------------------------------------------------------

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
    ) -> ExactEnrollment:
        """Commit to the layers' weights and curvature factors and prove them in range (see
        :meth:`zkunlearn.client.unlearning.GroupObsUnlearner.enroll` for the curvature options)."""
        spec = self.spec
        refuse_overwrite(self.state_dir, replace)
        if inputs.shape[0] < 1:
            raise UnlearningError("enrollment needs client samples for the Fisher factor")
        factors = enrollment_factors(
            self.model, spec, layers, inputs, targets, loss_fn, exclude, curvature, reconstruction_weight,
            fisher_shift,
        )  # fmt: skip
        seed = secrets.token_bytes(32)
        arrays: dict[str, Any] = {}
        meta: dict[str, Any] = {"layers": {}, "last_request": None, "seed": seed.hex(), "theta_labels": {}}
        jobs: list[ProveJob] = []
        commitments: list[Commitment] = []
        for layer in layers:
            param = model_param(self.model, layer)
            weight = param.detach().double().cpu().numpy().reshape(-1)
            if not np.isfinite(weight).all():
                raise UnlearningError(f"{layer} has non-finite weights; they cannot be committed")
            try:
                exponent, theta, g = commit_layer(spec, weight, factors[layer].factors, layer)
            except (FixedPointError, GroupObsError, DeletionError) as exc:
                raise UnlearningError(f"enrolling {layer}: {exc}") from exc
            arrays[f"{layer}/theta"] = theta.astype(np.float64) / 2.0**spec.theta_bits
            arrays[f"{layer}/g"] = g.astype(np.float64) / 2.0**spec.g_bits
            meta["layers"][layer] = {"exponent": exponent, "shape": list(param.shape)}
            n_batches = theta.shape[0]
            meta["theta_labels"][layer] = [f"theta/{layer}/{b}/enroll" for b in range(n_batches)]
            for b in range(n_batches):
                theta_felts = theta_tensor(
                    theta[b], _blinding(seed, meta["theta_labels"][layer][b], spec.batch, spec.n_blind)
                )
                g_felts = g_tensor(g[b], _blinding(seed, f"g/{layer}/{b}", spec.batch, spec.block))
                commitments += [
                    Commitment(commitment_name("theta", layer), b, self._commit(theta_felts)),
                    Commitment(commitment_name("g", layer), b, self._commit(g_felts)),
                ]
                arts = self.enrollment_circuit
                jobs.append(
                    ProveJob([g_felts], arts.compiled, arts.vk, arts.pk, arts.srs.path, f"{layer}#{b}")
                )
        results = prove_parallel(
            jobs, workers=self.options.workers, memory_limit_mb=self.options.memory_limit_mb,
            progress=self.options.progress,
        )  # fmt: skip
        # Commitments come in (theta, g) pairs, one pair per job, in job order; the proof reads g.
        for job, result, g_commitment in zip(jobs, results, commitments[1::2], strict=True):
            if result.commitments != [g_commitment.point_hex]:
                raise UnlearningError(f"{job.label}: the enrollment proof commits to another G than ours")
        meta["commitments"] = [c.to_json() for c in commitments]
        meta["enrollment_proofs"] = [encode_proof(r.proof).hex() for r in results]
        meta["enrollment_stats"] = {
            "prove_s": [round(r.prove_s, 3) for r in results],
            "peak_rss_mb": [round(r.peak_rss_mb, 1) for r in results],
        }
        save_state(self.state_dir, arrays, meta)
        self.load_model()
        return ExactEnrollment(commitments, [encode_proof(r.proof) for r in results])

    def saved_enrollment(self) -> ExactEnrollment:
        """The saved enrollment (e.g. to send it again after a restart)."""
        _arrays, meta = load_state(self.state_dir)
        return ExactEnrollment(
            [Commitment.from_json(c) for c in meta["commitments"]],
            [bytes.fromhex(p) for p in meta["enrollment_proofs"]],
        )

    def enrollment_proof_stats(self) -> dict[str, list[float]]:
        """Each enrollment proof's seconds and its worker's peak resident memory (MB)."""
        _arrays, meta = load_state(self.state_dir)
        stats: dict[str, list[float]] = meta.get("enrollment_stats", {"prove_s": [], "peak_rss_mb": []})
        return stats

    def _commit(self, felts: list[str]) -> str:
        arts = self.deletion_circuit
        return EzklBackend().commit(felts, arts.vk, arts.settings, arts.srs.path)

    # -- deletion --------------------------------------------------------------------------------

    def prove(self, request: VerifiedRequest) -> UpdateResult:
        arrays, meta = load_state(self.state_dir)
        done = already_answered(meta, request.request_id)
        if done is not None:
            self.load_model()
            return done
        mine = {(c["name"], c["block"]): c["point_hex"] for c in meta["commitments"]}
        theirs = {(c.name, c.block): c.point_hex for c in request.before_commitments}
        if theirs and theirs != mine:
            raise UnlearningError("the provider's record of our commitments differs from our committed state")
        spec, seed = self.spec, bytes.fromhex(meta["seed"])
        for layer_mask in request.mask.layers:
            check_mask_layer(layer_mask, meta, spec)
        batches = touched_batches(request.mask, spec)
        if not batches:
            raise UnlearningError("the request's mask touches no weights")
        digest = request_digest(request.canonical)
        layers = {layer.layer: layer for layer in request.mask.layers}
        jobs: list[ProveJob] = []
        updates: list[tuple[str, int, IntArray, str]] = []
        for layer, b in batches:
            theta = quantise_exact(arrays[f"{layer}/theta"][b], spec.theta_bits)
            g = quantise_exact(arrays[f"{layer}/g"][b], spec.g_bits)
            mask = batch_mask_rows(layers[layer], b, spec)
            try:
                update = self.batch_update(theta, g, mask)
            except GroupObsError as exc:
                raise UnlearningError(f"{layer} batch {b}: {exc}") from exc
            label = f"theta/{layer}/{b}/{request.request_id}"
            after_felts = theta_tensor(update.theta_after, _blinding(seed, label, spec.batch, spec.n_blind))
            inputs = [
                theta_tensor(
                    theta, _blinding(seed, meta["theta_labels"][layer][b], spec.batch, spec.n_blind)
                ),
                after_felts,
                g_tensor(g, _blinding(seed, f"g/{layer}/{b}", spec.batch, spec.block)),
                mask_tensor(mask, digest, spec.n_blind),
                theta_tensor(
                    update.w, _blinding(seed, f"w/{layer}/{b}/{request.request_id}", spec.batch, spec.n_blind)
                ),
            ]
            arts = self.deletion_circuit
            jobs.append(ProveJob(inputs, arts.compiled, arts.vk, arts.pk, arts.srs.path, f"{layer}#{b}"))
            updates.append((layer, b, update.theta_after, label))
        results = prove_parallel(
            jobs, workers=self.options.workers, memory_limit_mb=self.options.memory_limit_mb,
            progress=self.options.progress,
        )  # fmt: skip
        after = dict(mine)
        for (layer, b, theta_after, label), result in zip(updates, results, strict=True):
            key = (commitment_name("theta", layer), b)
            if self.self_check and result.commitments[0] != mine[key]:
                raise UnlearningError(f"{layer} batch {b}: the proof's theta is not our committed theta")
            after[key] = result.commitments[1]
            arrays[f"{layer}/theta"][b] = theta_after.astype(np.float64) / 2.0**spec.theta_bits
            meta["theta_labels"][layer][b] = label
        return self._save_answer(request.request_id, after, results, arrays, meta)

    def batch_update(self, theta: IntArray, g: IntArray, mask: npt.NDArray[np.bool_]) -> ExactUpdate:
        """One batch's exact Group-OBS update (``theta`` ``(n, B)``, ``g`` ``(n, m, B)`` integers)."""
        return exact_update(self.spec, theta, g, mask)

    def load_model(self) -> None:
        """Write the committed weights into the live model (e.g. after a restart)."""
        arrays, meta = load_state(self.state_dir)
        for name, info in meta["layers"].items():
            param = model_param(self.model, name)
            layout = layer_layout(name, param.numel(), self.spec)
            flat = layout.unpad(arrays[f"{name}/theta"])
            value = flat.reshape(info["shape"]) / 2.0 ** int(info["exponent"])
            with torch.no_grad():
                param.copy_(torch.from_numpy(value).to(param.dtype))
