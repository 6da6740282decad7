"""A job's commit on the driver directly (adapters/db/raw.py) against the same statements run
through SQLAlchemy's async execution, side by side in one process on the same MariaDB.

    python -m bench.raw_sql [--transactions 3000] [--rounds 3] [--database-url URL]

Each transaction is what most of a job's ~30 commits are: the fenced UPDATE of its
`failover_jobs` row, one outbox event, one ledger upsert. `JobStore.commit` runs it one way;
the baseline runs the very statements and parameters `JobStore` prepared, with
`AsyncConnection.execute` in an `engine.begin()` block (how every commit ran before). The two
alternate, `--rounds` times each, on a database of their own (`failover_bench_raw`). Prints
the CPU milliseconds of this process and the wall milliseconds per transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import func, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from adapters.db.engine import make_engine, utcnow
from adapters.db.migrate import upgrade
from adapters.db.outbox import OUTBOX_INSERT
from adapters.db.store import LEDGER_UPSERT, JobStore
from adapters.db.tables import failover_jobs
from schemas.events import LogRecorded
from statemachine.ports import Commit, JobRow, LedgerEntry

DATABASE = "failover_bench_raw"
OWNER = "bench-raw"


async def fresh(url: str) -> str:
    parsed = make_url(url)
    server = create_async_engine(parsed.set(database=""))
    async with server.begin() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS `{DATABASE}`"))
        await conn.execute(text(f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4"))
    await server.dispose()
    made = parsed.set(database=DATABASE).render_as_string(hide_password=False)
    await asyncio.to_thread(upgrade, made)
    return made


def a_commit(job: JobRow, n: int) -> Commit:
    event = LogRecorded(event_id=uuid.uuid4(), job_id=uuid.UUID(job.job_id), job_type="test-failover", vm_id=job.vm_id,
                        sequence=job.last_sequence + 1, correlation_id=uuid.UUID(job.job_id),
                        causation_id=uuid.UUID(job.job_id), occurred_at=datetime.now(UTC), level="INFO",
                        message=f"volume {n % 8} attached", step="volume-attachment", fields={"n": n})
    return Commit(events=[event], job={"status": "volume-attachment"},
                  ledger=[LedgerEntry(key=f"attach:{n % 8}", resource_type="volume", action="attach",
                                      status="done", resource_id=f"vol-{n % 8}", data={"device": "/dev/vdb"})])


async def main(url: str, transactions: int, rounds: int) -> None:
    engine = make_engine(await fresh(url), pool_size=4)
    store = JobStore(engine, OWNER, lease_seconds=60.0)
    job_id = str(uuid.uuid4())
    now = utcnow()
    async with engine.begin() as conn:
        await conn.execute(failover_jobs.insert().values(
            job_id=job_id, request_id=job_id, vm_id="vm-bench", job_type="test", status="running",
            source_vm_name="bench", created_at=now, updated_at=now, correlation_id=job_id,
            last_sequence=1, lease_owner=OWNER, lease_expires_at=func.date_add(func.now(6), text("INTERVAL 1 DAY"))))
    job = JobRow(job_id=job_id, request_id=job_id, job_type="test", vm_id="vm-bench", vm_name="bench",
                 correlation_id=job_id, parent_job_id=None, requested_by="bench", status="running",
                 last_sequence=1, resume_state=None, options={}, plan={}, cancel_requested=False,
                 rollback_requested=False, failed_step=None, error_code=None, error_message=None,
                 created_at=time.time(), started_at=None)
    n = 0

    async def direct() -> None:
        nonlocal job, n
        commit = a_commit(job, n)
        await store.commit(job, commit)
        job = dataclasses.replace(job, last_sequence=job.last_sequence + 1)
        n += 1

    async def through_sqlalchemy() -> None:
        nonlocal job, n
        guarded, _, params, out, led = store._prepare(job, a_commit(job, n))
        async with engine.begin() as conn:
            if (await conn.execute(guarded, params)).rowcount != 1:
                raise RuntimeError("the fence failed")
            await conn.execute(OUTBOX_INSERT, out)
            await conn.execute(LEDGER_UPSERT, led)
        job = dataclasses.replace(job, last_sequence=job.last_sequence + 1)
        n += 1

    results: dict[str, list[tuple[float, float]]] = {"driver directly": [], "SQLAlchemy execute": []}
    for _ in range(rounds):
        for name, run in (("SQLAlchemy execute", through_sqlalchemy), ("driver directly", direct)):
            for _ in range(200):  # warm: statement caches, pool
                await run()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(transactions):
                await run()
            results[name].append(((time.process_time() - cpu) * 1000 / transactions,
                                  (time.perf_counter() - wall) * 1000 / transactions))
    await engine.dispose()
    print(f"{transactions} transactions x {rounds} rounds each (fenced UPDATE + outbox row + ledger upsert)")
    print(f"{'':22} {'CPU ms/txn (median)':>20} {'wall ms/txn (median)':>21}")
    for name, rows in results.items():
        print(f"{name:22} {statistics.median(r[0] for r in rows):>20.3f} {statistics.median(r[1] for r in rows):>21.3f}")
    base = statistics.median(r[0] for r in results["SQLAlchemy execute"])
    ours = statistics.median(r[0] for r in results["driver directly"])
    print(f"CPU per transaction: {ours / base:.2f}x of SQLAlchemy execute's")


def cli() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--transactions", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--database-url", default="mysql+asyncmy://root@127.0.0.1:3306/")
    a = p.parse_args()
    asyncio.run(main(a.database_url, a.transactions, a.rounds))


if __name__ == "__main__":
    cli()
