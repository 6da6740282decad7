"""Retention: deleting the records of jobs that ended long ago (`failoverctl db prune`).

Every job leaves ~22 outbox rows (each with its event's JSON), its log lines, steps, ledger,
inbox rows and a VM name claim; nothing else ever deletes them. A prune deletes, for the jobs
that ended before a cutoff, every row the service wrote about them, in one transaction per
batch of jobs, and keeps a job whenever anything may still need it:

- a job that holds its VM (`active_vm_id`: a test failover not cleaned up, a rollback not
  complete, the failover of a cleanup that failed) is kept with all its rows: a cleanup or a
  retried rollback reads them. A completed live failover holds its VM for good: it is kept as
  the record of it, and counted on its own;
- a test failover goes together with its cleanups (a cleanup reads its failover's ledger, a
  later cleanup the earlier ones'), and only when all of them ended before the cutoff;
- a job with an event not yet published (the relay behind, or the broker down since) or not
  yet projected (`job_tracking` behind its last event) is kept until they are;
- a job that still holds a VM name by the claim rule (`store.NAME_RELEASED_BY`: ended with
  nothing of its own left under it) is kept, so that no other job takes the name meanwhile.
The last two and the cleanup's time are checked though the service does not leave a job that
ended and holds no VM in those states: a database edited by hand, or by an older version, may.

Then the inbox rows older than the cutoff of commands whose job is gone (or that named none: a
rejected request, or a cancel signalled) are deleted, with the events a rejected request left
under its own id (its `JobRejected`, published, and its `projected_events` row). A request
redelivered after its job was pruned is a new request: the cutoff is also the window in which a
redelivered request is recognised as a duplicate.

Each batch's rows are locked and every condition checked again inside its transaction, under
READ COMMITTED (no gap locks on the job tables a running service inserts into).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Table, and_, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .store import NAME_RELEASED_BY, SEED_JOB_TYPES, again_if_deadlocked
from .tables import (
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

__all__ = ["KEPT_REASONS", "PruneReport", "prune"]

# what keeps an ended job's rows, as the report names it
KEPT_REASONS = {
    "live": "is a completed live failover (its VM is the platform's now): kept as the record of it",
    "blocks_vm": "still holds its VM (a test failover not cleaned up, or a rollback not complete): "
                 "kept while it does",
    "cleanup_recent": "its cleanup is running or ended after the cutoff: kept with it",
    "unpublished": "has events the relay has not published yet (is the broker reachable and the relay "
                   "running?): kept until they are",
    "unprojected": "is not projected up to its last event yet (is the projector running? an event of it in "
                   "failover.dead stays unprojected): kept until it is",
    "holds_name": "still holds its VM name (something it made may be left under it): kept while it does",
}

# every table with rows about a job, by the column naming the job (failover_jobs last)
_BY_JOB: tuple[tuple[Table, str], ...] = (
    (outbox, "job_id"), (resource_ledger, "job_id"), (log_events, "job_id"), (job_steps, "job_id"),
    (projected_events, "job_id"), (job_tracking, "id"),
)
TABLES = (*(t.name for t, _ in _BY_JOB), "vm_name_claims", "job_commands", "failover_jobs")


@dataclass
class PruneReport:
    cutoff: datetime
    dry_run: bool
    jobs: int = 0  # jobs deleted (or that would be)
    rows: Counter[str] = field(default_factory=Counter)  # by table
    kept: Counter[str] = field(default_factory=Counter)  # ended before the cutoff, kept: by KEPT_REASONS key
    candidates: int = 0  # failovers ended before the cutoff that block no VM (with their cleanups: families)
    scanned: int = 0  # of the candidates, those looked at so far

    def as_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.isoformat() + "Z", "dry_run": self.dry_run, "jobs": self.jobs,
                "rows": {t: self.rows.get(t, 0) for t in TABLES}, "kept": dict(self.kept)}


@dataclass
class _Job:
    job_id: str
    request_id: str
    ended: bool
    updated_at: datetime
    active_vm_id: str | None
    status: str
    rolled_back: bool | None
    last_sequence: int
    names: set[str] = field(default_factory=set)


_JOB_COLUMNS = (failover_jobs.c.id, failover_jobs.c.job_id, failover_jobs.c.request_id, failover_jobs.c.ended,
                failover_jobs.c.updated_at, failover_jobs.c.active_vm_id, failover_jobs.c.status,
                failover_jobs.c.rolled_back, failover_jobs.c.last_sequence, failover_jobs.c.plan,
                failover_jobs.c.vm_id, failover_jobs.c.parent_job_id)
# a failover (not a cleanup) ended before the cutoff, blocking no VM: a family's head
_HEADS = (select(failover_jobs.c.id, failover_jobs.c.job_id, failover_jobs.c.vm_id)
          .where(failover_jobs.c.parent_job_id.is_(None), failover_jobs.c.ended.is_(True),
                 failover_jobs.c.active_vm_id.is_(None)))


def _job(r: Any) -> _Job:
    name = (r.plan or {}).get("cs_name") if isinstance(r.plan, dict) else None
    return _Job(job_id=r.job_id, request_id=r.request_id, ended=bool(r.ended), updated_at=r.updated_at,
                active_vm_id=r.active_vm_id, status=r.status,
                rolled_back=None if r.rolled_back is None else bool(r.rolled_back),
                last_sequence=r.last_sequence, names={name} if name else set())


async def prune(engine: AsyncEngine, cutoff: datetime, *, batch: int = 200, dry_run: bool = False,
                progress: Callable[[PruneReport], None] | None = None) -> PruneReport:
    """Delete (or with `dry_run` only count) the rows of the jobs that ended before `cutoff`
    (naive UTC) and that nothing needs any more; see the module's docstring."""
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    async with engine.connect() as conn:
        live = and_(failover_jobs.c.job_type == SEED_JOB_TYPES["live-failover"],
                    failover_jobs.c.status == "completed")
        blocking = select(live, func.count()).where(
            failover_jobs.c.ended.is_(True), failover_jobs.c.active_vm_id.is_not(None),
            failover_jobs.c.updated_at < cutoff).group_by(live)
        counts = {bool(is_live): n for is_live, n in (await conn.execute(blocking)).all()}
        for reason, n in (("live", counts.get(True, 0)), ("blocks_vm", counts.get(False, 0))):
            if n:
                report.kept[reason] = n
        heads = _HEADS.where(failover_jobs.c.updated_at < cutoff)
        report.candidates = int((await conn.execute(
            select(func.count()).select_from(heads.subquery()))).scalar_one())
    if progress:
        progress(report)
    pruned: dict[str, str] = {}  # a dry run's, by request id: its inbox sweep takes them as gone
    after = 0
    while True:
        async with engine.connect() as conn:
            found = (await conn.execute(heads.where(failover_jobs.c.id > after)
                                        .order_by(failover_jobs.c.id).limit(batch))).all()
        if not found:
            break
        after = found[-1].id
        report.scanned += len(found)
        jobs = await again_if_deadlocked(partial(_prune_batch, engine, found, cutoff, report, dry_run))
        if dry_run:
            pruned.update((j.request_id, j.job_id) for j in jobs)
        if progress:
            progress(report)
    await _sweep_commands(engine, cutoff, report, dry_run, pruned)
    if progress:
        progress(report)
    return report


