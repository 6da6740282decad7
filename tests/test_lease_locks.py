"""A process's lease statements lock the rows of the jobs they name, and no others.

Each statement that takes or keeps leases locks what it reads (an UPDATE; the renewal's
`SELECT ... FOR UPDATE SKIP LOCKED`; a commit's fenced UPDATE), and under REPEATABLE READ
InnoDB locks every row a locking statement walks, not only those it changes. Left to its
estimates, MariaDB chose the claim index (ended, lease_expires_at) for the claim's UPDATE on a
fresh install's tables where few jobs were unended: such a walk locks every unended job, other
processes' running jobs included, until it commits, and meanwhile another process's renewal
passes its own jobs by (their rows are locked) or its UPDATE waits. The statements name the
jobs' key (`adapters/db/store.py` `by_job_key`; a commit's fenced UPDATE, `USE INDEX (job_id)`);
with the claim index forced on them instead, every case here fails (the commit's, because P2's
own renewal then walks that index and waits for P1's row).

Here each statement of process P1 is held open in a transaction, and P2 renews its own job
meanwhile: it must be renewed, at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from adapters.db.engine import utcnow
from adapters.db.store import JobStore, fenced_update, intake_owner
from adapters.db.tables import failover_jobs
from tests.crash.support import database_of_its_own

P1, P2 = "process-1", "process-2"
MINE, THEIRS, FREE = "job-p1", "job-p2", "job-free"
ENDED = 40  # a history of ended jobs beside the three: the claim index's unended range looks cheap


@pytest.fixture(scope="module")
async def database(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with database_of_its_own(database_url, "locks") as engine:
        now = utcnow()
        rows = [(MINE, P1, now + timedelta(minutes=10)), (THEIRS, P2, now + timedelta(minutes=10)),
                (FREE, None, None)]
        ended = [f"ended-{i}" for i in range(ENDED)]
        async with engine.begin() as conn:
            await conn.execute(insert(failover_jobs), [{
                "job_id": job, "vm_id": f"vm-{job}", "job_type": "test", "source_vm_name": "web", "options": {},
                "status": "running", "ended": False, "created_at": now, "updated_at": now, "request_id": job,
                "correlation_id": job, "lease_owner": owner, "lease_expires_at": until, "last_sequence": 0}
                for job, owner, until in rows])
            await conn.execute(insert(failover_jobs), [{
                "job_id": job, "vm_id": f"vm-{job}", "job_type": "test", "source_vm_name": "web", "options": {},
                "status": "completed", "ended": True, "created_at": now, "updated_at": now, "request_id": job,
                "correlation_id": job, "last_sequence": 9} for job in ended])
        yield engine


async def _both(conn: AsyncConnection, *statements: Any) -> None:
    for statement in statements:
        await conn.execute(statement)


def _held(database: AsyncEngine) -> dict[str, Callable[[AsyncConnection], Awaitable[Any]]]:
    p1 = JobStore(database, P1)
    return {
        "renewal": lambda conn: conn.execute(p1.renewal_lock([MINE])),
        "claim": lambda conn: _both(conn, p1.claim_lock([FREE], p1._claimable([])), p1.claim_take([FREE], 5)),
        "take": lambda conn: conn.execute(p1._take_statement(1, 5), {
            "owner": P1, "intake_owner": intake_owner(P1), "id_0": FREE}),
        "commit": lambda conn: conn.execute(fenced_update(("status",), None, unless_cancelled=False), {
            "f_job_id": MINE, "f_owner": P1, "f_sequence": 0, "v_status": "running"}),
    }


@pytest.mark.parametrize("statement", ["renewal", "claim", "take", "commit"])
async def test_another_process_renews_its_job_while_one_holds(database: AsyncEngine, statement: str) -> None:
    async with database.connect() as conn:
        await conn.begin()
        try:
            await _held(database)[statement](conn)
            renewal = await asyncio.wait_for(JobStore(database, P2).renew([THEIRS], 5), 10)
        finally:
            await conn.rollback()
    assert renewal == ({THEIRS}, {}, set())


async def test_a_claim_passes_a_row_locked_elsewhere_by_and_takes_it_once_free(database: AsyncEngine) -> None:
    """A claim does not wait for a claimable job's row that another transaction holds (up to
    the server's 50 s lock wait, this process's claims stopped meanwhile): it takes the job at
    a later claim."""
    free = "job-free-locked"
    now = utcnow()
    async with database.begin() as conn:
        await conn.execute(insert(failover_jobs).values(
            job_id=free, vm_id="vm-x", job_type="test", source_vm_name="web", options={}, status="pending",
            ended=False, created_at=now, updated_at=now, request_id=free, correlation_id=free, last_sequence=1))
    store = JobStore(database, "process-3")
    async with database.connect() as conn:
        await conn.begin()
        try:
            await conn.execute(select(failover_jobs.c.id).where(failover_jobs.c.job_id == free).with_for_update())
            passed = await asyncio.wait_for(store.claim(10, 5), 10)
        finally:
            await conn.rollback()
    try:
        assert free not in [r.job_id for r in passed]
        assert free in [r.job_id for r in await asyncio.wait_for(store.claim(10, 5), 10)]
    finally:  # the other tests' free job is free again, this one gone
        async with database.begin() as conn:
            await conn.execute(update(failover_jobs).where(failover_jobs.c.lease_owner == "process-3")
                               .values(lease_owner=None, lease_expires_at=None))
            await conn.execute(delete(failover_jobs).where(failover_jobs.c.job_id == free))


async def test_a_release_says_whether_it_handed_the_job_back(database: AsyncEngine) -> None:
    job = "job-released"
    now = utcnow()
    async with database.begin() as conn:
        await conn.execute(insert(failover_jobs).values(
            job_id=job, vm_id="vm-r", job_type="test", source_vm_name="web", options={}, status="running",
            ended=False, created_at=now, updated_at=now, request_id=job, correlation_id=job, last_sequence=1,
            lease_owner="process-4", lease_expires_at=now + timedelta(minutes=10)))
    try:
        assert await JobStore(database, "process-5").release(job) is False  # not its job
        assert await JobStore(database, "process-4").release(job) is True
        assert await JobStore(database, "process-4").release(job) is False  # no longer its job
    finally:
        async with database.begin() as conn:
            await conn.execute(delete(failover_jobs).where(failover_jobs.c.job_id == job))
