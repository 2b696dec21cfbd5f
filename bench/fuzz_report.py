"""Fuzzing counts: how many inputs each fuzz target tried, what they got, and how long it took.

The fuzz tests (tests/test_fuzz_*.py) count per target through :class:`FuzzTally`. With
``ZKU_FUZZ_REPORT=<path>`` set they merge their counts into that JSON file; ``ZKU_FUZZ_SCALE=<k>``
multiplies every example bound, so the same tests serve as the bounded CI run (scale 1) and as the
longer run whose counts go to ``bench/results/fuzz.json``::

    zkunlearn bench fuzz --scale 10   # writes bench/results/fuzz.json
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "fuzz.json"
FUZZ_TESTS = ("tests/test_fuzz_rpc.py", "tests/test_fuzz_structured.py", "tests/test_fuzz_parsers.py")


def fuzz_scale() -> int:
    """The example multiplier; a positive integer so a typo cannot silently disable fuzzing."""
    raw = os.environ.get("ZKU_FUZZ_SCALE", "1")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"ZKU_FUZZ_SCALE must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"ZKU_FUZZ_SCALE must be a positive integer, got {raw!r}")
    return value


def examples(base: int) -> int:
    return base * fuzz_scale()


class FuzzTally:
    """Inputs tried and outcomes seen per target, with the wall time spent on each target."""

    def __init__(self) -> None:
        self.inputs: Counter[str] = Counter()
        self.statuses: dict[str, Counter[str]] = {}
        self.seconds: dict[str, float] = {}
        self.slowest: dict[str, float] = {}

    def hit(self, target: str, status: str, call_seconds: float | None = None) -> None:
        """Count one input; ``call_seconds`` (one call's latency) keeps the slowest, the hang evidence."""
        self.inputs[target] += 1
        self.statuses.setdefault(target, Counter())[status] += 1
        if call_seconds is not None:
            self.slowest[target] = max(self.slowest.get(target, 0.0), call_seconds)

    def timed(self, target: str, seconds: float) -> None:
        self.seconds[target] = self.seconds.get(target, 0.0) + seconds

    def as_json(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for t in sorted(self.inputs):
            out[t] = {
                "inputs": self.inputs[t],
                "statuses": dict(sorted(self.statuses.get(t, Counter()).items())),
                "seconds": round(self.seconds.get(t, 0.0), 2),
            }
            if t in self.slowest:
                out[t]["slowest_call_s"] = round(self.slowest[t], 3)
        return out

    def summary(self) -> str:
        lines = [f"fuzz counts (scale {fuzz_scale()}):"]
        for target, row in self.as_json().items():
            slowest = f", slowest call {row['slowest_call_s']} s" if "slowest_call_s" in row else ""
            head = f"  {target}: {row['inputs']} inputs in {row['seconds']} s"
            lines.append(f"{head}{slowest}, {row['statuses']}")
        return "\n".join(lines)

    def flush(self) -> None:
        """Merge into ``$ZKU_FUZZ_REPORT`` when set (a lock keeps concurrent writers from losing rows)."""
        path = os.environ.get("ZKU_FUZZ_REPORT")
        if not path:
            return
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
            targets: dict[str, Any] = data.setdefault("targets", {})
            targets.update(self.as_json())
            data["scale"] = fuzz_scale()
            data["total_inputs"] = sum(int(row["inputs"]) for row in targets.values())
            out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run_fuzz_report(scale: int = 10, out: Path = DEFAULT_OUT) -> int:
    """Run the fuzz tests at ``scale`` and write their counts and wall time to ``out``; pytest's exit code."""
    if out.exists():
        out.unlink()
    env = {**os.environ, "ZKU_FUZZ_SCALE": str(scale), "ZKU_FUZZ_REPORT": str(out)}
    start = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", *FUZZ_TESTS], cwd=ROOT, env=env)
    data = json.loads(out.read_text())
    data["wall_seconds"] = round(time.monotonic() - start, 1)
    data["tests_passed"] = rc == 0
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".lock").unlink(missing_ok=True)
    print(json.dumps({k: v for k, v in data.items() if k != "targets"}))
    return rc