@asynccontextmanager
async def _transaction(engine: AsyncEngine, dry_run: bool) -> AsyncIterator[AsyncConnection]:
    """One transaction under READ COMMITTED (no gap locks on the tables a running service
    inserts into), committed, or with `dry_run` rolled back."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="READ COMMITTED")
        trans = await conn.begin()
        try:
            yield conn
        except BaseException:
            await trans.rollback()
            raise
        await (trans.rollback() if dry_run else trans.commit())


async def _prune_batch(engine: AsyncEngine, heads: Sequence[Any], cutoff: datetime, report: PruneReport,
                       dry_run: bool) -> list[_Job]:
    """One batch of families, in one transaction: locked, checked again, deleted."""
    kept: Counter[str] = Counter()
    rows: Counter[str] = Counter()
    async with _transaction(engine, dry_run) as conn:
        families = await _families(conn, heads)
        checks = [_ended_before(cutoff), await _published(conn, families), await _projected(conn, families),
                  await _names_released(conn, families)]
        chosen: list[list[_Job]] = []
        for family in families.values():
            reason = next((r for check in checks if (r := check(family)) is not None), None)
            if reason is None:
                chosen.append(family)
            else:
                kept[reason] += 1
        jobs = [j for family in chosen for j in family]
        if jobs:
            await _delete(conn, jobs, rows, dry_run)
    # (counted once the transaction committed: a deadlock's try again counts afresh)
    report.kept.update(kept)
    report.rows.update(rows)
    report.jobs += len(jobs)
    return jobs


async def _families(conn: AsyncConnection, heads: Sequence[Any]) -> dict[str, list[_Job]]:
    """The heads and their cleanups, their rows locked (by the primary key's unique index)."""
    head_ids = [h.job_id for h in heads]
    # the cleanups, by the VM's index (a VM has a few jobs, the table a history)
    children = (await conn.execute(select(failover_jobs.c.job_id).where(
        failover_jobs.c.vm_id.in_({h.vm_id for h in heads}),
        failover_jobs.c.parent_job_id.in_(head_ids)))).scalars().all()
    locked = (await conn.execute(select(*_JOB_COLUMNS).where(
        failover_jobs.c.job_id.in_([*head_ids, *children])).with_for_update())).all()
    by_id = {r.job_id: r for r in locked}
    families: dict[str, list[_Job]] = {}
    for head in head_ids:
        r = by_id.get(head)
        # (checked again under the lock: a head may have changed since it was found)
        if r is None or not r.ended or r.active_vm_id is not None or r.parent_job_id is not None:
            continue
        families[head] = [_job(r)]
    for r in locked:
        if r.parent_job_id in families:
            families[r.parent_job_id].append(_job(r))
    ledger_names = (await conn.execute(select(resource_ledger.c.job_id, resource_ledger.c.name).where(
        resource_ledger.c.job_id.in_(list(by_id)), resource_ledger.c.name.is_not(None)))).all()
    jobs = {j.job_id: j for family in families.values() for j in family}
    for job_id, name in ledger_names:
        if job_id in jobs:
            jobs[job_id].names.add(name)
    return families


def _ended_before(cutoff: datetime) -> Callable[[list[_Job]], str | None]:
    # (a cleanup's end updates its failover's row too: the head's time is the family's last)
    return lambda family: (None if all(j.ended and j.updated_at < cutoff for j in family)
                           else "cleanup_recent")


async def _published(conn: AsyncConnection, families: dict[str, list[_Job]]) -> Callable[[list[_Job]], str | None]:
    ids = [j.job_id for family in families.values() for j in family]
    behind = set((await conn.execute(select(outbox.c.job_id).distinct().where(
        outbox.c.job_id.in_(ids), outbox.c.published_at.is_(None)))).scalars().all()) if ids else set()
    return lambda family: "unpublished" if any(j.job_id in behind for j in family) else None


async def _projected(conn: AsyncConnection, families: dict[str, list[_Job]]) -> Callable[[list[_Job]], str | None]:
    ids = [j.job_id for family in families.values() for j in family]
    seen = {r.id: r.last_sequence for r in (await conn.execute(select(
        job_tracking.c.id, job_tracking.c.last_sequence).where(job_tracking.c.id.in_(ids)))).all()} if ids else {}
    return lambda family: ("unprojected" if any(seen.get(j.job_id, -1) < j.last_sequence for j in family)
                           else None)


def _releases_name(job: _Job) -> bool:
    return job.ended and (job.status in NAME_RELEASED_BY or job.rolled_back is True)


async def _names_released(conn: AsyncConnection,
                          families: dict[str, list[_Job]]) -> Callable[[list[_Job]], str | None]:
    jobs = {j.job_id: j for family in families.values() for j in family}
    names = {n for j in jobs.values() for n in j.names}
    held = set((await conn.execute(select(vm_name_claims.c.job_id).where(
        vm_name_claims.c.name.in_(names)))).scalars().all()) if names else set()
    return lambda family: ("holds_name" if any(j.job_id in held and not _releases_name(j) for j in family)
                           else None)


async def _delete(conn: AsyncConnection, jobs: list[_Job], rows: Counter[str], dry_run: bool) -> None:
    ids = [j.job_id for j in jobs]
    names = [n for j in jobs for n in j.names]
    wheres: list[tuple[Table, Any]] = [(table, table.c[col].in_(ids)) for table, col in _BY_JOB]
    if names:
        wheres.append((vm_name_claims, and_(vm_name_claims.c.name.in_(names), vm_name_claims.c.job_id.in_(ids))))
    wheres.append((job_commands, job_commands.c.request_id.in_([j.request_id for j in jobs])))
    wheres.append((failover_jobs, failover_jobs.c.job_id.in_(ids)))
    await _remove(conn, wheres, rows, dry_run)


async def _remove(conn: AsyncConnection, wheres: list[tuple[Table, Any]], rows: Counter[str], dry_run: bool) -> None:
    """Delete (or count) each table's rows `where`, adding to `rows` by table."""
    for table, where in wheres:
        if dry_run:
            rows[table.name] += int((await conn.execute(
                select(func.count()).select_from(table).where(where))).scalar_one())
        else:
            rows[table.name] += (await conn.execute(delete(table).where(where))).rowcount


async def _sweep_commands(engine: AsyncEngine, cutoff: datetime, report: PruneReport, dry_run: bool,
                          pruned: dict[str, str], chunk: int = 1000) -> None:
    """The inbox rows older than the cutoff whose job is gone (pruned now or before), or that
    named none (a rejected request, a cancel signalled), with what a rejected request left
    under its own id: read in primary-key order, a chunk at a time (no statement scans the
    table), each chunk's deletes in one transaction under READ COMMITTED."""
    after = ""
    gone_jobs = set(pruned.values())
    while True:
        async with engine.connect() as conn:
            found = (await conn.execute(
                select(job_commands.c.request_id, job_commands.c.job_id, job_commands.c.received_at)
                .where(job_commands.c.request_id > after).order_by(job_commands.c.request_id).limit(chunk))).all()
        if not found:
            return
        after = found[-1].request_id
        # (a dry run's pruned jobs are still there: their own commands were counted with them)
        old = [r for r in found if r.received_at < cutoff and r.request_id not in pruned]
        if old:
            rows = await again_if_deadlocked(partial(_sweep_chunk, engine, old, cutoff, dry_run, gone_jobs))
            report.rows.update(rows)


async def _sweep_chunk(engine: AsyncEngine, old: Sequence[Any], cutoff: datetime, dry_run: bool,
                       gone_jobs: set[str]) -> Counter[str]:
    rows: Counter[str] = Counter()
    async with _transaction(engine, dry_run) as conn:
        ids = {r.job_id for r in old if r.job_id} | {r.request_id for r in old}
        existing = set((await conn.execute(select(failover_jobs.c.job_id).where(
            failover_jobs.c.job_id.in_(ids)))).scalars().all()) - gone_jobs
        # what a rejected request left under its own id, kept while its event is unpublished
        unsent = set((await conn.execute(select(outbox.c.job_id).distinct().where(
            outbox.c.job_id.in_([r.request_id for r in old]), outbox.c.published_at.is_(None)))).scalars().all())
        gone = [r.request_id for r in old
                if (not r.job_id or r.job_id not in existing) and r.request_id not in existing | unsent]
        if gone:
            # (checked again in the statement: a job that appeared meanwhile keeps its rows)
            exists = select(failover_jobs.c.job_id).where(failover_jobs.c.job_id == job_commands.c.job_id)
            command = and_(job_commands.c.request_id.in_(gone), job_commands.c.received_at < cutoff)
            await _remove(conn, [(job_commands, command if dry_run else and_(command, ~exists.exists()))],
                          rows, dry_run)
            await _remove(conn, [(table, table.c[col].in_(gone)) for table, col in _BY_JOB], rows, dry_run)
    return rows
