"""The driver-injection command that outlives its `serve` (killed with SIGKILL mid-step) is not
joined by a second run on the same device: the process that resumes the step waits for it to
end (saying so in the job's progress), then runs the command itself, and the job completes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from pathlib import Path

from failover.seed import seed_vm
from schemas.commands import FailoverRequested

from ..helpers import holds, processes_with, wait_until
from .support import Cell, derived_database, derived_vhost


def _lines(cell: Cell, job_id: str) -> list[str]:
    assert cell.log
    return [e.message for e in cell.log.stream(job_id) if e.type == "LogRecorded"]


async def test_a_resumed_injection_waits_for_the_run_that_outlived_its_serve(
        database_url: str, amqp_url: str, tmp_path: Path) -> None:
    vhost = await asyncio.to_thread(derived_vhost, amqp_url, "injlock")
    cell = await Cell(name="injlock", db_url=derived_database(database_url, "injlock"), amqp_url=vhost,
                      tmp=tmp_path, env_extra={"FAILOVER_INJECT_LOCK_DIR": str(tmp_path / "locks"),
                                               "FAILOVER_INJECT_TIMEOUT_SECONDS": "60"}).open()
    job = str(uuid.uuid4())
    try:
        assert cell.control and cell.emu and cell.log and cell.db and cell.bus
        control = cell.control
        vm = await seed_vm(cell.db, control, cell.emu.appliance_vm_id, vm_name="injection lock")  # Windows
        await control.add_fault(api="inject", command="inject", kind="hang", times=1)  # the first run hangs
        first = await cell.start_serve()
        await cell.bus.publish(FailoverRequested(request_id=uuid.UUID(job), vm_id=vm.vm_id, failover_type="test",
                                                 requested_by="crash-tests"))

        async def one_call() -> bool:
            return len(await control.calls(api="inject")) == 1
        await wait_until(one_call, 60, "the first run's write")
        assert len(processes_with(job)) == 1
        await first.kill()  # the command lives on, orphaned, holding its device's lock
        assert len(processes_with(job)) == 1

        await cell.start_serve()
        await wait_until(holds(lambda: any(m.startswith("waiting for an earlier run of the injection command")
                                           for m in _lines(cell, job))), 60, "the resumed step to wait")
        assert len(await control.calls(api="inject")) == 1  # no second run while the first lives
        for pid in processes_with(job):
            os.kill(pid, signal.SIGKILL)  # the first run ends (as the operator, or its own end, would)
        await cell.log.wait_ended([job], 60)
        last = cell.log.stream(job)[-1]
        assert last.type == "JobCompleted", [e.type for e in cell.log.stream(job)]
        assert len(await control.calls(api="inject")) == 2  # the resumed step's own run, after the first
    finally:
        for pid in processes_with(job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await cell.close()
