"""Client-side proving: building the committed tensors and proving block batches in parallel.

Every committed tensor is passed to ezkl as felts we quantised ourselves, so the commitments the
client computes (and later the provider expects) are of exactly the values the circuit sees.
Batches run in worker processes (spawned, one job per process so that each peak RSS is its own)
under an address-space cap: a proof that would exceed the edge device's budget fails cleanly
instead of swapping the device to death.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import numpy.typing as npt
from rich.progress import Progress
from zkunlearn.proofs.backend import EzklBackend, Proof, ProvingError
from zkunlearn.proofs.fixedpoint import (
    FixedPointError,
    FloatArray,
    felts,
    group_obs_mask_rows,
    random_blinding,
)


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


@dataclass(frozen=True)
class ProveJob:
    """Everything a worker needs; paths only, so the job pickles cheaply."""

    inputs: list[list[str]]
    compiled: Path
    vk: Path
    pk: Path
    srs: Path
    label: str = ""


@dataclass(frozen=True)
class ProveResult:
    label: str
    proof: Proof
    commitments: list[str]
    prove_s: float
    peak_rss_mb: float
    extra: dict[str, float] = field(default_factory=dict)


def _cap_memory(limit_mb: int | None) -> None:
    if limit_mb:
        limit = int(limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    spawned worker would report its (large) parent's peak instead of its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_job(job: ProveJob) -> ProveResult:
    """Witness + prove one batch in this process."""
    from zkunlearn.proofs.backend import witness_commitments

    backend = EzklBackend()
    t0 = time.perf_counter()
    witness = backend.witness(job.inputs, job.compiled, job.vk, job.srs)
    proof = backend.prove(witness, job.compiled, job.pk, job.srs)
    elapsed = time.perf_counter() - t0
    peak = peak_rss_mb()
    return ProveResult(job.label, proof, witness_commitments(witness), elapsed, peak)


def prove_parallel(
    jobs: Sequence[ProveJob],
    *,
    workers: int = 2,
    memory_limit_mb: int | None = 8192,
    progress: bool = True,
) -> list[ProveResult]:
    """Prove batches in ``workers`` spawned processes, each capped at ``memory_limit_mb`` of address space.

    Results come back in job order. A worker that runs out of memory raises :class:`ProvingError`
    naming the job and the cap.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ctx = get_context("spawn")
    results: dict[int, ProveResult] = {}
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_cap_memory,
        initargs=(memory_limit_mb,),
        max_tasks_per_child=1,
    ) as pool:
        futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("proving", total=len(jobs))
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except MemoryError as exc:
                    raise ProvingError(
                        f"job {jobs[i].label or i} exceeded the {memory_limit_mb} MB memory cap"
                    ) from exc
                except Exception as exc:
                    # Under a cap, allocation failures surface as thread-pool or allocator errors.
                    raise ProvingError(
                        f"job {jobs[i].label or i} failed (memory cap {memory_limit_mb} MB): {exc}"
                    ) from exc
                bar.update(task, advance=1)
    return [results[i] for i in range(len(jobs))]
