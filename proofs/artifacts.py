"""Circuit artifacts, cached by content: (ONNX, settings, SRS digest) -> compiled circuit, vk, pk.

Roles: the *provider* exports the relation, writes settings, compiles and runs setup; it keeps the vk
and settings as its own and hands the client the compiled circuit and settings. The *client* never
receives a proving key: it regenerates pk (and vk) from the compiled circuit and the same SRS
(ezkl's setup is deterministic), and a test checks that its vk equals the provider's byte for byte.

Settings carry a timestamp; it is dropped before hashing and writing so identical inputs give one key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zkunlearn.proofs.backend import CircuitConfig, EzklBackend, ProvingBackend
from zkunlearn.proofs.srs import SrsInfo, file_sha256


class ArtifactError(RuntimeError):
    """Artifacts are missing or do not match their content key."""


@dataclass(frozen=True)
class CircuitArtifacts:
    key: str
    directory: Path
    onnx: Path
    settings: Path
    compiled: Path
    vk: Path
    pk: Path
    srs: SrsInfo

    @property
    def settings_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.settings.read_text())
        return data

    @property
    def logrows(self) -> int:
        return int(self.settings_dict["run_args"]["logrows"])

    @property
    def output_scale(self) -> int:
        return int(self.settings_dict["model_output_scales"][0])


def _normalise_settings(path: Path) -> bytes:
    data = json.loads(path.read_text())
    data.pop("timestamp", None)
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(raw)
    return raw


def content_key(onnx_bytes: bytes, settings_bytes: bytes, srs_sha256: str) -> str:
    h = hashlib.sha256(b"zkunlearn/circuit/v1")
    for part in (onnx_bytes, settings_bytes, srs_sha256.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def build_provider_artifacts(
    onnx_path: Path,
    cache_dir: Path,
    srs_for_logrows: Callable[[int], SrsInfo],
    config: CircuitConfig | None = None,
    backend: ProvingBackend | None = None,
) -> CircuitArtifacts:
    """Settings + compile + setup, reusing a cached build with the same content key."""
    backend = backend or EzklBackend()
    config = config or CircuitConfig()
    cache_dir = Path(cache_dir)
    staging = cache_dir / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    settings_tmp = staging / "settings.json"
    settings = backend.make_settings(Path(onnx_path), settings_tmp, config)
    settings_bytes = _normalise_settings(settings_tmp)
    srs = srs_for_logrows(int(settings["run_args"]["logrows"]))
    onnx_bytes = Path(onnx_path).read_bytes()
    key = content_key(onnx_bytes, settings_bytes, srs.sha256)
    target = cache_dir / key
    arts = CircuitArtifacts(
        key=key,
        directory=target,
        onnx=target / "model.onnx",
        settings=target / "settings.json",
        compiled=target / "model.compiled",
        vk=target / "vk.key",
        pk=target / "pk.key",
        srs=srs,
    )
    if all(p.exists() for p in (arts.onnx, arts.settings, arts.compiled, arts.vk, arts.pk)):
        return arts
    target.mkdir(parents=True, exist_ok=True)
    arts.onnx.write_bytes(onnx_bytes)
    arts.settings.write_bytes(settings_bytes)
    backend.compile(arts.onnx, arts.settings, arts.compiled)
    backend.setup(arts.compiled, srs.path, arts.vk, arts.pk)
    shutil.rmtree(staging, ignore_errors=True)
    return arts


@dataclass(frozen=True)
class ClientCircuit:
    """What the client holds: compiled circuit, settings and keys it derived itself."""

    compiled: Path
    settings: Path
    vk: Path
    pk: Path
    srs: SrsInfo

    @property
    def output_scale(self) -> int:
        return int(json.loads(self.settings.read_text())["model_output_scales"][0])


def client_artifacts(
    compiled_bytes: bytes,
    settings_bytes: bytes,
    srs: SrsInfo,
    directory: Path,
    backend: ProvingBackend | None = None,
) -> ClientCircuit:
    """Regenerate pk/vk from the provider's compiled circuit and settings plus the shared SRS."""
    backend = backend or EzklBackend()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if file_sha256(srs.path) != srs.sha256:
        raise ArtifactError(f"SRS {srs.path} changed since it was pinned")
    cc = ClientCircuit(
        compiled=directory / "model.compiled",
        settings=directory / "settings.json",
        vk=directory / "vk.key",
        pk=directory / "pk.key",
        srs=srs,
    )
    cc.compiled.write_bytes(compiled_bytes)
    cc.settings.write_bytes(settings_bytes)
    backend.setup(cc.compiled, srs.path, cc.vk, cc.pk)
    return cc
