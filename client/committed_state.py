"""The edge client's committed state: the tensors and blinding behind the commitments the provider holds.

A prover keeps it in one folder (``state.npz`` + ``state.json``). Both files carry the same generation
id and are replaced as one (:func:`save_state`), so a crash can never pair new weights with old
commitments; :func:`load_state` refuses a torn pair by name. :class:`CommittedStateProver` is what the
provers share: the folder, saving an answer with the state it leads to, and the last proof's statistics.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn
from zkunlearn.client.sdk import Commitment, UpdateResult
from zkunlearn.proofs.artifacts import ClientCircuit
from zkunlearn.proofs.backend import EzklBackend
from zkunlearn.proofs.deletion import encode_proof
from zkunlearn.proofs.fixedpoint import felts
from zkunlearn.proofs.prover import ProveResult

from zkunlearn.errors import RefusedError

__all__ = [
    "CommittedStateProver",
    "UnlearningError",
    "already_answered",
    "commit_tensor",
    "input_scale",
    "load_state",
    "model_param",
    "on_grid",
    "refuse_overwrite",
    "save_state",
]

F64 = npt.NDArray[np.float64]


class UnlearningError(RefusedError, RuntimeError):
    """The committed state and a request or circuit disagree; nothing was changed."""


_GENERATION = "__generation__"
_GENERATION_RE = re.compile(r"[0-9a-f]{32}")


def _fsync_dir(directory: Path) -> None:
    """A rename is durable only once its directory is flushed; only POSIX can open a directory."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_state(directory: Path, arrays: dict[str, F64], meta: dict[str, Any]) -> None:
    """Replace the committed state as one: a crash at any point leaves the old state or the new one.

    Two renames cannot switch two files at once, so ``state.json`` is the single switch and names the
    generation of the arrays that belong to it. The new arrays are written, flushed, under their own
    name ``state.<generation>.npz``; then the new ``state.json`` replaces the old one (the commit);
    only then is ``state.<generation>.npz`` renamed over ``state.npz``. Before the commit the old pair
    is untouched (the new arrays are an orphan the next save removes); after it :func:`load_state` reads
    the generation's own file until that last rename has happened.
    """
    directory.mkdir(parents=True, exist_ok=True)
    generation = secrets.token_hex(16)
    pending = directory / f"state.{generation}.npz"
    stamped = arrays | {_GENERATION: np.array(generation)}
    _write_durably(pending, lambda handle: np.savez(handle, **stamped))
    tmp_meta = directory / f".state.json.{generation}.tmp"
    body = json.dumps(meta | {_GENERATION: generation}, sort_keys=True).encode()
    _write_durably(tmp_meta, lambda handle: handle.write(body))
    os.replace(tmp_meta, directory / "state.json")
    _fsync_dir(directory)
    os.replace(pending, directory / "state.npz")
    _fsync_dir(directory)
    for stale in [*directory.glob("state.*.npz"), *directory.glob(".state.json.*.tmp")]:
        if _GENERATION_RE.fullmatch(stale.name.split(".")[-2]):
            # Orphans of saves that crashed before their commit; the state is saved whatever happens here.
            with contextlib.suppress(OSError):
                stale.unlink()


