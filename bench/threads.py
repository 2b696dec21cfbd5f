"""One compute thread per benchmark job (``docs/decisions/one-thread-per-job.md``).

Benchmark jobs run side by side (``--workers``) on machines with few cores. torch's and NumPy's
(OpenBLAS) thread pools start one thread per core each, and OpenBLAS's threads spin while they wait: two
jobs on two cores then each take about three times as long as with one thread apiece, while a job alone
on an idle machine gains only a few per cent from a second thread.
"""

from __future__ import annotations

import os

import torch
from threadpoolctl import threadpool_limits


def limit_threads(threads: int) -> None:
    """Limit this process's torch and BLAS/OpenMP pools to ``threads``, for the rest of the process: the
    pools loaded now, and (through the environment, which child processes inherit) those loaded later,
    such as SciPy's own OpenBLAS."""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


def one_thread_per_job() -> None:
    """:func:`limit_threads` to one: what every benchmark job runs with."""
    limit_threads(1)
