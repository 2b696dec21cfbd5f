"""Session-wide fixtures shared by several test modules."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from postgres_server import postgres_server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server on loopback for the whole session (fails loudly when it cannot start)."""
    if importlib.util.find_spec("psycopg") is None:
        pytest.fail("psycopg is not installed: install the `postgres` extra (make test does)")
    with postgres_server() as url:
        yield url
