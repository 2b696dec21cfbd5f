"""Enrollment proofs kept with each client (exact Group-OBS clients; empty for the others).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.add_column(
            sa.Column("enrollment_proofs", sa.LargeBinary, nullable=False, server_default=sa.text("''"))
        )


def downgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("enrollment_proofs")
