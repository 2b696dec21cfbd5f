"""Session-wide fixtures shared by several test modules."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from zkunlearn.bench.postgres import create_database, postgres_server

if TYPE_CHECKING:
    from zkunlearn.proofs.deletion import DeletionCircuits


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server on loopback for the whole session (fails loudly when it cannot start)."""
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
def exact_published(tmp_path_factory: pytest.TempPathFactory) -> DeletionCircuits:
    """The provider's published exact Group-OBS circuits at the tests' small shape (B 16, m 8, 2 blocks)."""
    from zkunlearn.proofs.deletion import DeletionCircuits as Circuits
    from zkunlearn.proofs.exact import ExactGroupObsSpec

    spec = ExactGroupObsSpec.from_lam(16, 8, 2, 2.0**-10)
    return Circuits.build(
        tmp_path_factory.mktemp("exact-published"), group_obs=None, analytic=None, exact=spec
    )
