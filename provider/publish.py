"""Publishing a model's circuits: build the sound relations for a spec, check the model's layer sizes
against the one layout rule, and the provider config that serves them.

``zkunlearn provider publish`` calls :func:`publish_circuits`; the lines it returns go into
``provider.toml`` as they are (``docs/operations.md``, "Publishing your own model").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.exact import ExactGroupObsSpec
from zkunlearn.proofs.layout import DeletionError, layer_layout
from zkunlearn.proofs.served import publication

from zkunlearn.errors import MalformedError

__all__ = ["PublishError", "Published", "artifact_config_lines", "publish_circuits"]


class PublishError(MalformedError):
    """The spec or a layer size cannot be published; the message names the rule."""


@dataclass(frozen=True)
class Published:
    circuits: DeletionCircuits
    config_lines: tuple[str, ...]
    batches: Mapping[str, int]  # layer -> proofs per full deletion of it (padding included)
    insecure_srs: bool


def artifact_config_lines(model_id: str, circuits_dir: Path) -> list[str]:
    """``provider.toml`` tables that tell the verifier where ``model_id``'s circuits are and serve
    what a device downloads of each over ``GetArtifact``."""
    circuits_dir = Path(circuits_dir).resolve()
    lines = [f"[artifacts.{json.dumps(model_id)}]", f"circuits_dir = {json.dumps(str(circuits_dir))}"]
    for circuit, files in publication(model_id, DeletionCircuits.load(circuits_dir)).items():
        lines.append(f"[artifacts.{json.dumps(circuit)}]")
        lines += [f"{name} = {json.dumps(str(path))}" for name, path in files.items()]
    return lines


def publish_circuits(
    out_dir: Path,
    model_id: str,
    *,
    group_obs: ExactGroupObsSpec | None,
    analytic: ExactAnalyticSpec | None = None,
    layers: Mapping[str, int] | None = None,
) -> Published:
    """Build ``model_id``'s exact circuits into ``out_dir`` (a development SRS: INSECURE, recorded as such)
    after checking every ``layers`` entry (name -> weight count) fits ``group_obs``'s layout; refuses
    before building anything."""
    if not model_id or "/" in model_id:
        raise PublishError(
            f"model id {model_id!r} must be non-empty and contain no '/' (circuit ids add one)"
        )
    if group_obs is None and analytic is None:
        raise PublishError("nothing to publish: give a Group-OBS spec, an analytic head spec, or both")
    batches: dict[str, int] = {}
    if layers and group_obs is None:
        raise PublishError("layer sizes are checked against a Group-OBS spec: give its block and rank")
    for layer, numel in (layers or {}).items():
        assert group_obs is not None
        try:
            batches[layer] = layer_layout(layer, numel, group_obs).batches
        except DeletionError as exc:
            raise PublishError(str(exc)) from exc
    circuits = DeletionCircuits.build(
        Path(out_dir), group_obs=None, analytic=None, exact=group_obs, analytic_exact=analytic
    )
    lines = artifact_config_lines(model_id, circuits.directory)
    return Published(circuits, tuple(lines), batches, insecure_srs=True)
