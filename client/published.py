"""A model's published circuit as a device gets it: downloaded over gRPC, checked, derived on the device.

The device asks for ``<model_id>/<kind>`` (names in :mod:`zkunlearn.proofs.served`), downloads the
circuits index, the settings and the SRS (each download size- and digest-checked), holds the SRS to the
index's digest and to a pin of its own when it has one, refuses a development SRS unless told to accept
it, and derives its circuit from the published spec: the relation exported and compiled here, the
proving key generated here (:func:`zkunlearn.proofs.artifacts.derive_client_circuit`). Nothing the
provider compiled is run. Everything lands under one folder (``published/<kind>`` and
``circuit/<kind>``); :func:`open_published` opens it again after a restart without deriving anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
from zkunlearn.proofs.artifacts import (
    ArtifactError,
    ClientCircuit,
    derive_analytic_exact_client_circuit,
    derive_client_circuit,
    derive_exact_client_circuits,
    derived_client_circuit,
)
from zkunlearn.proofs.exact import ExactGroupObsSpec
from zkunlearn.proofs.served import DEVICE_KINDS, SERVED_ARTIFACTS, circuit_id
from zkunlearn.proofs.specs import GroupObsSpec
from zkunlearn.proofs.srs import SrsInfo

from zkunlearn.errors import ZkUnlearnError

from .artifacts import fetch_artifact
from .transport import Transport

__all__ = [
    "UPDATE_KINDS",
    "KindSpec",
    "PublicationError",
    "PublishedCircuit",
    "derive_published",
    "fetch_published",
    "open_published",
]

KindSpec = GroupObsSpec | ExactGroupObsSpec | ExactAnalyticSpec
#: The protocol's update kind of each device kind.
UPDATE_KINDS = {"group_obs": 1, "group_obs_exact": 3, "analytic_exact": 4}
_SPECS: dict[str, type[Any]] = {
    "group_obs": GroupObsSpec,
    "group_obs_exact": ExactGroupObsSpec,
    "analytic_exact": ExactAnalyticSpec,
}
_EXACT_PARTS = ("deletion", "enrollment")  # derive_exact_client_circuits' sub-folders


#: Why the one-call device refuses update kind 2 (the fixed-point analytic head, never served to devices).
NO_FIXED_POINT_ANALYTIC = (
    "the one-call device does not prove the fixed-point analytic head (kind 'analytic', update kind 2): "
    "publish the model's 'analytic_exact' circuit and use enroll_head(), or drive EdgeClient with "
    "AnalyticUnlearner (docs/sdk.md)"
)


class PublicationError(ZkUnlearnError, RuntimeError):
    """The provider does not publish what the device needs (no circuit for the model, an artifact
    missing, an index that does not describe it), or publishes it on an SRS the device does not accept."""


@dataclass(frozen=True)
class PublishedCircuit:
    """One kind of a model's published circuits, derived on this device."""

    model_id: str
    kind: str  # a key of SERVED_ARTIFACTS
    spec: KindSpec
    circuits: tuple[ClientCircuit, ...]  # the deletion circuit; exact Group-OBS: then its enrollment one

    @property
    def update_kind(self) -> int:
        return UPDATE_KINDS[self.kind]

    @property
    def srs(self) -> SrsInfo:
        return self.circuits[0].srs


def fetch_published(
    transport: Transport,
    model_id: str,
    folder: Path,
    *,
    kinds: tuple[str, ...] = DEVICE_KINDS,
    srs_sha256: str | None = None,
    allow_insecure_srs: bool = False,
) -> PublishedCircuit:
    """Download the first of ``kinds`` that ``model_id`` publishes and derive its circuit under ``folder``.

    Raises :class:`PublicationError` for what the provider does not publish or an SRS refused (another
    digest than ``srs_sha256``; a development SRS without ``allow_insecure_srs``),
    :class:`~zkunlearn.proofs.artifacts.ArtifactError` for a published circuit the device refuses to
    derive (unsound settings, too little blinding), and the download's own errors.
    """
    if "analytic" in kinds:
        raise PublicationError(NO_FIXED_POINT_ANALYTIC)
    unknown = [kind for kind in kinds if kind not in SERVED_ARTIFACTS]
    if unknown or not kinds:
        raise PublicationError(f"unknown circuit kinds {unknown or []}; a device proves {list(DEVICE_KINDS)}")
    for kind in kinds:
        if _fetch(transport, model_id, kind, "index", folder, required=False):
            break
    else:
        asked = ", ".join(circuit_id(model_id, k) for k in kinds)
        raise PublicationError(
            f"the provider publishes no circuit for model {model_id!r} (asked for {asked})"
        )
    record = _record(folder, model_id, kind)
    srs = record["srs"]
    if srs_sha256 is not None and srs["sha256"] != srs_sha256.lower():
        raise PublicationError(
            f"{circuit_id(model_id, kind)} uses the SRS with SHA-256 {srs['sha256']}, not the pinned "
            f"{srs_sha256}"
        )
    if (srs["insecure"] or srs["source"] == "ezkl.gen_srs") and not allow_insecure_srs:
        raise PublicationError(
            f"{circuit_id(model_id, kind)} uses an INSECURE development SRS (whoever generated it can forge "
            "proofs); pass allow_insecure_srs=True for tests and demos only"
        )
    for name in SERVED_ARTIFACTS[kind][1:]:
        _fetch(transport, model_id, kind, name, folder, required=True)
    return derive_published(folder, model_id, kind)


