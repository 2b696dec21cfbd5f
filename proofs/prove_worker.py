"""One proving job in a process of its own: ``python -P -m zkunlearn.proofs.prove_worker JOB_DIR PARENT_PID``.

The worker is the package's own entry point. It never imports the caller's ``__main__`` (which
``multiprocessing``'s spawn and forkserver start methods do: a user script without a
``if __name__ == "__main__":`` guard would re-run its whole body, enrollment included, in every
worker) and it imports neither torch nor the client SDK, only ezkl and numpy.

Contract with :func:`zkunlearn.proofs.prover.prove_parallel`:

* ``JOB_DIR/job.json`` holds a :class:`ProveJob` (:meth:`ProveJob.to_json`);
* on success the worker writes ``JOB_DIR/result.json`` (:meth:`ProveResult.to_json`) and exits 0;
* on a proving failure (e.g. the witness does not satisfy the circuit's range checks) it writes
  ``JOB_DIR/error.json`` (``{"error": message}``) and exits :data:`EXIT_PROVING_FAILED`;
* when the process ``PARENT_PID`` is gone it exits :data:`EXIT_ORPHANED` at once;
* any other exit code or signal is reported by the parent as what it is.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from zkunlearn.proofs.backend import EzklBackend, Proof, ProvingError, witness_commitments

EXIT_PROVING_FAILED = 3
"""Exit code of a worker whose job failed inside the proving backend (the reason is in error.json)."""

EXIT_ORPHANED = 4
"""Exit code of a worker whose parent died: nobody is left to use its proof."""

JOB_FILE, RESULT_FILE, ERROR_FILE = "job.json", "result.json", "error.json"


@dataclass(frozen=True)
class ProveJob:
    """Everything a worker needs: the committed inputs as felts and the paths of the circuit's files."""

    inputs: list[list[str]]
    compiled: Path
    vk: Path
    pk: Path
    srs: Path
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        """Paths are made absolute here, against the caller's working folder: a worker runs in its own."""
        return {
            "inputs": self.inputs,
            "compiled": str(Path(self.compiled).absolute()),
            "vk": str(Path(self.vk).absolute()),
            "pk": str(Path(self.pk).absolute()),
            "srs": str(Path(self.srs).absolute()),
            "label": self.label,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ProveJob:
        return cls(
            inputs=[[str(v) for v in row] for row in obj["inputs"]],
            compiled=Path(obj["compiled"]),
            vk=Path(obj["vk"]),
            pk=Path(obj["pk"]),
            srs=Path(obj["srs"]),
            label=str(obj.get("label", "")),
        )


@dataclass(frozen=True)
class ProveResult:
    """A proof with the commitments its witness computed and what it cost.

    ``extra`` may carry ``baseline_rss_mb`` (the worker's resident memory before the job: interpreter,
    numpy, ezkl) and ``overhead_s`` (the worker's whole life as its parent saw it, less witness and
    prove: interpreter start, imports, job and result files).
    """

    label: str
    proof: Proof
    commitments: list[str]
    prove_s: float
    peak_rss_mb: float
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "proof": self.proof.to_json(),
            "commitments": self.commitments,
            "prove_s": self.prove_s,
            "peak_rss_mb": self.peak_rss_mb,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ProveResult:
        return cls(
            label=str(obj["label"]),
            proof=Proof.from_json(obj["proof"]),
            commitments=[str(c) for c in obj["commitments"]],
            prove_s=float(obj["prove_s"]),
            peak_rss_mb=float(obj["peak_rss_mb"]),
            extra={str(k): float(v) for k, v in dict(obj.get("extra") or {}).items()},
        )


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    worker started by a large parent would report the parent's peak instead of its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_job(job: ProveJob) -> ProveResult:
    """Witness + prove one job in this process."""
    backend = EzklBackend()
    t0 = time.perf_counter()
    witness = backend.witness(job.inputs, job.compiled, job.vk, job.srs)
    proof = backend.prove(witness, job.compiled, job.pk, job.srs)
    elapsed = time.perf_counter() - t0
    return ProveResult(job.label, proof, witness_commitments(witness), elapsed, peak_rss_mb())


def _write_atomically(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _exit_with_parent(parent: int) -> None:
    """Stop this worker once the process that started it is gone (it can no longer use the proof)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or (len(args) == 2 and not args[1].isdigit()):
        print("usage: python -m zkunlearn.proofs.prove_worker JOB_DIR [PARENT_PID]", file=sys.stderr)
        return 2
    # The parent's pid comes from the parent itself: one read here could already see the reaper.
    _exit_with_parent(int(args[1]) if len(args) == 2 else os.getppid())
    folder = Path(args[0])
    job = ProveJob.from_json(json.loads((folder / JOB_FILE).read_text()))
    # What the worker holds before the job: the interpreter, numpy, ezkl (never torch).
    baseline = psutil.Process().memory_info().rss / (1024 * 1024)
    try:
        result = run_job(job)
    except ProvingError as exc:
        _write_atomically(folder / ERROR_FILE, {"error": str(exc)})
        return EXIT_PROVING_FAILED
    extra = {**result.extra, "baseline_rss_mb": round(baseline, 1)}
    _write_atomically(
        folder / RESULT_FILE,
        ProveResult(
            result.label, result.proof, result.commitments, result.prove_s, result.peak_rss_mb, extra
        ).to_json(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
