"""Reads for people (`failoverctl jobs | show | logs | watch`): the read models, the ledger and
the job's recorded events, as plain JSON-ready dicts. Times are ISO 8601 in UTC."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, select, union_all
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.engine import index_hint
from adapters.db.tables import (
    failover_jobs,
    job_commands,
    job_steps,
    job_tracking,
    log_events,
    outbox,
    resource_ledger,
)
from schemas.common import FAILOVER_STEPS

__all__ = ["ENDED", "LEVELS", "command_outcome", "command_outcomes", "holders", "job_detail", "job_details", "job_logs",
           "newest_jobs", "recent_jobs", "running_jobs"]

T = TypeVar("T")

LEVELS = ["DEBUG", "INFO", "WARN", "ERROR"]
ENDED = ("completed", "failed", "cancelled")  # job_tracking.status of a job that has ended

# failover_jobs columns worth showing (the rest is the engine's bookkeeping)
_FAILOVER_COLUMNS = ("job_id", "vm_id", "job_type", "status", "source_vm_name", "destination_vm_id",
                     "ossea_snapshot_id", "error_message", "failed_step", "error_code", "rolled_back",
                     "requested_by", "correlation_id", "parent_job_id", "cleanup_job_id", "created_at",
                     "started_at", "completed_at")
# the events that tell a job's outcome, errors and what is left to do
_OUTCOME_EVENTS = ("StepFailed", "RollbackStarted", "RollbackCompleted", "RollbackFailed", "JobCompleted",
                   "JobFailed", "JobCancelled")
# of them, those that end a job or reopen it (a retried rollback): the last tells whether it ended
_ENDS = ("RollbackStarted", "JobCompleted", "JobFailed", "JobCancelled")


def _iso(value: datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _plain(row: Any) -> dict[str, Any]:
    return {k: (_iso(v) if isinstance(v, datetime) else v) for k, v in row._mapping.items()}


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 3)


def _chunks(ids: list[T], size: int = 500) -> list[list[T]]:
    """`ids` in lists short enough for one `IN (...)` (or one statement) each."""
    return [ids[at:at + size] for at in range(0, len(ids), size)]


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # the columns hold naive UTC


def recent_jobs_query(limit: int) -> Select[Any]:
    """The newest `limit` jobs, by their creation index (on a year of jobs, whatever the
    server's statistics say: tests/test_query_plans.py)."""
    return index_hint(select(job_tracking).order_by(job_tracking.c.created_at.desc()).limit(limit),
                      "FORCE INDEX (ix_job_tracking_created)", job_tracking)


async def recent_jobs(engine: AsyncEngine, limit: int = 20) -> list[dict[str, Any]]:
    """The newest jobs first, with `age_seconds` and, once ended, `duration_seconds`."""
    async with engine.connect() as conn:
        rows = (await conn.execute(recent_jobs_query(limit))).all()
    now = _now()
    out = []
    for row in rows:
        item = _plain(row)
        item["age_seconds"] = _seconds(row.created_at, now)
        ended = row.status in ENDED
        item["duration_seconds"] = _seconds(row.started_at or row.created_at, row.completed_at) if ended else None
        out.append(item)
    return out


async def job_detail(engine: AsyncEngine, job_id: str) -> dict[str, Any] | None:
    """Everything `show` prints: the job, its steps (with times), ledger, outputs and errors.

    None when neither the read model nor the service knows the job."""
    return (await job_details(engine, [job_id])).get(job_id)


def _of_jobs(table: Any, column: Any, ids: list[str], *order: Any) -> Select[Any]:
    return select(table).where(column.in_(ids)).order_by(column, *order)


def details_queries(ids: list[str]) -> dict[str, Select[Any]]:
    """The reads of `job_details` for one chunk of jobs, each by the index that starts with the
    job's id (tests/test_query_plans.py)."""
    return {
        "tracking": _of_jobs(job_tracking, job_tracking.c.id, ids),
        "jobs": _of_jobs(failover_jobs, failover_jobs.c.job_id, ids),
        "steps": _of_jobs(job_steps, job_steps.c.job_id, ids, job_steps.c.step_order),
        "ledger": index_hint(_of_jobs(resource_ledger, resource_ledger.c.job_id, ids, resource_ledger.c.id),
                             "FORCE INDEX (uq_ledger_job_key)", resource_ledger),
        "events": select(outbox.c.job_id, outbox.c.body).where(
            outbox.c.job_id.in_(ids), outbox.c.event_type.in_(_OUTCOME_EVENTS))
        .order_by(outbox.c.job_id, outbox.c.sequence),
    }


async def job_details(engine: AsyncEngine, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """`job_detail` of each of these jobs, by its id, read a chunk of jobs at a time (five reads
    for up to 500 jobs, where one by one takes six a job: a wave of hundreds watched at once);
    jobs neither the read model nor the service knows are left out. Each also carries `ends`:
    its RollbackStarted and end events, oldest first (the last tells whether it has ended)."""
    out: dict[str, dict[str, Any]] = {}
    async with engine.connect() as conn:
        unique: dict[str, str] = {}  # (the ids compare without case, as the columns do: the first spelling)
        for job_id in job_ids:
            unique.setdefault(job_id.casefold(), job_id)
        for chunk in _chunks(list(unique.values())):
            rows: dict[str, dict[str, list[Any]]] = {}
            for name, query in details_queries(chunk).items():
                for row in (await conn.execute(query)).all():
                    key = (row.job_id if name != "tracking" else row.id).casefold()
                    rows.setdefault(key, {}).setdefault(name, []).append(row)
            for job_id in chunk:
                found = rows.get(job_id.casefold(), {})
                if found.get("tracking") or found.get("jobs"):
                    out[job_id] = _detail(job_id, found)
    return out


def _detail(job_id: str, found: dict[str, list[Any]]) -> dict[str, Any]:
    tracking = (found.get("tracking") or [None])[0]
    job = (found.get("jobs") or [None])[0]
    step_rows = []
    for s in found.get("steps", []):
        item = {k: v for k, v in _plain(s).items() if k not in ("id", "status_sequence")}
        item["duration_seconds"] = _seconds(s.started_at, s.completed_at)
        step_rows.append(item)
    failover = None
    if job is not None:
        failover = {k: v for k, v in _plain(job).items() if k in _FAILOVER_COLUMNS}
    events = [json.loads(r.body) for r in found.get("events", [])]
    outputs: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    manual: list[dict[str, Any]] = []
    for e in events:
        if e["type"] == "JobCompleted":
            outputs = e.get("outputs") or {}
        elif e["type"] == "StepFailed":
            errors.append({"step": e["step"], **e["error"], "attempts": e.get("attempts")})
        elif e["type"] == "RollbackFailed":
            errors.append({"step": "rollback", **e["error"]})
            manual = e.get("manual_actions") or []
        elif e["type"] == "RollbackCompleted":
            manual = []  # a retried rollback finished what was left
    if tracking is not None:
        job_row = _plain(tracking)
    else:  # accepted, not projected yet
        assert job is not None
        job_row = {
            "id": job_id, "job_type": None, "status": "pending", "percent_complete": 0, "vm_id": job.vm_id,
            "vm_name": job.source_vm_name, "current_step": None, "error_message": job.error_message,
            "created_at": _iso(job.created_at), "completed_at": None}
    return {"job": job_row, "steps": step_rows, "failover_job": failover,
            "ledger": [{k: v for k, v in _plain(e).items() if k != "id"} for e in found.get("ledger", [])],
            "outputs": outputs, "errors": errors, "manual_actions": manual,
            "ends": [e for e in events if e["type"] in _ENDS]}


async def job_logs(engine: AsyncEngine, job_id: str, *, level: str = "DEBUG", after: int = 0) -> list[dict[str, Any]]:
    """The job's log lines at `level` or above, after sequence `after`."""
    wanted = LEVELS[LEVELS.index(level.upper()):] if level.upper() in LEVELS else LEVELS
    async with engine.connect() as conn:
        rows = (await conn.execute(select(log_events).where(
            log_events.c.job_id == job_id, log_events.c.level.in_(wanted), log_events.c.sequence > after)
            .order_by(log_events.c.sequence))).all()
    return [{k: v for k, v in _plain(r).items() if k not in ("id", "step_id")} for r in rows]


async def command_outcome(engine: AsyncEngine, request_id: str) -> dict[str, Any] | None:
    """How the service answered a command (`accepted`, `signalled`, `rejected_<reason>`, ...),
    once it has recorded it; None before."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(job_commands).where(job_commands.c.request_id == request_id))).first()
    if row is None or row.outcome == "received":
        return None
    return _plain(row)


async def holders(engine: AsyncEngine, vm_ids: list[str]) -> dict[str, dict[str, Any]]:
    """For each of these VMs that a job holds (a test failover not cleaned up, a live failover,
    a running failover, a rollback not completed: `failover_jobs.active_vm_id`), that job's id,
    type and status, by the VM id casefolded (the column compares without case); VMs no job
    holds are left out."""
    out: dict[str, dict[str, Any]] = {}
    async with engine.connect() as conn:
        for chunk in _chunks(vm_ids):
            rows = (await conn.execute(select(
                failover_jobs.c.active_vm_id, failover_jobs.c.job_id, failover_jobs.c.job_type,
                failover_jobs.c.status).where(failover_jobs.c.active_vm_id.in_(chunk)))).all()
            for r in rows:
                out[r.active_vm_id.casefold()] = {"job_id": r.job_id, "job_type": r.job_type, "status": r.status}
    return out


async def running_jobs(engine: AsyncEngine, vm_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The job running for each of these VMs (a failover, or a cleanup), by the VM id casefolded;
    VMs with none are left out."""
    out: dict[str, dict[str, Any]] = {}
    async with engine.connect() as conn:
        for chunk in _chunks(vm_ids):
            rows = (await conn.execute(select(
                failover_jobs.c.vm_id, failover_jobs.c.job_id, failover_jobs.c.job_type, failover_jobs.c.status)
                .where(failover_jobs.c.vm_id.in_(chunk), failover_jobs.c.ended.is_(False)))).all()
            for r in rows:
                out[r.vm_id.casefold()] = {"job_id": r.job_id, "job_type": r.job_type, "status": r.status}
    return out


async def command_outcomes(engine: AsyncEngine, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """How the service answered each of these commands, for those it has (`command_outcome`)."""
    out: dict[str, dict[str, Any]] = {}
    async with engine.connect() as conn:
        for chunk in _chunks(request_ids):
            rows = (await conn.execute(select(job_commands.c.request_id, job_commands.c.outcome, job_commands.c.detail)
                                       .where(job_commands.c.request_id.in_(chunk),
                                              job_commands.c.outcome != "received"))).all()
            out.update({r.request_id: {"outcome": r.outcome, "detail": r.detail} for r in rows})
    return out




_RUN_COLUMNS = (failover_jobs.c.job_id, failover_jobs.c.vm_id, failover_jobs.c.job_type, failover_jobs.c.status,
                failover_jobs.c.source_vm_name, failover_jobs.c.destination_vm_id, failover_jobs.c.error_message,
                failover_jobs.c.failed_step, failover_jobs.c.error_code, failover_jobs.c.rolled_back,
                failover_jobs.c.cancel_requested, failover_jobs.c.created_at, failover_jobs.c.started_at,
                failover_jobs.c.completed_at, failover_jobs.c.parent_job_id, failover_jobs.c.requested_by)
_FAILOVER_TYPES = ("test", "live")
STARTUP_STEP = FAILOVER_STEPS[-1]  # vm-startup-validation: the VM started and Running
_PER_STATEMENT = 100  # VMs looked up in one statement (one index dive each)


def _newest(*where: Any) -> Select[Any]:
    """The newest job that matches, by the VMs' index walked from its newest end (a VM's history,
    however long, is not read: its newest rows until one matches)."""
    return (select(*_RUN_COLUMNS).where(*where)
            .order_by(failover_jobs.c.created_at.desc(), failover_jobs.c.id.desc()).limit(1))


def _each(parts: list[Select[Any]]) -> Any:
    return parts[0] if len(parts) == 1 else union_all(*parts)


def newest_failovers_query(vm_ids: list[str], since: datetime | None) -> Any:
    """The newest failover (test or live, requested at or after `since`) of each of these VMs."""
    after = [failover_jobs.c.created_at >= since] if since is not None else []
    return _each([_newest(failover_jobs.c.vm_id == vm, failover_jobs.c.job_type.in_(_FAILOVER_TYPES), *after)
                  for vm in vm_ids])


def newest_cleanups_query(failovers: list[tuple[str, str, datetime]]) -> Any:
    """The newest cleanup of each of these (VM, failover job, its request time) (a failed one
    included: the failover's `cleanup_job_id` is cleared when its cleanup fails), by the same
    index, read from the VM's newest rows back to the failover's request (a cleanup comes after
    its failover), not further, whether or not it has one."""
    return _each([_newest(failover_jobs.c.vm_id == vm, failover_jobs.c.created_at >= at,
                          failover_jobs.c.job_type == "cleanup", failover_jobs.c.parent_job_id == job)
                  for vm, job, at in failovers])


async def newest_jobs(engine: AsyncEngine, vm_ids: list[str]) -> dict[str, str]:
    """The newest job of each of these VMs (a failover or a cleanup), by the VM id casefolded;
    one index dive each, however long the VM's history."""
    out: dict[str, str] = {}
    async with engine.connect() as conn:
        for part in _chunks(vm_ids, _PER_STATEMENT):
            for r in (await conn.execute(_each([_newest(failover_jobs.c.vm_id == vm) for vm in part]))).all():
                out.setdefault(r.vm_id.casefold(), r.job_id)
    return out


async def failover_runs(engine: AsyncEngine, *, vm_ids: Sequence[str] = (), job_ids: Sequence[str] = (),
                        since: datetime | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """What `failoverctl report` shows: the newest failover of each of these VMs (requested at
    or after `since`, naive UTC), by the VM id casefolded; and these jobs, by their id
    casefolded. Each with its newest cleanup (`cleanup`: a test failover's cleanup job's row, or
    None) and `startup_seconds` (its last step's time: the VM's start until CloudStack said
    Running, once that step completed). VMs and jobs not found are
    left out. Times are ISO 8601 UTC."""
    by_vm: dict[str, Any] = {}
    by_job: dict[str, Any] = {}
    async with engine.connect() as conn:
        for part in _chunks(list(vm_ids), _PER_STATEMENT):
            for row in (await conn.execute(newest_failovers_query(part, since))).all():
                by_vm.setdefault(row.vm_id.casefold(), row)
        for chunk in _chunks(list(job_ids)):
            rows = (await conn.execute(select(*_RUN_COLUMNS).where(failover_jobs.c.job_id.in_(chunk)))).all()
            by_job.update({row.job_id.casefold(): row for row in rows})
        runs = {row.job_id: row for row in [*by_vm.values(), *by_job.values()]}
        cleanups: dict[str, Any] = {}
        startups: dict[str, Any] = {}
        tests = sorted((r.vm_id, r.job_id, r.created_at) for r in runs.values() if r.job_type == "test")
        for some in _chunks(tests, _PER_STATEMENT):
            for row in (await conn.execute(newest_cleanups_query(some))).all():
                cleanups.setdefault(row.parent_job_id.casefold(), row)
        for chunk in _chunks(sorted(runs)):
            steps = (await conn.execute(select(job_steps.c.job_id, job_steps.c.started_at, job_steps.c.completed_at)
                                        .where(job_steps.c.job_id.in_(chunk), job_steps.c.step_name == STARTUP_STEP,
                                               job_steps.c.status == "completed"))).all()
            startups.update({row.job_id.casefold(): _seconds(row.started_at, row.completed_at) for row in steps})

    def plain(row: Any) -> dict[str, Any]:
        item = _plain(row)
        cleanup = cleanups.get(row.job_id.casefold())
        item["cleanup"] = None if cleanup is None else _plain(cleanup)
        item["startup_seconds"] = startups.get(row.job_id.casefold())
        return item

    return ({vm: plain(row) for vm, row in by_vm.items()}, {job: plain(row) for job, row in by_job.items()})
