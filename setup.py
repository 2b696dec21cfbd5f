"""Expands the package-dir map of pyproject.toml into every subpackage.

setuptools cannot auto-discover packages whose import names differ from their folders,
so the map in pyproject.toml stays the single source of truth and this file walks it.
"""

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

_ROOT = Path(__file__).parent
_PACKAGE_DIR: dict[str, str] = tomllib.loads((_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"
]


def _all_packages() -> list[str]:
    found: set[str] = set()
    for name, folder in _PACKAGE_DIR.items():
        found.add(name)
        found.update(f"{name}.{sub}" for sub in find_packages(where=str(_ROOT / folder)))
    # protos/zkunlearn/ is the wire package with its own entry: skip its mirror under zkunlearn.protos.
    return sorted(p for p in found if not p.startswith("zkunlearn.protos.zkunlearn"))


setup(packages=_all_packages(), package_dir=_PACKAGE_DIR)
