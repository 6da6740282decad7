"""Reads for people: the read models (and the ledger) as plain dicts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.tables import failover_jobs, job_steps, job_tracking, log_events, resource_ledger

_LEVELS = ["DEBUG", "INFO", "WARN", "ERROR"]


def _plain(row: Any) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row._mapping.items()}


async def recent_jobs(engine: AsyncEngine, limit: int = 20) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(job_tracking).order_by(job_tracking.c.created_at.desc()).limit(limit))).all()
    return [_plain(r) for r in rows]


async def job_detail(engine: AsyncEngine, job_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        tracking = (await conn.execute(select(job_tracking).where(job_tracking.c.id == job_id))).first()
        if tracking is None:
            return None
        steps = (await conn.execute(select(job_steps).where(job_steps.c.job_id == job_id)
                                    .order_by(job_steps.c.step_order))).all()
        job = (await conn.execute(select(failover_jobs).where(failover_jobs.c.job_id == job_id))).first()
        ledger = (await conn.execute(select(resource_ledger).where(resource_ledger.c.job_id == job_id)
                                     .order_by(resource_ledger.c.id))).all()
    failover = None
    if job is not None:
        failover = {k: v for k, v in _plain(job).items() if k in (
            "job_id", "vm_id", "job_type", "status", "source_vm_name", "destination_vm_id", "ossea_snapshot_id",
            "error_message", "created_at", "completed_at", "rolled_back", "cleanup_job_id", "parent_job_id")}
    return {"job": _plain(tracking), "steps": [_plain(s) for s in steps], "failover_job": failover,
            "ledger": [_plain(e) for e in ledger]}


async def job_logs(engine: AsyncEngine, job_id: str, *, level: str = "DEBUG", after: int = 0) -> list[dict[str, Any]]:
    wanted = _LEVELS[_LEVELS.index(level.upper()):] if level.upper() in _LEVELS else _LEVELS
    async with engine.connect() as conn:
        rows = (await conn.execute(select(log_events).where(
            log_events.c.job_id == job_id, log_events.c.level.in_(wanted), log_events.c.sequence > after)
            .order_by(log_events.c.sequence))).all()
    return [_plain(r) for r in rows]
