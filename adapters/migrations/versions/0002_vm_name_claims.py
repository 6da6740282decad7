"""vm_name_claims: one job at a time deploys, and looks up, a VM of a name

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 13:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vm_name_claims",
        sa.Column("name", sa.String(length=191), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("claimed_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("vm_name_claims")
