"""The database schema as SQLAlchemy Core tables.

Three groups:
- the service's own write model: `failover_jobs` (the state machine's record), `job_commands`
  (the inbox: one row per `request_id`), `outbox` (events committed with their transition),
  `resource_ledger` (every external resource a job creates or moves), `leases`,
  `vm_name_claims` (which job may deploy, and look up, a VM of a name);
- the read models built only by the projectors: `job_tracking`, `job_steps`, `log_events`
  (+ `projected_events`, what the projector has applied, for idempotency);
- the platform's tables, owned by MigrateKit and only read (and `current_status` written).

The Alembic migrations create exactly these; `tests/test_migrations.py` compares them.
Times are UTC, stored naive with microseconds.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.mysql import DATETIME, LONGTEXT

metadata = MetaData()

ID = String(191)  # the seed's id width: utf8mb4 keys up to 767 bytes
UUID = String(36)


def _ts(name: str, nullable: bool = True) -> Column[object]:
    return Column(name, DATETIME(fsp=6), nullable=nullable)


# --------------------------------------------------------------------------- write model

failover_jobs = Table(
    "failover_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", ID, nullable=False, unique=True),
    Column("vm_id", ID, nullable=False),
    Column("job_type", String(50), nullable=False),  # seed values: test | live (+ cleanup)
    Column("status", String(50), nullable=False, server_default="pending"),
    Column("source_vm_name", ID, nullable=False),
    Column("source_vm_spec", Text),  # JSON: cpu, memory, os type, disks
    Column("destination_vm_id", ID),
    Column("ossea_snapshot_id", ID),  # the root volume's snapshot
    Column("linstor_snapshot_name", ID),  # deprecated by the seed; kept for compatibility
    Column("network_mappings", Text),  # JSON: the networks the VM was given
    Column("error_message", Text),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
    _ts("started_at"),
    _ts("completed_at"),
    # --- additions: the engine's bookkeeping
    Column("request_id", UUID, nullable=False, unique=True),
    Column("correlation_id", UUID, nullable=False),
    Column("parent_job_id", UUID),  # a cleanup's failover
    Column("requested_by", ID, nullable=False, server_default="system"),
    Column("options", JSON),
    Column("plan", JSON),  # what validation resolved: volumes, networks, names
    Column("last_sequence", Integer, nullable=False, server_default="0"),
    Column("ended", Boolean, nullable=False, server_default="0"),
    Column("cancel_requested", Boolean, nullable=False, server_default="0"),
    Column("rollback_requested", Boolean, nullable=False, server_default="0"),
    Column("rolled_back", Boolean),
    Column("failed_step", String(64)),
    Column("error_code", String(64)),
    Column("resume_state", String(64)),  # where rolling_back came from (or the step to redo)
    # At most one job blocks a VM: set while it runs, while its test failover is not
    # cleaned up, after a live failover, or while its rollback is incomplete. NULLs don't
    # collide, so the unique index is the conflict check (guarantee 1), race-free.
    Column("active_vm_id", ID, unique=True),
    Column("cleanup_job_id", UUID),  # the cleanup running or done for this failover
    Column("lease_owner", ID),
    _ts("lease_expires_at"),
    Column("attempts", Integer, nullable=False, server_default="0"),  # claims of this job
    Index("ix_failover_jobs_claim", "ended", "lease_expires_at"),
    Index("ix_failover_jobs_vm", "vm_id", "created_at"),
    Index("ix_failover_jobs_owner", "lease_owner"),
    mysql_charset="utf8mb4",
)

job_commands = Table(
    "job_commands",
    metadata,
    Column("request_id", UUID, primary_key=True),
    Column("command_type", String(64), nullable=False),
    Column("job_id", UUID),
    Column("outcome", String(32), nullable=False),  # accepted | rejected_<reason>
    Column("detail", Text),
    _ts("received_at", nullable=False),
    mysql_charset="utf8mb4",
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("event_id", UUID, nullable=False, unique=True),
    Column("job_id", UUID, nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("correlation_id", UUID, nullable=False),
    Column("body", LONGTEXT, nullable=False),
    _ts("created_at", nullable=False),
    _ts("published_at"),
    UniqueConstraint("job_id", "sequence", name="uq_outbox_job_sequence"),
    Index("ix_outbox_unsent", "published_at", "id"),
    mysql_charset="utf8mb4",
)

resource_ledger = Table(
    "resource_ledger",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", UUID, nullable=False),
    Column("resource_key", ID, nullable=False),  # deterministic: e.g. snapshot:<volume id>
    Column("resource_type", String(32), nullable=False),  # snapshot | vm | volume | ...
    Column("action", String(32), nullable=False),  # create | detach | attach | write | delete
    Column("resource_id", ID),  # the real CloudStack id once known
    Column("name", ID),  # the deterministic name given to CloudStack, if any
    Column("status", String(16), nullable=False),  # intended | done | undone | failed
    Column("cs_job_id", ID),  # CloudStack async job id, saved before polling
    Column("operation_id", ID),  # Volume Daemon operation id, saved before polling
    Column("data", JSON),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
    UniqueConstraint("job_id", "resource_key", name="uq_ledger_job_key"),
    mysql_charset="utf8mb4",
)

# A VM's name is the job's only hold on it between the intent to deploy and the deploy's answer
# (a resume, a retry or the rollback looks it up by that name). Two jobs may want one name: a
# live failover's is the source VM's alone, and two source VMs may sanitise to the same. A job
# claims the name before it deploys (`JobStore.claim_vm_name`) and keeps it until it ended with
# nothing of its own left under the name (completed, or rolled back): no other job deploys, or
# looks up, a VM of that name meanwhile.
vm_name_claims = Table(
    "vm_name_claims",
    metadata,
    Column("name", ID, primary_key=True),
    Column("job_id", UUID, nullable=False),
    _ts("claimed_at", nullable=False),
    mysql_charset="utf8mb4",
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", ID, nullable=False),
    _ts("expires_at", nullable=False),
    mysql_charset="utf8mb4",
)

# --------------------------------------------------------------------------- read models

job_tracking = Table(
    "job_tracking",
    metadata,
    Column("id", ID, primary_key=True),
    Column("job_type", String(32), nullable=False),
    Column("operation", String(255), nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("percent_complete", SmallInteger, nullable=False, server_default="0"),
    _ts("started_at"),
    _ts("completed_at"),
    Column("metadata", JSON),
    # additions
    Column("vm_id", ID),
    Column("vm_name", ID),
    Column("correlation_id", UUID),
    Column("requested_by", ID),
    Column("current_step", String(64)),
    Column("error_message", Text),
    Column("rolled_back", Boolean),
    Column("last_sequence", Integer, nullable=False, server_default="0"),
    Column("status_sequence", Integer, nullable=False, server_default="0"),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
    Index("ix_job_tracking_created", "created_at"),
    Index("ix_job_tracking_vm", "vm_id"),
    mysql_charset="utf8mb4",
)

job_steps = Table(
    "job_steps",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", ID, nullable=False),
    Column("step_name", String(64), nullable=False),
    Column("step_order", Integer, nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    _ts("started_at"),
    _ts("completed_at"),
    Column("error_message", Text),
    # additions
    Column("error_code", String(64)),
    Column("outputs", JSON),
    Column("status_sequence", Integer, nullable=False, server_default="0"),
    UniqueConstraint("job_id", "step_name", name="uq_job_steps_job_step"),
    mysql_charset="utf8mb4",
)

log_events = Table(
    "log_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", ID, nullable=False),
    Column("step_id", BigInteger),
    Column("correlation_id", ID, nullable=False),
    Column("level", String(8), nullable=False),
    Column("message", Text, nullable=False),
    Column("fields", JSON),
    _ts("timestamp", nullable=False),
    # additions
    Column("sequence", Integer, nullable=False),
    Column("step_name", String(64)),
    UniqueConstraint("job_id", "sequence", name="uq_log_events_job_sequence"),
    mysql_charset="utf8mb4",
)

projected_events = Table(
    "projected_events",
    metadata,
    Column("job_id", UUID, nullable=False),
    Column("sequence", Integer, nullable=False),
    _ts("projected_at", nullable=False),
    PrimaryKeyConstraint("job_id", "sequence"),
    mysql_charset="utf8mb4",
)

# --------------------------------------------------------------------------- platform tables

vm_replication_contexts = Table(
    "vm_replication_contexts",
    metadata,
    Column("context_id", String(64), primary_key=True),
    Column("vm_name", ID, nullable=False),
    Column("vmware_vm_id", ID, nullable=False, unique=True),
    Column("vm_path", String(500)),
    Column("vcenter_host", ID),
    Column("datacenter", ID),
    Column("current_status", String(50), nullable=False, server_default="discovered"),
    Column("cpu_count", Integer),
    Column("memory_mb", Integer),
    Column("os_type", String(255)),
    Column("power_state", String(50)),
    _ts("created_at"),
    _ts("updated_at"),
    mysql_charset="utf8mb4",
)

replication_jobs = Table(
    "replication_jobs",
    metadata,
    Column("id", ID, primary_key=True),
    Column("source_vm_id", ID, nullable=False),
    Column("source_vm_name", ID, nullable=False),
    Column("source_vm_path", String(500)),
    Column("vcenter_host", ID),
    Column("datacenter", ID),
    Column("replication_type", String(50)),
    Column("status", String(50), nullable=False, server_default="pending"),
    Column("progress_percent", Integer),
    Column("vm_context_id", String(64)),
    _ts("created_at"),
    _ts("updated_at"),
    _ts("completed_at"),
    Index("ix_replication_jobs_source", "source_vm_id", "created_at"),
    mysql_charset="utf8mb4",
)

vm_disks = Table(
    "vm_disks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", ID, nullable=False),
    Column("vm_context_id", String(64)),
    Column("disk_id", ID, nullable=False),
    Column("vmdk_path", String(500)),
    Column("size_gb", Integer),
    Column("datastore", ID),
    Column("unit_number", Integer),
    Column("label", ID),
    Column("capacity_bytes", BigInteger),
    Column("provisioning_type", String(50)),
    Column("ossea_volume_id", Integer),
    Column("disk_change_id", String(255)),
    _ts("created_at"),
    _ts("updated_at"),
    Index("ix_vm_disks_job", "job_id"),
    mysql_charset="utf8mb4",
)

ossea_volumes = Table(
    "ossea_volumes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("volume_id", ID, nullable=False, unique=True),
    Column("volume_name", ID),
    Column("size_gb", Integer),
    Column("ossea_config_id", Integer),
    Column("volume_type", String(50)),
    Column("device_path", String(255)),
    Column("mount_point", String(255)),
    Column("status", String(50)),
    _ts("created_at"),
    _ts("updated_at"),
    mysql_charset="utf8mb4",
)

network_mappings = Table(
    "network_mappings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("vm_id", ID, nullable=False),
    Column("source_network_name", ID, nullable=False),
    Column("destination_network_id", ID, nullable=False),
    Column("destination_network_name", ID),
    Column("is_test_network", Boolean, nullable=False, server_default="0"),
    _ts("created_at"),
    _ts("updated_at"),
    Index("ix_network_mappings_vm", "vm_id"),
    mysql_charset="utf8mb4",
)

PLATFORM_TABLES = (
    vm_replication_contexts,
    replication_jobs,
    vm_disks,
    ossea_volumes,
    network_mappings,
)
