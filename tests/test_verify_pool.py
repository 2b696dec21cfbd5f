"""The verifier process pool: workers from the package's own entry point, replaced when they die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from zkunlearn.proofs import verify_pool
from zkunlearn.proofs.backend import BackendError, Proof
from zkunlearn.proofs.verify_pool import PooledEzklBackend, VerifierCrashedError, VerifierPool, parallel_map


def test_parallel_map_keeps_order_and_runs_inline_for_one() -> None:
    assert parallel_map(lambda v: v * v, range(7), 3) == [v * v for v in range(7)]
    assert parallel_map(lambda v: v + 1, [1], 1) == [2]


def test_a_bad_request_is_one_error_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    with VerifierPool(1) as pool:
        with pytest.raises(BackendError, match="unknown verifier request"):
            pool.call({"op": "sign", "settings": "s", "vk": "v", "srs": "r"})
        backend = PooledEzklBackend(pool)
        # Files that do not exist: ezkl cannot verify, which is a refusal, not a crash.
        missing = tmp_path / "missing"
        assert backend.verify(Proof(b"x", ()), missing, missing, missing, None) is False
        assert len(pool._started) == 1


def test_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with VerifierPool(1) as pool:
        backend = PooledEzklBackend(pool)
        assert backend.verify(Proof(b"x", ()), missing, missing, missing, None) is False
        first = pool._started[0].proc
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert backend.verify(Proof(b"x", ()), missing, missing, missing, None) is False
        assert pool._started[-1].proc.pid != first.pid


def test_the_pool_never_reruns_the_callers_script(tmp_path: Path) -> None:
    """A user's script without a ``__main__`` guard: its body runs once, not once per worker."""
    marker = tmp_path / "runs.txt"
    script = tmp_path / "user.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from zkunlearn.proofs.backend import Proof
            from zkunlearn.proofs.verify_pool import PooledEzklBackend, VerifierPool
            with open({str(marker)!r}, "a") as f:
                f.write("run\\n")
            missing = Path({str(tmp_path / "missing")!r})
            with VerifierPool(2) as pool:
                backend = PooledEzklBackend(pool)
                print(backend.verify(Proof(b"x", ()), missing, missing, missing, None))
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
    assert marker.read_text().count("run") == 1


def test_a_worker_dying_mid_request_is_a_crash_not_a_verdict(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    real_call = verify_pool._Worker.call

    def dies_first(worker: verify_pool._Worker, request: dict[str, object]) -> dict[str, object] | None:
        worker.proc.kill()
        worker.proc.wait()
        return real_call(worker, request)

    with VerifierPool(1) as pool:
        backend = PooledEzklBackend(pool)
        monkeypatch.setattr(verify_pool._Worker, "call", dies_first)
        with pytest.raises(VerifierCrashedError, match="died mid-request"):
            backend.verify(Proof(b"x", ()), missing, missing, missing, None)
        monkeypatch.undo()
        assert backend.verify(Proof(b"x", ()), missing, missing, missing, None) is False  # a new worker
