"""Download the provider's published circuit artifacts over gRPC, checked by size and SHA-256.

The device never receives a proving key: it fetches the published index (specs), the settings and the
SRS (streamed in chunks), checks each against the digest announced on the first chunk, and derives the
circuit and its keys locally from the spec (:func:`zkunlearn.proofs.artifacts.derive_client_circuit`);
the digests only catch corruption in transit, not what the provider chose to serve. Files are written
atomically, so an interrupted download never leaves a truncated artifact that looks complete.

The announced size bounds the download: an announced total over ``max_bytes`` is refused at once, and
the stream is cancelled as soon as it would deliver more than it announced, so a hostile provider
cannot fill the client's disk.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from zkunlearn.v1 import provider_pb2 as pb

from zkunlearn.errors import ZkUnlearnError

from .transport import Transport

__all__ = ["MAX_ARTIFACT_BYTES", "ArtifactDownloadError", "fetch_artifact"]

#: Default cap on one artifact's announced size. The largest published artifact is the SRS (2^k G1
#: points, about 0.5 GiB at logrows 23); 4 GiB leaves room while still bounding what a provider can write.
MAX_ARTIFACT_BYTES = 4 * 1024**3


class ArtifactDownloadError(ZkUnlearnError, RuntimeError):
    """The stream was empty, truncated, or its bytes do not match the announced digest."""


def fetch_artifact(
    transport: Transport,
    circuit_id: str,
    artifact: str,
    destination: Path,
    *,
    max_bytes: int = MAX_ARTIFACT_BYTES,
) -> Path:
    """Stream one artifact into ``destination``; retried as a whole on UNAVAILABLE.

    ``max_bytes`` caps the announced total; a stream that sends more than it announced is aborted
    before the excess is written (the temporary file never outgrows the announced total).
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be non-negative, got {max_bytes}")

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
                        if total > max_bytes:
                            raise ArtifactDownloadError(
                                f"{circuit_id}/{artifact}: announced {total} bytes, over the limit of "
                                f"{max_bytes}"
                            )
                    if received + len(chunk.data) > total:
                        raise ArtifactDownloadError(
                            f"{circuit_id}/{artifact}: the provider sent more than the {total} bytes "
                            "it announced"
                        )
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
                stream.cancel()  # stop the provider streaming the rest; a no-op once the stream ended
                Path(handle.name).unlink(missing_ok=True)
                raise
        os.replace(handle.name, destination)
        return destination

    return transport.call(attempt)
