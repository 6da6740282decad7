"""Three `serve` processes against one broker and one database, 200 jobs, one process killed
with SIGKILL halfway (guarantees 3, 6 and 8).

Every job completes exactly once in the emulated world; no job is ever driven by two processes
at the same time (each process logs when it starts and stops driving a job: the intervals of
different processes never overlap, the killed one's ending at the kill); the jobs the killed
process was driving are taken over (and say so in a `LogRecorded` naming the new owner); and
job_tracking, job_steps and log_events equal the fold of every event, collected from a queue
bound to `#`.

The database is a private MariaDB (tests/crash/servers.py): three processes with 200 jobs use
many connections, and the machine's shared server serves other tests too.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import func, select

from adapters.db.tables import failover_jobs, outbox
from failover.seed import seed_vm
from schemas.commands import FailoverRequested
from schemas.common import FAILOVER_STEPS
from statemachine.naming import sanitize_vm_name, test_vm_name

from ..helpers import wait_until
from .servers import PrivateMariaDB
from .support import (
    Cell,
    derived_vhost,
    drive_intervals,
    exactly_once_problems,
    job_rows,
    open_drives,
    outbox_unsent,
    overlaps,
    projected_all,
    projection_problems,
    reap,
    shape,
    sigkill,
    stream_problems,
)

JOBS = 200


def linux_failover_shape() -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = [("JobAccepted", None)]
    for step in FAILOVER_STEPS:
        out.append(("StepStarted", step))
        out.append(("StepSkipped" if step == "virtio-driver-injection" else "StepCompleted", step))
    return [*out, ("JobCompleted", None)]


async def open_cell(name: str, db_url: str, amqp_url: str, tmp: Path, **env: str) -> Cell:
    vhost = await asyncio.to_thread(derived_vhost, amqp_url, name)
    return await Cell(name=name, db_url=db_url, amqp_url=vhost, tmp=tmp, env_extra=env).open()


@pytest.mark.slow
async def test_three_processes_200_jobs_one_killed_halfway(
        private_mariadb: PrivateMariaDB, amqp_url: str, tmp_path: Path) -> None:
    cell = await open_cell("sbs", private_mariadb.url("failover_sbs"), amqp_url, tmp_path,
                           FAILOVER_LEASE_SECONDS="5", FAILOVER_CLAIM_INTERVAL_SECONDS="0.5")
    try:
        assert cell.control and cell.emu and cell.log and cell.bus and cell.db
        await cell.control.set_latency(async_job_seconds=0.05, operation_seconds=0.05)
        processes = [cell.serve() for _ in range(3)]
        await asyncio.gather(*(p.start(timeout=60) for p in processes))
        vms = [await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name=f"sbs {i}",
                             os_type="ubuntu64Guest", disks=2) for i in range(JOBS)]
        ids = [str(uuid.uuid4()) for _ in vms]
        began = time.monotonic()
        for vm, job_id in zip(vms, ids, strict=True):
            await cell.bus.publish(FailoverRequested(request_id=uuid.UUID(job_id), vm_id=vm.vm_id,
                                                     failover_type="test", requested_by="crash-tests"))
        log = cell.log

        async def half_ended() -> bool:  # from the table: the events reach the test later
            async with cell.db.connect() as conn:  # type: ignore[union-attr]
                n = (await conn.execute(select(func.count()).select_from(failover_jobs)
                                        .where(failover_jobs.c.ended.is_(True)))).scalar_one()
            return n >= JOBS // 2

        await wait_until(half_ended, 300, "half the jobs to end", interval=0.1)
        # the process driving the most jobs right now
        victim = max(processes, key=lambda p: len(open_drives(p.log_path)))
        killed_at = sigkill(victim)
        await reap(victim)
        await log.wait_ended(ids, 300)
        elapsed = time.monotonic() - began

        problems: list[str] = []
        want = linux_failover_shape()
        for vm, job_id in zip(vms, ids, strict=True):
            problems += [f"job {job_id}: {p}" for p in stream_problems(log, job_id)]
            end = log.ended(job_id)
            if end is None or end.type != "JobCompleted":
                problems.append(f"job {job_id} ended with {end.type if end else None}")
            if shape(log.stream(job_id)) != want:
                problems.append(f"job {job_id}: events {shape(log.stream(job_id))}")
            name = test_vm_name(sanitize_vm_name(vm.vm_name), job_id)
            problems += [f"job {job_id}: {p}" for p in exactly_once_problems(
                cell.emu.world, name, vm.volume_ids, f"test-failover-{job_id[:8]}")]

        # nobody drove a job while another process did; the killed process's jobs moved on
        names = {p.name: p for p in processes}  # type: ignore[attr-defined]
        intervals = drive_intervals(cell.logs, {victim.name: killed_at}, time.time())  # type: ignore[attr-defined]
        problems += overlaps(intervals)
        # the jobs the killed process was acting on, and that it had not ended before the kill
        stranded = [j for j, spans in intervals.items()
                    if any(name == victim.name and end >= killed_at for name, _, end in spans)  # type: ignore[attr-defined]
                    and log.stream(j)[-1].occurred_at.timestamp() > killed_at]
        taken = [j for j in stranded if any(name != victim.name and start > killed_at  # type: ignore[attr-defined]
                                            for name, start, _ in spans_of(intervals, j))]
        if not stranded:
            problems.append("the kill hit no running job: nothing was taken over")
        if sorted(taken) != sorted(stranded):
            problems.append(f"{len(stranded) - len(taken)} jobs of the killed process were not taken over")
        for j in taken:
            owners = {e.fields.get("owner") for e in log.stream(j) if e.type == "LogRecorded"  # type: ignore[attr-defined]
                      and "taken over" in e.message and e.occurred_at.timestamp() > killed_at}  # type: ignore[attr-defined]
            if not owners or not owners <= set(names) - {victim.name}:  # type: ignore[attr-defined]
                problems.append(f"job {j}: taken over by {owners} (from its LogRecorded events)")
        # kill -> the new owner's first event seen on the bus; kill -> its first commit (its log)
        takeover = [min(s.arrived for s in log.by_job[j] if s.event.occurred_at.timestamp() > killed_at) - killed_at
                    for j in taken]
        acting = [min(start for name, start, _ in spans_of(intervals, j) if start > killed_at) - killed_at
                  for j in taken]

        # where the time between the new owner's commit and the test seeing its event goes:
        # the outbox relay (commit -> published with a confirm) or the way to the test
        relay_delay, delivery_delay = [], []
        async with cell.db.connect() as conn:
            for j in taken:
                first = min((s for s in log.by_job[j] if s.event.occurred_at.timestamp() > killed_at),
                            key=lambda s: s.event.sequence)
                row = (await conn.execute(select(outbox.c.created_at, outbox.c.published_at).where(
                    outbox.c.event_id == str(first.event.event_id)))).first()
                if row is not None and row.published_at is not None:
                    published = row.published_at.replace(tzinfo=UTC).timestamp()
                    relay_delay.append(published - row.created_at.replace(tzinfo=UTC).timestamp())
                    delivery_delay.append(first.arrived - published)

        # the read models equal the fold of the events; nothing left in the outbox or leased
        await projected_all(cell.db, log, ids, 120)
        problems += await projection_problems(cell.db, log, ids)
        rows = await job_rows(cell.db, ids)
        bad = [j for j in ids if rows[j].status != "completed" or rows[j].lease_owner is not None]
        if bad:
            problems.append(f"{len(bad)} failover_jobs rows not completed or still leased")
        if await outbox_unsent(cell.db):
            problems.append("events left unsent in the outbox")
        if log.unreadable:
            problems.append(f"{log.unreadable} unreadable events")

        print(f"\n3 serve processes, {JOBS} jobs, one killed halfway: {elapsed:.1f} s "
              f"({JOBS / elapsed:.1f} jobs/s); {len(stranded)} jobs were running in the killed process, "
              f"{len(taken)} taken over; takeover (kill -> first event from the new owner): "
              + (f"median {statistics.median(takeover):.2f} s, max {max(takeover):.2f} s" if takeover else "-")
              + (f" (kill -> first commit of the new owner: median {statistics.median(acting):.2f} s, "
                 f"max {max(acting):.2f} s; lease 5 s)" if acting else "")
              + (f"; of that, commit -> published by the relay: median {statistics.median(relay_delay):.2f} s, "
                 f"published -> seen by the test: median {statistics.median(delivery_delay):.2f} s"
                 if relay_delay else "")
              + f"; {sum(len(v) for v in intervals.values())} drive intervals checked, "
                f"{sum(len(log.by_job[j]) for j in ids)} deliveries folded")
        assert not problems, "\n".join(problems[:40])
    finally:
        await cell.close()


def spans_of(intervals: dict[str, list[tuple[str, float, float]]], job: str) -> list[tuple[str, float, float]]:
    return intervals.get(job, [])
