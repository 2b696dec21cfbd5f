"""The PostgreSQL fixture itself: a real server answers SQL through SQLAlchemy and psycopg 3."""

from __future__ import annotations

import sqlalchemy as sa


def test_postgres_server_answers(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    with engine.connect() as connection:
        version = connection.execute(sa.text("select version()")).scalar_one()
    engine.dispose()
    assert "PostgreSQL" in version
