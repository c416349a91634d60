"""stack fanout and bundle

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 22:45:50.165570
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import server.db

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""

    with op.batch_alter_table("stacks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("fanout_version", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("bundle_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("bundle_built_at", server.db.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    """Revert this revision."""

    with op.batch_alter_table("stacks", schema=None) as batch_op:
        batch_op.drop_column("bundle_built_at")
        batch_op.drop_column("bundle_sha256")
        batch_op.drop_column("fanout_version")
