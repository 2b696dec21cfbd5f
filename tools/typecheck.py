"""Run mypy over the zkunlearn packages as they are imported, not as they are laid out on disk.

The design card keeps provider/, client/, ... as top-level folders mapped under `zkunlearn.*`
(pyproject.toml's package-dir). mypy cannot follow setuptools' editable import hook, so this
builds a tree of symlinks with the import layout from that same map and points MYPYPATH at it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".cache" / "mypy-src"


def build_tree() -> Path:
    package_dir: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    if TREE.exists():
        for link in sorted(TREE.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            link.unlink() if link.is_symlink() or link.is_file() else link.rmdir()
    mapped = {(ROOT / folder).resolve() for folder in package_dir.values()}
    for name, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
        target = TREE.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for entry in (ROOT / folder).iterdir():
            link = target / entry.name
            # A folder that holds another mapped package (protos/zkunlearn) is reached through its own name.
            holds_mapped = any(
                m.is_relative_to(entry.resolve()) for m in mapped if m != (ROOT / folder).resolve()
            )
            if entry.name.startswith((".", "__pycache__")) or link.exists() or holds_mapped:
                continue
            if (entry.is_file() and entry.suffix in {".py", ".pyi", ".typed"}) or entry.is_dir():
                link.symlink_to(entry)
    return TREE


def main() -> int:
    tree = build_tree()
    env = {**os.environ, "MYPYPATH": str(tree)}
    # `-p zkunlearn` walks every mapped subpackage through the symlinked tree.
    args = [sys.executable, "-m", "mypy", "-p", "zkunlearn", *sys.argv[1:]]
    return subprocess.call(args, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
