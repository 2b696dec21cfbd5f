"""Whole enrollments and deletions under the exact Group-OBS relation, judged with the provider's keys.

An exact client enrolls, per targeted layer and batch, the commitments ``theta:<layer>#b`` and
``g:<layer>#b`` and one enrollment proof over them (in layer order, then batch order). The provider
accepts the enrollment only if every proof verifies against exactly those commitments, every layer is
enrolled whole (batches ``0 .. n-1``) and each layer's factor has unit mean diagonal; it keeps each
batch's proven ``||G_q||_F^2`` (:data:`EnrolledNorms`), against which every later deletion of that
batch is judged. A layer whose block count is not a multiple of the batch has padding blocks at the
end of its last batch (:func:`zkunlearn.proofs.layout.layer_layout`): their proven norm is 0, which is
how an enrollment shows its layout (:func:`enrolled_layout`); a deletion is judged only if that
layout is the one its mask's layer shape gives. Deletions follow :mod:`zkunlearn.proofs.layout`:
one proof per touched batch, and only those batches' ``theta`` commitments may change. An exact
analytic head (layer ``head``) enrolls beside them with its own proof
(:mod:`zkunlearn.proofs.analytic_exact_deletion`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zkunlearn.circuits.mask import Mask
from zkunlearn.proofs.analytic_exact_circuits import ExactAnalyticVerifier
from zkunlearn.proofs.analytic_exact_deletion import ANALYTIC_EXACT_KEYS, verify_analytic_exact_enrollment
from zkunlearn.proofs.backend import Proof
from zkunlearn.proofs.exact_circuits import ExactGroupObsVerifier
from zkunlearn.proofs.layout import (
    ANALYTIC_LAYER,
    CommitmentLike,
    DeletionError,
    DeletionVerdict,
    LayerLayout,
    NoReplay,
    batch_mask_commitment,
    by_key,
    changed_outside,
    commitment_name,
    enrolled_batches,
    mask_layout,
    parse_proof,
    request_digest,
    touched_batches,
)
from zkunlearn.proofs.statements import (
    DOMAIN_ENROLLMENT,
    StatementError,
    StatementVerifier,
    enrollment_proofs_digest,
)
from zkunlearn.proofs.verifier import Verdict
from zkunlearn.proofs.verify_pool import parallel_map


def encode_proof_list(proofs: Sequence[bytes]) -> bytes:
    """How a provider stores enrollment proofs: canonical JSON list of hex strings."""
    return json.dumps([p.hex() for p in proofs], separators=(",", ":")).encode()


def decode_proof_list(stored: bytes) -> list[bytes]:
    if not stored:
        return []
    values = json.loads(stored)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DeletionError("stored enrollment proofs are not a JSON list of hex strings")
    return [bytes.fromhex(v) for v in values]


__all__ = [
    "EnrolledNorms",
    "ExactEnrollmentVerdict",
    "bundle_enrolled_norms",
    "decode_proof_list",
    "encode_proof_list",
    "enrolled_layout",
    "enrollment_order",
    "enrollment_proofs_digest",
    "verify_exact_deletion",
    "verify_exact_enrollment",
]

EnrolledNorms = Mapping[tuple[str, int], Sequence[int]]
"""Per (layer, batch): each block's ``||G_q||_F^2`` as its enrollment proof showed it."""


@dataclass(frozen=True)
class ExactEnrollmentVerdict:
    ok: bool
    reason: str
    norms: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)


def enrollment_order(commitments: Sequence[CommitmentLike], layers: Sequence[str]) -> list[tuple[str, int]]:
    """The (layer, batch) pairs an enrollment must prove, in proof order; refuses a layer enrolled in
    part or with ``theta`` and ``G`` batches that do not pair up."""
    names = by_key(commitments, "enrollment")
    order: list[tuple[str, int]] = []
    for layer in layers:
        if layer == ANALYTIC_LAYER:  # the head's Gram and weights: one proof (analytic_exact_deletion)
            if set(ANALYTIC_EXACT_KEYS) - set(names):
                raise DeletionError("an exact analytic head enrolls exactly m:head#0 and w:head#0")
            order.append((layer, 0))
            continue
        order += [(layer, b) for b in enrolled_batches(names, layer)]
    known = {commitment_name(kind, layer) for layer in layers for kind in ("theta", "g")}
    if ANALYTIC_LAYER in layers:
        known |= {name for name, _ in ANALYTIC_EXACT_KEYS}
    stray = sorted({name for name, _ in names} - known)
    if stray:
        raise DeletionError(f"enrollment names commitments of no enrolled layer: {stray[:3]}")
    return order


