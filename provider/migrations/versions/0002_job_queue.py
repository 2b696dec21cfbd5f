"""Verification jobs claimed by leases, and one ledger tip row that orders every append.

Several provider replicas (and stand-alone verification workers) share one database: a pending
submission is a job that a worker claims for a lease (``SELECT ... FOR UPDATE SKIP LOCKED`` on
PostgreSQL), and every leaf append first locks the single ``ledger_tip`` row, so appends are
serialised in commit order and the log has one writer order however many replicas write.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("submissions") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_expires_ms", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "ledger_tip",
        sa.Column("tip_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("size", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO ledger_tip (tip_id, size) SELECT 1, COUNT(*) FROM ledger_leaves")


def downgrade() -> None:
    op.drop_table("ledger_tip")
    with op.batch_alter_table("submissions") as batch:
        batch.drop_column("attempts")
        batch.drop_column("lease_expires_ms")
        batch.drop_column("claimed_by")
