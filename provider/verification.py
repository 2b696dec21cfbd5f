"""The provider's real proof verifier: ezkl, with its own circuits, behind the service's ``ProofVerifier``.

The service hands over a :class:`~zkunlearn.provider.service.VerificationJob` built only from the
provider's records (enrolled commitments, the request it signed, the mask it computed); this adapter
turns it into :func:`zkunlearn.proofs.deletion.verify_deletion`, the same judgement the offline
auditor makes. Circuits are loaded once per model and shared by the worker threads (verification only
reads them). With ``processes`` > 0 the proofs of one submission are checked on that many ezkl
processes at once (:mod:`zkunlearn.proofs.verify_pool`): ezkl holds the GIL, so threads alone would
verify on one core.

The verifier commits to each issued mask when the request is issued (:meth:`EzklVerifier.prepare`, on
one background thread) and keeps the commitments in a bounded memo that verification reads; a
commitment not found there (another replica issued the request, a restart, an eviction) is computed
when the proofs are judged (``docs/decisions/mask-commitments-at-issue.md``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
from zkunlearn.proofs.backend import EzklBackend
from zkunlearn.proofs.commit_memo import CommitmentMemo
from zkunlearn.proofs.deletion import (
    UPDATE_KIND_GROUP_OBS_EXACT,
    DeletionCircuits,
    prepare_deletion,
    verify_deletion,
)
from zkunlearn.proofs.exact_deletion import (
    EnrolledNorms,
    enrollment_proofs_digest,
    verify_exact_enrollment,
)
from zkunlearn.proofs.published import enrollment_layout_problem
from zkunlearn.proofs.verify_pool import PooledEzklBackend, VerifierPool

from .models import CommitmentRef, TensorData, VerificationJob, VerificationResult
from .server import ConfigError, ProviderConfig

__all__ = ["EzklVerifier", "from_config"]

log = logging.getLogger(__name__)


def _array(tensor: TensorData | None) -> npt.NDArray[np.float64] | None:
    if tensor is None:
        return None
    return tensor.array()


class EzklVerifier:
    """Verifies every submission against the circuits published for its model."""

    def __init__(
        self,
        circuits_by_model: Mapping[str, Path],
        *,
        processes: int = 0,
        commit_memo: CommitmentMemo | None = None,
    ) -> None:
        if not circuits_by_model:
            raise ConfigError("the ezkl verifier needs at least one model's circuits directory")
        self._pool = VerifierPool(processes) if processes > 0 else None
        self.commit_memo = commit_memo if commit_memo is not None else CommitmentMemo()
        """Commitments to issued masks, shared by :meth:`prepare` and :meth:`verify`."""
        self._preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-request")
        self._dirs = {model: Path(path) for model, path in circuits_by_model.items()}
        self._loaded: dict[str, DeletionCircuits] = {}
        self._norms: dict[str, EnrolledNorms] = {}  # by enrollment digest: proofs checked once
        self._lock = threading.Lock()

    def circuits(self, model_id: str) -> DeletionCircuits:
        with self._lock:
            if model_id not in self._loaded:
                if model_id not in self._dirs:
                    raise ConfigError(f"no circuits are configured for model {model_id!r}")
                circuits = DeletionCircuits.load(self._dirs[model_id])
                backend = (
                    PooledEzklBackend(self._pool, commit_memo=self.commit_memo)
                    if self._pool is not None
                    else EzklBackend(commit_memo=self.commit_memo)
                )
                circuits = circuits.with_backend(backend)
                self._loaded[model_id] = circuits
            return self._loaded[model_id]

    def close(self) -> None:
        """Drop preparations not yet started and stop the verifier processes (they also exit when this
        process does)."""
        self._preparing.shutdown(wait=True, cancel_futures=True)
        if self._pool is not None:
            self._pool.close()

    def prepare(self, model_id: str, update_kind: int, request_canonical: bytes, mask: bytes) -> None:
        """Queue the commitments to an issued request's mask (one per touched batch) for the memo that
        :meth:`verify` reads; returns at once. A request that cannot be prepared is logged and left to
        verification, which judges it in full."""
        try:
            self._preparing.submit(self._prepare, model_id, update_kind, request_canonical, mask)
        except RuntimeError:  # closed: verification computes what is missing
            return

    def prepared(self) -> None:
        """Wait until every preparation queued so far has finished (tests, benchmarks)."""
        self._preparing.submit(lambda: None).result()

    def _prepare(self, model_id: str, update_kind: int, request_canonical: bytes, mask: bytes) -> None:
        try:
            prepare_deletion(
                self.circuits(model_id),
                update_kind=update_kind,
                request_canonical=request_canonical,
                mask_bytes=mask,
            )
        except Exception as exc:  # a background optimisation: any failure leaves the work to verify()
            log.warning("model %r: request not prepared (verify commits to its mask): %s", model_id, exc)

    def check_enrollment(
        self,
        model_id: str,
        update_kind: int,
        layers: tuple[str, ...],
        commitments: tuple[CommitmentRef, ...],
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> VerificationResult:
        """The commitments are the tensors this model's published circuit for ``update_kind`` reads
        (every batch of each layer, when the layers' ``shapes`` are known)."""
        try:
            circuits = self.circuits(model_id)
        except ConfigError as exc:
            return VerificationResult(False, str(exc))
        problem = enrollment_layout_problem(circuits, update_kind, layers, commitments, shapes)
        return VerificationResult(problem is None, problem or "")

    def verify_enrollment(
        self,
        model_id: str,
        layers: tuple[str, ...],
        commitments: tuple[CommitmentRef, ...],
        proofs: tuple[bytes, ...],
    ) -> VerificationResult:
        """An exact enrollment: every Group-OBS batch's proof (whole layers, unit-mean-diagonal factors)
        and the analytic head's (its Gram in range and positive semidefinite, its head the ridge solution)."""
        circuits = self.circuits(model_id)
        group_obs, analytic = circuits.enrollment_verifiers()
        if group_obs is None and analytic is None:
            return VerificationResult(False, f"model {model_id!r} publishes no exact circuit")
        verdict = verify_exact_enrollment(
            group_obs, layers=layers, commitments=commitments, proofs=proofs, analytic=analytic
        )
        if verdict.ok:
            with self._lock:
                self._norms[self._enrollment_key(commitments, proofs)] = verdict.norms
        return VerificationResult(verdict.ok, verdict.reason)

    @staticmethod
    def _enrollment_key(commitments: tuple[CommitmentRef, ...], proofs: tuple[bytes, ...]) -> str:
        named = sorted((c.name, c.block, c.point_hex) for c in commitments)
        return enrollment_proofs_digest([repr(named).encode(), *proofs])

    def _enrolled_norms(self, job: VerificationJob) -> EnrolledNorms | None:
        """The norms the client's accepted enrollment proofs show (re-checked once per process)."""
        if not job.enrollment_proofs:
            return None
        key = self._enrollment_key(job.enrolled_commitments, job.enrollment_proofs)
        with self._lock:
            cached = self._norms.get(key)
        if cached is not None:
            return cached
        result = self.verify_enrollment(
            job.model_id, job.enrolled_layers, job.enrolled_commitments, job.enrollment_proofs
        )
        if not result.accepted:
            return None
        with self._lock:
            return self._norms.get(key)

    def verify(self, job: VerificationJob) -> VerificationResult:
        norms = self._enrolled_norms(job) if job.update_kind == UPDATE_KIND_GROUP_OBS_EXACT else None
        verdict = verify_deletion(
            self.circuits(job.model_id),
            update_kind=job.update_kind,
            request_id=job.request_id,
            request_canonical=job.request_canonical,
            mask_bytes=job.mask,
            forget_features=_array(job.forget_features),
            forget_labels=_array(job.forget_labels),
            before=job.before_commitments,
            after=job.after_commitments,
            proofs=job.proofs,
            enrolled_norms=norms,
        )
        return VerificationResult(verdict.ok, verdict.reason)


def from_config(config: ProviderConfig) -> EzklVerifier:
    """Factory for ``verifier = "zkunlearn.provider.verification:from_config"`` in the provider config.

    The config's ``artifacts`` table maps a circuit id to named files; an entry named ``circuits_dir``
    under a model id names that model's :class:`DeletionCircuits` directory. ``limits.verify_workers``
    ezkl processes verify the proofs.
    """
    dirs = {
        model: Path(entry["circuits_dir"])
        for model, entry in config.artifacts.items()
        if "circuits_dir" in entry
    }
    return EzklVerifier(dirs, processes=max(1, config.limits.verify_workers))