def enrolled_layout(
    verifier: ExactGroupObsVerifier, layer: str, norms: EnrolledNorms
) -> tuple[LayerLayout, ExactEnrollmentVerdict]:
    """The layout a layer's proven norms show -- its blocks of weights are those before the first
    ``||G_q||_F^2 = 0``, the rest must be padding -- and the layer's verdict
    (:meth:`ExactGroupObsVerifier.check_layer`: padding only completes the last batch, unit mean
    diagonal over the blocks of weights)."""
    spec = verifier.spec
    per_batch: list[Sequence[int]] = []
    while (layer, len(per_batch)) in norms:
        per_batch.append(norms[(layer, len(per_batch))])
    flat = [int(v) for batch in per_batch for v in batch]
    blocks = next((i for i, v in enumerate(flat) if v == 0), len(flat))
    layout = LayerLayout(layer, spec.block, spec.batch, blocks)
    if blocks == 0:
        return layout, ExactEnrollmentVerdict(False, f"{layer}: no enrolled block of weights")
    verdict = verifier.check_layer(layout, per_batch)
    if not verdict.ok:
        return layout, ExactEnrollmentVerdict(
            False, f"{layer}: {verdict.reason.value} {verdict.detail}".strip()
        )
    return layout, ExactEnrollmentVerdict(True, "ok")


def verify_exact_enrollment(
    verifier: ExactGroupObsVerifier | None,
    *,
    layers: Sequence[str],
    commitments: Sequence[CommitmentLike],
    proofs: Sequence[bytes],
    layer_blocks: Mapping[str, int] | None = None,
    analytic: ExactAnalyticVerifier | None = None,
) -> ExactEnrollmentVerdict:
    """Judge an enrollment: one proof per (layer, batch), the analytic head's (layer ``head``, checked
    with ``analytic``) at its place in layer order; ``layer_blocks`` (when the provider knows its
    model's layer sizes) is how many blocks of weights each Group-OBS layer must have. Without it, the
    layout the proofs show (:func:`enrolled_layout`) is checked against each deletion's mask."""
    try:
        order = enrollment_order(commitments, layers)
    except DeletionError as exc:
        return ExactEnrollmentVerdict(False, str(exc))
    if len(proofs) != len(order):
        return ExactEnrollmentVerdict(False, f"expected {len(order)} enrollment proofs, got {len(proofs)}")
    names = by_key(commitments, "enrollment")

    def check(item: tuple[int, tuple[tuple[str, int], bytes]]) -> str | tuple[int, ...] | None:
        """Why the proof is refused, or the norms it shows (``None`` for the analytic head)."""
        index, ((layer, b), raw) = item
        try:
            if layer == ANALYTIC_LAYER:
                if analytic is None:
                    return "this model publishes no exact analytic circuit"
                head = verify_analytic_exact_enrollment(analytic, names, raw, index)
                return None if head.ok else f"{layer}: {head.reason.value} {head.detail}".strip()
            if verifier is None:
                return "this model publishes no exact Group-OBS circuit"
            proof = parse_proof(raw, index)
        except DeletionError as exc:
            return str(exc)
        verdict = verifier.verify_enrollment(proof, g_commit=names[(commitment_name("g", layer), b)])
        if not verdict.ok:
            return f"{layer} batch {b}: {verdict.reason.value} {verdict.detail}".strip()
        return verdict.g_fro_sq

    concurrency = verifier.concurrency if verifier is not None else 1
    norms: dict[tuple[str, int], tuple[int, ...]] = {}
    outcomes = parallel_map(check, enumerate(zip(order, proofs, strict=True)), concurrency)
    for key, outcome in zip(order, outcomes, strict=True):
        if isinstance(outcome, str):
            return ExactEnrollmentVerdict(False, outcome)
        if outcome is not None:
            norms[key] = outcome
    for layer in layers:
        if layer == ANALYTIC_LAYER or verifier is None:
            continue
        layout, verdict = enrolled_layout(verifier, layer, norms)
        if not verdict.ok:
            return verdict
        if layer_blocks is not None and layer_blocks.get(layer) != layout.blocks:
            return ExactEnrollmentVerdict(
                False,
                f"{layer}: {layout.blocks} blocks of weights enrolled, the model's layer has "
                f"{layer_blocks.get(layer)}",
            )
    return ExactEnrollmentVerdict(True, "ok", norms)


