"""The load benchmark's provider replicas: one ``provider serve`` process each, with its config, started
(retrying a port taken meanwhile), SIGKILLed or stopped, and the CPU time it spent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .load_world import World
from .postgres import free_port


@dataclass
class Replica:
    name: str
    port: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    cpu_s: float = 0.0  # CPU seconds of this replica's processes that have ended (kills and stops)

    def _charge_cpu(self) -> None:
        """Add the running process's CPU time (user + system, its children included) to ``cpu_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return
        ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
        self.cpu_s += ticks / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        """Start the replica, retrying when its port was taken in the meantime.

        ``free_port`` only says a port *was* free: another process's outgoing connection (the other
        replica's to PostgreSQL, say) can take it before the provider binds. Before the first start
        no client knows the port, so a new one is picked; on a restart the clients do, so the same
        port is retried until whoever holds it lets go.
        """
        for attempt in range(8):
            bound_before = self.log.stat().st_size if self.log.exists() else 0
            if self._start_once():
                return
            with self.log.open("rb") as log:
                log.seek(bound_before)
                if b"cannot listen on" not in log.read():
                    break
            if self.starts == 1:
                old, self.port = self.port, free_port()
                text = self.config.read_text().replace(f"127.0.0.1:{old}", f"127.0.0.1:{self.port}")
                self.config.write_text(text)
                self.starts = 0
            else:
                time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"provider {self.name} did not start; see {self.log}")

    def _start_once(self) -> bool:
        port_file = self.config.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "zkunlearn.cli", "provider", "serve"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--config", str(self.config), "--port-file", str(port_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.starts += 1
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                if self.process.poll() is None:
                    self.kill()
                return False
            time.sleep(0.05)
        return True

    def kill(self) -> None:
        self._charge_cpu()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        from zkunlearn.demo import stop_process

        self._charge_cpu()
        if self.process is not None:
            stop_process(self.process, timeout_s=60)


def make_replicas(work: Path, world: World, state_url: str, count: int, verify_workers: int) -> list[Replica]:
    out = []
    for i in range(count):
        port = free_port()
        config = work / f"replica-{i}.toml"
        config.write_text(
            "\n".join(
                [
                    f'listen = "127.0.0.1:{port}"',
                    f'replica_id = "replica-{i}"',
                    f"state = {json.dumps(state_url)}",
                    f"key_file = {json.dumps(str(world.key_file))}",
                    "submit_wait_s = 0.0",
                    "watch_poll_s = 0.2",
                    "grace_s = 2.0",
                    *world.config_top,
                    "[limits]",
                    f"verify_workers = {verify_workers}",
                    "verify_lease_s = 60.0",
                    "verify_poll_s = 0.2",
                    "max_workers = 96",
                    # Every simulated device dials from this one host: a per-address limit would
                    # throttle the fleet as one caller (the per-id limit stays on).
                    "challenge_rate_per_peer = 0.0",
                    *world.config_tables,  # [policy]: the update kinds this world's clients enroll
                    "",
                ]
            )
        )
        out.append(Replica(f"replica-{i}", port, config, work / f"replica-{i}.log"))
    return out
