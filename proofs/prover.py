"""Client-side proving: building the committed tensors and proving block batches in parallel.

Every committed tensor is passed to ezkl as felts we quantised ourselves, so the commitments the
client computes (and later the provider expects) are of exactly the values the circuit sees.
Each job runs in a fresh process started from the package's own entry point
(:mod:`zkunlearn.proofs.prove_worker`), never from the caller's program: nothing of the caller's
``__main__`` runs again, and each worker's peak memory is its own. Each worker's resident memory is
bounded: a proof that would exceed the edge device's budget fails cleanly instead of swapping the
device to death.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import psutil
from rich.console import Console
from rich.progress import Progress
from zkunlearn.proofs.backend import ProvingError
from zkunlearn.proofs.fixedpoint import (
    FixedPointError,
    FloatArray,
    felts,
    group_obs_mask_rows,
    random_blinding,
)
from zkunlearn.proofs.prove_worker import (
    ERROR_FILE,
    EXIT_PROVING_FAILED,
    JOB_FILE,
    RESULT_FILE,
    ProveJob,
    ProveResult,
    peak_rss_mb,
    run_job,
)

__all__ = [
    "GroupObsBatch",
    "ProveJob",
    "ProveResult",
    "group_obs_tensors",
    "new_group_obs_batch",
    "peak_rss_mb",
    "prove_parallel",
    "run_job",
]


@dataclass(frozen=True)
class GroupObsBatch:
    """One proof's worth of blocks (all normalised: G to unit mean diagonal, theta scaled by 2**e).

    Blinding elements are drawn once and kept: the same ``theta_after`` + blinding is the next
    request's enrolled ``theta``.
    """

    theta: FloatArray  # (n, B)
    theta_after: FloatArray  # (n, B)
    g: FloatArray  # (n, m, B)
    mask: npt.NDArray[np.bool_]  # (n, B)
    w: FloatArray  # (n, m)
    theta_blind: FloatArray  # (n, n_blind)
    theta_after_blind: FloatArray  # (n, n_blind)
    g_blind: FloatArray  # (n, B)
    w_blind: FloatArray  # (n, n_blind)

    @property
    def n_blocks(self) -> int:
        return int(self.theta.shape[0])

    def with_theta_after(self, theta_after: FloatArray, w: FloatArray | None = None) -> GroupObsBatch:
        """A copy with another update (tests build dishonest variants this way)."""
        return GroupObsBatch(
            self.theta,
            np.asarray(theta_after, dtype=np.float64),
            self.g,
            self.mask,
            self.w if w is None else np.asarray(w, dtype=np.float64),
            self.theta_blind,
            self.theta_after_blind,
            self.g_blind,
            self.w_blind,
        )


def new_group_obs_batch(
    theta: npt.ArrayLike,
    theta_after: npt.ArrayLike,
    g: npt.ArrayLike,
    mask: npt.ArrayLike,
    w: npt.ArrayLike,
    *,
    scale: int,
    n_blind: int,
    theta_blind: npt.ArrayLike | None = None,
    g_blind: npt.ArrayLike | None = None,
) -> GroupObsBatch:
    """Validate shapes and draw fresh blinding (reusing the enrolled blinding when given)."""
    th = np.asarray(theta, dtype=np.float64)
    ta = np.asarray(theta_after, dtype=np.float64)
    gm = np.asarray(g, dtype=np.float64)
    mk = np.asarray(mask, dtype=bool)
    wv = np.asarray(w, dtype=np.float64)
    if th.ndim != 2 or ta.shape != th.shape or mk.shape != th.shape:
        raise FixedPointError(f"theta, theta_after, mask must share shape (n, B); got {th.shape}, {ta.shape}")
    n, b = th.shape
    if gm.ndim != 3 or gm.shape[0] != n or gm.shape[2] != b:
        raise FixedPointError(f"g must be (n, m, B) = ({n}, m, {b}); got {gm.shape}")
    if wv.shape != (n, gm.shape[1]):
        raise FixedPointError(f"w must be (n, m) = ({n}, {gm.shape[1]}); got {wv.shape}")

    def fresh(k: int) -> FloatArray:
        return np.stack([random_blinding(k, scale) for _ in range(n)])

    return GroupObsBatch(
        theta=th,
        theta_after=ta,
        g=gm,
        mask=mk,
        w=wv,
        theta_blind=fresh(n_blind) if theta_blind is None else np.asarray(theta_blind, dtype=np.float64),
        theta_after_blind=fresh(n_blind),
        g_blind=fresh(b) if g_blind is None else np.asarray(g_blind, dtype=np.float64),
        w_blind=fresh(n_blind),
    )


def group_obs_tensors(
    batch: GroupObsBatch, request_digest: bytes, scale: int, n_blind: int
) -> list[list[str]]:
    """The five committed inputs in circuit order (theta, theta', G, mask, w) as felts."""
    theta = np.concatenate([batch.theta, batch.theta_blind], axis=1)
    theta_after = np.concatenate([batch.theta_after, batch.theta_after_blind], axis=1)
    g = np.concatenate([batch.g, batch.g_blind[:, None, :]], axis=1)
    mask = group_obs_mask_rows(batch.mask, request_digest, n_blind, scale)
    w = np.concatenate([batch.w, batch.w_blind], axis=1)
    return [felts(t, scale) for t in (theta, theta_after, g, mask, w)]


_POLL_S = 0.02
"""How often the parent samples each worker's resident memory and exit status."""


@dataclass
class _Running:
    index: int
    job: ProveJob
    folder: Path
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.perf_counter)
    peak_rss_mb: float = 0.0
    over_cap: bool = False


