"""Download the provider's published circuit artifacts over gRPC, checked by size and SHA-256.

The device never receives a proving key: it fetches the compiled circuit, the settings and the SRS
(streamed in chunks), checks each against the digest announced on the first chunk, and regenerates
the proving key locally (:func:`zkunlearn.proofs.artifacts.client_artifacts`). Files are written
atomically, so an interrupted download never leaves a truncated artifact that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from zkunlearn.v1 import provider_pb2 as pb

from .transport import Transport

__all__ = ["ArtifactDownloadError", "fetch_artifact"]


class ArtifactDownloadError(RuntimeError):
    """The stream was empty, truncated, or its bytes do not match the announced digest."""


def fetch_artifact(transport: Transport, circuit_id: str, artifact: str, destination: Path) -> Path:
    """Stream one artifact into ``destination``; retried as a whole on UNAVAILABLE."""

    def attempt() -> Path:
        stream = transport.stub.GetArtifact(
            pb.GetArtifactRequest(circuit_id=circuit_id, artifact=artifact), timeout=transport.timeout
        )
        digest = hashlib.sha256()
        announced, total, received = "", -1, 0
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as handle:
            try:
                for index, chunk in enumerate(stream):
                    if index == 0:
                        announced, total = chunk.sha256, int(chunk.total_bytes)
                    digest.update(chunk.data)
                    received += len(chunk.data)
                    handle.write(chunk.data)
                handle.flush()
                os.fsync(handle.fileno())
                if total < 0:
                    raise ArtifactDownloadError(f"{circuit_id}/{artifact}: the provider sent no chunk")
                if received != total:
                    raise ArtifactDownloadError(f"{circuit_id}/{artifact}: got {received} of {total} bytes")
                if digest.hexdigest() != announced:
                    raise ArtifactDownloadError(
                        f"{circuit_id}/{artifact}: SHA-256 differs from the announced one"
                    )
            except BaseException:
                Path(handle.name).unlink(missing_ok=True)
                raise
        os.replace(handle.name, destination)
        return destination

    return transport.call(attempt)
