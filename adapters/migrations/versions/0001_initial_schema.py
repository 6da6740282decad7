"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 12:53:49.227599
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The service's own tables.
    op.create_table(
        "failover_jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=191), nullable=False),
        sa.Column("vm_id", sa.String(length=191), nullable=False),
        sa.Column("job_type", sa.String(length=50), nullable=False),
        sa.Column("status", sa.String(length=50), server_default="pending", nullable=False),
        sa.Column("source_vm_name", sa.String(length=191), nullable=False),
        sa.Column("source_vm_spec", sa.Text(), nullable=True),
        sa.Column("destination_vm_id", sa.String(length=191), nullable=True),
        sa.Column("ossea_snapshot_id", sa.String(length=191), nullable=True),
        sa.Column("linstor_snapshot_name", sa.String(length=191), nullable=True),
        sa.Column("network_mappings", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.Column("updated_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.Column("started_at", mysql.DATETIME(fsp=6), nullable=True),
        sa.Column("completed_at", mysql.DATETIME(fsp=6), nullable=True),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("correlation_id", sa.String(length=36), nullable=False),
        sa.Column("parent_job_id", sa.String(length=36), nullable=True),
        sa.Column("requested_by", sa.String(length=191), server_default="system", nullable=False),
        sa.Column("options", sa.JSON(), nullable=True),
        sa.Column("plan", sa.JSON(), nullable=True),
        sa.Column("last_sequence", sa.Integer(), server_default="0", nullable=False),
        sa.Column("ended", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("rollback_requested", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("rolled_back", sa.Boolean(), nullable=True),
        sa.Column("failed_step", sa.String(length=64), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("resume_state", sa.String(length=64), nullable=True),
        sa.Column("active_vm_id", sa.String(length=191), nullable=True),
        sa.Column("cleanup_job_id", sa.String(length=36), nullable=True),
        sa.Column("lease_owner", sa.String(length=191), nullable=True),
        sa.Column("lease_expires_at", mysql.DATETIME(fsp=6), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("active_vm_id"),
        sa.UniqueConstraint("job_id"),
        sa.UniqueConstraint("request_id"),
        mysql_charset="utf8mb4",
    )
    op.create_index(
        "ix_failover_jobs_claim", "failover_jobs", ["ended", "lease_expires_at"], unique=False
    )
    op.create_index("ix_failover_jobs_owner", "failover_jobs", ["lease_owner"], unique=False)
    op.create_index("ix_failover_jobs_vm", "failover_jobs", ["vm_id", "created_at"], unique=False)
    op.create_table(
        "job_commands",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("command_type", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("received_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "job_steps",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=191), nullable=False),
        sa.Column("step_name", sa.String(length=64), nullable=False),
        sa.Column("step_order", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("started_at", mysql.DATETIME(fsp=6), nullable=True),
        sa.Column("completed_at", mysql.DATETIME(fsp=6), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("status_sequence", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "step_name", name="uq_job_steps_job_step"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "job_tracking",
        sa.Column("id", sa.String(length=191), nullable=False),
        sa.Column("job_type", sa.String(length=32), nullable=False),
        sa.Column("operation", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("percent_complete", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("started_at", mysql.DATETIME(fsp=6), nullable=True),
        sa.Column("completed_at", mysql.DATETIME(fsp=6), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("vm_id", sa.String(length=191), nullable=True),
        sa.Column("vm_name", sa.String(length=191), nullable=True),
        sa.Column("correlation_id", sa.String(length=36), nullable=True),
        sa.Column("requested_by", sa.String(length=191), nullable=True),
        sa.Column("current_step", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("rolled_back", sa.Boolean(), nullable=True),
        sa.Column("last_sequence", sa.Integer(), server_default="0", nullable=False),
        sa.Column("status_sequence", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.Column("updated_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_job_tracking_created", "job_tracking", ["created_at"], unique=False)
    op.create_index("ix_job_tracking_vm", "job_tracking", ["vm_id"], unique=False)
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=191), nullable=False),
        sa.Column("expires_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "log_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=191), nullable=False),
        sa.Column("step_id", sa.BigInteger(), nullable=True),
        sa.Column("correlation_id", sa.String(length=191), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("fields", sa.JSON(), nullable=True),
        sa.Column("timestamp", mysql.DATETIME(fsp=6), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("step_name", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "sequence", name="uq_log_events_job_sequence"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("correlation_id", sa.String(length=36), nullable=False),
        sa.Column("body", mysql.LONGTEXT(), nullable=False),
        sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.Column("published_at", mysql.DATETIME(fsp=6), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
        sa.UniqueConstraint("job_id", "sequence", name="uq_outbox_job_sequence"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_outbox_unsent", "outbox", ["published_at", "id"], unique=False)
    op.create_table(
        "projected_events",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("projected_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "sequence"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "resource_ledger",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("resource_key", sa.String(length=191), nullable=False),
        sa.Column("resource_type", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("resource_id", sa.String(length=191), nullable=True),
        sa.Column("name", sa.String(length=191), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cs_job_id", sa.String(length=191), nullable=True),
        sa.Column("operation_id", sa.String(length=191), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.Column("updated_at", mysql.DATETIME(fsp=6), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "resource_key", name="uq_ledger_job_key"),
        mysql_charset="utf8mb4",
    )

    # The platform's tables belong to MigrateKit: create them only where they are absent
    # (a fresh install, the demo, the tests), never touch existing ones.
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "vm_replication_contexts" not in existing:
        op.create_table(
            "vm_replication_contexts",
            sa.Column("context_id", sa.String(length=64), nullable=False),
            sa.Column("vm_name", sa.String(length=191), nullable=False),
            sa.Column("vmware_vm_id", sa.String(length=191), nullable=False),
            sa.Column("vm_path", sa.String(length=500), nullable=True),
            sa.Column("vcenter_host", sa.String(length=191), nullable=True),
            sa.Column("datacenter", sa.String(length=191), nullable=True),
            sa.Column(
                "current_status", sa.String(length=50), server_default="discovered", nullable=False
            ),
            sa.Column("cpu_count", sa.Integer(), nullable=True),
            sa.Column("memory_mb", sa.Integer(), nullable=True),
            sa.Column("os_type", sa.String(length=255), nullable=True),
            sa.Column("power_state", sa.String(length=50), nullable=True),
            sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.Column("updated_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.PrimaryKeyConstraint("context_id"),
            sa.UniqueConstraint("vmware_vm_id"),
            mysql_charset="utf8mb4",
        )
    if "replication_jobs" not in existing:
        op.create_table(
            "replication_jobs",
            sa.Column("id", sa.String(length=191), nullable=False),
            sa.Column("source_vm_id", sa.String(length=191), nullable=False),
            sa.Column("source_vm_name", sa.String(length=191), nullable=False),
            sa.Column("source_vm_path", sa.String(length=500), nullable=True),
            sa.Column("vcenter_host", sa.String(length=191), nullable=True),
            sa.Column("datacenter", sa.String(length=191), nullable=True),
            sa.Column("replication_type", sa.String(length=50), nullable=True),
            sa.Column("status", sa.String(length=50), server_default="pending", nullable=False),
            sa.Column("progress_percent", sa.Integer(), nullable=True),
            sa.Column("vm_context_id", sa.String(length=64), nullable=True),
            sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.Column("updated_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.Column("completed_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            mysql_charset="utf8mb4",
        )
        op.create_index(
            "ix_replication_jobs_source",
            "replication_jobs",
            ["source_vm_id", "created_at"],
            unique=False,
        )
    if "vm_disks" not in existing:
        op.create_table(
            "vm_disks",
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("job_id", sa.String(length=191), nullable=False),
            sa.Column("vm_context_id", sa.String(length=64), nullable=True),
            sa.Column("disk_id", sa.String(length=191), nullable=False),
            sa.Column("vmdk_path", sa.String(length=500), nullable=True),
            sa.Column("size_gb", sa.Integer(), nullable=True),
            sa.Column("datastore", sa.String(length=191), nullable=True),
            sa.Column("unit_number", sa.Integer(), nullable=True),
            sa.Column("label", sa.String(length=191), nullable=True),
            sa.Column("capacity_bytes", sa.BigInteger(), nullable=True),
            sa.Column("provisioning_type", sa.String(length=50), nullable=True),
            sa.Column("ossea_volume_id", sa.Integer(), nullable=True),
            sa.Column("disk_change_id", sa.String(length=255), nullable=True),
            sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.Column("updated_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            mysql_charset="utf8mb4",
        )
        op.create_index("ix_vm_disks_job", "vm_disks", ["job_id"], unique=False)
    if "ossea_volumes" not in existing:
        op.create_table(
            "ossea_volumes",
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("volume_id", sa.String(length=191), nullable=False),
            sa.Column("volume_name", sa.String(length=191), nullable=True),
            sa.Column("size_gb", sa.Integer(), nullable=True),
            sa.Column("ossea_config_id", sa.Integer(), nullable=True),
            sa.Column("volume_type", sa.String(length=50), nullable=True),
            sa.Column("device_path", sa.String(length=255), nullable=True),
            sa.Column("mount_point", sa.String(length=255), nullable=True),
            sa.Column("status", sa.String(length=50), nullable=True),
            sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.Column("updated_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("volume_id"),
            mysql_charset="utf8mb4",
        )
    if "network_mappings" not in existing:
        op.create_table(
            "network_mappings",
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("vm_id", sa.String(length=191), nullable=False),
            sa.Column("source_network_name", sa.String(length=191), nullable=False),
            sa.Column("destination_network_id", sa.String(length=191), nullable=False),
            sa.Column("destination_network_name", sa.String(length=191), nullable=True),
            sa.Column("is_test_network", sa.Boolean(), server_default="0", nullable=False),
            sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.Column("updated_at", mysql.DATETIME(fsp=6), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            mysql_charset="utf8mb4",
        )
        op.create_index("ix_network_mappings_vm", "network_mappings", ["vm_id"], unique=False)


def downgrade() -> None:
    # Platform tables are left in place: they are not ours to drop.
    # ### commands auto generated by Alembic - please adjust! ###
    op.drop_table("resource_ledger")
    op.drop_table("projected_events")
    op.drop_index("ix_outbox_unsent", table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("log_events")
    op.drop_table("leases")
    op.drop_index("ix_job_tracking_vm", table_name="job_tracking")
    op.drop_index("ix_job_tracking_created", table_name="job_tracking")
    op.drop_table("job_tracking")
    op.drop_table("job_steps")
    op.drop_table("job_commands")
    op.drop_index("ix_failover_jobs_vm", table_name="failover_jobs")
    op.drop_index("ix_failover_jobs_owner", table_name="failover_jobs")
    op.drop_index("ix_failover_jobs_claim", table_name="failover_jobs")
    op.drop_table("failover_jobs")
