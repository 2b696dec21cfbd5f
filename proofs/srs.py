"""Structured reference strings: an insecure dev SRS, and a production loader pinned by digest.

``ezkl.gen_srs`` makes an SRS whose toxic waste is known to this process: anyone holding it can forge
proofs. It is fine for tests and demos, and must never be mistaken for a ceremony SRS, so it is
always labelled insecure (a flag carried in :class:`SrsInfo` and a warning in the log). A production
SRS (from a public ceremony) is loaded only when its SHA-256 equals the pinned digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ezkl as _ezkl

from zkunlearn.errors import ZkUnlearnError

# ezkl's bundled stubs lag its runtime (PyRunArgs fields, optional arguments): use it untyped.
ezkl: Any = _ezkl

log = logging.getLogger(__name__)


class SrsError(ZkUnlearnError, RuntimeError):
    """The SRS is missing, malformed, or does not match its pinned digest."""


@dataclass(frozen=True)
class SrsInfo:
    path: Path
    logrows: int
    sha256: str
    insecure: bool
    source: str


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dev_srs(directory: Path, logrows: int) -> SrsInfo:
    """Generate (or reuse) an INSECURE test SRS for ``logrows``; metadata records it as insecure."""
    if not 1 <= logrows <= 26:
        raise SrsError(f"logrows must be in 1..26, got {logrows}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"dev-insecure-k{logrows}.srs"
    meta = path.with_suffix(".json")
    if not path.exists():
        ezkl.gen_srs(str(path), logrows)
    digest = file_sha256(path)
    meta.write_text(
        json.dumps({"logrows": logrows, "sha256": digest, "insecure": True, "source": "ezkl.gen_srs"})
    )
    log.warning(
        "using INSECURE development SRS %s (toxic waste known locally; proofs can be forged)", path.name
    )
    return SrsInfo(path=path, logrows=logrows, sha256=digest, insecure=True, source="ezkl.gen_srs")


def load_srs(path: Path, pinned_sha256: str, logrows: int) -> SrsInfo:
    """Load a ceremony SRS, refusing it unless its SHA-256 equals ``pinned_sha256``."""
    path = Path(path)
    if not path.is_file():
        raise SrsError(f"SRS file {path} does not exist")
    digest = file_sha256(path)
    if digest != pinned_sha256.lower():
        raise SrsError(f"SRS {path.name} has sha256 {digest}, expected pinned {pinned_sha256.lower()}")
    return SrsInfo(path=path, logrows=logrows, sha256=digest, insecure=False, source="pinned")
