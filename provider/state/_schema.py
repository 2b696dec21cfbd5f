"""The SQL backend's tables, their migrations, and row-to-record conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from zkunlearn.provider.state._base import (
    ClientRecord,
    LeafRecord,
    RequestRecord,
    SubmissionRecord,
    TreeHeadRecord,
)

_meta = sa.MetaData()


def _enrollment_columns() -> list[sa.Column[Any]]:
    """A client record's columns after its id: the same in ``clients`` and ``replaced_enrollments``."""
    return [
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("model_id", sa.String(256), nullable=False),
        sa.Column("layers", sa.Text, nullable=False),  # newline-joined (layer names cannot hold newlines)
        sa.Column("update_kind", sa.Integer, nullable=False),
        sa.Column("enrolled_commitments", sa.Text, nullable=False),
        sa.Column("current_commitments", sa.Text, nullable=False),
        sa.Column("enrollment_canonical", sa.LargeBinary, nullable=False),
        sa.Column("enrollment_signature", sa.LargeBinary, nullable=False),
        sa.Column("enrolled_ms", sa.BigInteger, nullable=False),
        sa.Column("enrollment_proofs", sa.LargeBinary, nullable=False, server_default=sa.text("''")),
    ]


clients_t = sa.Table(
    "clients", _meta, sa.Column("client_id", sa.String(128), primary_key=True), *_enrollment_columns()
)

nonces_t = sa.Table(
    "nonces",
    _meta,
    sa.Column("nonce", sa.LargeBinary(64), primary_key=True),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)

requests_t = sa.Table(
    "requests",
    _meta,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("client_id", sa.String(128), sa.ForeignKey("clients.client_id"), nullable=False),
    sa.Column("cursor", sa.BigInteger, nullable=False),
    sa.Column("canonical", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("mask", sa.LargeBinary, nullable=False),
    sa.Column("forget", sa.LargeBinary, nullable=False),
    sa.Column("issued_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=False),
    sa.Column("accepted_submission_id", sa.String(128), nullable=True),
    sa.UniqueConstraint("client_id", "cursor", name="uq_requests_client_cursor"),
)

submissions_t = sa.Table(
    "submissions",
    _meta,
    sa.Column("submission_id", sa.String(128), primary_key=True),
    sa.Column("request_id", sa.String(128), sa.ForeignKey("requests.request_id"), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("content_digest", sa.String(64), nullable=False),
    sa.Column("proof_sha256", sa.String(64), nullable=False),
    sa.Column("proof_sizes", sa.Text, nullable=False),
    sa.Column("proof", sa.LargeBinary, nullable=False),
    sa.Column("after_commitments", sa.Text, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("verdict", sa.Integer, nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("leaf_index", sa.BigInteger, nullable=True),
    sa.Column("claimed_by", sa.String(128), nullable=True),
    sa.Column("lease_expires_ms", sa.BigInteger, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("request_id", "content_digest", name="uq_submissions_request_content"),
)

leaves_t = sa.Table(
    "ledger_leaves",
    _meta,
    sa.Column("leaf_index", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("canonical", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("submission_id", sa.String(128), nullable=False, unique=True),
    sa.Column("request_id", sa.String(128), nullable=False),
)

# One row; every append locks it first, so concurrent replicas append in one order (the commit order).
tip_t = sa.Table(
    "ledger_tip",
    _meta,
    sa.Column("tip_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("size", sa.BigInteger, nullable=False),
)

# Every enrollment a re-enrollment replaced (its record as it stood then), keyed by the index of the
# re-enrollment leaf that replaced it: the log's order says which enrollment judged which receipt.
replaced_t = sa.Table(
    "replaced_enrollments",
    _meta,
    sa.Column(
        "replaced_at",
        sa.BigInteger,
        sa.ForeignKey("ledger_leaves.leaf_index"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("client_id", sa.String(128), sa.ForeignKey("clients.client_id"), nullable=False, index=True),
    *_enrollment_columns(),
)

heads_t = sa.Table(
    "tree_heads",
    _meta,
    sa.Column("tree_size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("canonical", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
)


_WRITE = "zkunlearn_write"
_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Any fixed 64-bit key: PostgreSQL advisory lock held while one replica migrates the schema.
_MIGRATION_LOCK = 0x7A6B_756E_6C72_6E01


def upgrade_schema(engine: Engine) -> str:
    """Bring the database to the newest schema revision; returns that revision.

    Runs in one transaction under a lock (PostgreSQL: an advisory lock; SQLite: the write lock of
    BEGIN IMMEDIATE), so replicas started together migrate once. A database created before
    migrations existed (tables present, no ``alembic_version``) is stamped at the first revision,
    which is exactly the schema it has, and then upgraded.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    with engine.execution_options(**{_WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        tables = set(sa.inspect(conn).get_table_names())
        cfg.attributes["connection"] = conn
        if "alembic_version" not in tables and "clients" in tables:
            command.stamp(cfg, "0001")
        command.upgrade(cfg, "head")
    return head


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL for concurrent readers, FULL sync so a commit survives a power cut, and BEGIN IMMEDIATE.

    pysqlite's own transaction handling begins lazily and only on writes, so a read-then-write
    transaction can deadlock or read stale data; taking the write lock at BEGIN serialises writers.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Readers take a WAL snapshot without blocking writers; only writers take the lock up front.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def _client_row(row: Any) -> ClientRecord:
    return ClientRecord(
        client_id=row.client_id,
        public_key=bytes(row.public_key),
        model_id=row.model_id,
        layers=tuple(row.layers.split("\n")) if row.layers else (),
        update_kind=row.update_kind,
        enrolled_commitments=row.enrolled_commitments,
        current_commitments=row.current_commitments,
        enrollment_canonical=bytes(row.enrollment_canonical),
        enrollment_signature=bytes(row.enrollment_signature),
        enrolled_ms=row.enrolled_ms,
        enrollment_proofs=bytes(row.enrollment_proofs),
    )


def _request_row(row: Any) -> RequestRecord:
    return RequestRecord(
        request_id=row.request_id,
        client_id=row.client_id,
        canonical=bytes(row.canonical),
        signature=bytes(row.signature),
        mask=bytes(row.mask),
        forget=bytes(row.forget),
        issued_ms=row.issued_ms,
        expires_ms=row.expires_ms,
        cursor=row.cursor,
        accepted_submission_id=row.accepted_submission_id,
    )


def _submission_row(row: Any) -> SubmissionRecord:
    return SubmissionRecord(
        submission_id=row.submission_id,
        request_id=row.request_id,
        client_id=row.client_id,
        content_digest=row.content_digest,
        proof_sha256=row.proof_sha256,
        proof_sizes=row.proof_sizes,
        proof=bytes(row.proof),
        after_commitments=row.after_commitments,
        created_ms=row.created_ms,
        verdict=row.verdict,
        reason=row.reason,
        leaf_index=row.leaf_index,
        claimed_by=row.claimed_by,
        lease_expires_ms=row.lease_expires_ms,
        attempts=row.attempts,
    )


def _leaf_row(row: Any) -> LeafRecord:
    return LeafRecord(
        index=row.leaf_index,
        leaf_hash=bytes(row.leaf_hash),
        canonical=bytes(row.canonical),
        signature=bytes(row.signature),
        submission_id=row.submission_id,
        request_id=row.request_id,
    )


def _head_row(row: Any) -> TreeHeadRecord:
    return TreeHeadRecord(
        size=row.tree_size,
        root_hash=bytes(row.root_hash),
        canonical=bytes(row.canonical),
        signature=bytes(row.signature),
    )
