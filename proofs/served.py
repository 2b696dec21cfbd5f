"""What a provider serves of a model's circuits over ``GetArtifact``, and the names a device asks for.

Each published relation of a model is one circuit id, ``<model_id>/<kind>``, whose artifacts are the
circuits index (``circuits.json``: specs and SRS digests), the settings of each relation the device
compiles, and the SRS. Never a proving key, and not the compiled circuit either: the device exports
and compiles the published spec's relation itself (:mod:`zkunlearn.proofs.artifacts`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zkunlearn.proofs.deletion import DeletionCircuits

__all__ = ["DEVICE_KINDS", "SERVED_ARTIFACTS", "circuit_id", "publication"]

#: Artifact names served per kind (the kind is also the kind's key in ``circuits.json``).
SERVED_ARTIFACTS: dict[str, tuple[str, ...]] = {
    "group_obs_exact": ("index", "settings", "enrollment_settings", "srs"),
    "group_obs": ("index", "settings", "srs"),
    "analytic_exact": ("index", "settings", "srs"),
}
#: The kinds a device can derive and prove, in the order a device prefers them when a model publishes
#: several: exact Group-OBS, then fixed-point Group-OBS, then the exact analytic head.
DEVICE_KINDS: tuple[str, ...] = tuple(SERVED_ARTIFACTS)


def circuit_id(model_id: str, kind: str) -> str:
    """The ``GetArtifact`` circuit id of ``model_id``'s ``kind`` circuit."""
    return f"{model_id}/{kind}"


def publication(model_id: str, circuits: DeletionCircuits) -> dict[str, dict[str, Path]]:
    """The provider config's ``[artifacts]`` tables serving every device kind ``circuits`` holds:
    circuit id -> artifact name -> file."""
    index = circuits.directory / "circuits.json"
    served: dict[str, dict[str, Path]] = {}
    if circuits.exact is not None:
        _spec, deletion, enrollment = circuits.exact
        served[circuit_id(model_id, "group_obs_exact")] = {
            "index": index,
            "settings": deletion.settings,
            "enrollment_settings": enrollment.settings,
            "srs": deletion.srs.path,
        }
    for kind, entry in (("group_obs", circuits.group_obs), ("analytic_exact", circuits.analytic_exact)):
        if entry is not None:
            arts = entry[1]
            files = {"index": index, "settings": arts.settings, "srs": arts.srs.path}
            served[circuit_id(model_id, kind)] = files
    return served
