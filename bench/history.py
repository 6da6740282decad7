"""History: the rows finished jobs leave behind, added to the benchmark's database in bulk.

The service keeps every finished job's row, its events (the outbox, published), its ledger, its
projections and its log lines: the audit trail. A year of failovers is hundreds of thousands of
jobs. `fill` adds `jobs` such finished jobs (as many rows of each kind as the benchmark's own
jobs leave: 22 events, 10 ledger rows, 6 steps, 8 log lines) so that a burst run before and
after shows whether the service's cost per job grows with its history (`python -m bench.run
--history N`, bench/README.md).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

EVENTS, LEDGER, STEPS, LOG_LINES = 22, 10, 6, 8
_COUNTS = {"events": EVENTS, "ledger": LEDGER, "steps": STEPS, "lines": LOG_LINES}
CHUNK = 10_000  # jobs per statement (MariaDB's seq_<from>_to_<to> tables number them)

# one statement per table: `{lo}` and `{hi}` number the chunk's jobs; `hist-<n>` names them
_STATEMENTS = (
    "INSERT INTO failover_jobs (job_id, vm_id, job_type, status, source_vm_name, created_at, updated_at,"
    " started_at, completed_at, request_id, correlation_id, ended, last_sequence, lease_owner, lease_expires_at,"
    " options) SELECT CONCAT('hist-', seq), CONCAT('hist-vm-', seq), 'test-failover', 'completed',"
    " CONCAT('hist-vm-', seq), @old, @old, @old, @old, CONCAT('hist-req-', seq), CONCAT('hist-cor-', seq), 1,"
    " {events}, 'history', @old, '{{}}' FROM seq_{lo}_to_{hi}",
    "INSERT INTO job_commands (request_id, command_type, job_id, outcome, received_at)"
    " SELECT CONCAT('hist-req-', seq), 'FailoverRequested', CONCAT('hist-', seq), 'accepted', @old"
    " FROM seq_{lo}_to_{hi}",
    "INSERT INTO job_tracking (id, job_type, operation, status, percent_complete, started_at, completed_at, vm_id,"
    " vm_name, correlation_id, requested_by, last_sequence, status_sequence, created_at, updated_at)"
    " SELECT CONCAT('hist-', seq), 'test', 'test-failover', 'completed', 100, @old, @old, CONCAT('hist-vm-', seq),"
    " CONCAT('hist-vm-', seq), CONCAT('hist-cor-', seq), 'history', {events}, {events}, @old, @old"
    " FROM seq_{lo}_to_{hi}",
    "INSERT INTO outbox (event_id, job_id, sequence, event_type, correlation_id, body, created_at, published_at)"
    " SELECT UUID(), CONCAT('hist-', j.seq), e.seq, 'StepCompleted', CONCAT('hist-cor-', j.seq),"
    " '{{\"history\": true}}', @old, @old FROM seq_{lo}_to_{hi} j JOIN seq_1_to_{events} e",
    "INSERT INTO projected_events (job_id, sequence, projected_at)"
    " SELECT CONCAT('hist-', j.seq), e.seq, @old FROM seq_{lo}_to_{hi} j JOIN seq_1_to_{events} e",
    "INSERT INTO resource_ledger (job_id, resource_key, resource_type, action, status, data, created_at, updated_at)"
    " SELECT CONCAT('hist-', j.seq), CONCAT('volume-', k.seq), 'volume', 'detach', 'done', '{{}}', @old, @old"
    " FROM seq_{lo}_to_{hi} j JOIN seq_1_to_{ledger} k",
    "INSERT INTO job_steps (job_id, step_name, step_order, status, started_at, completed_at)"
    " SELECT CONCAT('hist-', j.seq), CONCAT('step-', s.seq), s.seq, 'completed', @old, @old"
    " FROM seq_{lo}_to_{hi} j JOIN seq_1_to_{steps} s",
    "INSERT INTO log_events (job_id, correlation_id, level, message, fields, timestamp, sequence)"
    " SELECT CONCAT('hist-', j.seq), CONCAT('hist-cor-', j.seq), 'INFO', 'a finished job''s log line', '{{}}',"
    " @old, l.seq FROM seq_{lo}_to_{hi} j JOIN seq_1_to_{lines} l",
)
_TABLES = ("failover_jobs", "job_commands", "job_tracking", "outbox", "projected_events", "resource_ledger",
           "job_steps", "log_events")


async def fill(engine: AsyncEngine, jobs: int) -> dict[str, Any]:
    """Add `jobs` finished jobs' rows (MariaDB: its sequence engine numbers them), then refresh
    the tables' statistics as a server that grew them slowly would have them."""
    began = time.monotonic()
    rows = 0
    async with engine.connect() as conn:
        await conn.execute(text("SET @old = UTC_TIMESTAMP(6) - INTERVAL 30 DAY"))
        for lo in range(1, jobs + 1, CHUNK):
            hi = min(lo + CHUNK - 1, jobs)
            for statement in _STATEMENTS:
                rows += (await conn.execute(text(statement.format(lo=lo, hi=hi, **_COUNTS)))).rowcount
            await conn.commit()
        await conn.execute(text(f"ANALYZE TABLE {', '.join(_TABLES)}"))
    return {"jobs": jobs, "rows": rows, "seconds": round(time.monotonic() - began, 1)}
