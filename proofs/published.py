"""What the auditor checks of a provider's publication: every circuit is the relation its spec
defines under sound run arguments (its verifying key rebuilt and compared), and every exported
submission gets the provider's own judgement again (:func:`verify_bundle_submission`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt
from zkunlearn.proofs.analytic_exact_circuits import export_analytic_exact
from zkunlearn.proofs.artifacts import CircuitArtifacts
from zkunlearn.proofs.backend import EzklBackend, ProvingBackend
from zkunlearn.proofs.deletion import (
    UPDATE_KIND_ANALYTIC,
    UPDATE_KIND_ANALYTIC_EXACT,
    UPDATE_KIND_GROUP_OBS,
    UPDATE_KIND_GROUP_OBS_EXACT,
    DeletionCircuits,
    DeletionError,
    export_spec,
    verify_deletion,
)
from zkunlearn.proofs.exact_circuits import export_exact
from zkunlearn.proofs.exact_deletion import bundle_enrolled_norms
from zkunlearn.proofs.layout import (
    ANALYTIC_LAYER,
    BlockLayout,
    CommitmentLike,
    by_key,
    commitment_name,
    enrolled_batches,
    layer_layout,
)
from zkunlearn.proofs.specs import AnalyticSpec, GroupObsSpec, RefitSpec

__all__ = [
    "EXACT_SOUND_RUN_ARGS",
    "SOUND_RUN_ARGS",
    "DeletionError",
    "check_bundle_enrollment",
    "check_published_circuits",
    "enrollment_layout_problem",
    "verify_bundle_submission",
]

#: ezkl run arguments without which a proof would not mean what the protocol says: inputs committed
#: (KZG, never public or hashed away), residual maxima public, the relation's constants fixed in the
#: circuit, and committed inputs range-checked (nothing else bounds them).
SOUND_RUN_ARGS = {
    "input_visibility": "KZGCommit",
    "output_visibility": "Public",
    "param_visibility": "Fixed",
    "ignore_range_check_inputs_outputs": False,
}


#: The exact relation's run arguments: inputs KZG-committed, outputs public, constants fixed, every
#: value an integer (scale 0), and ezkl's input range checks off because the relation range-checks
#: what is new itself and the enrollment proof bounds the rest (docs/protocol.md).
EXACT_SOUND_RUN_ARGS = {
    "input_visibility": "KZGCommit",
    "output_visibility": "Public",
    "param_visibility": "Fixed",
    "ignore_range_check_inputs_outputs": True,
    "input_scale": 0,
    "param_scale": 0,
}


def check_published_circuits(directory: Path) -> str:
    """Rebuild each published circuit's verifying key from its spec with this code, and compare.

    Every proof in a bundle is verified with the bundle's own vk and settings. Without this, a provider
    could publish a vk for a weaker relation (or settings that leave inputs unchecked), accept proofs
    of nothing, and still pass an audit. The rebuild is deterministic: the same spec exports the
    same ONNX bytes, and Halo2 key generation from the same circuit and SRS gives the same vk.
    """
    circuits = DeletionCircuits.load(directory)
    go_spec = circuits.group_obs[0] if circuits.group_obs else None
    backend = EzklBackend()
    notes = []
    with tempfile.TemporaryDirectory(prefix="zkaudit-") as tmp:
        entries: list[tuple[str, Any, CircuitArtifacts, Path, Mapping[str, Any]]] = []
        specs: list[tuple[str, GroupObsSpec | AnalyticSpec | RefitSpec, CircuitArtifacts]] = []
        if circuits.group_obs is not None:
            specs.append(("group_obs", *circuits.group_obs))
        if circuits.analytic is not None:
            specs.append(("analytic", *circuits.analytic))
        specs += [(f"refit {spec.masked}", spec, arts) for spec, arts in circuits.refits]
        for i, (label, spec, arts) in enumerate(specs):
            onnx = export_spec(spec, Path(tmp) / f"{i}.onnx", group_obs=go_spec)
            entries.append((label, spec, arts, onnx, SOUND_RUN_ARGS))
        if circuits.exact is not None:
            exact_spec, deletion_arts, enrollment_arts = circuits.exact
            deletion_onnx, enrollment_onnx = export_exact(exact_spec, Path(tmp) / "exact")
            entries.append(
                ("group_obs_exact", exact_spec, deletion_arts, deletion_onnx, EXACT_SOUND_RUN_ARGS)
            )
            entries.append(
                (
                    "group_obs_exact enrollment",
                    exact_spec,
                    enrollment_arts,
                    enrollment_onnx,
                    EXACT_SOUND_RUN_ARGS,
                )
            )
        if circuits.analytic_exact is not None:
            an_spec, an_arts = circuits.analytic_exact
            an_onnx = export_analytic_exact(an_spec, Path(tmp) / "analytic-exact")
            decomposition = {"decomp_base": an_spec.decomp_base, "decomp_legs": an_spec.decomp_legs}
            entries.append(
                ("analytic_exact", an_spec, an_arts, an_onnx, {**EXACT_SOUND_RUN_ARGS, **decomposition})
            )
        if not entries:
            raise DeletionError("circuits.json publishes no circuit")
        for i, (label, spec, arts, onnx, sound) in enumerate(entries):
            if onnx.read_bytes() != arts.onnx.read_bytes():
                raise DeletionError(f"{label}: model.onnx is not the relation its published spec defines")
            run_args = arts.settings_dict.get("run_args", {})
            for key, want in sound.items():
                if run_args.get(key) != want:
                    raise DeletionError(
                        f"{label}: settings run_args {key} is {run_args.get(key)!r}, "
                        f"the protocol needs {want!r}"
                    )
            compiled, vk, pk = (Path(tmp) / f"{i}.{ext}" for ext in ("compiled", "vk", "pk"))
            try:
                backend.compile(arts.onnx, arts.settings, compiled)
                backend.setup(compiled, arts.srs.path, vk, pk)
            except BaseException as exc:  # ezkl panics are BaseException; KeyboardInterrupt is not ours
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise DeletionError(f"{label}: cannot rebuild its keys from settings and SRS: {exc}") from exc
            pk.unlink(missing_ok=True)  # up to GBs, and never needed here
            if vk.read_bytes() != arts.vk.read_bytes():
                raise DeletionError(
                    f"{label}: vk.key is not the verifying key of its relation under its settings and SRS"
                )
            srs = "INSECURE dev" if arts.srs.insecure else arts.srs.sha256[:16]
            notes.append(
                f"{label} {asdict(spec)} at input scale {run_args.get('input_scale')}, "
                f"logrows {run_args.get('logrows')}, SRS {srs}"
            )
    return "vk rebuilt and identical: " + "; ".join(notes)


@dataclass(frozen=True)
class _Commitment:
    name: str
    block: int
    point_hex: str


def verify_bundle_submission(
    request_payload: Mapping[str, Any],
    request_canonical: bytes,
    mask_bytes: bytes,
    forget_features: npt.ArrayLike | None,
    forget_labels: npt.ArrayLike | None,
    before_commitments: Sequence[Mapping[str, Any]],
    after_commitments: Sequence[Mapping[str, Any]],
    proofs: Sequence[bytes],
    circuits_dir: Path,
    enrollment: Mapping[str, Any] | None = None,
    *,
    backend: ProvingBackend | None = None,
) -> tuple[bool, str]:
    """The auditor's proof check: the same judgement as the provider's, from an exported bundle
    (with ``backend``, e.g. a :class:`~zkunlearn.proofs.verify_pool.PooledEzklBackend`, its ezkl calls).

    An exact-kind deletion is judged with the norms the proofs of ``enrollment`` show: the exported
    enrollment in force at the receipt's place in the log (the auditor's
    :func:`~zkunlearn.proofs.audit_enrollments.in_force`); without it, it is refused.
    """
    try:
        circuits = DeletionCircuits.load(circuits_dir)
        if backend is not None:
            circuits = circuits.with_backend(backend)
        before = [
            _Commitment(str(c["name"]), int(c["block"]), str(c["point_hex"])) for c in before_commitments
        ]
        after = [_Commitment(str(c["name"]), int(c["block"]), str(c["point_hex"])) for c in after_commitments]
    except (DeletionError, KeyError, TypeError, ValueError) as exc:
        return False, f"cannot load circuits or commitments: {exc}"
    norms = None
    update_kind = int(request_payload.get("update_kind", 0))
    if update_kind in (UPDATE_KIND_GROUP_OBS_EXACT, UPDATE_KIND_ANALYTIC_EXACT):
        if enrollment is None:
            return False, "not judged: the enrollment in force at this receipt is unknown (see its chain)"
        try:  # its enrollment proofs re-verified
            group_obs, analytic = circuits.enrollment_verifiers()
            norms = bundle_enrolled_norms(group_obs, enrollment, analytic)
        except DeletionError as exc:
            return False, str(exc)
    verdict = verify_deletion(
        circuits,
        update_kind=update_kind,
        request_id=str(request_payload.get("request_id", "")),
        request_canonical=request_canonical,
        mask_bytes=mask_bytes,
        forget_features=forget_features,
        forget_labels=forget_labels,
        before=before,
        after=after,
        proofs=proofs,
        enrolled_norms=norms,
    )
    return verdict.ok, verdict.reason


def check_bundle_enrollment(
    record: Mapping[str, Any], circuits_dir: Path, *, backend: ProvingBackend | None = None
) -> str:
    """An exported exact-kind enrollment's proofs verify with the bundle's circuits (raises
    :class:`DeletionError` saying why not); returns what was checked."""
    circuits = DeletionCircuits.load(circuits_dir)
    if backend is not None:
        circuits = circuits.with_backend(backend)
    group_obs, analytic = circuits.enrollment_verifiers()
    norms = bundle_enrolled_norms(group_obs, record, analytic)
    proofs = record.get("enrollment_proofs") or []
    return f"{len(proofs)} enrollment proof(s) verify ({len(norms)} Group-OBS batch norm(s) proven)"


def enrollment_layout_problem(
    circuits: DeletionCircuits,
    update_kind: int,
    layers: Sequence[str],
    commitments: Sequence[CommitmentLike],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> str | None:
    """Why an enrollment's commitments cannot be what this model's circuits prove, or ``None``.

    The kind must be one the model publishes a circuit for. A Group-OBS client commits ``theta`` and
    ``g`` batches ``0..n-1`` of each enrolled layer, plus ``z``, ``b1`` (masked layer) and ``v``
    (following layer) for every published refit of an enrolled layer; an analytic head commits exactly
    its two tensors on layer ``head``. Nothing else: a stray or missing tensor is refused here rather
    than at the first deletion. With the model's parameter ``shapes``, a Group-OBS layer must exist and
    be enrolled whole: ``ceil(blocks / batch)`` batches (:func:`~zkunlearn.proofs.layout.layer_layout`;
    a fixed-point layer must fill its batches exactly). (The exact kinds' enrollment proofs check the
    rest of their layout, padding included.)
    """
    published = {
        UPDATE_KIND_GROUP_OBS: circuits.group_obs is not None,
        UPDATE_KIND_ANALYTIC: circuits.analytic is not None,
        UPDATE_KIND_GROUP_OBS_EXACT: circuits.exact is not None,
        UPDATE_KIND_ANALYTIC_EXACT: circuits.analytic_exact is not None,
    }
    if not published.get(update_kind, False):
        return f"the model publishes no circuit for update kind {update_kind}"
    try:
        names = by_key(commitments, "enrollment")
    except DeletionError as exc:
        return str(exc)
    head_tensors = {UPDATE_KIND_ANALYTIC: ("r", "w"), UPDATE_KIND_ANALYTIC_EXACT: ("m", "w")}
    if update_kind in head_tensors:
        expected = {(commitment_name(t, ANALYTIC_LAYER), 0) for t in head_tensors[update_kind]}
        if list(layers) != [ANALYTIC_LAYER] or set(names) != expected:
            wanted = sorted(f"{n}#{b}" for n, b in expected)
            return f"an analytic head enrolls layer {ANALYTIC_LAYER!r} with exactly {wanted}"
        return None
    # Published (checked above): the exact spec for kind 3, the fixed-point one for kind 1. Only the
    # exact relation pads a layer's last batch with zero blocks (proofs/layout.py).
    exact = update_kind == UPDATE_KIND_GROUP_OBS_EXACT
    layout_spec: BlockLayout | None = None
    if exact and circuits.exact is not None:
        layout_spec = circuits.exact[0]
    elif not exact and circuits.group_obs is not None:
        layout_spec = circuits.group_obs[0]
    expected_names: set[str] = set()
    for layer in layers:
        try:
            batches = len(enrolled_batches(names, layer))
        except DeletionError as exc:
            return str(exc)
        if shapes is not None and layout_spec is not None:
            if layer not in shapes:
                return f"the model has no layer {layer!r}"
            try:
                layout = layer_layout(layer, math.prod(shapes[layer]), layout_spec)
            except DeletionError as exc:
                return str(exc)
            if not exact and layout.padding_blocks:
                return (
                    f"{layer}: {layout.weights} weights are not a multiple of block x batch = "
                    f"{layout_spec.batch_weights} (only the exact relation pads a batch)"
                )
            if batches != layout.batches:
                return (
                    f"{layer}: {layout.blocks} blocks of {layout.block} need {layout.batches} batches of "
                    f"{layout.batch} blocks, {batches} enrolled"
                )
        expected_names |= {commitment_name("theta", layer), commitment_name("g", layer)}
    if update_kind != UPDATE_KIND_GROUP_OBS:
        return None
    for refit, _ in circuits.refits:
        if refit.masked not in layers:
            continue
        keys = [("z", refit.masked), ("b1", refit.masked), ("v", refit.following)]
        missing = [
            commitment_name(t, layer) for t, layer in keys if (commitment_name(t, layer), 0) not in names
        ]
        if missing:
            return f"the model publishes an output refit of {refit.following}: enroll {missing} (batch 0)"
        expected_names |= {commitment_name(t, layer) for t, layer in keys}
    refit_names = expected_names - {commitment_name(t, layer) for layer in layers for t in ("theta", "g")}
    stray = sorted(
        f"{name}#{b}" for name, b in names if name not in expected_names or (name in refit_names and b != 0)
    )
    if stray:
        return f"enrollment names commitments no published circuit reads: {stray[:3]}"
    return None
