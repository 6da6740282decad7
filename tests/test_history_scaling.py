"""The service's recurring reads stay index lookups however much history the tables hold.

Finished jobs, their published events and their ledgers are kept (the audit trail), so the
tables only grow. A read that scans them would cost a little more with every job ever run:
unnoticed in a fresh database, and the claim loop reading the whole history every few seconds
after a year. Here the database holds `HISTORY` finished jobs (with their events and ledgers)
beside a few live ones, and each read's rows are counted by the server itself (its session
`Handler_read_*` counters, on the one connection of the engine's pool): a read that uses its
index touches about as many rows as it returns, a scan at least the history's size.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete, event, insert, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from adapters.db.engine import make_engine, utcnow
from adapters.db.outbox import OutboxStore
from adapters.db.store import JobStore
from adapters.db.tables import (
    failover_jobs,
    job_steps,
    job_tracking,
    log_events,
    outbox,
    resource_ledger,
)
from failover.reads import failover_runs, job_detail, job_details, job_logs, recent_jobs
from tests.crash.support import database_of_its_own

HISTORY = 2000  # finished jobs
EVENTS, LEDGER, STEPS, LINES = 10, 5, 6, 4  # published events, ledger rows, steps and log lines of each
LIVE = 3  # unended jobs, each with one unsent event
OWNER = "history-test"
# rows a read may touch beyond what it returns (index dives, a filesort's re-reads, the live rows)
SLACK = 60
RUNS = 200  # a VM's test failovers (each with its cleanup) in the report's test


TABLES = ("failover_jobs", "outbox", "resource_ledger", "job_tracking", "job_steps", "log_events")


async def _fill(engine: AsyncEngine, statistics: str) -> list[str]:
    """The history, the live jobs (owned by nobody, claimable); returns the live jobs' ids.

    `statistics`: "analyzed", the server's statistics know the rows (`ANALYZE TABLE` after
    the fill); "stale", they were taken when the tables held the first job alone, and not
    since (a fresh install's first wave of jobs, before the server's background
    recalculation catches up). With stale statistics and no index named, `failoverctl list`
    read the whole history here (tests/test_query_plans.py checks the plans themselves)."""
    if statistics == "stale":
        async with engine.begin() as conn:
            # with transient statistics (recomputed on every table open) nothing would stay stale
            persistent = (await conn.execute(text("SELECT @@innodb_stats_persistent"))).scalar()
            assert persistent == 1, "this test needs innodb_stats_persistent=ON (MariaDB's default)"
            for table in TABLES:
                await conn.execute(text(f"ALTER TABLE {table} STATS_AUTO_RECALC = 0"))
    now = utcnow()
    old = now - timedelta(days=2)
    live = [str(uuid.uuid4()) for _ in range(LIVE)]
    job = {"vm_id": "", "job_type": "test", "source_vm_name": "web", "options": {}}
    async with engine.begin() as conn:
        for start, end in [(0, 1), *((s, min(s + 500, HISTORY)) for s in range(1, HISTORY, 500))]:
            ids = [f"old-{i:06d}" for i in range(start, end)]
            await conn.execute(insert(failover_jobs), [
                {**job, "job_id": j, "vm_id": f"vm-{j}", "status": "completed", "ended": True,
                 "created_at": old, "updated_at": old, "request_id": j, "correlation_id": j,
                 "last_sequence": EVENTS, "lease_owner": "gone", "lease_expires_at": old} for j in ids])
            await conn.execute(insert(outbox), [
                {"event_id": str(uuid.uuid4()), "job_id": j, "sequence": s, "event_type": "StepCompleted",
                 "correlation_id": j, "body": "{}", "created_at": old, "published_at": old}
                for j in ids for s in range(1, EVENTS + 1)])
            await conn.execute(insert(resource_ledger), [
                {"job_id": j, "resource_key": f"volume:{k}", "resource_type": "volume", "action": "detach",
                 "status": "done", "data": {}, "created_at": old, "updated_at": old}
                for j in ids for k in range(LEDGER)])
            # the read models the projector keeps
            await conn.execute(insert(job_tracking), [
                {"id": j, "job_type": "test", "operation": "test-failover", "status": "completed",
                 "percent_complete": 100, "vm_id": f"vm-{j}", "created_at": old, "updated_at": old} for j in ids])
            await conn.execute(insert(job_steps), [
                {"job_id": j, "step_name": f"step-{k}", "step_order": k, "status": "completed"}
                for j in ids for k in range(1, STEPS + 1)])
            await conn.execute(insert(log_events), [
                {"job_id": j, "correlation_id": j, "level": "INFO", "message": "done", "fields": {},
                 "timestamp": old, "sequence": k} for j in ids for k in range(1, LINES + 1)])
            if statistics == "stale" and start == 0:
                for table in TABLES:
                    await conn.execute(text(f"ANALYZE TABLE {table}"))
        await conn.execute(insert(failover_jobs), [
            {**job, "job_id": j, "vm_id": f"vm-{j}", "status": "running", "ended": False, "created_at": now,
             "updated_at": now, "request_id": j, "correlation_id": j} for j in live])
        await conn.execute(insert(outbox), [
            {"event_id": str(uuid.uuid4()), "job_id": j, "sequence": 1, "event_type": "JobAccepted",
             "correlation_id": j, "body": "{}", "created_at": now} for j in live])
        await conn.execute(insert(job_tracking), [
            {"id": j, "job_type": "test", "operation": "test-failover", "status": "running", "vm_id": f"vm-{j}",
             "created_at": now, "updated_at": now} for j in live])
        await conn.execute(insert(log_events), [
            {"job_id": j, "correlation_id": j, "level": "INFO", "message": "started", "fields": {}, "timestamp": now,
             "sequence": 1} for j in live])
        if statistics == "analyzed":
            for table in TABLES:
                await conn.execute(text(f"ANALYZE TABLE {table}"))  # the statistics a server has by then
    return live


@pytest.fixture(scope="module", params=["analyzed", "stale"])
async def history(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple[AsyncEngine, list[str]]]:
    async with database_of_its_own(database_url, f"history_{request.param}") as setup:
        live = await _fill(setup, request.param)
        # one connection: the reads under test and the counters read before and after share it
        engine = make_engine(setup.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0)
        try:
            yield engine, live
        finally:
            await engine.dispose()


async def _reads(conn: AsyncConnection) -> int:
    rows = (await conn.execute(text("SHOW SESSION STATUS LIKE 'Handler_read%'"))).all()
    return sum(int(value) for _, value in rows)


async def rows_touched(engine: AsyncEngine, call: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
    """Rows the server read for `call` (on the pool's only connection), and what it returned."""
    async with engine.connect() as conn:
        before = await _reads(conn)
        cost = await _reads(conn) - before  # reading the counters reads rows too
        before += cost
    result = await call()
    async with engine.connect() as conn:
        after = await _reads(conn)
    return after - before - cost, result


async def test_claim_reads_the_unended_jobs_not_the_history(history: tuple[AsyncEngine, list[str]]) -> None:
    engine, live = history
    store = JobStore(engine, OWNER)
    touched, claimed = await rows_touched(engine, lambda: store.claim(64, 30))
    assert sorted(j.job_id for j in claimed) == sorted(live)
    assert touched < SLACK, f"claiming {LIVE} jobs read {touched} rows of a {HISTORY}-job history"
    # and the renewal, the release and the re-take of those leases
    touched, (renewed, _, _) = await rows_touched(engine, lambda: store.renew(live, 30))
    assert renewed == set(live) and touched < SLACK, touched
    touched, rows = await rows_touched(engine, lambda: store.take(live, 30))
    assert len(rows) == LIVE and touched < SLACK, touched
    touched, released = await rows_touched(engine, store.release_all)
    assert released == LIVE and touched < SLACK, touched


async def test_job_reads_touch_their_own_rows(history: tuple[AsyncEngine, list[str]]) -> None:
    engine, live = history
    store = JobStore(engine, OWNER)
    touched, row = await rows_touched(engine, lambda: store.load(live[0]))
    assert row is not None and row.job_id == live[0] and touched < SLACK, touched
    touched, ledger = await rows_touched(engine, lambda: store.ledger("old-000007"))
    assert len(ledger) == LEDGER and touched < SLACK, touched


async def test_relay_reads_the_unsent_events_not_the_published_ones(history: tuple[AsyncEngine, list[str]]) -> None:
    engine, live = history
    relay = OutboxStore(engine, OWNER)
    touched, unsent = await rows_touched(engine, lambda: relay.unsent(500))
    assert sorted(e.job_id for e in unsent) == sorted(live)
    assert touched < SLACK, f"reading {LIVE} unsent events read {touched} rows of {HISTORY * EVENTS} published"
    touched, (count, _) = await rows_touched(engine, relay.backlog)
    assert count == LIVE and touched < SLACK, touched


async def test_an_operators_reads_touch_what_they_show(history: tuple[AsyncEngine, list[str]]) -> None:
    """`failoverctl list`, `show` and `logs` (failover/reads.py): at 3 a.m., on a year of jobs."""
    engine, live = history
    touched, jobs = await rows_touched(engine, lambda: recent_jobs(engine, 20))
    assert {j["id"] for j in jobs} >= set(live) and len(jobs) == 20
    assert touched < 20 + SLACK, f"listing 20 jobs read {touched} rows of a {HISTORY}-job history"
    touched, detail = await rows_touched(engine, lambda: job_detail(engine, "old-000042"))
    assert detail is not None and len(detail["steps"]) == STEPS and len(detail["ledger"]) == LEDGER
    assert touched < SLACK, f"showing one job read {touched} rows"
    one = touched
    wave = [f"old-{i:06d}" for i in range(100, 150)]  # `watch` of a wave: its jobs a chunk at a time
    touched, details = await rows_touched(engine, lambda: job_details(engine, [*wave, "no-such-job"]))
    assert sorted(details) == wave and all(len(d["ledger"]) == LEDGER for d in details.values())
    assert touched <= (len(wave) + 1) * one, f"showing {len(wave)} jobs and an unknown one read {touched} rows, one alone {one}"
    vms = [f"vm-old-{i:06d}" for i in range(300, 320)]  # `failoverctl report` of a wave of 20 VMs
    touched, (runs, _) = await rows_touched(engine, lambda: failover_runs(engine, vm_ids=vms))
    assert sorted(runs) == vms and all(run["status"] == "completed" for run in runs.values())
    assert touched < 3 * len(vms) + SLACK, f"reporting {len(vms)} VMs read {touched} rows"
    touched, lines = await rows_touched(engine, lambda: job_logs(engine, live[0]))
    assert [line["message"] for line in lines] == ["started"] and touched < SLACK, touched


async def test_a_waves_details_are_read_five_statements_a_chunk(history: tuple[AsyncEngine, list[str]]) -> None:
    """`failoverctl watch` of a wave: 501 jobs (one named twice, in another case) in two chunks of
    five reads each, not six reads a job."""
    engine, _ = history
    wave = [f"old-{i:06d}" for i in range(600, 1101)]
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        details = await job_details(engine, [*wave, wave[7].upper()])
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
    assert list(details) == wave and all(len(d["steps"]) == STEPS for d in details.values())
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 10, statements


async def test_a_report_reads_a_vms_newest_failover_not_its_history(history: tuple[AsyncEngine, list[str]]) -> None:
    """A VM tested every week for years: `failoverctl report` reads its newest failover and
    cleanup, not each of its hundreds of runs (given in another case than stored, too)."""
    engine, _ = history
    old = utcnow() - timedelta(days=400)
    runs = [f"many-{n:04d}" for n in range(RUNS)]
    job = {"vm_id": "vm-tested-weekly", "source_vm_name": "web", "options": {}, "ended": True,
           "lease_owner": "gone", "lease_expires_at": old}
    async with engine.begin() as conn:
        for n, run in enumerate(runs):  # each test failover, then its cleanup, a week apart
            at = old + timedelta(days=7 * n)
            await conn.execute(insert(failover_jobs), [
                {**job, "job_id": run, "job_type": "test", "status": "cleaned_up", "parent_job_id": None, "created_at": at,
                 "updated_at": at, "completed_at": at + timedelta(minutes=2), "request_id": run, "correlation_id": run},
                {**job, "job_id": f"c-{run}", "job_type": "cleanup", "status": "completed", "parent_job_id": run,
                 "created_at": at + timedelta(hours=1), "updated_at": at, "completed_at": at + timedelta(hours=1),
                 "request_id": f"c-{run}", "correlation_id": f"c-{run}"}])
    try:
        touched, (found, _) = await rows_touched(engine, lambda: failover_runs(engine, vm_ids=["VM-Tested-Weekly"]))
        newest = found["vm-tested-weekly"]
        assert newest["job_id"] == runs[-1] and newest["cleanup"]["job_id"] == f"c-{runs[-1]}"
        assert touched < SLACK, f"reporting a VM with {RUNS} runs read {touched} rows"
        this_week = "many-this-week"  # and this week's test, not cleaned up yet: no cleanup is looked for far
        at = old + timedelta(days=7 * RUNS)
        async with engine.begin() as conn:
            await conn.execute(insert(failover_jobs).values(
                **job, job_id=this_week, job_type="test", status="completed", created_at=at, updated_at=at,
                completed_at=at, request_id=this_week, correlation_id=this_week))
        touched, (found, _) = await rows_touched(engine, lambda: failover_runs(engine, vm_ids=["vm-tested-weekly"]))
        assert found["vm-tested-weekly"]["job_id"] == this_week and found["vm-tested-weekly"]["cleanup"] is None
        assert touched < SLACK, f"reporting a VM with {RUNS} runs and no cleanup yet read {touched} rows"
    finally:
        async with engine.begin() as conn:
            await conn.execute(delete(failover_jobs).where(failover_jobs.c.vm_id == "vm-tested-weekly"))