def derive_published(folder: Path, model_id: str, kind: str) -> PublishedCircuit:
    """Derive the device's circuit from the artifacts already downloaded under ``folder``."""
    record = _record(folder, model_id, kind)
    files = Path(folder) / "published" / kind
    spec, srs, target = _spec(record, kind, model_id), _srs(record, files / "srs"), _derived_dir(folder, kind)
    settings = (files / "settings").read_bytes()
    circuits: tuple[ClientCircuit, ...]
    if isinstance(spec, ExactGroupObsSpec):
        enrollment = (files / "enrollment_settings").read_bytes()
        circuits = derive_exact_client_circuits(spec, settings, enrollment, srs, target)
    elif isinstance(spec, ExactAnalyticSpec):
        circuits = (derive_analytic_exact_client_circuit(spec, settings, srs, target),)
    else:
        circuits = (derive_client_circuit(spec, settings, srs, target),)
    return PublishedCircuit(model_id, kind, spec, circuits)


def open_published(folder: Path, model_id: str, kind: str) -> PublishedCircuit:
    """The circuit derived under ``folder`` before (e.g. by an earlier run of the device's program);
    derived again from the downloaded artifacts only if some derived file is missing."""
    record = _record(folder, model_id, kind)
    srs = _srs(record, Path(folder) / "published" / kind / "srs")
    target = _derived_dir(folder, kind)
    parts = [target / part for part in _EXACT_PARTS] if kind == "group_obs_exact" else [target]
    try:
        circuits = tuple(derived_client_circuit(part, srs) for part in parts)
    except ArtifactError:
        return derive_published(folder, model_id, kind)
    return PublishedCircuit(model_id, kind, _spec(record, kind, model_id), circuits)


def _derived_dir(folder: Path, kind: str) -> Path:
    return Path(folder) / "circuit" / kind


def _fetch(
    transport: Transport, model_id: str, kind: str, name: str, folder: Path, *, required: bool
) -> bool:
    cid = circuit_id(model_id, kind)
    try:
        fetch_artifact(transport, cid, name, Path(folder) / "published" / kind / name)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        if required:
            raise PublicationError(f"the provider publishes {cid} without its {name!r} artifact") from exc
        return False
    return True


def _record(folder: Path, model_id: str, kind: str) -> dict[str, Any]:
    """The index's record of ``kind``, refused by name unless it has what a device reads."""
    path = Path(folder) / "published" / kind / "index"
    where = f"the circuits index of {circuit_id(model_id, kind)}"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PublicationError(f"cannot read {where}: {exc}") from exc
    record = index.get(kind) if isinstance(index, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise PublicationError(f"{where} has no {kind!r} entry with a spec")
    srs = record.get("srs")
    fields = {"logrows": int, "sha256": str, "insecure": bool, "source": str}
    if not isinstance(srs, dict) or any(not isinstance(srs.get(k), t) for k, t in fields.items()):
        raise PublicationError(f"{where} does not describe its SRS (logrows, sha256, insecure, source)")
    if kind == "group_obs" and index.get("refits"):
        raise PublicationError(
            f"{circuit_id(model_id, kind)} comes with output-refit circuits, which the one-call device does "
            "not prove: drive EdgeClient with GroupObsUnlearner(refits=...) (docs/sdk.md), or publish "
            "the model without refit pairs"
        )
    return record


def _spec(record: dict[str, Any], kind: str, model_id: str) -> KindSpec:
    try:
        spec: KindSpec = _SPECS[kind](**record["spec"])
    except (TypeError, ValueError) as exc:
        raise PublicationError(f"the published {circuit_id(model_id, kind)} spec is not one: {exc}") from exc
    return spec


def _srs(record: dict[str, Any], path: Path) -> SrsInfo:
    srs = record["srs"]
    return SrsInfo(path, int(srs["logrows"]), str(srs["sha256"]), bool(srs["insecure"]), str(srs["source"]))
