"""The auditor rebuilds a bundle's verifying keys from the published specs before trusting any proof.

A provider that wanted to accept proofs of nothing could publish a vk for a weaker relation, settings
that leave inputs unchecked, or a spec its circuit does not implement; each is refused here, with real
ezkl keys (a small Group-OBS circuit).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from zkunlearn.proofs.deletion import (
    DeletionError,
    GroupObsSpec,
)
from zkunlearn.proofs.published import check_published_circuits

if TYPE_CHECKING:
    from tests.conftest import SharedCircuits

SPEC = GroupObsSpec(block=16, m=8, batch=1, lam=0.1)
WEAKER = GroupObsSpec(block=16, m=8, batch=1, lam=0.5)


@pytest.fixture(scope="module")
def published(shared_circuits: SharedCircuits) -> tuple[Path, Path]:
    """The provider's circuits, and another spec's (the source of a substituted key); tests copy them."""
    honest = shared_circuits.build(group_obs=SPEC)
    other = shared_circuits.build(group_obs=WEAKER)
    assert honest.group_obs is not None
    assert other.group_obs is not None
    return honest.directory, other.group_obs[1].vk


@pytest.fixture
def copy(published: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(published[0], tmp_path / "circuits", ignore=shutil.ignore_patterns("pk.key")))


def _artifact_dir(circuits: Path) -> Path:
    return circuits / json.loads((circuits / "circuits.json").read_text())["group_obs"]["key"]


def test_published_circuits_rebuild_to_the_same_vk(copy: Path) -> None:
    note = check_published_circuits(copy)
    assert note.startswith("vk rebuilt and identical: group_obs")
    assert "'lam': 0.1" in note
    assert "INSECURE dev" in note


def test_a_substituted_vk_is_refused(published: tuple[Path, Path], copy: Path) -> None:
    shutil.copyfile(published[1], _artifact_dir(copy) / "vk.key")
    with pytest.raises(DeletionError, match=r"vk\.key is not the verifying key of its relation"):
        check_published_circuits(copy)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ignore_range_check_inputs_outputs", True),
        ("input_visibility", "Public"),
        ("param_visibility", "Private"),
    ],
)
def test_settings_that_would_not_bind_the_proof_are_refused(copy: Path, key: str, value: object) -> None:
    path = _artifact_dir(copy) / "settings.json"
    settings = json.loads(path.read_text())
    settings["run_args"][key] = value
    path.write_text(json.dumps(settings))
    with pytest.raises(DeletionError, match=f"settings run_args {key} is"):
        check_published_circuits(copy)


def test_a_spec_the_circuit_does_not_implement_is_refused(copy: Path) -> None:
    """The tolerance and the auditor's reading follow the spec: it must be the circuit's own."""
    record = json.loads((copy / "circuits.json").read_text())
    record["group_obs"]["spec"]["lam"] = 0.5
    (copy / "circuits.json").write_text(json.dumps(record))
    with pytest.raises(DeletionError, match=r"model\.onnx is not the relation its published spec defines"):
        check_published_circuits(copy)
