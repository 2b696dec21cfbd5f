"""Test doubles for the proof system: a prover and a verifier that agree on a hash transcript.

The fake "proof" of block i is SHA-256 over the request's signed bytes, the mask, the before and after
commitments and i. The verifier recomputes it from the provider's own records, so any change to
the proof bytes, the commitments, the request or the mask makes it reject: protocol tests can fail
for real reasons without ezkl. Slow and crash-test knobs come from environment variables so that a
provider started with ``python -m`` in a subprocess can use them too.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from zkunlearn.client.sdk import Commitment, UpdateResult, VerifiedRequest
from zkunlearn.proofs.backend import point_from_tag
from zkunlearn.provider.models import UPDATE_KINDS
from zkunlearn.provider.service import VerificationJob, VerificationResult

BLOCKS = 2
#: The fake prover answers in the shape of the fixed-point kinds (no enrollment proofs), so protocol
#: tests built on it opt into every update kind, as an operator benchmarking relations would.
ALL_KINDS = frozenset(UPDATE_KINDS)
ALL_KINDS_POLICY: dict[str, Any] = {"policy.update_kinds": sorted(UPDATE_KINDS.values())}
ALL_KINDS_TOML = "[policy]\nupdate_kinds = " + json.dumps(sorted(UPDATE_KINDS.values())) + "\n"


def loopback_settings(tmp: Path, **extra: Any) -> dict[str, Any]:
    """A test provider's settings: loopback on a free port, state and key under ``tmp``, short waits."""
    return {
        "listen": "127.0.0.1:0",
        "state": str(tmp / "provider.db"),
        "key_file": str(tmp / "provider.key"),
        "submit_wait_s": 60.0,
        "watch_poll_s": 0.2,
        "grace_s": 0.5,
        **extra,
    }


def _transcript(
    canonical: bytes, mask: bytes, before: list[dict[str, Any]], after: list[dict[str, Any]], i: int
) -> bytes:
    body = json.dumps({"before": before, "after": after, "block": i}, sort_keys=True).encode()
    return hashlib.sha256(b"zkunlearn-fake-proof\x00" + canonical + b"\x00" + mask + b"\x00" + body).digest()


def after_for(before: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "theta_after",
            "block": i,
            "point_hex": point_from_tag((request_id + json.dumps(before, sort_keys=True) + str(i)).encode()),
        }
        for i in range(BLOCKS)
    ]


class FakeProver:
    """Counts calls so tests can assert a request is never proved twice."""

    def __init__(self, tamper: bool = False) -> None:
        self.calls: list[str] = []
        self.tamper = tamper
        self._lock = threading.Lock()

    def prove(self, request: VerifiedRequest) -> UpdateResult:
        with self._lock:
            self.calls.append(request.request_id)
        before = [c.to_json() for c in request.before_commitments]
        after = after_for(before, request.request_id)
        proofs = [_transcript(request.canonical, request.mask_bytes, before, after, i) for i in range(BLOCKS)]
        if self.tamper:
            proofs[0] = bytes([proofs[0][0] ^ 1]) + proofs[0][1:]
        return UpdateResult([Commitment.from_json(c) for c in after], proofs)


class FakeVerifier:
    def __init__(self, delay_s: float = 0.0, marker: str = "", gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.marker = marker
        self.gate = gate  # when given, every verification waits for it
        self.jobs: list[str] = []

    def verify(self, job: VerificationJob) -> VerificationResult:
        self.jobs.append(job.request_id)
        if self.marker:
            Path(self.marker).write_text(job.request_id)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.gate is not None:
            self.gate.wait()
        slow = os.environ.get("ZKU_FAKE_VERIFY_SLOW_FILE", "")
        if slow and Path(slow).exists():
            time.sleep(60)  # the test SIGKILLs the provider during this sleep
        before = [c.to_json() for c in job.before_commitments]
        after = [c.to_json() for c in job.after_commitments]
        if after != after_for(before, job.request_id):
            return VerificationResult(False, "after-commitments do not follow from the before-commitments")
        if len(job.proofs) != BLOCKS:
            return VerificationResult(False, f"expected {BLOCKS} proofs, got {len(job.proofs)}")
        for i, proof in enumerate(job.proofs):
            if proof != _transcript(job.request_canonical, job.mask, before, after, i):
                return VerificationResult(False, f"proof for block {i} does not verify")
        return VerificationResult(True, "")


def make_verifier(_config: object) -> FakeVerifier:
    """Factory for the provider config's ``verifier = "tests.fakes:make_verifier"``."""
    return FakeVerifier(
        delay_s=float(os.environ.get("ZKU_FAKE_VERIFY_DELAY_S", "0")),
        marker=os.environ.get("ZKU_FAKE_VERIFY_MARKER", ""),
    )
