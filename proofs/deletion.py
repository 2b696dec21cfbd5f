"""The statement of a whole deletion: which batches are proven and against which commitments.

One deletion request touches a set of Fisher blocks (Group-OBS) or the analytic head. This module
is the one place that decides how those map onto proofs, so that the client (building them), the
provider (verifying) and the auditor (re-verifying offline) cannot disagree:

* **Group-OBS.** A targeted layer of ``numel`` weights is cut into blocks of ``B`` (row-major) and the
  blocks into fixed *batches* of ``batch`` consecutive blocks; one proof per touched batch. The client
  commits at enrollment, per batch, to ``theta`` and ``G`` (each with its blinding), named
  ``theta:<layer>`` / ``g:<layer>`` with ``block`` = the batch index. After an accepted deletion the
  ``theta`` commitments of touched batches are replaced by the proofs' ``theta'`` commitments; every
  other commitment (all ``G``, untouched ``theta``) must be carried over unchanged.
* **Output refit** (optional, per published layer pair). For a pair whose masked layer the mask
  touches, one more proof after the Group-OBS ones, in the order the pairs are published: the layer
  its activations feed, ``V = [W2 | b2]``, is the ridge refit of ``circuits.output_refit``. The client
  commits at enrollment to the masked layer's inputs (``z:<layer>``, pre-scaled by its theta exponent),
  its bias (``b1:<layer>``) and ``V`` (``v:<following>``); the proof reads ``W1`` / ``W1'`` through the
  masked layer's ``theta`` commitments (enrolled, and as accepted by this deletion's Group-OBS proofs),
  and ``v:<following>`` is replaced by the refit's commitment.
* **Analytic.** One proof; the client commits to ``R`` and ``W`` (names ``r:head``, ``w:head``); the
  forget features and labels travel with the request, zero-padded to the circuit's ``n_u`` rows
  (zero rows change neither residual), and their commitments are computed by the verifier itself.

Verification always uses the provider's own circuits (:class:`DeletionCircuits`), never keys or
settings from the submission. Proof bytes are :meth:`~zkunlearn.proofs.backend.Proof.to_bytes`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy.typing as npt
from zkunlearn.circuits import analytic as analytic_relation
from zkunlearn.circuits import group_obs as group_obs_relation
from zkunlearn.circuits import output_refit as refit_relation
from zkunlearn.circuits.export import export_relation
from zkunlearn.circuits.mask import Mask, MaskError
from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
from zkunlearn.proofs.analytic_exact_circuits import (
    ExactAnalyticVerifier,
    build_analytic_exact,
)
from zkunlearn.proofs.analytic_exact_deletion import verify_analytic_exact
from zkunlearn.proofs.artifacts import CircuitArtifacts, build_provider_artifacts, required_logrows
from zkunlearn.proofs.backend import CircuitConfig, ProvingBackend
from zkunlearn.proofs.exact import ExactGroupObsSpec
from zkunlearn.proofs.exact_circuits import ExactGroupObsVerifier, build_exact_circuits
from zkunlearn.proofs.exact_deletion import EnrolledNorms, verify_exact_deletion
from zkunlearn.proofs.fixedpoint_deletion import (
    analytic_forget_tensors,
    input_scale,
    pad_forget,
    verify_analytic,
    verify_group_obs,
)
from zkunlearn.proofs.layout import (
    ANALYTIC_LAYER,
    BlockLayout,
    CommitmentLike,
    DeletionError,
    DeletionVerdict,
    batch_mask_commitment,
    batch_mask_rows,
    commitment_name,
    encode_proof,
    layer_batches,
    request_digest,
    touched_batches,
)
from zkunlearn.proofs.specs import AnalyticSpec, GroupObsSpec, RefitSpec
from zkunlearn.proofs.srs import SrsInfo, dev_srs, file_sha256
from zkunlearn.proofs.verifier import AnalyticVerifier, GroupObsVerifier

__all__ = [
    "ANALYTIC_LAYER",
    "UPDATE_KIND_ANALYTIC",
    "UPDATE_KIND_ANALYTIC_EXACT",
    "UPDATE_KIND_GROUP_OBS",
    "UPDATE_KIND_GROUP_OBS_EXACT",
    "AnalyticSpec",
    "CommitmentLike",
    "DeletionCircuits",
    "DeletionError",
    "DeletionVerdict",
    "GroupObsSpec",
    "RefitSpec",
    "analytic_forget_tensors",
    "batch_mask_rows",
    "commitment_name",
    "encode_proof",
    "export_spec",
    "layer_batches",
    "pad_forget",
    "prepare_deletion",
    "request_digest",
    "touched_batches",
    "verify_analytic",
    "verify_deletion",
    "verify_group_obs",
]

REFIT_DECOMP_LEGS = 4
"""Range-check legs of the refit circuits (base 1024: values below 2**40 at twice the input scale).
The refit's Gram and cross products sum ``n`` terms before rescaling; with Group-OBS's 3 legs
(2**30, i.e. 16 in real units at scale 2 x 13) an honest refit over a few dozen rows already
overflows the decomposition. The legs do not change a commitment, so the circuits still agree."""

UPDATE_KIND_GROUP_OBS = 1
UPDATE_KIND_ANALYTIC = 2
UPDATE_KIND_GROUP_OBS_EXACT = 3
UPDATE_KIND_ANALYTIC_EXACT = 4


@dataclass(frozen=True)
class DeletionCircuits:
    """The provider's compiled circuits for one model, as a directory it can publish and audit.

    Layout: ``circuits.json`` (specs, artifact keys, SRS digest), one folder per artifact key
    (``settings.json``, ``model.compiled``, ``vk.key``, ``model.onnx``; the provider also keeps
    ``pk.key``, which an export leaves out) and ``srs/`` with the SRS files.
    """

    directory: Path
    group_obs: tuple[GroupObsSpec, CircuitArtifacts] | None
    analytic: tuple[AnalyticSpec, CircuitArtifacts] | None
    refits: tuple[tuple[RefitSpec, CircuitArtifacts], ...] = ()
    exact: tuple[ExactGroupObsSpec, CircuitArtifacts, CircuitArtifacts] | None = None
    analytic_exact: tuple[ExactAnalyticSpec, CircuitArtifacts] | None = None
    backend: ProvingBackend | None = field(default=None, compare=False)
    """What the verifiers run ezkl with (default: in this process, one proof at a time)."""

    def with_backend(self, backend: ProvingBackend) -> DeletionCircuits:
        """The same circuits whose verifiers use ``backend`` (e.g. a
        :class:`~zkunlearn.proofs.verify_pool.PooledEzklBackend` to verify on several cores)."""
        return replace(self, backend=backend)

    @classmethod
    def build(
        cls,
        directory: Path,
        *,
        group_obs: GroupObsSpec | None,
        analytic: AnalyticSpec | None,
        config: CircuitConfig | None = None,
        srs: SrsInfo | None = None,
        refits: Sequence[RefitSpec] = (),
        exact: ExactGroupObsSpec | None = None,
        analytic_exact: ExactAnalyticSpec | None = None,
    ) -> DeletionCircuits:
        """Export, compile and set up each relation with the provider's own keys (cached by content).

        Without ``srs`` a development SRS is generated: INSECURE, and recorded as such. With
        ``refits``, the Group-OBS and refit circuits are built with one common logrows (the largest
        any of them needs), so the refit proofs can be checked against Group-OBS's commitments.
        """
        directory = Path(directory)
        srs_dir = directory / "srs"
        base = config or CircuitConfig()
        if refits and group_obs is None:
            raise DeletionError("output refit circuits read Group-OBS's commitments; publish Group-OBS too")
        # Not ``directory / "staging"``: each artifact build clears that folder.
        refit_staging = directory / "staging-refit"
        refit_onnx: list[Path] = []
        for i, spec in enumerate(refits):
            refit_onnx.append(export_spec(spec, refit_staging / f"refit_{i}.onnx", group_obs=group_obs))
        shared = base  # Group-OBS and the refits: one logrows, so one commitment per tensor
        refit_base = replace(base, decomp_legs=max(base.decomp_legs, REFIT_DECOMP_LEGS))
        if refits:
            need = max(required_logrows(path, refit_base, refit_staging) for path in refit_onnx)
            shared = replace(base, min_logrows=max(base.min_logrows, need))

        def srs_for(logrows: int) -> SrsInfo:
            if srs is not None:
                if srs.logrows < logrows:
                    raise DeletionError(f"SRS has logrows {srs.logrows}, the circuit needs {logrows}")
                return srs
            return dev_srs(srs_dir, logrows)

        built_go: tuple[GroupObsSpec, CircuitArtifacts] | None = None
        built_an: tuple[AnalyticSpec, CircuitArtifacts] | None = None
        record: dict[str, Any] = {"format": "zkunlearn-circuits/v1"}
        if group_obs is not None:
            onnx = export_spec(group_obs, directory / "staging" / "group_obs.onnx")
            legs = group_obs.decomp_legs(shared.input_scale, shared.decomp_base)
            go_config = replace(shared, decomp_legs=max(shared.decomp_legs, legs))
            arts = build_provider_artifacts(onnx, directory, srs_for, go_config)
            if refits and arts.logrows > shared.min_logrows:  # Group-OBS is the larger: follow it
                shared = replace(shared, min_logrows=arts.logrows)
            built_go = (group_obs, arts)
            record["group_obs"] = {
                "spec": asdict(group_obs),
                "key": arts.key,
                **_srs_record(arts.srs, directory),
            }
        if analytic is not None:
            onnx = export_spec(analytic, directory / "staging" / "analytic.onnx")
            arts = build_provider_artifacts(onnx, directory, srs_for, base)
            built_an = (analytic, arts)
            record["analytic"] = {
                "spec": asdict(analytic),
                "key": arts.key,
                **_srs_record(arts.srs, directory),
            }
        built_refits: list[tuple[RefitSpec, CircuitArtifacts]] = []
        for spec, onnx in zip(refits, refit_onnx, strict=True):
            refit_config = replace(refit_base, min_logrows=shared.min_logrows)
            arts = build_provider_artifacts(onnx, directory, srs_for, refit_config)
            if built_go is not None and arts.logrows != built_go[1].logrows:
                raise DeletionError(
                    f"refit circuit for {spec.masked} has logrows {arts.logrows}, Group-OBS "
                    f"{built_go[1].logrows}: their commitments would not agree"
                )
            built_refits.append((spec, arts))
        shutil.rmtree(refit_staging, ignore_errors=True)
        built_exact: tuple[ExactGroupObsSpec, CircuitArtifacts, CircuitArtifacts] | None = None
        if exact is not None:
            if refits:
                raise DeletionError(
                    "the output refit reads fixed-point theta commitments; it cannot follow exact Group-OBS"
                )
            deletion_arts, enrollment_arts = build_exact_circuits(exact, directory, srs_for)
            built_exact = (exact, deletion_arts, enrollment_arts)
            record["group_obs_exact"] = {
                "spec": asdict(exact),
                "key": deletion_arts.key,
                "enrollment_key": enrollment_arts.key,
                **_srs_record(deletion_arts.srs, directory),
            }
        built_analytic_exact: tuple[ExactAnalyticSpec, CircuitArtifacts] | None = None
        if analytic_exact is not None:
            arts = build_analytic_exact(analytic_exact, directory, srs_for)
            built_analytic_exact = (analytic_exact, arts)
            record["analytic_exact"] = {
                "spec": asdict(analytic_exact),
                "key": arts.key,
                **_srs_record(arts.srs, directory),
            }
        if built_refits:
            record["refits"] = [
                {"spec": asdict(spec), "key": arts.key, **_srs_record(arts.srs, directory)}
                for spec, arts in built_refits
            ]
        (directory / "circuits.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return cls(directory, built_go, built_an, tuple(built_refits), built_exact, built_analytic_exact)

    @classmethod
    def load(cls, directory: Path) -> DeletionCircuits:
        """Open a circuits directory, re-checking every SRS file against its recorded digest."""
        directory = Path(directory)
        try:
            record = json.loads((directory / "circuits.json").read_text())
        except (OSError, ValueError) as exc:
            raise DeletionError(f"cannot read {directory / 'circuits.json'}: {exc}") from exc
        go = an = None
        if "group_obs" in record:
            go = (GroupObsSpec(**record["group_obs"]["spec"]), _artifacts(directory, record["group_obs"]))
        if "analytic" in record:
            an = (AnalyticSpec(**record["analytic"]["spec"]), _artifacts(directory, record["analytic"]))
        refits = tuple(
            (RefitSpec(**entry["spec"]), _artifacts(directory, entry)) for entry in record.get("refits", [])
        )
        exact = None
        if "group_obs_exact" in record:
            entry = record["group_obs_exact"]
            exact = (
                ExactGroupObsSpec(**entry["spec"]),
                _artifacts(directory, entry),
                _artifacts(directory, {**entry, "key": entry["enrollment_key"]}),
            )
        analytic_exact = None
        if "analytic_exact" in record:
            entry = record["analytic_exact"]
            analytic_exact = (ExactAnalyticSpec(**entry["spec"]), _artifacts(directory, entry))
        return cls(directory, go, an, refits, exact, analytic_exact)

    def group_obs_verifier(self) -> tuple[GroupObsSpec, GroupObsVerifier]:
        if self.group_obs is None:
            raise DeletionError("this model publishes no Group-OBS circuit")
        spec, arts = self.group_obs
        tol = spec.tolerance(input_scale(arts))
        return spec, GroupObsVerifier(
            arts, n_blocks=spec.batch, n_blind=spec.n_blind, tolerance=tol, backend=self.backend
        )

    def exact_verifier(self) -> tuple[ExactGroupObsSpec, ExactGroupObsVerifier]:
        if self.exact is None:
            raise DeletionError("this model publishes no exact Group-OBS circuit")
        spec, deletion, enrollment = self.exact
        return spec, ExactGroupObsVerifier(spec, deletion, enrollment, self.backend)

    def analytic_exact_verifier(self) -> ExactAnalyticVerifier:
        if self.analytic_exact is None:
            raise DeletionError("this model publishes no exact analytic circuit")
        return ExactAnalyticVerifier(*self.analytic_exact, self.backend)

    def enrollment_verifiers(self) -> tuple[ExactGroupObsVerifier | None, ExactAnalyticVerifier | None]:
        """The verifiers of the enrollment proofs this model's exact circuits need (either may be absent)."""
        group_obs = self.exact_verifier()[1] if self.exact is not None else None
        analytic = self.analytic_exact_verifier() if self.analytic_exact is not None else None
        return group_obs, analytic

    def analytic_verifier(self) -> tuple[AnalyticSpec, AnalyticVerifier]:
        if self.analytic is None:
            raise DeletionError("this model publishes no analytic circuit")
        spec, arts = self.analytic
        return spec, AnalyticVerifier(
            arts, d=spec.d, tolerance=spec.tolerance(input_scale(arts)), backend=self.backend
        )


