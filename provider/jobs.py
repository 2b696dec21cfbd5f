"""Verification workers that take their jobs from the shared state, not from an in-process queue.

The job queue *is* the ``submissions`` table: a pending submission is a job, claimed for a lease by
:meth:`ProviderState.claim_submissions` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL). Keeping the
queue in the database rather than in a separate broker is deliberate: finishing a job (verdict,
receipt leaf, the client's new commitments) and acknowledging it are then one transaction, so no
crash between "job done" and "job acked" can lose a receipt or append one twice, which an external
queue with at-least-once delivery could not promise without this same idempotency underneath.

Any number of these pools may run, in provider replicas or in stand-alone worker processes
(``zkunlearn provider worker``) on other machines sharing the database. A worker that dies leaves its
lease to expire and the job is claimed again; a job claimed ``max_attempts`` times without finishing
(it keeps crashing or starving its workers) is finished as rejected, so one hostile proof cannot
wedge the queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from zkunlearn.proofs.statements import now_ms

from .state import ProviderState, SubmissionRecord

__all__ = ["JobSettings", "VerificationWorkers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSettings:
    workers: int = 2
    lease_s: float = 300.0  # extended while verifying; a dead worker's job waits at most this long
    poll_s: float = 0.25  # how soon a job submitted through another replica is noticed
    max_attempts: int = 3


class VerificationWorkers:
    """``settings.workers`` threads, each claiming one job at a time and running ``process`` on it.

    ``process`` must finish the submission (record its verdict) or raise; ``give_up`` finishes one
    that exhausted its attempts. :meth:`nudge` wakes idle workers when this process queued a job, so
    local submissions do not wait for the next poll.
    """

    def __init__(
        self,
        state: ProviderState,
        process: Callable[[SubmissionRecord], SubmissionRecord],
        give_up: Callable[[SubmissionRecord, str], SubmissionRecord],
        *,
        replica_id: str,
        settings: JobSettings | None = None,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.state = state
        self.settings = settings or JobSettings()
        self.replica_id = replica_id
        self._process = process
        self._give_up = give_up
        self._clock_ms = clock_ms
        self._wake = threading.Condition()
        self._pending_nudges = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Notified (under its own lock) after every job this pool finishes; waiters re-read the state.
        self.finished = threading.Condition()
        self.processed = 0

    def start(self) -> None:
        for n in range(max(0, self.settings.workers)):
            thread = threading.Thread(
                target=self._run, args=(f"{self.replica_id}/{n}/",), name=f"zku-verify-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def nudge(self) -> None:
        with self._wake:
            self._pending_nudges += 1
            self._wake.notify()

    def stop(self, wait: bool = True, timeout_s: float | None = None) -> None:
        """Stop claiming; with ``wait``, let jobs in hand finish.

        Without ``wait`` a job in hand keeps its lease until it expires (or this replica restarts and
        releases its claims), and is then taken by another worker: abandoned, never lost.
        """
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if wait:
            for thread in self._threads:
                thread.join(timeout_s)

    def _idle(self) -> None:
        with self._wake:
            if self._pending_nudges == 0:
                self._wake.wait(self.settings.poll_s)
            self._pending_nudges = max(0, self._pending_nudges - 1)

    def _run(self, worker_id: str) -> None:
        lease_ms = int(self.settings.lease_s * 1000)
        while not self._stop.is_set():
            try:
                jobs = self.state.claim_submissions(worker_id, self._clock_ms(), lease_ms, 1)
            except Exception:  # a database hiccup must not kill the worker: log, back off, retry
                log.exception("claiming a verification job failed; retrying")
                self._stop.wait(1.0)
                continue
            if not jobs:
                self._idle()
                continue
            for job in jobs:
                self._finish(worker_id, job)

    def _heartbeat(self, worker_id: str, job: SubmissionRecord, done: threading.Event) -> None:
        """Extend the lease every third of its length until the job is finished (or lost)."""
        lease_ms = int(self.settings.lease_s * 1000)
        while not done.wait(self.settings.lease_s / 3):
            try:
                held = self.state.extend_lease(job.submission_id, worker_id, self._clock_ms() + lease_ms)
            except Exception:  # the lease may then expire: at worst the job is verified twice
                log.exception("could not extend the lease of job %s", job.submission_id)
                continue
            if not held:
                return

    def _finish(self, worker_id: str, job: SubmissionRecord) -> None:
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(worker_id, job, done), daemon=True)
        beat.start()
        try:
            if job.attempts > self.settings.max_attempts:
                self._give_up(
                    job,
                    f"verification did not complete in {self.settings.max_attempts} attempts "
                    "(each worker that took it died or timed out)",
                )
            else:
                self._process(job)
        except BaseException as exc:  # free the lease at once: another attempt (or give_up) follows
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            # BaseException: a pyo3 panic (ezkl) is one, and an uncaught one would end this worker.
            log.exception("verification job %s failed; it will be retried", job.submission_id)
            try:
                self.state.release_claims(worker_id)
            except Exception:  # the lease then simply expires
                log.exception("could not release the lease of job %s", job.submission_id)
            self._stop.wait(0.5)
        finally:
            done.set()
            with self.finished:
                self.processed += 1
                self.finished.notify_all()
