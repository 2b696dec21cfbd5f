"""Circuit artifacts, cached by content: (ONNX, settings, SRS digest) -> compiled circuit, vk, pk.

Roles: the *provider* exports the relation, writes settings, compiles and runs setup; it keeps the vk
and settings as its own and hands the client the compiled circuit and settings. The *client* never
receives a proving key: it regenerates pk (and vk) from the compiled circuit and the same SRS
(ezkl's setup is deterministic), and a test checks that its vk equals the provider's byte for byte.

A client that talks to a provider must not trust what it serves: :func:`derive_client_circuit` exports
the relation from the published spec itself, refuses settings whose run arguments are not the sound
ones (``input_visibility`` "public" would make the client's weights the proof's public instances) and
specs without enough blinding rows, and compiles the circuit locally. The provider's compiled bytes are
never used. :func:`client_artifacts` is for artifacts this process built or otherwise trusts.

Settings carry a timestamp; it is dropped before hashing and writing so identical inputs give one key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zkunlearn.proofs.backend import CircuitConfig, EzklBackend, ProvingBackend
from zkunlearn.proofs.srs import SrsInfo, file_sha256

from zkunlearn.errors import ZkUnlearnError

if TYPE_CHECKING:
    from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
    from zkunlearn.proofs.exact import ExactGroupObsSpec
    from zkunlearn.proofs.specs import AnalyticSpec, GroupObsSpec, RefitSpec

log = logging.getLogger(__name__)


class ArtifactError(ZkUnlearnError, RuntimeError):
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

    def as_client(self) -> ClientCircuit:
        """The same circuit as a prover uses it (this process built it, so its proving key is trusted)."""
        return ClientCircuit(self.compiled, self.settings, self.vk, self.pk, self.srs)


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


def required_logrows(onnx: Path, config: CircuitConfig, staging: Path) -> int:
    """The logrows a relation needs under ``config`` (settings only: no compile, no setup)."""
    staging.mkdir(parents=True, exist_ok=True)
    settings = EzklBackend().make_settings(onnx, staging / f"{onnx.stem}.settings.json", config)
    return int(settings["run_args"]["logrows"])


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


def check_client_settings(settings_bytes: bytes, *, exact: bool = False) -> dict[str, Any]:
    """Parse served settings and refuse any whose run arguments differ from the protocol's sound ones.

    ``input_visibility`` must be KZG commitments: "public" (ezkl's Python default) would put the
    client's weights in the proof's public instances, "hashed" would publish a brute-forceable hash.
    The lists are :data:`zkunlearn.proofs.published.SOUND_RUN_ARGS` (fixed-point relations) and
    ``EXACT_SOUND_RUN_ARGS`` (``exact``: the exact circuits), the ones the auditor enforces.
    """
    from zkunlearn.proofs.published import EXACT_SOUND_RUN_ARGS, SOUND_RUN_ARGS  # imports this module

    sound = EXACT_SOUND_RUN_ARGS if exact else SOUND_RUN_ARGS

    try:
        data: dict[str, Any] = json.loads(settings_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"circuit settings are not JSON: {exc}") from exc
    run_args = data.get("run_args") if isinstance(data, dict) else None
    if not isinstance(run_args, dict):
        raise ArtifactError("circuit settings carry no run_args")
    for key, want in sound.items():
        got = run_args.get(key)
        if type(got) is not type(want) or got != want:
            raise ArtifactError(
                f"refusing circuit settings: run_args {key} is {got!r}, the protocol needs {want!r} "
                "(other values can publish or leave unchecked the client's private weights)"
            )
    return data


def check_client_spec(spec: GroupObsSpec | AnalyticSpec | RefitSpec, group_obs: GroupObsSpec | None) -> None:
    """Refuse a published spec whose committed tensors carry fewer blinding rows than the product's
    minimum (``circuits.group_obs.N_BLIND``): without them the KZG commitments to the client's weights
    are not hiding (low-entropy weights can be found by trial)."""
    # Late imports: deletion imports this module, and the relation pulls in torch.
    from zkunlearn.circuits.group_obs import N_BLIND
    from zkunlearn.proofs.deletion import GroupObsSpec

    for what in (spec, group_obs):
        if isinstance(what, GroupObsSpec):
            n_blind = what.n_blind
            if type(n_blind) is not int or n_blind < N_BLIND:
                raise ArtifactError(
                    f"refusing Group-OBS spec with n_blind={n_blind!r}: at least {N_BLIND} blinding rows "
                    "are needed to hide the weights behind their commitments"
                )


def _check_srs(srs: SrsInfo) -> None:
    if file_sha256(srs.path) != srs.sha256:
        raise ArtifactError(f"SRS {srs.path} changed since it was pinned")
    if srs.insecure or srs.source == "ezkl.gen_srs":
        log.warning(
            "circuit uses the INSECURE development SRS %s (toxic waste known to whoever generated it: "
            "proofs can be forged); acceptable for tests and demos only, never in production",
            srs.path.name,
        )


def derive_client_circuit(
    spec: GroupObsSpec | AnalyticSpec | RefitSpec,
    settings_bytes: bytes,
    srs: SrsInfo,
    directory: Path,
    *,
    group_obs: GroupObsSpec | None = None,
    backend: ProvingBackend | None = None,
) -> ClientCircuit:
    """The client's circuit for a published ``spec``, derived here and never taken from the provider.

    The relation is exported from ``spec`` with this code (:func:`~zkunlearn.proofs.deletion.export_spec`,
    what the auditor rebuilds), compiled with the served settings once they pass
    :func:`check_client_settings`, and set up with the pinned SRS. A refit spec needs its ``group_obs``
    spec. The result's vk equals the provider's exactly when the provider published this relation.
    """
    from zkunlearn.proofs.deletion import DeletionError, export_spec  # deletion imports this module

    backend = backend or EzklBackend()
    directory = Path(directory)
    check_client_spec(spec, group_obs)
    check_client_settings(settings_bytes)
    _check_srs(srs)
    cc = _client_circuit(directory, srs)
    onnx = directory / "model.onnx"
    cc.compiled.unlink(missing_ok=True)
    try:
        export_spec(spec, onnx, group_obs=group_obs)
    except DeletionError as exc:
        raise ArtifactError(str(exc)) from exc
    cc.settings.write_bytes(settings_bytes)
    try:
        backend.compile(onnx, cc.settings, cc.compiled)
    except BaseException as exc:  # ezkl panics are BaseException; KeyboardInterrupt is not ours
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ArtifactError(f"cannot compile the published relation with the served settings: {exc}") from exc
    backend.setup(cc.compiled, srs.path, cc.vk, cc.pk)
    return cc


def derive_exact_client_circuits(
    spec: ExactGroupObsSpec,
    deletion_settings: bytes,
    enrollment_settings: bytes,
    srs: SrsInfo,
    directory: Path,
    *,
    backend: ProvingBackend | None = None,
) -> tuple[ClientCircuit, ClientCircuit]:
    """The client's exact Group-OBS deletion and enrollment circuits for a published ``spec``, exported
    and compiled here with the served settings once they pass :func:`check_client_settings`."""
    from zkunlearn.proofs.exact_circuits import export_exact  # imports this module

    backend = backend or EzklBackend()
    directory = Path(directory)
    for settings in (deletion_settings, enrollment_settings):
        check_client_settings(settings, exact=True)
    _check_srs(srs)
    onnx = export_exact(spec, directory / "relations")
    out = []
    for name, relation_onnx, settings in zip(
        ("deletion", "enrollment"), onnx, (deletion_settings, enrollment_settings), strict=True
    ):
        out.append(_compile_served(backend, relation_onnx, settings, directory / name, srs, f"exact {name}"))
    return out[0], out[1]


def derive_analytic_exact_client_circuit(
    spec: ExactAnalyticSpec,
    settings_bytes: bytes,
    srs: SrsInfo,
    directory: Path,
    *,
    backend: ProvingBackend | None = None,
) -> ClientCircuit:
    """The client's exact analytic circuit for a published ``spec``, exported and compiled here with the
    served settings once they pass :func:`check_client_settings` and decompose as the spec assumes."""
    from zkunlearn.proofs.analytic_exact_circuits import export_analytic_exact  # imports this module

    backend = backend or EzklBackend()
    directory = Path(directory)
    run_args = check_client_settings(settings_bytes, exact=True)["run_args"]
    want = {"decomp_base": spec.decomp_base, "decomp_legs": spec.decomp_legs}
    for key, value in want.items():
        if run_args.get(key) != value:
            raise ArtifactError(
                f"refusing circuit settings: run_args {key} is {run_args.get(key)!r}, the spec needs "
                f"{value!r} (its offsets and thresholds assume that decomposition)"
            )
    _check_srs(srs)
    onnx = export_analytic_exact(spec, directory / "relation")
    return _compile_served(backend, onnx, settings_bytes, directory, srs, "exact analytic")


def _compile_served(
    backend: ProvingBackend, onnx: Path, settings: bytes, directory: Path, srs: SrsInfo, what: str
) -> ClientCircuit:
    """Compile a relation exported here with the served (already checked) settings, and set it up."""
    cc = _client_circuit(directory, srs)
    cc.settings.write_bytes(settings)
    try:
        backend.compile(onnx, cc.settings, cc.compiled)
    except BaseException as exc:  # ezkl panics are BaseException; KeyboardInterrupt is not ours
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ArtifactError(f"cannot compile the {what} relation with the served settings: {exc}") from exc
    backend.setup(cc.compiled, srs.path, cc.vk, cc.pk)
    return cc


def _client_circuit(directory: Path, srs: SrsInfo) -> ClientCircuit:
    directory.mkdir(parents=True, exist_ok=True)
    return _layout(directory, srs)


def _layout(directory: Path, srs: SrsInfo) -> ClientCircuit:
    return ClientCircuit(
        compiled=directory / "model.compiled",
        settings=directory / "settings.json",
        vk=directory / "vk.key",
        pk=directory / "pk.key",
        srs=srs,
    )


def derived_client_circuit(directory: Path, srs: SrsInfo) -> ClientCircuit:
    """The circuit a ``derive_*`` call left in ``directory`` (e.g. on a device after a restart), refused
    unless every file of it is there; nothing is compiled or set up again."""
    cc = _layout(Path(directory), srs)
    missing = [p.name for p in (cc.compiled, cc.settings, cc.vk, cc.pk, srs.path) if not p.is_file()]
    if missing:
        raise ArtifactError(f"the circuit derived in {directory} lacks {', '.join(missing)}")
    return cc


def client_artifacts(
    compiled_bytes: bytes,
    settings_bytes: bytes,
    srs: SrsInfo,
    directory: Path,
    backend: ProvingBackend | None = None,
    *,
    exact: bool = False,
) -> ClientCircuit:
    """Regenerate pk/vk from a compiled circuit and settings plus the shared SRS.

    The compiled bytes are used as given: only for artifacts this process built or otherwise trusts.
    A client of a remote provider uses :func:`derive_client_circuit` (or
    :func:`derive_exact_client_circuits`), which never runs served bytes. The settings are still
    checked (:func:`check_client_settings`; ``exact`` for the exact Group-OBS circuits).
    """
    backend = backend or EzklBackend()
    directory = Path(directory)
    check_client_settings(settings_bytes, exact=exact)
    _check_srs(srs)
    cc = _client_circuit(directory, srs)
    cc.compiled.write_bytes(compiled_bytes)
    cc.settings.write_bytes(settings_bytes)
    backend.setup(cc.compiled, srs.path, cc.vk, cc.pk)
    return cc
