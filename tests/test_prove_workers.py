"""Proving workers report truthfully how they ended (real processes, no ezkl needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest
from zkunlearn.proofs import prover
from zkunlearn.proofs.backend import ProvingError
from zkunlearn.proofs.prover import ProveJob, prove_parallel


def _job(label: str, tmp_path: Path) -> ProveJob:
    missing = tmp_path / "absent"
    return ProveJob(
        [["00" * 32]], missing / "c", missing / "vk", missing / "pk", missing / "srs", label=label
    )


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _worker_runs(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    monkeypatch.setattr(prover, "_worker_command", lambda _folder: [sys.executable, "-c", code])


def test_a_worker_killed_by_a_signal_is_reported_by_its_signal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _worker_runs(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    with pytest.raises(ProvingError, match="sig-job: the proving worker was killed by SIGTERM"):
        prove_parallel([_job("sig-job", tmp_path)], workers=1, progress=False)


def test_a_sigkilled_worker_names_the_out_of_memory_killer_as_a_possible_cause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _worker_runs(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(ProvingError, match=r"killed by SIGKILL .*out-of-memory killer"):
        prove_parallel([_job("oom", tmp_path)], workers=1, progress=False)


def test_a_worker_exit_code_is_reported_with_its_last_words(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _worker_runs(monkeypatch, "import sys; print('disk full', file=sys.stderr); sys.exit(7)")
    with pytest.raises(ProvingError, match="exit-job: the proving worker exited with code 7: disk full"):
        prove_parallel([_job("exit-job", tmp_path)], workers=1, progress=False)


def test_a_proving_failure_inside_the_real_worker_carries_the_backends_reason(tmp_path: Path) -> None:
    """The package's own worker entry point runs, fails on a missing circuit and says why."""
    with pytest.raises(ProvingError, match="bad-job: witness generation failed"):
        prove_parallel([_job("bad-job", tmp_path)], workers=1, progress=False)


def test_one_failed_job_stops_the_others(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A failure ends the batch at once; no worker is left running behind the caller's back."""
    started: list[int] = []
    real_start = prover._start

    def start(index: int, job: ProveJob, root: Path, env: dict[str, str] | None = None) -> prover._Running:
        run = real_start(index, job, root, env)
        started.append(run.proc.pid)
        return run

    monkeypatch.setattr(prover, "_start", start)
    monkeypatch.setattr(
        prover,
        "_worker_command",
        lambda folder: [
            sys.executable,
            "-c",
            "import sys, time; sys.exit(5) if sys.argv[1].endswith('job0') else time.sleep(60)",
            str(folder),
        ],
    )
    with pytest.raises(ProvingError, match="exited with code 5"):
        prove_parallel([_job("a", tmp_path), _job("b", tmp_path)], workers=2, progress=False)
    assert len(started) == 2
    assert not any(_running(pid) for pid in started)


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        prove_parallel([_job("x", tmp_path)], workers=0)
    with pytest.raises(ValueError, match="memory_limit_mb"):
        prove_parallel([_job("x", tmp_path)], memory_limit_mb=0)


def test_a_worker_whose_caller_dies_stops_too(tmp_path: Path) -> None:
    """A device whose SDK process is killed mid-proof is not left with a proving worker eating memory."""
    import json
    import subprocess
    import time

    from zkunlearn.proofs.prove_worker import JOB_FILE

    (tmp_path / JOB_FILE).write_text(json.dumps(_job("orphan", tmp_path).to_json()))
    # The caller: starts the real worker entry point with a job that would never finish, then dies.
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import sys; from zkunlearn.proofs import "
            'prove_worker as w; w.run_job = lambda j: __import__("time").sleep(600); '
            "sys.exit(w.main(sys.argv[1:]))', sys.argv[1], str(os.getpid())])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert caller.stdout is not None
    worker = int(caller.stdout.readline())
    assert psutil.pid_exists(worker)
    caller.kill()
    caller.wait()

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _running(worker):
        time.sleep(0.2)
    assert not _running(worker), "the proving worker outlived its caller"


def test_workers_share_the_cores_unless_the_caller_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.setattr(prover.os, "cpu_count", lambda: 8)
    assert prover.worker_environment(2)["RAYON_NUM_THREADS"] == "4"
    assert prover.worker_environment(16)["RAYON_NUM_THREADS"] == "1"
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    assert prover.worker_environment(2)["RAYON_NUM_THREADS"] == "3"


def test_a_job_s_relative_paths_reach_the_worker_against_the_caller_s_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker runs in a folder of its own: a circuit named relative to the caller's working folder
    (a device's ``state_dir="device-state"``) must reach it as the caller's file, not its own."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "state").mkdir()
    for name in ("c", "vk", "pk", "srs"):
        (tmp_path / "state" / name).write_text(name)
    relative = Path("state")
    job = ProveJob([["00" * 32]], relative / "c", relative / "vk", relative / "pk", relative / "srs", "rel")
    check = (
        "import json, pathlib, sys; job = json.loads(pathlib.Path('job.json').read_text()); "
        "bad = [k for k in ('compiled', 'vk', 'pk', 'srs') if not pathlib.Path(job[k]).is_file()]; "
        "print('unreachable', bad, file=sys.stderr); sys.exit(9)"
    )
    _worker_runs(monkeypatch, check)
    with pytest.raises(ProvingError, match=r"exited with code 9: unreachable \[\]"):
        prove_parallel([job], workers=1, progress=False)
