"""Submission checks of the fixed-point relations: Group-OBS (update kind 1, with its output refits)
and the analytic head (kind 2). :func:`zkunlearn.proofs.deletion.verify_deletion` dispatches here;
the exact relations have their own modules (``exact_deletion``, ``analytic_exact_deletion``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from zkunlearn.circuits.mask import Mask
from zkunlearn.proofs.artifacts import CircuitArtifacts
from zkunlearn.proofs.fixedpoint import FixedPointError, FloatArray, felts, request_binding
from zkunlearn.proofs.layout import (
    ANALYTIC_LAYER,
    CommitmentLike,
    DeletionError,
    DeletionVerdict,
    NoReplay,
    batch_mask_commitment,
    by_key,
    changed_outside,
    commitment_name,
    layer_batches,
    parse_proof,
    request_digest,
    touched_batches,
)
from zkunlearn.proofs.specs import AnalyticSpec
from zkunlearn.proofs.verifier import RefitVerifier, Verdict

if TYPE_CHECKING:
    from zkunlearn.proofs.deletion import DeletionCircuits

__all__ = ["analytic_forget_tensors", "input_scale", "pad_forget", "verify_analytic", "verify_group_obs"]


def input_scale(arts: CircuitArtifacts) -> int:
    return int(arts.settings_dict["run_args"]["input_scale"])


# ---- Group-OBS layout ---------------------------------------------------------------------------


def verify_group_obs(
    circuits: DeletionCircuits,
    *,
    request_id: str,
    request_canonical: bytes,
    mask: Mask,
    before: Sequence[CommitmentLike],
    after: Sequence[CommitmentLike],
    proofs: Sequence[bytes],
) -> DeletionVerdict:
    spec, verifier = circuits.group_obs_verifier()
    digest = request_digest(request_canonical)
    old, new = by_key(before, "before"), by_key(after, "after")
    batches = touched_batches(mask, spec)
    if not batches:
        return DeletionVerdict(False, "the mask touches no weights")
    touched_layers = {layer for layer, _ in batches}
    refits = [(r, arts) for r, arts in circuits.refits if r.masked in touched_layers]
    if len(proofs) != len(batches) + len(refits):
        return DeletionVerdict(
            False,
            f"expected {len(batches) + len(refits)} proofs (one per touched batch"
            f"{', one per refit pair of a touched layer' if refits else ''}), got {len(proofs)}",
        )
    may_change = {(commitment_name("theta", layer), b) for layer, b in batches}
    may_change |= {(commitment_name("v", r.following), 0) for r, _ in refits}
    refused = changed_outside(old, new, may_change)
    if refused:
        return DeletionVerdict(False, refused)
    layers = {layer.layer: layer for layer in mask.layers}
    verdicts: list[Verdict] = []
    for index, ((layer_name, b), raw) in enumerate(zip(batches, proofs[: len(batches)], strict=True)):
        theta_key, g_key = (commitment_name("theta", layer_name), b), (commitment_name("g", layer_name), b)
        if theta_key not in old or g_key not in old:
            return DeletionVerdict(False, f"no enrolled commitment for {layer_name} batch {b}")
        try:
            proof = parse_proof(raw, index)
            mask_commitment = batch_mask_commitment(verifier, layers[layer_name], b, spec, digest)
        except (DeletionError, FixedPointError) as exc:
            return DeletionVerdict(False, str(exc), tuple(verdicts))
        verdict = verifier.verify(
            proof,
            request_id=request_id,
            enrolled_theta=old[theta_key],
            enrolled_g=old[g_key],
            mask_commitment=mask_commitment,
            claimed_theta_after=new[theta_key],
            replay=NoReplay(),
        )
        verdicts.append(verdict)
        if not verdict.ok:
            return DeletionVerdict(
                False,
                f"{layer_name} batch {b}: {verdict.reason.value} {verdict.detail}".strip(),
                tuple(verdicts),
            )
    for index, ((refit, arts), raw) in enumerate(zip(refits, proofs[len(batches) :], strict=True)):
        n_batches = layer_batches(layers[refit.masked], spec)
        theta_keys = [(commitment_name("theta", refit.masked), b) for b in range(n_batches)]
        keys = {
            "z": (commitment_name("z", refit.masked), 0),
            "b1": (commitment_name("b1", refit.masked), 0),
            "v": (commitment_name("v", refit.following), 0),
        }
        missing = [f"{k[0]}#{k[1]}" for k in [*theta_keys, *keys.values()] if k not in old]
        if missing:
            return DeletionVerdict(False, f"refit of {refit.following}: no enrolled {', '.join(missing)}")
        try:
            proof = parse_proof(raw, len(batches) + index)
        except DeletionError as exc:
            return DeletionVerdict(False, str(exc), tuple(verdicts))
        refit_verifier = RefitVerifier(
            arts, n_batches=n_batches, tolerance=refit.tolerance(input_scale(arts))
        )
        verdict = refit_verifier.verify(
            proof,
            request_id=request_id,
            enrolled_z=old[keys["z"]],
            enrolled_theta=[old[k] for k in theta_keys],
            enrolled_b1=old[keys["b1"]],
            theta_after=[new[k] for k in theta_keys],
            enrolled_v=old[keys["v"]],
            claimed_v_after=new[keys["v"]],
            replay=NoReplay(),
        )
        verdicts.append(verdict)
        if not verdict.ok:
            return DeletionVerdict(
                False,
                f"refit of {refit.following}: {verdict.reason.value} {verdict.detail}".strip(),
                tuple(verdicts),
            )
    return DeletionVerdict(True, "ok", tuple(verdicts))


# ---- analytic layout ----------------------------------------------------------------------------


def pad_forget(
    spec: AnalyticSpec, features: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Forget features (n, d) and targets (n, k) zero-padded to the circuit's ``n_u`` rows."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim == 1:  # class indices become one-hot regression targets, as the head was trained
        if not np.all((y == np.round(y)) & (y >= 0) & (y < spec.k)):
            raise DeletionError(f"1-D forget labels must be class indices in [0, {spec.k})")
        y = np.eye(spec.k)[y.astype(np.int64)]
    if x.ndim != 2 or x.shape[1] != spec.d or y.shape != (x.shape[0], spec.k):
        raise DeletionError(
            f"forget data must be ({spec.n_u} max, {spec.d}) and (n, {spec.k}); got {x.shape}, {y.shape}"
        )
    if x.shape[0] > spec.n_u:
        raise DeletionError(f"{x.shape[0]} forget samples exceed the circuit's n_u = {spec.n_u}")
    pad = spec.n_u - x.shape[0]
    return np.vstack([x, np.zeros((pad, spec.d))]), np.vstack([y, np.zeros((pad, spec.k))])


def analytic_forget_tensors(
    spec: AnalyticSpec, features: npt.ArrayLike, labels: npt.ArrayLike, digest: bytes, scale: int
) -> tuple[list[str], list[str]]:
    """The committed X_u and Y_u (padded, plus a request-bound trailing row) as felts."""
    x, y = pad_forget(spec, features, labels)
    rows = []
    for name, v in (("x_u", x), ("y_u", y)):
        rows.append(
            felts(np.vstack([v, request_binding(digest + name.encode(), v.shape[1], scale)[None, :]]), scale)
        )
    return rows[0], rows[1]


def verify_analytic(
    circuits: DeletionCircuits,
    *,
    request_id: str,
    request_canonical: bytes,
    forget_features: npt.ArrayLike | None,
    forget_labels: npt.ArrayLike | None,
    before: Sequence[CommitmentLike],
    after: Sequence[CommitmentLike],
    proofs: Sequence[bytes],
) -> DeletionVerdict:
    spec, verifier = circuits.analytic_verifier()
    if forget_features is None or forget_labels is None:
        return DeletionVerdict(False, "an analytic deletion needs the forget features and labels")
    if len(proofs) != 1:
        return DeletionVerdict(False, f"an analytic deletion has exactly one proof, got {len(proofs)}")
    old, new = by_key(before, "before"), by_key(after, "after")
    r_key, w_key = (commitment_name("r", ANALYTIC_LAYER), 0), (commitment_name("w", ANALYTIC_LAYER), 0)
    if set(old) != {r_key, w_key} or set(new) != {r_key, w_key}:
        return DeletionVerdict(False, "analytic commitments must be exactly r:head#0 and w:head#0")
    scale = input_scale(circuits.analytic[1]) if circuits.analytic else 0
    try:
        x_u, y_u = analytic_forget_tensors(
            spec, forget_features, forget_labels, request_digest(request_canonical), scale
        )
        proof = parse_proof(proofs[0], 0)
    except (DeletionError, FixedPointError) as exc:
        return DeletionVerdict(False, str(exc))
    verdict = verifier.verify(
        proof,
        request_id=request_id,
        enrolled_r=old[r_key],
        claimed_r_after=new[r_key],
        enrolled_w=old[w_key],
        claimed_w_after=new[w_key],
        forget_x=verifier.commit(x_u),
        forget_y=verifier.commit(y_u),
        replay=NoReplay(),
    )
    reason = "ok" if verdict.ok else f"{verdict.reason.value} {verdict.detail}".strip()
    return DeletionVerdict(verdict.ok, reason, (verdict,))