def export_spec(
    spec: GroupObsSpec | AnalyticSpec | RefitSpec, path: Path, *, group_obs: GroupObsSpec | None = None
) -> Path:
    """The ONNX of the relation a published spec defines: what the provider builds and the auditor rebuilds.

    A refit's relation reads ``W1`` in Group-OBS's batch layout, so it needs ``group_obs``.
    """
    if isinstance(spec, GroupObsSpec):
        return export_relation(
            group_obs_relation.GroupObsCheck(spec.block, spec.m, spec.lam, spec.n_blind),
            group_obs_relation.example_inputs(spec.batch, spec.block, spec.m, spec.n_blind),
            path,
            group_obs_relation.INPUT_NAMES,
            group_obs_relation.OUTPUT_NAMES,
        )
    if isinstance(spec, AnalyticSpec):
        return export_relation(
            analytic_relation.AnalyticCheck(spec.d, spec.k, spec.n_u),
            analytic_relation.example_inputs(spec.d, spec.k, spec.n_u),
            path,
            analytic_relation.INPUT_NAMES,
            analytic_relation.OUTPUT_NAMES,
        )
    if group_obs is None:
        raise DeletionError(f"the refit of {spec.masked} reads Group-OBS's layout; publish Group-OBS too")
    module = spec.relation(group_obs)
    return export_relation(
        module, module.example_inputs(), path, module.input_names(), refit_relation.OUTPUT_NAMES
    )


