"""The repository's promises to a newcomer: layout, imports, CLI and the proto staleness check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import importlint  # noqa: E402
import protogen  # noqa: E402


def test_cli_lists_every_subcommand() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "zkunlearn"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in ("provider", "client", "audit", "demo", "bench"):
        assert command in result.stdout


def test_generated_protos_are_current() -> None:
    assert protogen.check() == []


def test_staleness_check_fails_after_proto_edit(tmp_path: Path) -> None:
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    proto = copy / "zkunlearn" / "v1" / "provider.proto"
    proto.write_text(
        proto.read_text().replace("message GetInfoRequest {}", "message GetInfoRequest { bool x = 1; }")
    )
    stale = protogen.check(copy)
    assert "provider_pb2.py" in stale
    assert "provider_pb2.pyi" in stale


def test_staleness_check_fails_when_generated_file_missing(tmp_path: Path) -> None:
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    (copy / "zkunlearn" / "v1" / "provider_pb2_grpc.pyi").unlink()
    assert protogen.check(copy) == ["provider_pb2_grpc.pyi"]


# Which parts may import which: the design card's one-way dependencies, as import-linter contracts.
PARTS = {
    "zkunlearn": "zkunlearn",
    "provider": "zkunlearn.provider",
    "client": "zkunlearn.client",
    "proofs": "zkunlearn.proofs",
    "circuits": "zkunlearn.circuits",
    "protos/zkunlearn/v1": "zkunlearn.v1",
}


def _mini_repo(root: Path, extra: dict[str, str]) -> Path:
    """A repository with the product's pyproject (its package map and contracts) and one module per
    part, plus ``extra`` (path -> source)."""
    root.mkdir(parents=True)
    shutil.copyfile(ROOT / "pyproject.toml", root / "pyproject.toml")
    for folder in PARTS:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
        (root / folder / "base.py").write_text("VALUE = 1\n")
    # The error root every part may import: a contract names it, so it must exist.
    (root / "zkunlearn").mkdir(exist_ok=True)
    (root / "zkunlearn" / "errors.py").write_text("class ZkUnlearnError(Exception): ...\n")
    for path, source in extra.items():
        (root / path).write_text(source)
    return root


def test_the_repository_keeps_its_import_contracts() -> None:
    assert importlint.main(ROOT) == 0


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("client/bad.py", "from zkunlearn.provider import base\n"),
        ("provider/bad.py", "import zkunlearn.client.base\n"),
        ("client/bad.py", "from ..provider import base\n"),  # relative imports count too
        ("circuits/bad.py", "from zkunlearn.proofs import base\n"),
        ("proofs/bad.py", "from zkunlearn.client.base import VALUE\n"),
        ("protos/zkunlearn/v1/bad.py", "from zkunlearn.circuits import base\n"),
        ("zkunlearn/errors.py", "from zkunlearn.provider import base\n"),
    ],
)
def test_a_broken_contract_fails_the_check(tmp_path: Path, path: str, source: str) -> None:
    honest = _mini_repo(tmp_path / "honest", {"proofs/ok.py": "from zkunlearn.circuits import base\n"})
    assert importlint.main(honest) == 0
    assert importlint.main(_mini_repo(tmp_path / "broken", {path: source})) != 0


def test_non_editable_wheel_ships_every_part(tmp_path: Path) -> None:
    """The wheel, not just the editable install, must carry every mapped folder and the generated stubs."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("zkunlearn-*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
        names = set(archive.namelist())
    assert "zkunlearn/v1/provider_pb2.pyi" in names
    assert "zkunlearn/client/py.typed" in names
    code = (
        "import zkunlearn, zkunlearn.provider, zkunlearn.client, zkunlearn.proofs\n"
        "import zkunlearn.circuits, zkunlearn.protos\n"
        "from zkunlearn.protos import provider_pb2\n"
        "print(zkunlearn.__file__); print(zkunlearn.client.__file__); print(provider_pb2.__file__)"
    )
    # The unpacked wheel comes first on sys.path, ahead of the editable install's import hook.
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
    )
    assert result.returncode == 0, result.stderr
    assert all(line.startswith(str(unpacked)) for line in result.stdout.split())
