"""SIGTERM drains (guarantee 9): the process stops taking commands, its running jobs stop at
their next safe point (a step boundary) and their leases are handed back, the outbox is
flushed, and it exits 0 within a bounded time; another process then finishes the jobs, each
from where it stopped (no step is re-entered)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from adapters.db.tables import job_commands
from failover.seed import seed_vm
from schemas.commands import FailoverRequested
from statemachine.naming import sanitize_vm_name, test_vm_name

from ..helpers import wait_until
from .support import (
    CRASH_ENV,
    Cell,
    derived_database,
    derived_vhost,
    exactly_once_problems,
    job_rows,
    outbox_unsent,
    projected_all,
    projection_problems,
    shape,
    stream_problems,
)
from .test_side_by_side import linux_failover_shape

JOBS = 10
LATE = 3  # commands published once the drain has begun


@pytest.mark.slow
async def test_sigterm_drains_and_another_process_finishes(database_url: str, amqp_url: str, tmp_path: Path) -> None:
    vhost = await asyncio.to_thread(derived_vhost, amqp_url, "drain")
    cell = await Cell(name="drain", db_url=derived_database(database_url, "drain"), amqp_url=vhost,
                      tmp=tmp_path).open()
    try:
        assert cell.control and cell.emu and cell.log and cell.db and cell.bus
        # steps that take a while (a second per CloudStack job / daemon operation), so that the
        # SIGTERM finds every job in the middle of one
        await cell.control.set_latency(async_job_seconds=1.0, operation_seconds=1.0)
        first = await cell.start_serve()
        vms = [await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name=f"drain {i}",
                             os_type="ubuntu64Guest", disks=2) for i in range(JOBS + LATE)]
        ids = [str(uuid.uuid4()) for _ in vms]
        for vm, job_id in zip(vms[:JOBS], ids[:JOBS], strict=True):
            await cell.bus.publish(FailoverRequested(request_id=uuid.UUID(job_id), vm_id=vm.vm_id,
                                                     failover_type="test", requested_by="crash-tests"))
        log = cell.log
        await log.wait(lambda: all(log.has(j, "StepStarted", "cloudstack-snapshot") for j in ids[:JOBS]), 60,
                       "every job to be in its snapshot step")
        assert first.proc is not None
        began = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: _logged(first.log_path, "draining: no new commands"), 10, "the drain to begin")
        for vm, job_id in zip(vms[JOBS:], ids[JOBS:], strict=True):  # not to be taken by the draining process
            await cell.bus.publish(FailoverRequested(request_id=uuid.UUID(job_id), vm_id=vm.vm_id,
                                                     failover_type="test", requested_by="crash-tests"))
        code = await asyncio.wait_for(first.proc.wait(), float(CRASH_ENV["FAILOVER_DRAIN_SECONDS"]) + 10)
        drained = time.monotonic() - began
        first._log.close()

        problems: list[str] = []
        if code != 0:
            problems.append(f"the drained process exited {code}")
        text = first.log_path.read_text()
        for bad in ("interrupted mid-step", "Traceback", "crashed in the engine"):
            if bad in text:
                problems.append(f"the drained process logged {bad!r}")
        rows = await job_rows(cell.db, ids)
        unended = [j for j in ids[:JOBS] if not rows[j].ended]
        for j in unended:
            r = rows[j]
            if r.lease_owner is not None:
                problems.append(f"job {j}: lease still held by {r.lease_owner} after the drain")
            if not (r.status == "pending" or r.resume_state == r.status):  # a step boundary
                problems.append(f"job {j} stopped in the middle of {r.status}")
        if await outbox_unsent(cell.db):
            problems.append("the outbox was not flushed")
        async with cell.db.connect() as conn:
            taken = (await conn.execute(select(job_commands.c.request_id)
                                        .where(job_commands.c.request_id.in_(ids[JOBS:])))).scalars().all()
        if taken:
            problems.append(f"the draining process took {len(taken)} new commands")

        second = await cell.start_serve()
        await log.wait_ended(ids, 120)
        want = linux_failover_shape()
        for vm, job_id in zip(vms, ids, strict=True):
            problems += [f"job {job_id}: {p}" for p in stream_problems(log, job_id)]
            stream = log.stream(job_id)
            if shape(stream) != want:
                problems.append(f"job {job_id}: events {shape(stream)}")
            if any(e.type == "LogRecorded" and e.message.startswith("resuming step") for e in stream):  # type: ignore[attr-defined]
                problems.append(f"job {job_id}: a step was re-entered after the drain")
            name = test_vm_name(sanitize_vm_name(vm.vm_name), job_id)
            problems += [f"job {job_id}: {p}" for p in exactly_once_problems(
                cell.emu.world, name, vm.volume_ids, f"test-failover-{job_id[:8]}")]
        finished_by_second = sum(1 for j in ids if second.name in _owners(log, j))  # type: ignore[attr-defined]
        await projected_all(cell.db, log, ids, 60)
        problems += await projection_problems(cell.db, log, ids)
        print(f"\nSIGTERM: drained in {drained:.1f} s (exit {code}), {len(unended)} of {JOBS} jobs handed back at a "
              f"step boundary, {LATE} later commands left to the next process; it finished "
              f"{finished_by_second} jobs taken over, all {len(ids)} completed once")
        assert not problems, "\n".join(problems[:40])
        assert unended, "the drain found no running job to hand back: the test proves nothing"
    finally:
        await cell.close()


async def _logged(path: Path, text: str) -> bool:
    return text in path.read_text(errors="replace")


def _owners(log: object, job_id: str) -> set[str]:
    return {e.fields.get("owner") for e in log.stream(job_id)  # type: ignore[attr-defined]
            if e.type == "LogRecorded" and "taken over" in e.message}