def _srs_record(srs: SrsInfo, directory: Path) -> dict[str, Any]:
    return {
        "srs": {
            "file": str(srs.path.relative_to(directory))
            if srs.path.is_relative_to(directory)
            else str(srs.path),
            "sha256": srs.sha256,
            "logrows": srs.logrows,
            "insecure": srs.insecure,
            "source": srs.source,
        }
    }


def _artifacts(directory: Path, entry: Mapping[str, Any]) -> CircuitArtifacts:
    key = str(entry["key"])
    srs_entry = entry["srs"]
    srs_path = Path(srs_entry["file"])
    srs_path = srs_path if srs_path.is_absolute() else directory / srs_path
    if not srs_path.is_file() or file_sha256(srs_path) != srs_entry["sha256"]:
        raise DeletionError(f"SRS {srs_path} is missing or does not match its recorded digest")
    srs = SrsInfo(
        srs_path,
        int(srs_entry["logrows"]),
        str(srs_entry["sha256"]),
        bool(srs_entry["insecure"]),
        str(srs_entry["source"]),
    )
    folder = directory / key
    return CircuitArtifacts(
        key=key,
        directory=folder,
        onnx=folder / "model.onnx",
        settings=folder / "settings.json",
        compiled=folder / "model.compiled",
        vk=folder / "vk.key",
        pk=folder / "pk.key",
        srs=srs,
    )


