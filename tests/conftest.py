"""Session-wide fixtures shared by several test modules.

Circuits are the suite's most expensive shared inputs (export, settings, compile, key generation), and
several modules need the same shapes. :class:`SharedCircuits` builds each distinct set of
:meth:`DeletionCircuits.build` arguments once per test session, in a folder that every pytest-xdist
worker of the session sees, under a file lock so that two workers never build the same one at once.
The folders are read-only by contract: a test that tampers with artifacts copies them first. Each
build records a digest of every file it wrote, and the session fails at teardown if one changed.

Under pytest-xdist each worker gets its share of the cores for torch, BLAS and OpenMP (and passes it on
to the processes its tests start): pools of one thread per core in every worker spin against each other
and made NumPy-heavy tests about three times slower (``docs/decisions/one-thread-per-job.md``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from filelock import FileLock
from zkunlearn.bench.postgres import create_database, postgres_server

if TYPE_CHECKING:
    from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
    from zkunlearn.proofs.backend import CircuitConfig
    from zkunlearn.proofs.deletion import AnalyticSpec, DeletionCircuits, GroupObsSpec, RefitSpec
    from zkunlearn.proofs.exact import ExactGroupObsSpec

MANIFEST = "shared-manifest.json"
"""Digest of every file of a finished build; its presence marks the build complete."""


def _describe(value: Any) -> Any:
    """A JSON-able description of a build argument that names its type (two specs with equal fields
    but different classes build different circuits)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__qualname__, "fields": _describe(asdict(value))}
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    raise TypeError(f"cannot key a shared circuit build on {type(value).__name__}")


def _file_digests(directory: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            digests[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


class SharedCircuits:
    """One :meth:`DeletionCircuits.build` per distinct set of arguments per test session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._handed_out: dict[str, DeletionCircuits] = {}

    def build(
        self,
        *,
        group_obs: GroupObsSpec | None = None,
        analytic: AnalyticSpec | None = None,
        config: CircuitConfig | None = None,
        refits: Sequence[RefitSpec] = (),
        exact: ExactGroupObsSpec | None = None,
        analytic_exact: ExactAnalyticSpec | None = None,
    ) -> DeletionCircuits:
        """The circuits :meth:`DeletionCircuits.build` makes from these arguments (with a development
        SRS), built by whichever worker asks first; never write into the returned folder."""
        from zkunlearn.proofs.deletion import DeletionCircuits

        arguments = {
            "group_obs": group_obs,
            "analytic": analytic,
            "config": config,
            "refits": list(refits),
            "exact": exact,
            "analytic_exact": analytic_exact,
        }
        key = hashlib.sha256(json.dumps(_describe(arguments), sort_keys=True).encode()).hexdigest()[:24]
        if key in self._handed_out:
            return self._handed_out[key]
        directory = self.root / key
        with FileLock(str(self.root / f"{key}.lock")):
            if not (directory / MANIFEST).is_file():
                shutil.rmtree(directory, ignore_errors=True)  # a build cut short by a killed worker
                DeletionCircuits.build(directory, **arguments)  # type: ignore[arg-type]
                (directory / MANIFEST).write_text(json.dumps(_file_digests(directory), indent=1))
            circuits = DeletionCircuits.load(directory)
        self._handed_out[key] = circuits
        return circuits

    def changed_files(self) -> list[str]:
        """Files of the builds this process handed out that differ from what their build wrote."""
        changed = []
        for key, circuits in self._handed_out.items():
            recorded = json.loads((circuits.directory / MANIFEST).read_text())
            now = _file_digests(circuits.directory)
            changed += [
                f"{key}/{name}"
                for name in sorted(set(recorded) | set(now))
                if recorded.get(name) != now.get(name)
            ]
        return changed


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker: cores // workers threads for torch, BLAS and OpenMP, here and in children."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    from zkunlearn.bench.threads import limit_threads

    limit_threads(max(1, (os.cpu_count() or 1) // max(1, int(workerinput["workercount"]))))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole modules in order of expected cost: any ``slow`` test first, then any ``ezkl`` one, then the
    rest, each module's tests in their own order. pytest-xdist hands out files in this order (with
    ``--no-loadscope-reorder``), so the longest files start first and the workers finish together."""
    weight: dict[Path, int] = {}
    for item in items:
        cost = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("ezkl") else 2
        weight[item.path] = min(weight.get(item.path, cost), cost)
    items.sort(key=lambda item: weight[item.path])


@pytest.fixture(scope="session")
def shared_circuits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCircuits]:
    """The session's circuit builds; the session fails if a test changed one of their files."""
    base = tmp_path_factory.getbasetemp()
    # Each xdist worker has its own base temp inside the session's; the builds live beside them.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    shared = SharedCircuits(root / "shared-circuits")
    yield shared
    changed = shared.changed_files()
    if changed:
        pytest.fail(f"a test wrote into shared circuits (copy them before tampering): {changed}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server on loopback for the whole session (fails loudly when it cannot start);
    under pytest-xdist each worker starts its own."""
    if importlib.util.find_spec("psycopg") is None:
        pytest.fail("psycopg is not installed: install the `postgres` extra (make test does)")
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server for one test."""
    import uuid

    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:16]}"
    yield create_database(postgres_url, name)
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def exact_published(shared_circuits: SharedCircuits) -> DeletionCircuits:
    """The provider's published exact Group-OBS circuits at the tests' small shape (B 16, m 8, 2 blocks)."""
    from zkunlearn.proofs.exact import ExactGroupObsSpec

    return shared_circuits.build(exact=ExactGroupObsSpec.from_lam(16, 8, 2, 2.0**-10))
