"""The read models, folded from the events only (guarantee 6).

A batch of events is applied in one transaction together with the record of which
(`job_id`, `sequence`) pairs were applied, so a redelivered or re-published event is a
no-op. Every update is guarded by the sequence of the event that last set the field, so the
fold gives the same rows whatever order the events arrive in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas.events import (
    Event,
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobFailed,
    LogRecorded,
    RollbackCompleted,
    RollbackFailed,
    RollbackStarted,
    StepCompleted,
    StepFailed,
    StepSkipped,
    StepStarted,
)

from .engine import utcnow
from .tables import job_steps, job_tracking, log_events, projected_events


def _naive(event: Event) -> Any:
    return event.occurred_at.replace(tzinfo=None)


class Projections:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def apply(self, events: Sequence[Event]) -> tuple[int, int]:
        """Apply what is new in `events`; returns (applied, duplicates)."""
        if not events:
            return 0, 0
        unique: dict[tuple[str, int], Event] = {}
        for e in events:
            unique.setdefault((str(e.job_id), e.sequence), e)
        async with self.engine.begin() as conn:
            keys = list(unique)
            seen = set((await conn.execute(
                select(projected_events.c.job_id, projected_events.c.sequence)
                .where(tuple_(projected_events.c.job_id, projected_events.c.sequence).in_(keys))
            )).tuples().all())
            new = [unique[k] for k in keys if k not in seen]
            if new:
                now = utcnow()
                await conn.execute(projected_events.insert(), [
                    {"job_id": str(e.job_id), "sequence": e.sequence, "projected_at": now} for e in new])
                for e in sorted(new, key=lambda e: (str(e.job_id), e.sequence)):
                    await self._apply(conn, e)
        return len(new), len(events) - len(new)

    async def _apply(self, conn: AsyncConnection, e: Event) -> None:
        job_id, seq, at = str(e.job_id), e.sequence, _naive(e)
        if isinstance(e, JobAccepted):
            await self._ensure_job(conn, e, metadata={"vm_name": e.vm_name, "requested_by": e.requested_by,
                                                      "steps": [s.model_dump() for s in e.steps]})
            await conn.execute(update(job_tracking).where(job_tracking.c.id == job_id).values(
                vm_name=e.vm_name, requested_by=e.requested_by, operation=e.job_type or "",
                job_type=e.job_type or ""))
            stmt = mysql_insert(job_steps)
            await conn.execute(stmt.prefix_with("IGNORE"), [
                {"job_id": job_id, "step_name": s.name, "step_order": s.order, "status": "pending"}
                for s in e.steps])
            await self._status(conn, job_id, seq, "pending", started_at=at)
        elif isinstance(e, StepStarted):
            await self._ensure_job(conn, e)
            await self._step(conn, job_id, e.step, e.step_order, seq, "running", started_at=at)
            await self._status(conn, job_id, seq, "running", current_step=e.step)
            await self._percent(conn, job_id, e.percent_complete)
        elif isinstance(e, (StepCompleted, StepSkipped)):
            await self._ensure_job(conn, e)
            status = "completed" if isinstance(e, StepCompleted) else "skipped"
            outputs = e.outputs if isinstance(e, StepCompleted) else {"reason": e.reason}
            await self._step(conn, job_id, e.step, e.step_order, seq, status, completed_at=at, outputs=outputs)
            await self._percent(conn, job_id, e.percent_complete)
        elif isinstance(e, StepFailed):
            await self._ensure_job(conn, e)
            await self._step(conn, job_id, e.step, e.step_order, seq, "failed", completed_at=at,
                             error_message=e.error.message, error_code=e.error.code)
        elif isinstance(e, LogRecorded):
            await self._ensure_job(conn, e)
            step_id = None
            if e.step:
                step_id = (await conn.execute(select(job_steps.c.id).where(
                    job_steps.c.job_id == job_id, job_steps.c.step_name == e.step))).scalar()
            await conn.execute(mysql_insert(log_events).prefix_with("IGNORE").values(
                job_id=job_id, step_id=step_id, correlation_id=str(e.correlation_id), level=e.level,
                message=e.message, fields=e.fields, timestamp=at, sequence=seq, step_name=e.step))
        elif isinstance(e, (RollbackStarted, RollbackCompleted, RollbackFailed)):
            await self._ensure_job(conn, e)
            step = {"RollbackStarted": "rolling_back", "RollbackCompleted": "rolled_back",
                    "RollbackFailed": "rollback_failed"}[e.type]
            await self._status(conn, job_id, seq, "running", current_step=step,
                               rolled_back=None if isinstance(e, RollbackStarted) else isinstance(e, RollbackCompleted))
        elif isinstance(e, JobCompleted):
            await self._ensure_job(conn, e)
            await self._status(conn, job_id, seq, "completed", completed_at=at, current_step=None)
            await self._percent(conn, job_id, 100)
        elif isinstance(e, JobFailed):
            await self._ensure_job(conn, e)
            await self._status(conn, job_id, seq, "failed", completed_at=at, error_message=e.error.message,
                               rolled_back=e.rolled_back)
        elif isinstance(e, JobCancelled):
            await self._ensure_job(conn, e)
            await self._status(conn, job_id, seq, "cancelled", completed_at=at, rolled_back=e.rolled_back)
        await conn.execute(update(job_tracking).where(job_tracking.c.id == job_id).values(
            last_sequence=func.greatest(job_tracking.c.last_sequence, seq), updated_at=utcnow()))

    async def _ensure_job(self, conn: AsyncConnection, e: Event, metadata: dict[str, Any] | None = None) -> None:
        now = utcnow()
        stmt = mysql_insert(job_tracking).prefix_with("IGNORE").values(
            id=str(e.job_id), job_type=e.job_type or "", operation=e.job_type or "", status="pending",
            percent_complete=0, metadata=metadata, vm_id=e.vm_id, correlation_id=str(e.correlation_id),
            created_at=_naive(e) if isinstance(e, JobAccepted) else now, updated_at=now)
        await conn.execute(stmt)
        if metadata is not None:
            await conn.execute(update(job_tracking).where(job_tracking.c.id == str(e.job_id)).values(
                metadata=metadata, created_at=_naive(e)))

    async def _status(self, conn: AsyncConnection, job_id: str, seq: int, status: str, **values: Any) -> None:
        values = {k: v for k, v in values.items() if v is not None or k == "current_step"}
        await conn.execute(update(job_tracking).where(
            job_tracking.c.id == job_id, job_tracking.c.status_sequence < seq).values(
            status=status, status_sequence=seq, **values))

    async def _percent(self, conn: AsyncConnection, job_id: str, percent: int) -> None:
        await conn.execute(update(job_tracking).where(job_tracking.c.id == job_id).values(
            percent_complete=func.greatest(job_tracking.c.percent_complete, percent)))

    async def _step(self, conn: AsyncConnection, job_id: str, step: str, order: int, seq: int, status: str,
                    **values: Any) -> None:
        await conn.execute(mysql_insert(job_steps).prefix_with("IGNORE").values(
            job_id=job_id, step_name=step, step_order=order, status="pending"))
        stamps = {k: values.pop(k) for k in ("started_at", "completed_at") if k in values}
        if stamps:  # times are set once, whatever the order of arrival
            for k, v in stamps.items():
                await conn.execute(update(job_steps).where(
                    job_steps.c.job_id == job_id, job_steps.c.step_name == step).values(
                    {k: func.coalesce(getattr(job_steps.c, k), v)}))
        await conn.execute(update(job_steps).where(
            job_steps.c.job_id == job_id, job_steps.c.step_name == step, job_steps.c.status_sequence < seq
        ).values(status=status, status_sequence=seq, **values))
