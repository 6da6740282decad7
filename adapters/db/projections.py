"""The read models, folded from the events only (guarantee 6).

A batch of events is folded in memory, then written with a handful of statements whatever its
size (one upsert per table), in one transaction together with the record of which
(`job_id`, `sequence`) pairs were applied, so a redelivered or re-published event is a no-op.
Every field is guarded by the sequence of the event that set it (`status_sequence`), so the
rows come out the same whatever order the events arrive in, in one batch or across batches.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, TextClause, bindparam, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

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

from . import raw
from .engine import utcnow
from .tables import projected_events

# MariaDB evaluates ON DUPLICATE KEY UPDATE assignments left to right, each seeing the ones
# before: every guarded column is assigned before `status_sequence` itself.
_NEWER = "VALUES(status_sequence) > status_sequence"

UPSERT_JOBS = text(f"""
INSERT INTO job_tracking (id, job_type, operation, status, percent_complete, started_at, completed_at,
    metadata, vm_id, vm_name, correlation_id, requested_by, current_step, error_message, rolled_back,
    last_sequence, status_sequence, created_at, updated_at)
VALUES (:id, :job_type, :operation, :status, :percent, :started_at, :completed_at, :metadata, :vm_id,
    :vm_name, :correlation_id, :requested_by, :current_step, :error_message, :rolled_back, :last_sequence,
    :status_sequence, :created_at, :updated_at)
ON DUPLICATE KEY UPDATE
    job_type = IF(VALUES(job_type) <> '', VALUES(job_type), job_type),
    operation = IF(VALUES(operation) <> '', VALUES(operation), operation),
    metadata = COALESCE(VALUES(metadata), metadata),
    vm_name = COALESCE(VALUES(vm_name), vm_name),
    requested_by = COALESCE(VALUES(requested_by), requested_by),
    created_at = IF(VALUES(metadata) IS NOT NULL, VALUES(created_at), created_at),
    started_at = COALESCE(VALUES(started_at), started_at),
    percent_complete = GREATEST(percent_complete, VALUES(percent_complete)),
    last_sequence = GREATEST(last_sequence, VALUES(last_sequence)),
    status = IF({_NEWER}, VALUES(status), status),
    current_step = IF({_NEWER}, VALUES(current_step), current_step),
    completed_at = IF({_NEWER}, COALESCE(VALUES(completed_at), completed_at), completed_at),
    error_message = IF({_NEWER}, COALESCE(VALUES(error_message), error_message), error_message),
    rolled_back = IF({_NEWER}, COALESCE(VALUES(rolled_back), rolled_back), rolled_back),
    updated_at = VALUES(updated_at),
    status_sequence = GREATEST(status_sequence, VALUES(status_sequence))
""")

UPSERT_STEPS = text(f"""
INSERT INTO job_steps (job_id, step_name, step_order, status, started_at, completed_at, error_message,
    error_code, outputs, status_sequence)
VALUES (:job_id, :step_name, :step_order, :status, :started_at, :completed_at, :error_message, :error_code,
    :outputs, :status_sequence)
ON DUPLICATE KEY UPDATE
    started_at = COALESCE(started_at, VALUES(started_at)),
    completed_at = COALESCE(completed_at, VALUES(completed_at)),
    status = IF({_NEWER}, VALUES(status), status),
    error_message = IF({_NEWER}, COALESCE(VALUES(error_message), error_message), error_message),
    error_code = IF({_NEWER}, COALESCE(VALUES(error_code), error_code), error_code),
    outputs = IF({_NEWER}, COALESCE(VALUES(outputs), outputs), outputs),
    status_sequence = GREATEST(status_sequence, VALUES(status_sequence))
