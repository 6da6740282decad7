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
    # The jobs that recorded a VM under a name before the claims existed hold it now, as if they
    # had claimed it (the oldest first where two did): a job in flight, or ended with its
    # rollback not done, may still look its VM up by the name, and another job must not deploy
    # under it meanwhile. (Stop every serve before this migration: one of the earlier version
    # would deploy without a claim.)
    op.execute(
        "INSERT IGNORE INTO vm_name_claims (name, job_id, claimed_at) "
        "SELECT l.name, l.job_id, UTC_TIMESTAMP(6) FROM resource_ledger AS l "
        "JOIN failover_jobs AS j ON j.job_id = l.job_id "
        "WHERE l.resource_key = 'vm' AND l.name IS NOT NULL "
        "AND NOT (j.ended AND (j.status IN ('completed', 'cleaned_up') OR j.rolled_back IS TRUE)) "
        "ORDER BY l.id"
    )


def downgrade() -> None:
    op.drop_table("vm_name_claims")