def prepare_deletion(
    circuits: DeletionCircuits, *, update_kind: int, request_canonical: bytes, mask_bytes: bytes
) -> int:
    """Compute what judging this request's proofs needs and does not depend on them: the provider's
    commitment to the mask rows of every touched batch, bound to the request digest. The values reach
    :func:`verify_deletion` through the circuits' backend's commitment memo (none: nothing is kept).
    Returns how many commitments were computed or found; 0 for kinds that commit to no mask. Raises
    :class:`DeletionError` or :class:`MaskError` for a mask the circuits cannot read."""
    spec: BlockLayout
    verifier: ExactGroupObsVerifier | GroupObsVerifier
    if update_kind == UPDATE_KIND_GROUP_OBS_EXACT:
        spec, verifier = circuits.exact_verifier()
    elif update_kind == UPDATE_KIND_GROUP_OBS:
        spec, verifier = circuits.group_obs_verifier()
    else:
        return 0
    mask = Mask.from_bytes(mask_bytes)
    layers = {layer.layer: layer for layer in mask.layers}
    digest = request_digest(request_canonical)
    batches = touched_batches(mask, spec)
    for layer, b in batches:
        batch_mask_commitment(verifier, layers[layer], b, spec, digest)
    return len(batches)


def verify_deletion(
    circuits: DeletionCircuits,
    *,
    update_kind: int,
    request_id: str,
    request_canonical: bytes,
    mask_bytes: bytes,
    forget_features: npt.ArrayLike | None,
    forget_labels: npt.ArrayLike | None,
    before: Sequence[CommitmentLike],
    after: Sequence[CommitmentLike],
    proofs: Sequence[bytes],
    enrolled_norms: EnrolledNorms | None = None,
) -> DeletionVerdict:
    """Judge one submission with the provider's own circuits; every refusal names its reason.

    An exact Group-OBS submission is judged against ``enrolled_norms``, what the client's enrollment
    proofs showed (:func:`zkunlearn.proofs.exact_deletion.verify_exact_enrollment`).
    """
    try:
        if update_kind == UPDATE_KIND_GROUP_OBS_EXACT:
            if enrolled_norms is None:
                return DeletionVerdict(False, "no accepted enrollment proofs for this client")
            _spec, verifier = circuits.exact_verifier()
            return verify_exact_deletion(
                verifier,
                request_id=request_id,
                request_canonical=request_canonical,
                mask=Mask.from_bytes(mask_bytes),
                before=before,
                after=after,
                proofs=proofs,
                norms=enrolled_norms,
            )
        if update_kind == UPDATE_KIND_ANALYTIC_EXACT:
            return verify_analytic_exact(
                circuits.analytic_exact_verifier(),
                request_id=request_id,
                request_canonical=request_canonical,
                forget_features=forget_features,
                forget_labels=forget_labels,
                before=before,
                after=after,
                proofs=proofs,
            )
        if update_kind == UPDATE_KIND_GROUP_OBS:
            return verify_group_obs(
                circuits,
                request_id=request_id,
                request_canonical=request_canonical,
                mask=Mask.from_bytes(mask_bytes),
                before=before,
                after=after,
                proofs=proofs,
            )
        if update_kind == UPDATE_KIND_ANALYTIC:
            return verify_analytic(
                circuits,
                request_id=request_id,
                request_canonical=request_canonical,
                forget_features=forget_features,
                forget_labels=forget_labels,
                before=before,
                after=after,
                proofs=proofs,
            )
    except (DeletionError, MaskError) as exc:
        return DeletionVerdict(False, str(exc))
    return DeletionVerdict(False, f"unknown update kind {update_kind}")