""")

INSERT_LOGS = text("""
INSERT IGNORE INTO log_events (job_id, correlation_id, level, message, fields, timestamp, sequence, step_name)
VALUES (:job_id, :correlation_id, :level, :message, :fields, :timestamp, :sequence, :step_name)
""")

# the batch's log lines by their job first, then each one's step by its key: named, since on
# tables whose statistics were taken while they were small MariaDB walked every step of every job
# (adapters/db/store.py, `LEDGER_OF_JOB`)
_LINK_LOG_STEPS = """
UPDATE log_events l FORCE INDEX (uq_log_events_job_sequence)
STRAIGHT_JOIN job_steps s FORCE INDEX (uq_job_steps_job_step) ON s.job_id = l.job_id AND s.step_name = l.step_name
SET l.step_id = s.id
WHERE l.step_id IS NULL AND l.step_name IS NOT NULL AND l.job_id IN ({jobs})
"""
_PROJECTED_INSERT = projected_events.insert()
# per batch size, built once (run on the driver, adapters/db/raw.py, which binds no lists)
_seen: dict[int, Select[Any]] = {}
_links: dict[int, TextClause] = {}


def _seen_of(count: int) -> Select[Any]:
    """Which of `count` (job_id, sequence) pairs, bound as j<i>, s<i>, were applied already."""
    stmt = _seen.get(count)
    if stmt is None:
        pairs = [tuple_(bindparam(f"j{i}"), bindparam(f"s{i}")) for i in range(count)]
        stmt = _seen[count] = cast(Select[Any], select(projected_events.c.job_id, projected_events.c.sequence).where(
            tuple_(projected_events.c.job_id, projected_events.c.sequence).in_(pairs)))
    return stmt


def _link_of(count: int) -> TextClause:
    """Link the log lines of `count` jobs (bound as j<i>) to their steps."""
    stmt = _links.get(count)
    if stmt is None:
        stmt = _links[count] = text(_LINK_LOG_STEPS.format(jobs=", ".join(f":j{i}" for i in range(count))))
    return stmt


def _pairs(keys: Sequence[tuple[str, int]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for i, (job_id, sequence) in enumerate(keys):
        params[f"j{i}"], params[f"s{i}"] = job_id, sequence
    return params


def _naive(value: datetime) -> datetime:
    return value.replace(tzinfo=None)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


@dataclass
class _Job:
    """One job's row in job_tracking, as this batch says it should become."""

    id: str
    job_type: str = ""
    vm_id: str | None = None
    correlation_id: str | None = None
    metadata: Any = None
    vm_name: str | None = None
    requested_by: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    percent: int = 0
    last_sequence: int = 0
    status: str = "pending"
    status_sequence: int = 0
    current_step: str | None = None
    completed_at: datetime | None = None
    error_message: str | None = None
    rolled_back: bool | None = None

    def status_event(self, seq: int, status: str, current_step: str | None, **extra: Any) -> None:
        if seq > self.status_sequence:
            self.status, self.status_sequence, self.current_step = status, seq, current_step
            self.completed_at = extra.get("completed_at")
            self.error_message = extra.get("error_message")
            self.rolled_back = extra.get("rolled_back")

    def row(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id, "job_type": self.job_type, "operation": self.job_type, "status": self.status,
            "percent": self.percent, "started_at": self.started_at, "completed_at": self.completed_at,
            "metadata": _json(self.metadata), "vm_id": self.vm_id, "vm_name": self.vm_name,
            "correlation_id": self.correlation_id, "requested_by": self.requested_by,
            "current_step": self.current_step, "error_message": self.error_message,
            "rolled_back": self.rolled_back, "last_sequence": self.last_sequence,
            "status_sequence": self.status_sequence, "created_at": self.created_at or now, "updated_at": now,
        }


@dataclass
class _Step:
    job_id: str
    step_name: str
    step_order: int
    status: str = "pending"
    status_sequence: int = 0
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error_message: str | None = None
    error_code: str | None = None
    outputs: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def status_event(self, seq: int, status: str, **values: Any) -> None:
        if seq > self.status_sequence:
            self.status, self.status_sequence = status, seq
            self.error_message = values.get("error_message")
            self.error_code = values.get("error_code")
            self.outputs = values.get("outputs")

    def row(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "step_name": self.step_name, "step_order": self.step_order,
            "status": self.status, "started_at": self.started_at, "completed_at": self.completed_at,
            "error_message": self.error_message, "error_code": self.error_code,
            "outputs": _json(self.outputs), "status_sequence": self.status_sequence,
        }


