"""A job the engine keeps crashing on is given up, not retried forever: after
ENGINE_CRASH_LIMIT crashes in a row at one point, its step fails (ENGINE_CRASHED), and when its
rollback crashes as often, the rollback ends incomplete naming what is left; once the cause is
fixed, a RollbackRequested finishes it and the world is as before.

The crash is real: the job's recorded plan is damaged in the database (as a bad manual edit
or a bad migration would) while no process runs it, so every resume of its step and of its
rollback raises where the engine reads it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from adapters.db.tables import failover_jobs, resource_ledger
from failover.seed import seed_vm
from schemas.commands import FailoverRequested, RollbackRequested
from statemachine.engine import ENGINE_CRASH_LIMIT

from ..helpers import wait_until
from ..world import assert_restored, view
from .support import Cell, derived_database, derived_vhost


def _types(events: list[Any]) -> list[str]:
    return [e.type for e in events if e.type != "LogRecorded"]


async def test_a_job_the_engine_keeps_crashing_on_is_given_up_then_rolled_back_by_request(
        database_url: str, amqp_url: str, tmp_path: Path) -> None:
    vhost = await asyncio.to_thread(derived_vhost, amqp_url, "crashing")
    cell = await Cell(name="crashing", db_url=derived_database(database_url, "crashing"), amqp_url=vhost,
                      tmp=tmp_path).open()
    try:
        assert cell.control and cell.emu and cell.log and cell.db and cell.bus
        log = cell.log
        vm = await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name="engine crash",
                           os_type="ubuntu64Guest", disks=2)
        before = await view(cell.control, vm.volume_ids, cell.emu.appliance_vm_id)
        await cell.control.set_latency(async_job_seconds=1.0, operation_seconds=1.0)
        first = await cell.start_serve()
        job = uuid.uuid4()
        await cell.bus.publish(FailoverRequested(request_id=job, vm_id=vm.vm_id, failover_type="test",
                                                 requested_by="crash-tests"))
        await log.wait(lambda: log.has(str(job), "StepStarted", "cloudstack-snapshot"), 60, "the snapshot step")

        async def snapshot_in_flight() -> bool:  # (its intent and CloudStack job id recorded)
            async with cell.db.connect() as conn:  # type: ignore[union-attr]
                return (await conn.execute(select(resource_ledger.c.id).where(
                    resource_ledger.c.job_id == str(job), resource_ledger.c.resource_type == "snapshot",
                    resource_ledger.c.cs_job_id.is_not(None)))).first() is not None

        await wait_until(snapshot_in_flight, 60, "a snapshot in flight")
        await first.kill()  # mid-step: the next process resumes the step

        async with cell.db.begin() as conn:
            plan = (await conn.execute(select(failover_jobs.c.plan).where(
                failover_jobs.c.job_id == str(job)))).scalar_one()
            await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == str(job))
                               .values(plan={**plan, "volumes": 5}))  # not a list: every read of it raises
        await cell.control.set_latency(async_job_seconds=0, operation_seconds=0)
        second = await cell.start_serve()
        await log.wait_ended([str(job)], 120)
        events = log.stream(str(job))
        kinds = _types(events)
        assert kinds[-4:] == ["StepFailed", "RollbackStarted", "RollbackFailed", "JobFailed"], kinds
        failed: Any = next(e for e in events if e.type == "StepFailed")
        assert failed.step == "cloudstack-snapshot" and failed.error.code == "ENGINE_CRASHED"
        assert failed.attempts == ENGINE_CRASH_LIMIT and "TypeError" in failed.error.message
        rollback: Any = next(e for e in events if e.type == "RollbackFailed")
        assert rollback.error.code == "ENGINE_CRASHED" and "RollbackRequested" in rollback.error.message
        # what the job made before the kill is named for the operator (the ledger's, unverified:
        # by its id, or by its name where the kill came before the id was recorded)
        async with cell.db.connect() as conn:
            snapshots = (await conn.execute(select(resource_ledger.c.resource_id, resource_ledger.c.name).where(
                resource_ledger.c.job_id == str(job), resource_ledger.c.resource_type == "snapshot"))).all()
        named = {a.resource_id for a in rollback.manual_actions}
        assert snapshots and all((r.resource_id or r.name) in named for r in snapshots), (
            snapshots, rollback.manual_actions)
        assert events[-1].rolled_back is False
        crashes = second.log_path.read_text().count("crashed in the engine")
        assert crashes == 2 * ENGINE_CRASH_LIMIT, crashes  # the step's, then its rollback's: then given up

        # the operator repairs the plan and asks for the rollback again: it completes
        async with cell.db.begin() as conn:
            await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == str(job)).values(plan=plan))
        seen = len(events)
        await cell.bus.publish(RollbackRequested(request_id=uuid.uuid4(), job_id=job))
        await log.wait(lambda: len(log.stream(str(job))) > seen and log.ended(str(job)), 60, "the retried rollback")
        more = _types(log.stream(str(job))[seen:])
        assert more == ["RollbackStarted", "RollbackCompleted", "JobFailed"], more
        assert log.stream(str(job))[-1].rolled_back is True
        assert_restored(before, await view(cell.control, vm.volume_ids, cell.emu.appliance_vm_id))
    finally:
        await cell.close()
