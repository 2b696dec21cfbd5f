"""Session-wide fixtures shared by several test modules."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from zkunlearn.bench.postgres import create_database, postgres_server


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
