"""The recurring statements' plans are the ones named, whatever the server's statistics say.

MariaDB picks a plan from its statistics of each table, and those lag behind the table: taken
while it was small (a fresh install, the first wave of jobs), they stay until the server's
background recalculation catches up, and a wave of hundreds of jobs comes faster. On small
statistics the optimizer reads a job's ledger by walking the whole table in id order rather
than by the job's key, and the claim's look, the relay's unsent read and the projector's link
of log lines to steps likewise. In a 400-job burst on fresh tables that was 370,000 rows
examined where 44,000 do (bench/PROFILE.md, eighteenth session).

Here each statement, rendered with its values as the service sends it, is EXPLAINed on a fresh
install's tables holding one job, where the statistics are smallest, through both URL schemes
the settings accept. Each must reach its rows through the index it names, by key or range (the
newest jobs by walking their index from its end, up to the LIMIT). Without their hints the
ledger read and the claim's look fail here (walking the primary key); the relay's, the
projector's and the list's plans are right on these tables even without theirs, which were
seen going wrong in the benchmark's slow log and, for the list, in
tests/test_history_scaling.py, which counts the rows the same reads touch on a long history.
The lease statements name the jobs' key for what they lock: tests/test_lease_locks.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db import raw
from adapters.db.engine import make_engine, utcnow
from adapters.db.outbox import BACKLOG, _unsent
from adapters.db.projections import _link_of
from adapters.db.store import LEDGER_OF_JOB, JobStore
from adapters.db.tables import failover_jobs, job_steps, log_events, outbox, resource_ledger
from failover.reads import (
    details_queries,
    newest_cleanups_query,
    newest_failovers_query,
    recent_jobs_query,
)
from tests.crash.support import database_of_its_own

OWNER = "plans-test"
JOB = "job-1"


@pytest.fixture(scope="module")
async def database(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with database_of_its_own(database_url, "plans") as engine:
        now = utcnow()
        async with engine.begin() as conn:
            await conn.execute(insert(failover_jobs), [{
                "job_id": JOB, "vm_id": "vm-1", "job_type": "test", "source_vm_name": "web", "options": {},
                "status": "running", "ended": False, "created_at": now, "updated_at": now, "request_id": JOB,
                "correlation_id": JOB, "lease_owner": OWNER, "lease_expires_at": now}])
            await conn.execute(insert(outbox), [{
                "event_id": "e-1", "job_id": JOB, "sequence": 1, "event_type": "JobAccepted",
                "correlation_id": JOB, "body": "{}", "created_at": now}])
            await conn.execute(insert(resource_ledger), [{
                "job_id": JOB, "resource_key": "volume:1", "resource_type": "volume", "action": "detach",
                "status": "done", "data": {}, "created_at": now, "updated_at": now}])
            await conn.execute(insert(job_steps), [{
                "job_id": JOB, "step_name": "validate", "step_order": 1, "status": "completed"}])
            await conn.execute(insert(log_events), [{
                "job_id": JOB, "correlation_id": JOB, "level": "INFO", "message": "m", "fields": {},
                "timestamp": now, "sequence": 1, "step_name": "validate"}])
        yield engine


@pytest.fixture(params=["mysql", "mariadb"])
async def fresh(database: AsyncEngine, request: pytest.FixtureRequest) -> AsyncIterator[AsyncEngine]:
    """The database through a `mysql+asyncmy://` URL and through a `mariadb+asyncmy://` one: SQLAlchemy
    renders a statement for the URL's dialect, and a hint kept for the other is not sent."""
    url = database.url.set(drivername=f"{request.param}+asyncmy").render_as_string(hide_password=False)
    engine = make_engine(url, pool_size=1)
    try:
        yield engine
    finally:
        await engine.dispose()


