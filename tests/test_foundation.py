"""The repository's promises to a newcomer: layout, imports, CLI and the proto staleness check."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
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


# Which parts may import which: the design card's one-way dependencies.
FORBIDDEN = {
    "circuits": {
        "zkunlearn.provider",
        "zkunlearn.client",
        "zkunlearn.proofs",
        "zkunlearn.protos",
        "zkunlearn.v1",
    },
    "proofs": {"zkunlearn.provider", "zkunlearn.client"},
    "provider": {"zkunlearn.client"},
    "client": {"zkunlearn.provider"},
    "protos": {"zkunlearn.provider", "zkunlearn.client", "zkunlearn.proofs", "zkunlearn.circuits"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_dependencies_point_one_way(part: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / part).rglob("*.py")
        for name in _imports(path)
        if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[part])
    ]
    assert offenders == []


def test_import_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from zkunlearn.provider import server\nimport zkunlearn.client.sdk\n")
    assert _imports(bad) == {"zkunlearn.provider", "zkunlearn.client.sdk"}


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