def _worker_command(folder: Path) -> list[str]:
    if not sys.executable:
        raise ProvingError("cannot start a proving worker: this interpreter does not know its executable")
    # -P: the caller's working directory is not put on sys.path, so a user's numpy.py cannot shadow ours.
    return [sys.executable, "-P", "-m", "zkunlearn.proofs.prove_worker", str(folder), str(os.getpid())]


def worker_environment(workers: int) -> dict[str, str]:
    """The environment of each of ``workers`` concurrent workers: the cores shared out among them
    (``RAYON_NUM_THREADS``, ezkl's thread pool), unless the caller set it, so concurrent workers do not
    oversubscribe the cores (as fast on an idle machine, faster on a loaded one: ``docs/benchmarks.md``)."""
    env = dict(os.environ)
    if "RAYON_NUM_THREADS" not in env:
        env["RAYON_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return env


def _start(index: int, job: ProveJob, root: Path, env: dict[str, str] | None = None) -> _Running:
    folder = root / f"job{index}"
    folder.mkdir()
    (folder / JOB_FILE).write_text(json.dumps(job.to_json()))
    with (folder / "stderr.log").open("wb") as err:
        proc = subprocess.Popen(
            _worker_command(folder),
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=folder,
            env=env,
            start_new_session=True,  # a Ctrl-C in the caller's terminal reaches the caller, which kills us
        )
    return _Running(index, job, folder, proc)


def _rss_mb(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0.0


def _stderr_tail(folder: Path, lines: int = 3) -> str:
    try:
        text = (folder / "stderr.log").read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])


def _collect(run: _Running, code: int, cap_mb: int | None) -> ProveResult:
    """The worker's result, or a ProvingError that says truthfully how it ended."""
    name = run.job.label or f"job {run.index}"
    if run.over_cap:
        raise ProvingError(
            f"{name}: stopped at {run.peak_rss_mb:.0f} MB resident memory, over the {cap_mb} MB cap "
            "(ProveOptions.memory_limit_mb); prove fewer blocks per job or raise the cap"
        )
    if code == 0:
        try:
            result = ProveResult.from_json(json.loads((run.folder / RESULT_FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProvingError(f"{name}: the worker exited 0 but left no readable result ({exc})") from exc
        overhead = max(0.0, time.perf_counter() - run.started - result.prove_s)
        return replace(result, extra={**result.extra, "overhead_s": round(overhead, 3)})
    if code == EXIT_PROVING_FAILED:
        try:
            message = str(json.loads((run.folder / ERROR_FILE).read_text())["error"])
        except (OSError, ValueError, KeyError, TypeError):
            message = _stderr_tail(run.folder) or "no reason recorded"
        raise ProvingError(f"{name}: {message}")
    if code < 0:
        sig = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (the system's out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        raise ProvingError(
            f"{name}: the proving worker was killed by {sig}{hint} "
            f"at {run.peak_rss_mb:.0f} MB resident memory"
        )
    tail = _stderr_tail(run.folder)
    raise ProvingError(f"{name}: the proving worker exited with code {code}" + (f": {tail}" if tail else ""))


def prove_parallel(
    jobs: Sequence[ProveJob],
    *,
    workers: int = 2,
    memory_limit_mb: int | None = 4096,
    progress: bool = True,
) -> list[ProveResult]:
    """Prove each job in its own worker process (:mod:`zkunlearn.proofs.prove_worker`), ``workers`` at a time.

    Results come back in job order. ``memory_limit_mb`` bounds each worker's *resident* memory: the
    parent samples it every 20 ms and kills a worker above the cap, so a burst shorter than that may
    overshoot it briefly. Any failure -- the cap, a proving error, a crash or a signal -- raises
    :class:`ProvingError` naming the job and how its worker ended; the other workers are stopped.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if memory_limit_mb is not None and memory_limit_mb < 1:
        raise ValueError(f"memory_limit_mb must be >= 1 or None, got {memory_limit_mb}")
    results: dict[int, ProveResult] = {}
    queue = list(enumerate(jobs))
    queue.reverse()
    running: list[_Running] = []
    env = worker_environment(min(workers, len(jobs)))
    with tempfile.TemporaryDirectory(prefix="zkprove-") as tmp, _progress(progress, len(jobs)) as advance:
        try:
            while queue or running:
                while queue and len(running) < workers:
                    index, job = queue.pop()
                    running.append(_start(index, job, Path(tmp), env))
                time.sleep(_POLL_S)
                for run in list(running):
                    rss = _rss_mb(run.proc.pid)
                    run.peak_rss_mb = max(run.peak_rss_mb, rss)
                    if memory_limit_mb is not None and rss > memory_limit_mb and not run.over_cap:
                        run.over_cap = True
                        run.proc.kill()
                    code = run.proc.poll()
                    if code is None:
                        continue
                    running.remove(run)
                    results[run.index] = _collect(run, code, memory_limit_mb)
                    advance(run.job.label or f"job {run.index}", results[run.index])
        finally:
            for run in running:
                run.proc.kill()
                run.proc.wait()
    return [results[i] for i in range(len(jobs))]


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str, ProveResult], None]]:
    """A rich bar on a terminal; one plain line per finished job in a non-TTY log."""
    if not enabled:
        yield lambda _label, _result: None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        done = 0

        def line(label: str, result: ProveResult) -> None:
            nonlocal done
            done += 1
            console.print(
                f"proved {done}/{total} ({label}): {result.prove_s:.1f} s, {result.peak_rss_mb:.0f} MB",
                markup=False,
                highlight=False,
            )

        yield line
        return
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("proving", total=total)
        yield lambda _label, _result: bar.update(task, advance=1)