async def plan(engine: AsyncEngine, statement: Any, params: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """(table, access type, key) of each table the statement reads, rendered with its values
    in the server's dialect, index hints included."""
    try:  # as the driver-level path renders it (adapters/db/raw.py)
        async with raw.transaction(engine) as tx:
            sql = tx.sql(statement, params or {})
    except ValueError:  # an expanding IN list: run through SQLAlchemy, and rendered by it
        assert not params
        sql = str(statement.compile(dialect=engine.sync_engine.dialect, compile_kwargs={"literal_binds": True}))
    async with engine.connect() as conn:
        rows = (await conn.execute(text("EXPLAIN " + sql.replace(":", r"\:")))).mappings().all()
    return [(r["table"], r["type"], r["key"]) for r in rows]


# by key (const, eq_ref, ref) or by a range of the index: never `index` (the whole index walked)
# or `ALL` (the whole table)
BY_KEY = {"const", "eq_ref", "ref", "range", "ref_or_null"}


def assert_by(found: list[tuple[str, str, str]], *expected: tuple[str, str], walk: bool = False) -> None:
    """`walk`: the named index may be walked (in its order, for an ORDER BY with a LIMIT)."""
    assert [(t, k) for t, _, k in found] == list(expected), found
    assert all(access in BY_KEY | ({"index"} if walk else set()) for _, access, _ in found), found


async def test_a_jobs_ledger_by_its_key(fresh: AsyncEngine) -> None:
    assert_by(await plan(fresh, LEDGER_OF_JOB, {"job_id": JOB}), ("resource_ledger", "uq_ledger_job_key"))


async def test_the_claims_look_by_the_unended_jobs(fresh: AsyncEngine) -> None:
    store = JobStore(fresh, OWNER)
    assert_by(await plan(fresh, store.claim_candidates(64, running=["job-2", "job-3"])),
              ("failover_jobs", "ix_failover_jobs_claim"))


async def test_the_relay_by_the_unsent_index(fresh: AsyncEngine) -> None:
    assert_by(await plan(fresh, _unsent(500)), ("outbox", "ix_outbox_unsent"))
    assert_by(await plan(fresh, BACKLOG), ("outbox", "ix_outbox_unsent"))


async def test_the_projector_links_a_batchs_lines_to_their_steps(fresh: AsyncEngine) -> None:
    assert_by(await plan(fresh, _link_of(2), {"j0": JOB, "j1": "job-2"}),
              ("l", "uq_log_events_job_sequence"), ("s", "uq_job_steps_job_step"))


async def test_failoverctl_list_by_the_creation_index(fresh: AsyncEngine) -> None:
    # the newest first: the creation index walked from its end, stopping at the LIMIT
    assert_by(await plan(fresh, recent_jobs_query(20)), ("job_tracking", "ix_job_tracking_created"), walk=True)


async def test_a_waves_details_by_each_tables_job_index(fresh: AsyncEngine) -> None:
    """`failoverctl watch` of hundreds of jobs reads them a chunk at a time (`job_details`)."""
    queries = details_queries([JOB, "job-2", "job-3"])
    assert_by(await plan(fresh, queries["tracking"]), ("job_tracking", "PRIMARY"))
    assert_by(await plan(fresh, queries["jobs"]), ("failover_jobs", "job_id"))
    assert_by(await plan(fresh, queries["steps"]), ("job_steps", "uq_job_steps_job_step"))
    assert_by(await plan(fresh, queries["ledger"]), ("resource_ledger", "uq_ledger_job_key"))
    assert_by(await plan(fresh, queries["events"]), ("outbox", "uq_outbox_job_sequence"))


async def test_a_reports_failovers_by_the_vms_index(fresh: AsyncEngine) -> None:
    """`failoverctl report --vms-file`: each VM's newest failover, and its newest cleanup, one
    dive into the VMs' index each (a VM's history, however long, is not read)."""
    for query in (newest_failovers_query(["vm-1", "vm-2"], None), newest_failovers_query(["vm-1"], utcnow()),
                  newest_cleanups_query([("vm-1", JOB, utcnow()), ("vm-2", "job-2", utcnow())])):
        found = [row for row in await plan(fresh, query) if not row[0].startswith("<union")]  # (the union's result)
        assert found and all(key == "ix_failover_jobs_vm" and access in BY_KEY for table, access, key in found
                             if table == "failover_jobs") and {t for t, _, _ in found} == {"failover_jobs"}, found