class _Fold:
    """The batch's events folded into rows."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Job] = {}
        self.steps: dict[tuple[str, str], _Step] = {}
        self.logs: list[dict[str, Any]] = []

    def job(self, e: Event) -> _Job:
        job = self.jobs.get(str(e.job_id))
        if job is None:
            job = self.jobs[str(e.job_id)] = _Job(id=str(e.job_id))
        job.job_type = job.job_type or (e.job_type or "")
        job.vm_id = job.vm_id or e.vm_id
        job.correlation_id = job.correlation_id or str(e.correlation_id)
        job.last_sequence = max(job.last_sequence, e.sequence)
        return job

    def step(self, job_id: str, name: str, order: int) -> _Step:
        key = (job_id, name)
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = _Step(job_id=job_id, step_name=name, step_order=order)
        return step

    def add(self, e: Event) -> None:
        job, seq, at = self.job(e), e.sequence, _naive(e.occurred_at)
        jid = job.id
        if isinstance(e, JobAccepted):
            job.metadata = {"vm_name": e.vm_name, "requested_by": e.requested_by,
                            "steps": [s.model_dump() for s in e.steps]}
            job.vm_name, job.requested_by, job.created_at, job.started_at = e.vm_name, e.requested_by, at, at
            for s in e.steps:
                self.step(jid, s.name, s.order)
            job.status_event(seq, "pending", None)
        elif isinstance(e, StepStarted):
            step = self.step(jid, e.step, e.step_order)
            step.started_at = step.started_at or at
            step.status_event(seq, "running")
            job.status_event(seq, "running", e.step)
            job.percent = max(job.percent, e.percent_complete)
        elif isinstance(e, (StepCompleted, StepSkipped)):
            step = self.step(jid, e.step, e.step_order)
            step.completed_at = step.completed_at or at
            if isinstance(e, StepCompleted):
                step.status_event(seq, "completed", outputs=e.outputs)
            else:
                step.status_event(seq, "skipped", outputs={"reason": e.reason})
            job.percent = max(job.percent, e.percent_complete)
        elif isinstance(e, StepFailed):
            step = self.step(jid, e.step, e.step_order)
            step.completed_at = step.completed_at or at
            step.status_event(seq, "failed", error_message=e.error.message, error_code=e.error.code)
        elif isinstance(e, LogRecorded):
            self.logs.append({"job_id": jid, "correlation_id": str(e.correlation_id), "level": e.level,
                              "message": e.message, "fields": _json(e.fields), "timestamp": at,
                              "sequence": seq, "step_name": e.step})
        elif isinstance(e, RollbackStarted):
            job.status_event(seq, "running", "rolling_back")
        elif isinstance(e, (RollbackCompleted, RollbackFailed)):
            job.status_event(seq, "running", "rolled_back" if isinstance(e, RollbackCompleted) else
                             "rollback_failed", rolled_back=isinstance(e, RollbackCompleted))
        elif isinstance(e, JobCompleted):
            job.status_event(seq, "completed", None, completed_at=at)
            job.percent = 100
        elif isinstance(e, JobFailed):
            job.status_event(seq, "failed", None, completed_at=at, error_message=e.error.message,
                             rolled_back=e.rolled_back)
        elif isinstance(e, JobCancelled):
            job.status_event(seq, "cancelled", None, completed_at=at, rolled_back=e.rolled_back)
        # JobRejected: a command that never became a job has no row in the job views


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
        async with raw.transaction(self.engine) as tx:
            keys = list(unique)
            asked = raw.padded(keys)
            seen = {(r[0], r[1]) for r in await tx.rows(_seen_of(len(asked)), _pairs(asked))}
            new = [unique[k] for k in keys if k not in seen]
            if new:
                now = utcnow()
                # the writes in one round trip (the first fails on a duplicate projected by
                # another projector meanwhile: none of the rest runs, the batch is retried)
                sqls = tx.insert_sqls(_PROJECTED_INSERT, [
                    {"job_id": str(e.job_id), "sequence": e.sequence, "projected_at": now} for e in new])
                fold = _Fold()
                for e in new:
                    if e.type != "JobRejected":
                        fold.add(e)
                if fold.jobs:
                    sqls.extend(tx.insert_sqls(UPSERT_JOBS, [j.row(now) for j in fold.jobs.values()]))
                if fold.steps:
                    sqls.extend(tx.insert_sqls(UPSERT_STEPS, [s.row() for s in fold.steps.values()]))
                if fold.logs:
                    sqls.extend(tx.insert_sqls(INSERT_LOGS, fold.logs))
                # a log line may arrive before its step's row: link both ways round
                jobs = sorted({row["job_id"] for row in fold.logs if row["step_name"]} | {j for j, _ in fold.steps})
                if jobs:
                    linked = raw.padded(jobs)
                    sqls.append(tx.sql(_link_of(len(linked)), {f"j{i}": j for i, j in enumerate(linked)}))
                await tx.script(sqls)
        return len(new), len(events) - len(new)
