"""Check the design card's import contracts (pyproject.toml's [tool.importlinter]) with import-linter.

import-linter reads a package's modules from its folder on disk, while the zkunlearn packages are
mapped from top-level folders (pyproject.toml's package-dir); so this copies the sources into their
import layout in a temporary folder, puts it first on the path, and runs ``lint-imports`` there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_layout(root: Path, into: Path) -> Path:
    """Copy every mapped package's ``.py`` files under ``into`` at their import path."""
    package_dir: dict[str, str] = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    folders = {name: (root / folder).resolve() for name, folder in package_dir.items()}
    for name, folder in folders.items():
        # A folder that holds another mapped package (protos/zkunlearn) is reached through its own name.
        inner = [
            f for other, f in folders.items() if other != name and f.is_relative_to(folder) and f != folder
        ]
        for source in folder.rglob("*.py"):
            if any(source.is_relative_to(f) for f in inner) or "__pycache__" in source.parts:
                continue
            target = into.joinpath(*name.split("."), source.relative_to(folder))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return into


def main(root: Path = ROOT) -> int:
    with tempfile.TemporaryDirectory(prefix="zkimports-") as tmp:
        layout = build_layout(root, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(layout)}
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.call(
            [str(lint), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=layout, env=env
        )


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
