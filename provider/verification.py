"""The provider's real proof verifier: ezkl, with its own circuits, behind the service's ``ProofVerifier``.

The service hands over a :class:`~zkunlearn.provider.service.VerificationJob` built only from the
provider's records (enrolled commitments, the request it signed, the mask it computed); this adapter
turns it into :func:`zkunlearn.proofs.deletion.verify_deletion`, the same judgement the offline
auditor makes. Circuits are loaded once per model and shared by the worker threads (verification only
reads them).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
from zkunlearn.proofs.deletion import DeletionCircuits, verify_deletion

from .server import ConfigError, ProviderConfig
from .service import TensorData, VerificationJob, VerificationResult

__all__ = ["EzklVerifier", "from_config"]


def _array(tensor: TensorData | None) -> npt.NDArray[np.float64] | None:
    if tensor is None:
        return None
    return np.frombuffer(tensor.float64_le, dtype="<f8").reshape(tensor.shape).astype(np.float64)


class EzklVerifier:
    """Verifies every submission against the circuits published for its model."""

    def __init__(self, circuits_by_model: Mapping[str, Path]) -> None:
        if not circuits_by_model:
            raise ConfigError("the ezkl verifier needs at least one model's circuits directory")
        self._dirs = {model: Path(path) for model, path in circuits_by_model.items()}
        self._loaded: dict[str, DeletionCircuits] = {}
        self._lock = threading.Lock()

    def circuits(self, model_id: str) -> DeletionCircuits:
        with self._lock:
            if model_id not in self._loaded:
                if model_id not in self._dirs:
                    raise ConfigError(f"no circuits are configured for model {model_id!r}")
                self._loaded[model_id] = DeletionCircuits.load(self._dirs[model_id])
            return self._loaded[model_id]

    def verify(self, job: VerificationJob) -> VerificationResult:
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
        )
        return VerificationResult(verdict.ok, verdict.reason)


def from_config(config: ProviderConfig) -> EzklVerifier:
    """Factory for ``verifier = "zkunlearn.provider.verification:from_config"`` in the provider config.

    The config's ``artifacts`` table maps a circuit id to named files; an entry named ``circuits_dir``
    under a model id names that model's :class:`DeletionCircuits` directory.
    """
    dirs = {
        model: Path(entry["circuits_dir"])
        for model, entry in config.artifacts.items()
        if "circuits_dir" in entry
    }
    return EzklVerifier(dirs)