def load_state(directory: Path) -> tuple[dict[str, F64], dict[str, Any]]:
    path = directory / "state.npz"
    try:
        meta = json.loads((directory / "state.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("state.json does not hold an object")
        generation = meta.pop(_GENERATION, None)
        if generation is not None:
            if not (isinstance(generation, str) and _GENERATION_RE.fullmatch(generation)):
                raise ValueError(f"state.json names a malformed generation {generation!r}")
            if (directory / f"state.{generation}.npz").exists():  # committed, not yet renamed
                path = directory / f"state.{generation}.npz"
        with np.load(path) as data:
            stamp = str(data[_GENERATION]) if _GENERATION in data.files else None
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in data.files if k != _GENERATION}
        # Both unstamped: a state saved before generations existed, consistent by the old contract. A
        # mismatch is a fault of this device's storage, not of any request: raised as a read failure.
        if stamp != generation:
            raise ValueError(
                f"it is torn: state.json is generation {generation}, {path.name} holds generation "
                f"{stamp}; restore the folder from a backup"
            )
    except (OSError, ValueError, KeyError) as exc:
        raise UnlearningError(f"cannot read committed state in {directory}: {exc}") from exc
    return arrays, meta


def refuse_overwrite(directory: Path, replace: bool) -> None:
    """Enrolling over a committed state would destroy the blinding behind commitments the provider
    already holds: every later proof would then be refused, with no way back. Only an explicit
    ``replace=True`` (a state never enrolled with a provider, or one being re-enrolled) may do it."""
    if not replace and (directory / "state.json").exists():
        raise UnlearningError(
            f"{directory} already holds a committed enrollment; enrolling again would overwrite the "
            "state behind commitments the provider may hold. Reopen it (load_model()), or pass "
            "replace=True to discard it"
        )


def model_param(model: nn.Module, name: str) -> nn.Parameter:
    params = dict(model.named_parameters())
    if name not in params:
        raise UnlearningError(f"model has no parameter {name!r}")
    return params[name]


def already_answered(meta: dict[str, Any], request_id: str) -> UpdateResult | None:
    """A crash after the state advanced but before the SDK saved the result: hand back the same answer."""
    last = meta.get("last_request")
    if not last or last["request_id"] != request_id:
        return None
    return UpdateResult(
        [Commitment.from_json(c) for c in last["after"]], [bytes.fromhex(p) for p in last["proofs"]]
    )


class CommittedStateProver:
    """What the provers share: a committed-state folder, saving an answer, and its statistics."""

    state_dir: Path

    def load_model(self) -> None: ...

    def _save_answer(
        self,
        request_id: str,
        after: dict[tuple[str, int], str],
        results: Sequence[ProveResult],
        arrays: dict[str, F64],
        meta: dict[str, Any],
    ) -> UpdateResult:
        """Commit the new state with its answer (kept for a retry after a crash), then the live model."""
        after_list = [Commitment(n, b, p) for (n, b), p in after.items()]
        proofs = [encode_proof(r.proof) for r in results]
        meta["commitments"] = [c.to_json() for c in after_list]
        meta["last_request"] = {
            "request_id": request_id,
            "after": [c.to_json() for c in after_list],
            "proofs": [p.hex() for p in proofs],
            "prove_s": [r.prove_s for r in results],
            "peak_rss_mb": [r.peak_rss_mb for r in results],
        }
        save_state(self.state_dir, arrays, meta)
        self.load_model()
        return UpdateResult(after_list, proofs)

    def last_proof_stats(self) -> dict[str, Any]:
        _arrays, meta = load_state(self.state_dir)
        last = meta.get("last_request") or {}
        return {k: last.get(k) for k in ("request_id", "prove_s", "peak_rss_mb")} | {
            "proof_bytes": sum(len(bytes.fromhex(p)) for p in last.get("proofs", []))
        }


def input_scale(circuit: ClientCircuit) -> int:
    """The fixed-point circuit's input scale (``2**scale`` grid)."""
    return int(json.loads(circuit.settings.read_text())["run_args"]["input_scale"])


def on_grid(x: F64, scale: int) -> F64:
    """``x`` rounded to the ``2**-scale`` grid the fixed-point circuit reads."""
    step = float(2**scale)
    out: F64 = np.rint(np.asarray(x, dtype=np.float64) * step) / step
    return out


def commit_tensor(circuit: ClientCircuit, tensor: F64, scale: int) -> str:
    """The KZG commitment the circuit makes to ``tensor`` on its grid."""
    return EzklBackend().commit(felts(tensor, scale), circuit.vk, circuit.settings, circuit.srs.path)
