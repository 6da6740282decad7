"""What a group commit costs, per job's commit: MariaDB's side and serve's, through the job store.

    python -m bench.group_commit [--jobs 400] [--group 8] [--rounds 5] [--callgrind PID]

Under load serve writes its jobs' commits in groups, several jobs' per transaction
(`JobStore._commit_group`, adapters/db/store.py). This runs the store's own code on a database
of its own (`failover_group_bench`, the project's migrations; dropped at the end): `--jobs`
jobs of ours, each round one commit of each, all at once, with one commit in flight at a time,
so that the first goes alone and the rest in groups of `--group`. A commit is what a step's end
usually is: the job's status and next step, one event (a `StepCompleted`, ~600 bytes of JSON)
and one ledger row. It prints, per commit, MariaDB's CPU (mariadbd's user + system time from
/proc, its idle rate taken off) or, with `--callgrind PID`, the instructions of a server run
under callgrind (bench/lease_update.py's docstring has the commands; pass its URL with
`--database-url`), and this process's CPU (the store's side: building the statements, the
driver, the event loop) or, run under callgrind itself with `--callgrind-self`, its
instructions.

Compare two versions of the store by running this from a checkout of each, one after the other:
instructions are repeatable whatever the machine does; CPU times are not on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.engine import make_url

from adapters.db.engine import make_engine, utcnow
from adapters.db.store import JobStore
from adapters.db.tables import failover_jobs
from bench.infra import Callgrind, fresh_database, pids_named
from bench.lease_update import mariadbd_cpu
from schemas.events import StepCompleted
from statemachine.ports import Commit, JobRow, LedgerEntry

OWNER = "group-commit-bench"
DB = "failover_group_bench"


def a_commit(job: JobRow, round_: int) -> Commit:
    event = StepCompleted(
        event_id=uuid.uuid4(), job_id=job.job_id, job_type="test-failover", vm_id=job.vm_id,
        sequence=job.last_sequence + 1, correlation_id=job.job_id, causation_id=job.job_id,
        occurred_at=datetime.now(UTC), step="volume-attachment", step_order=5, percent_complete=80,
        outputs={"volumes": [str(uuid.uuid4()) for _ in range(3)], "vm_id": str(uuid.uuid4())})
    return Commit(events=[event], job={"status": "running", "resume_state": f"step-{round_}"},
                  ledger=[LedgerEntry(key=f"volume:{round_}", resource_type="volume", action="attach",
                                      status="done", resource_id=str(uuid.uuid4()),
                                      data={"volume": str(uuid.uuid4()), "device_id": round_})])


async def main(args: argparse.Namespace) -> None:
    url = await fresh_database(args.database_url, DB)
    engine = make_engine(url, pool_size=4, max_overflow=0)
    try:
        now = utcnow()
        async with engine.begin() as conn:
            ids = [str(uuid.uuid4()) for _ in range(args.jobs)]
            await conn.execute(failover_jobs.insert(), [dict(
                job_id=j, vm_id=f"vm-{j[:8]}", job_type="test", source_vm_name="web", created_at=now, updated_at=now,
                request_id=j, correlation_id=j, options={}, status="running", lease_owner=OWNER,
                lease_expires_at=now + timedelta(hours=1)) for j in ids])
        store = JobStore(engine, OWNER, lease_seconds=3600, group_limit=1, group_most=args.group)
        jobs = [job for j in ids if (job := await store.load(j)) is not None]
        await store.commit(jobs[0], a_commit(jobs[0], 0))  # connected: the store knows the server
        jobs[0] = replace(jobs[0], last_sequence=jobs[0].last_sequence + 1)
        grind = Callgrind(args.callgrind) if args.callgrind else None
        port = make_url(args.database_url).port or 3306
        idle = 0.0
        if grind is None:
            if len(pids_named("mariadbd")) != 1:
                raise SystemExit("CPU time needs the one mariadbd on this machine; use --callgrind PID")
            cpu0 = mariadbd_cpu()
            await asyncio.sleep(3)
            idle = (mariadbd_cpu() - cpu0) / 3
        unit = "instructions" if grind else "us of mariadbd's CPU"
        mine_unit = "instructions" if args.callgrind_self else "us of CPU"
        print(f"{args.jobs} jobs, groups of up to {args.group}, MariaDB on port {port}: "
              + ("counted by callgrind" if grind else f"mariadbd idle {idle * 1000:.1f} ms/s"))
        me = Callgrind(os.getpid(), args.callgrind_self) if args.callgrind_self else None
        server, client = [], []
        for r in range(1, args.rounds + 1):
            commits = [a_commit(job, r) for job in jobs]
            transactions, groups = store.transactions, store.groups
            if grind is not None:
                grind.zero()
            else:
                cpu0, began = mariadbd_cpu(), time.monotonic()
            if me is not None:
                me.zero()
            mine = time.process_time()
            cancels = await asyncio.gather(*(store.commit(j, c) for j, c in zip(jobs, commits, strict=True)))
            mine = time.process_time() - mine
            if me is not None:
                mine = me.count() / 1e6  # (as millions, shown per commit below)
            if grind is not None:
                spent = grind.count() / len(jobs)
            else:
                spent = (mariadbd_cpu() - cpu0 - idle * (time.monotonic() - began)) / len(jobs) * 1e6
            assert not any(cancels), "no cancel was asked for"
            jobs = [replace(j, last_sequence=j.last_sequence + 1) for j in jobs]
            server.append(spent)
            client.append(mine / len(jobs) * 1e6)
            print(f"  round {r}: MariaDB {spent:,.0f} {unit}, this process {client[-1]:,.0f} {mine_unit} per commit "
                  f"({store.transactions - transactions} transactions, {store.groups - groups} of them groups)",
                  flush=True)
        print(f"median per commit: MariaDB {statistics.median(server):,.0f} {unit}; "
              f"this process {statistics.median(client):,.0f} {mine_unit}")
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP DATABASE `{DB}`"))
        await engine.dispose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--database-url", default="mysql+asyncmy://root@127.0.0.1:3306/",
                   help="the server (the bench uses its own database on it)")
    p.add_argument("--callgrind", type=int, metavar="PID",
                   help="count the instructions of a mariadbd run under callgrind instead of its CPU time")
    p.add_argument("--callgrind-self", metavar="OUT_FILE",
                   help="this process runs under callgrind (valgrind --tool=callgrind --callgrind-out-file=OUT_FILE "
                        "python -m bench.group_commit ...): count its own instructions per commit, not its CPU time")
    asyncio.run(main(p.parse_args()))
