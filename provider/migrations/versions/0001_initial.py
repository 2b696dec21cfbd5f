"""The schema as first deployed: clients, nonces, requests, submissions, ledger leaves, tree heads.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("model_id", sa.String(256), nullable=False),
        sa.Column("layers", sa.Text, nullable=False),
        sa.Column("update_kind", sa.Integer, nullable=False),
        sa.Column("enrolled_commitments", sa.Text, nullable=False),
        sa.Column("current_commitments", sa.Text, nullable=False),
        sa.Column("enrollment_canonical", sa.LargeBinary, nullable=False),
        sa.Column("enrollment_signature", sa.LargeBinary, nullable=False),
        sa.Column("enrolled_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "nonces",
        sa.Column("nonce", sa.LargeBinary(64), primary_key=True),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("expires_ms", sa.BigInteger, nullable=False),
        sa.Column("used", sa.Boolean, nullable=False),
    )
    op.create_index("ix_nonces_expires_ms", "nonces", ["expires_ms"])
    op.create_table(
        "requests",
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
    op.create_table(
        "submissions",
        sa.Column("submission_id", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(128), sa.ForeignKey("requests.request_id"), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("content_digest", sa.String(64), nullable=False),
        sa.Column("proof_sha256", sa.String(64), nullable=False),
        sa.Column("proof_sizes", sa.Text, nullable=False),
        sa.Column("proof", sa.LargeBinary, nullable=False),
        sa.Column("after_commitments", sa.Text, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("verdict", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("leaf_index", sa.BigInteger, nullable=True),
        sa.UniqueConstraint("request_id", "content_digest", name="uq_submissions_request_content"),
    )
    op.create_index("ix_submissions_verdict", "submissions", ["verdict"])
    op.create_table(
        "ledger_leaves",
        sa.Column("leaf_index", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("canonical", sa.LargeBinary, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("submission_id", sa.String(128), nullable=False, unique=True),
        sa.Column("request_id", sa.String(128), nullable=False),
    )
    op.create_table(
        "tree_heads",
        sa.Column("tree_size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("canonical", sa.LargeBinary, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    for table in ("tree_heads", "ledger_leaves", "submissions", "requests", "nonces", "clients"):
        op.drop_table(table)
