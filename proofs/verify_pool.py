"""Verifying on several cores: a pool of long-lived ezkl worker processes.

ezkl's ``verify`` and ``kzg_commit`` hold Python's GIL, so threads alone verify on one core. A
:class:`VerifierPool` keeps ``workers`` processes started from the package's own entry point
(``python -P -m zkunlearn.proofs.verify_pool``; the caller's ``__main__`` never runs again, as with
:mod:`zkunlearn.proofs.prove_worker`), each answering one request at a time over its stdin/stdout.
A caller thread blocked on a worker releases the GIL, so ``workers`` threads keep ``workers`` cores
busy. :class:`PooledEzklBackend` is an :class:`~zkunlearn.proofs.backend.EzklBackend` whose
``verify`` and ``commit`` run in the pool; :func:`parallel_map` runs per-proof checks across it.

Frames are a 4-byte big-endian length and that many bytes of JSON. A worker that dies mid-request
is replaced, and the request raises :class:`VerifierCrashedError`: a failure of the verifier, never a
verdict on the proof (the provider retries the job, and rejects one that keeps killing workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

from zkunlearn.proofs.backend import BackendError, EzklBackend, Proof
from zkunlearn.proofs.commit_memo import CommitmentMemo

from zkunlearn.errors import TransientError

__all__ = ["PooledEzklBackend", "VerifierCrashedError", "VerifierPool", "parallel_map"]

_T = TypeVar("_T")
_R = TypeVar("_R")
_MAX_FRAME = 1 << 26


class VerifierCrashedError(BackendError, TransientError):
    """A verifier worker died while answering: the request was not judged."""


def _write_frame(stream: IO[bytes], obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    stream.write(len(data).to_bytes(4, "big") + data)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> dict[str, Any] | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    size = int.from_bytes(head, "big")
    if size > _MAX_FRAME:
        raise BackendError(f"verifier frame of {size} bytes exceeds {_MAX_FRAME}")
    body = stream.read(size)
    if len(body) < size:
        return None
    value = json.loads(body)
    if not isinstance(value, dict):
        raise BackendError("verifier frame is not a JSON object")
    return value


def _answer(request: dict[str, Any], backend: EzklBackend) -> dict[str, Any]:
    paths = {k: Path(request[k]) for k in ("settings", "vk", "srs")}
    if request["op"] == "verify":
        proof = Proof.from_bytes(bytes.fromhex(request["proof"]))
        expected = request["expected"]
        ok = backend.verify(proof, paths["settings"], paths["vk"], paths["srs"], expected)
        return {"ok": ok}
    if request["op"] == "commit":
        return {"point": backend.commit(request["felts"], paths["vk"], paths["settings"], paths["srs"])}
    raise BackendError(f"unknown verifier request {request['op']!r}")


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The worker's loop: answer frames until stdin closes."""
    backend = EzklBackend()
    while (request := _read_frame(stdin)) is not None:
        try:
            reply = _answer(request, backend)
        except (BackendError, KeyError, TypeError, ValueError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        _write_frame(stdout, reply)
    return 0


class _Worker:
    def __init__(self) -> None:
        if not sys.executable:
            raise BackendError("cannot start a verifier worker: this interpreter has no known executable")
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "zkunlearn.proofs.verify_pool"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def call(self, request: dict[str, Any]) -> dict[str, Any] | None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        try:
            _write_frame(self.proc.stdin, request)
            return _read_frame(self.proc.stdout)
        except (BrokenPipeError, OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class VerifierPool:
    """``workers`` ezkl processes, started on first use; thread-safe; :meth:`close` stops them."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)  # a slot; its process starts when first needed
        self._closed = False
        self._lock = threading.Lock()
        self._started: list[_Worker] = []

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise BackendError("the verifier pool is closed")
        worker = self._idle.get()
        try:
            if worker is None or worker.proc.poll() is not None:
                worker = _Worker()
                with self._lock:
                    self._started.append(worker)
            reply = worker.call(request)
            if reply is None:
                code = worker.proc.poll()
                worker.stop()
                worker = None
                raise VerifierCrashedError(f"a verifier worker died mid-request (exit status {code})")
            if "error" in reply:
                raise BackendError(str(reply["error"]))
            return reply
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._started = self._started, []
        for worker in workers:
            worker.stop()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class PooledEzklBackend(EzklBackend):
    """ezkl with ``verify`` and ``commit`` in a :class:`VerifierPool` (everything else in-process)."""

    def __init__(self, pool: VerifierPool, *, commit_memo: CommitmentMemo | None = None) -> None:
        super().__init__(commit_memo=commit_memo)
        self.pool = pool

    @property
    def concurrency(self) -> int:
        return self.pool.workers

    def verify(
        self,
        proof: Proof,
        settings_path: Path,
        vk_path: Path,
        srs_path: Path,
        expected_commitments: Sequence[str] | None,
    ) -> bool:
        reply = self.pool.call(
            {
                "op": "verify",
                "proof": proof.to_bytes().hex(),
                "settings": str(settings_path),
                "vk": str(vk_path),
                "srs": str(srs_path),
                "expected": None if expected_commitments is None else list(expected_commitments),
            }
        )
        return reply.get("ok") is True

    def _commit(self, felts: Sequence[str], vk_path: Path, settings_path: Path, srs_path: Path) -> str:
        reply = self.pool.call(
            {
                "op": "commit",
                "felts": list(felts),
                "settings": str(settings_path),
                "vk": str(vk_path),
                "srs": str(srs_path),
            }
        )
        return str(reply["point"])


def parallel_map(fn: Callable[[_T], _R], items: Iterable[_T], concurrency: int) -> list[_R]:
    """``[fn(x) for x in items]``, in order, on ``concurrency`` threads (in this thread when 1)."""
    values = list(items)
    if concurrency <= 1 or len(values) <= 1:
        return [fn(x) for x in values]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(values))) as pool:
        return list(pool.map(fn, values))


if __name__ == "__main__":
    # Own stdout is the reply channel: nothing else may write to it.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    sys.exit(serve(sys.stdin.buffer, out))
