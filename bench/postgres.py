"""A throwaway PostgreSQL server on loopback for the state-layer tests and the load benchmark.

The provider's SQL backend must behave the same on PostgreSQL as on SQLite, so its test suite runs
against a real server: initdb into a temporary folder, listen on 127.0.0.1 with a free port, trust
authentication, and stop it when the test session ends. PostgreSQL refuses to run as root, so the
cluster is created and started as the `postgres` system user when the tests run as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "install the PostgreSQL server (Debian: `apt-get install -y postgresql`; `make test` does this as root)"
)


class PostgresUnavailableError(RuntimeError):
    pass


def _bin_dir() -> Path:
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
    )
    if not versions:
        raise PostgresUnavailableError(f"no PostgreSQL server binaries found: {INSTALL_HINT}")
    return versions[-1].parent


def free_port() -> int:
    """A loopback port that was free a moment ago (the caller binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailableError(
            "running as root but `runuser` is missing; cannot start PostgreSQL as `postgres`"
        )
    return [runuser, "-u", "postgres", "--", *args]


@dataclass(frozen=True)
class PostgresCluster:
    """A private server: its SQLAlchemy URL and a way to restart it (a fault the load bench injects)."""

    url: str
    restart: Callable[[], None]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL (psycopg 3 driver) of a fresh database on a private server."""
    with postgres_cluster() as cluster:
        yield cluster.url


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A fresh private server; :meth:`PostgresCluster.restart` stops it (fast: open sessions are cut)
    and starts it again on the same port and data."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="zkunlearn-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    try:
        subprocess.run(
            _as_server_user(
                [str(bin_dir / "initdb"), "-D", str(data), "-U", "zkunlearn", "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=200"

        def pg_ctl(*action: str) -> None:
            command = [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w"]
            subprocess.run(_as_server_user([*command, *action]), check=True, capture_output=True)

        pg_ctl("start")
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise PostgresUnavailableError("PostgreSQL did not start listening within 30 s") from None
                time.sleep(0.2)

        def restart() -> None:
            pg_ctl("-m", "fast", "restart")

        yield PostgresCluster(f"postgresql+psycopg://zkunlearn@127.0.0.1:{port}/postgres", restart)
    except subprocess.CalledProcessError as error:
        raise PostgresUnavailableError(
            f"{error.cmd[0]} failed: {error.stderr.decode(errors='replace')}"
        ) from error
    finally:
        subprocess.run(
            _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """Create an empty database on the server and return its URL."""
    import sqlalchemy as sa

    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
