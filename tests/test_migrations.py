"""The alembic history builds exactly the schema the code queries, and upgrades old databases in place."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from zkunlearn.provider.state import SqlState, upgrade_schema
from zkunlearn.provider.state import _schema as state_mod


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+pysqlite:///{tmp_path / 'm.db'}"
    else:
        yield request.getfixturevalue("postgres_db_url")


def test_head_schema_matches_the_tables_the_code_uses(url: str) -> None:
    engine = sa.create_engine(url)
    upgrade_schema(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), state_mod._meta)
    engine.dispose()
    assert diff == []


def test_upgrade_is_idempotent_and_reports_head(url: str) -> None:
    engine = sa.create_engine(url)
    assert upgrade_schema(engine) == upgrade_schema(engine) == "0004"
    engine.dispose()


def test_a_database_from_before_migrations_is_stamped_and_upgraded_keeping_its_log(url: str) -> None:
    """A first-release database (0001 tables, no alembic_version) with one leaf: the tip starts at 1."""
    engine = sa.create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(state_mod._MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(sa.text("DROP TABLE alembic_version"))
        conn.execute(
            sa.text(
                "INSERT INTO ledger_leaves (leaf_index, leaf_hash, canonical, signature, submission_id,"
                " request_id) VALUES (0, :h, :c, :s, 'old-sub', 'old-req')"
            ),
            {"h": bytes(32), "c": b"receipt", "s": b"sig"},
        )
    engine.dispose()
    st = SqlState(url)
    assert st.ledger_size() == 1
    assert st.get_leaf(0).submission_id == "old-sub"  # type: ignore[union-attr]
    st.close()


def test_replicas_starting_together_migrate_once(postgres_db_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            SqlState(postgres_db_url).close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    st = SqlState(postgres_db_url)
    assert st.ledger_size() == 0
    st.close()