def verify_exact_deletion(
    verifier: ExactGroupObsVerifier,
    *,
    request_id: str,
    request_canonical: bytes,
    mask: Mask,
    before: Sequence[CommitmentLike],
    after: Sequence[CommitmentLike],
    proofs: Sequence[bytes],
    norms: EnrolledNorms,
) -> DeletionVerdict:
    """Judge one exact Group-OBS submission: one proof per touched batch, nothing else changed."""
    spec = verifier.spec
    digest = request_digest(request_canonical)
    try:
        old, new = by_key(before, "before"), by_key(after, "after")
        batches = touched_batches(mask, spec)
    except DeletionError as exc:
        return DeletionVerdict(False, str(exc))
    if not batches:
        return DeletionVerdict(False, "the mask touches no weights")
    if len(proofs) != len(batches):
        return DeletionVerdict(
            False, f"expected {len(batches)} proofs (one per touched batch), got {len(proofs)}"
        )
    refused = changed_outside(old, new, {(commitment_name("theta", layer), b) for layer, b in batches})
    if refused:
        return DeletionVerdict(False, refused)
    layers = {layer.layer: layer for layer in mask.layers}
    parsed: list[Proof] = []
    for index, ((layer, b), raw) in enumerate(zip(batches, proofs, strict=True)):
        theta_key, g_key = (commitment_name("theta", layer), b), (commitment_name("g", layer), b)
        if theta_key not in old or g_key not in old or (layer, b) not in norms:
            return DeletionVerdict(False, f"no enrolled commitment or enrollment proof for {layer} batch {b}")
        try:
            parsed.append(parse_proof(raw, index))
        except DeletionError as exc:
            return DeletionVerdict(False, str(exc))
    # The padding each proof is judged with comes from the mask's layer shape; the enrollment must
    # have proven that same layout (zero G exactly on the padding blocks).
    layouts: dict[str, LayerLayout] = {}
    for name in dict.fromkeys(layer for layer, _ in batches):
        layout = mask_layout(layers[name], spec)
        enrolled, layer_verdict = enrolled_layout(verifier, name, norms)
        if not layer_verdict.ok:
            return DeletionVerdict(False, layer_verdict.reason)
        if enrolled.blocks != layout.blocks:
            return DeletionVerdict(
                False,
                f"{name}: enrolled with {enrolled.blocks} blocks of weights, "
                f"the mask's layer has {layout.blocks}",
            )
        layouts[name] = layout

    def check(item: tuple[tuple[str, int], Proof]) -> Verdict:
        (layer, b), proof = item
        theta_key, g_key = (commitment_name("theta", layer), b), (commitment_name("g", layer), b)
        return verifier.verify(
            proof,
            request_id=request_id,
            enrolled_theta=old[theta_key],
            enrolled_g=old[g_key],
            mask_commitment=batch_mask_commitment(verifier, layers[layer], b, spec, digest),
            claimed_theta_after=new[theta_key],
            g_fro_sq=norms[(layer, b)],
            replay=NoReplay(),
            padding=spec.batch - layouts[layer].real_blocks(b),
        )

    verdicts = parallel_map(check, zip(batches, parsed, strict=True), verifier.concurrency)
    for index, ((layer, b), verdict) in enumerate(zip(batches, verdicts, strict=True)):
        if not verdict.ok:
            detail = f"{layer} batch {b}: {verdict.reason.value} {verdict.detail}".strip()
            return DeletionVerdict(False, detail, tuple(verdicts[: index + 1]))
    return DeletionVerdict(True, "ok", tuple(verdicts))


_BUNDLE_NORMS: dict[str, EnrolledNorms] = {}


def bundle_enrolled_norms(
    verifier: ExactGroupObsVerifier | None,
    record: Mapping[str, Any],
    analytic: ExactAnalyticVerifier | None = None,
) -> EnrolledNorms:
    """The norms an exported enrollment's proofs show, re-verified: ``record`` is an enrollment as a
    bundle holds it (``{"canonical", "signature", "public_key", "enrollment_proofs", ...}``, hex), whose
    proofs must be the ones its client-signed statement's ``enrollment_proofs_sha256`` names. Raises
    :class:`DeletionError`."""
    try:
        client = StatementVerifier.from_public_bytes(bytes.fromhex(record["public_key"]))
        statement = (bytes.fromhex(record["canonical"]), bytes.fromhex(record["signature"]))
        payload = client.verify(statement, DOMAIN_ENROLLMENT)
        proofs = [bytes.fromhex(p) for p in record.get("enrollment_proofs", [])]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, StatementError) as exc:
        raise DeletionError(f"cannot read the exported enrollment: {exc}") from exc
    where = f"the enrollment {hashlib.sha256(statement[0]).hexdigest()[:16]}"
    digest = enrollment_proofs_digest(proofs)
    if payload.get("enrollment_proofs_sha256") != digest:
        raise DeletionError(f"{where}: the enrollment proofs are not the ones the client signed")
    try:
        commitments = [
            _Named(str(c["name"]), int(c["block"]), str(c["point_hex"])) for c in payload["commitments"]
        ]
        layers = [str(x) for x in payload["layers"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DeletionError(f"{where}: unreadable commitments or layers: {exc}") from exc
    keys = (verifier.circuit_keys if verifier else None, analytic.circuit_key if analytic else None)
    key = f"{keys}/{digest}/{json.dumps(payload['commitments'], sort_keys=True)}"
    if key not in _BUNDLE_NORMS:
        verdict = verify_exact_enrollment(
            verifier, layers=layers, commitments=commitments, proofs=proofs, analytic=analytic
        )
        if not verdict.ok:
            raise DeletionError(f"{where}: enrollment refused: {verdict.reason}")
        _BUNDLE_NORMS[key] = verdict.norms
    return _BUNDLE_NORMS[key]


@dataclass(frozen=True)
class _Named:
    name: str
    block: int
    point_hex: str
