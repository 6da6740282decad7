"""`adapters.db.retention.prune` against the real MariaDB, on a database of its own: which ended
jobs it deletes (with every row about them) and which it keeps, and why. The jobs are written
row by row as the service leaves them, so that each rule is met by exactly one family; a few
(a cleanup younger than its failover, a job that ended failed without its rollback but holds
no VM) are states only a database edited by hand, or by an older version, holds, for the rules
that guard against them. The end-to-end twin (real jobs from `serve`, pruned by `failoverctl db
prune`) is in test_cli.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.engine import utcnow
from adapters.db.retention import TABLES, prune
from adapters.db.tables import (
    failover_jobs,
    job_commands,
    job_steps,
    job_tracking,
    log_events,
    outbox,
    projected_events,
    resource_ledger,
    vm_name_claims,
)
from tests.crash.support import database_of_its_own

OLD = timedelta(days=40)
CUTOFF_AGE = timedelta(days=30)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with database_of_its_own(database_url, "retention") as engine:
        yield engine


async def _job(db: AsyncEngine, *, age: timedelta = OLD, parent: str | None = None, status: str = "completed",
               live: bool = False, ended: bool = True, blocks: bool = False, rolled_back: bool | None = None, events: int = 3,
               published: int | None = None, projected: int | None = None, name: bool = True) -> str:
    """A job as the service leaves it: its row, its events (published and projected unless
    said), its steps, log lines, ledger (a VM under a claimed name), tracking and inbox row."""
    job_id, request_id, vm_id = str(uuid.uuid4()), str(uuid.uuid4()), f"vm-{uuid.uuid4()}"
    if parent is not None:
        async with db.connect() as conn:
            vm_id = (await conn.execute(select(failover_jobs.c.vm_id)
                                        .where(failover_jobs.c.job_id == parent))).scalar_one()
    at = utcnow() - age
    cs_name = f"vm-test-{job_id[:8]}"
    published = events if published is None else published
    projected = events if projected is None else projected
    async with db.begin() as conn:
        await conn.execute(insert(failover_jobs).values(
            job_id=job_id, vm_id=vm_id, job_type="cleanup" if parent else "live" if live else "test", status=status,
            source_vm_name="source", created_at=at, updated_at=at, completed_at=at if ended else None,
            request_id=request_id, correlation_id=parent or job_id, parent_job_id=parent,
            plan={} if parent else {"cs_name": cs_name}, last_sequence=events, ended=ended,
            active_vm_id=vm_id if blocks else None, rolled_back=rolled_back))
        await conn.execute(insert(job_commands).values(
            request_id=request_id, command_type="CleanupRequested" if parent else "FailoverRequested",
            job_id=job_id, outcome="accepted", received_at=at))
        await conn.execute(insert(outbox), [
            {"event_id": str(uuid.uuid4()), "job_id": job_id, "sequence": s, "event_type": "StepCompleted",
             "correlation_id": job_id, "body": "{}", "created_at": at,
             "published_at": at if s <= published else None} for s in range(1, events + 1)])
        await conn.execute(insert(log_events), [
            {"job_id": job_id, "correlation_id": job_id, "level": "INFO", "message": f"line {s}",
             "timestamp": at, "sequence": s} for s in range(1, events + 1)])
        await conn.execute(insert(job_steps).values(job_id=job_id, step_name="validation", step_order=1,
                                                    status="completed"))
        if projected:
            await conn.execute(insert(projected_events), [
                {"job_id": job_id, "sequence": s, "projected_at": at} for s in range(1, projected + 1)])
            await conn.execute(insert(job_tracking).values(
                id=job_id, job_type="test-failover", operation="failover", status=status,
                last_sequence=projected, created_at=at, updated_at=at))
        if not parent:
            await conn.execute(insert(resource_ledger).values(
                job_id=job_id, resource_key="vm", resource_type="vm", action="create", name=cs_name,
                status="done", created_at=at, updated_at=at))
            if name:
                await conn.execute(insert(vm_name_claims).values(name=cs_name, job_id=job_id, claimed_at=at))
    return job_id


async def _rows(db: AsyncEngine, job_ids: list[str]) -> dict[str, int]:
    """Every row about these jobs, by table."""
    async with db.connect() as conn:
        counts = {}
        for table in (outbox, resource_ledger, log_events, job_steps, projected_events, vm_name_claims,
                      job_commands, failover_jobs):
            counts[table.name] = (await conn.execute(select(func.count()).select_from(table).where(
                table.c.job_id.in_(job_ids)))).scalar_one()
        counts["job_tracking"] = (await conn.execute(select(func.count()).select_from(job_tracking).where(
            job_tracking.c.id.in_(job_ids)))).scalar_one()
    return counts


def _cutoff() -> datetime:
    return utcnow() - CUTOFF_AGE


async def test_prunes_ended_families_with_every_row_and_keeps_each_job_something_needs(db: AsyncEngine) -> None:
    # pruned: a test failover cleaned up (with a failed cleanup before the one that worked), a
    # failover rolled back, and a cancelled one that made nothing (no name claimed)
    cleaned = await _job(db, status="cleaned_up")
    cleanups = [await _job(db, parent=cleaned, status="failed"), await _job(db, parent=cleaned)]
    rolled = await _job(db, status="failed", rolled_back=True)
    cancelled = await _job(db, status="cancelled", rolled_back=True, name=False)
    gone = [cleaned, *cleanups, rolled, cancelled]
    # kept, one for each reason
    blocking = await _job(db, status="completed", blocks=True)  # a test failover not cleaned up
    live = await _job(db, status="completed", live=True, blocks=True)  # for good
    recent_cleanup = await _job(db, status="cleaned_up")
    await _job(db, parent=recent_cleanup, age=timedelta(days=2))
    unpublished = await _job(db, status="failed", rolled_back=True, published=2)
    unprojected = await _job(db, status="failed", rolled_back=True, projected=2)
    never_projected = await _job(db, status="failed", rolled_back=True, projected=0)
    holds_name = await _job(db, status="failed", rolled_back=False)  # what it made may be left under its name
    young = await _job(db, status="cleaned_up", age=timedelta(days=29))
    kept = [blocking, live, recent_cleanup, unpublished, unprojected, never_projected, holds_name, young]
    before = await _rows(db, gone)
    kept_before = await _rows(db, kept)
    assert before["failover_jobs"] == 5 and before["outbox"] == 15 and before["vm_name_claims"] == 2

    dry = await prune(db, _cutoff(), batch=2, dry_run=True)
    assert await _rows(db, gone) == before  # a dry run deletes nothing
    report = await prune(db, _cutoff(), batch=2)

    assert report.jobs == dry.jobs == 5
    assert dict(report.rows) == dict(dry.rows) == {t: before[t] for t in TABLES if before[t]}
    assert report.kept == dry.kept == {"live": 1, "blocks_vm": 1, "cleanup_recent": 1, "unpublished": 1,
                                       "unprojected": 2, "holds_name": 1}
    assert await _rows(db, gone) == dict.fromkeys(before, 0)
    assert await _rows(db, kept) == kept_before
    # once more: nothing left to prune, the same kept
    again = await prune(db, _cutoff())
    assert (again.jobs, sum(again.rows.values()), again.kept) == (0, 0, report.kept)


async def test_a_kept_job_is_pruned_once_what_kept_it_is_done(db: AsyncEngine) -> None:
    unpublished = await _job(db, status="failed", rolled_back=True, published=1)
    unprojected = await _job(db, status="failed", rolled_back=True, projected=1)
    first = await prune(db, _cutoff())
    assert first.jobs == 0 and first.kept == {"unpublished": 1, "unprojected": 1}
    async with db.begin() as conn:  # the relay and the projector caught up
        await conn.execute(update(outbox).where(outbox.c.job_id == unpublished).values(published_at=utcnow()))
        await conn.execute(update(job_tracking).where(job_tracking.c.id == unprojected).values(last_sequence=3))
    second = await prune(db, _cutoff())
    assert second.jobs == 2 and second.kept == {}
    assert await _rows(db, [unpublished, unprojected]) == dict.fromkeys(TABLES, 0)


async def test_old_inbox_rows_of_gone_jobs_and_rejected_requests_are_swept_with_their_events(
        db: AsyncEngine) -> None:
    """As the service records them: a rejected request's row names no job, and its JobRejected
    (and the projector's mark of it) sit under the request's own id; a signalled cancel's row
    names none; an accepted RollbackRequested's names its job."""
    old, young = utcnow() - OLD, utcnow() - timedelta(days=1)
    live = await _job(db, status="completed", live=True, blocks=True)
    rows: list[dict[str, Any]] = [
        {"outcome": "rejected_not_found", "job_id": None, "received_at": old},  # swept, with its event
        {"outcome": "signalled", "job_id": None, "received_at": old},  # a cancel's: swept
        {"outcome": "rejected_not_found", "job_id": None, "received_at": young},  # too young
        {"outcome": "accepted", "job_id": live, "received_at": old},  # its job is kept
        {"outcome": "rejected_conflict", "job_id": None, "received_at": old},  # its event not yet sent
    ]
    ids = [str(uuid.uuid4()) for _ in rows]
    async with db.begin() as conn:
        await conn.execute(insert(job_commands), [
            {"request_id": rid, "command_type": "FailoverRequested", **row} for rid, row in zip(ids, rows, strict=True)])
        for i in (0, 2, 4):  # the rejected requests' JobRejected, and the projector's mark of each
            await conn.execute(insert(outbox).values(
                event_id=str(uuid.uuid4()), job_id=ids[i], sequence=1, event_type="JobRejected",
                correlation_id=ids[i], body="{}", created_at=rows[i]["received_at"],
                published_at=None if i == 4 else rows[i]["received_at"]))
            if i != 4:
                await conn.execute(insert(projected_events).values(job_id=ids[i], sequence=1,
                                                                   projected_at=rows[i]["received_at"]))
    dry = await prune(db, _cutoff(), dry_run=True)
    report = await prune(db, _cutoff())
    assert {t: n for t, n in dry.rows.items() if n} == {t: n for t, n in report.rows.items() if n} == {
        "job_commands": 2, "outbox": 1, "projected_events": 1}
    async with db.connect() as conn:
        left = set((await conn.execute(select(job_commands.c.request_id)
                                       .where(job_commands.c.request_id.in_(ids)))).scalars())
        events = set((await conn.execute(select(outbox.c.job_id).where(outbox.c.job_id.in_(ids)))).scalars())
    assert left == {ids[2], ids[3], ids[4]}
    assert events == {ids[2], ids[4]}
