"""The driver-injection command that outlives its `serve` (killed with SIGKILL mid-step) is not
joined by a second run on the same device: the process that resumes the step waits for it to
end (saying so in the job's progress), then runs the command itself, and the job completes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from failover.seed import SeededVm, seed_vm
from schemas.commands import FailoverRequested, RollbackRequested

from ..helpers import holds, processes_with, wait_until
from ..world import assert_restored, view
from .support import Cell, derived_database, derived_vhost


def _scripts(job_id: str) -> list[int]:
    """The emulated injection command's processes for `job_id` (not `flock`, which runs it)."""
    found = []
    for pid in processes_with(job_id):
        try:
            program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if not program.endswith(b"flock"):
            found.append(pid)
    return found


def _lines(cell: Cell, job_id: str) -> list[str]:
    assert cell.log
    return [e.message for e in cell.log.stream(job_id) if e.type == "LogRecorded"]


@contextlib.asynccontextmanager
async def _orphaned_injection(database_url: str, amqp_url: str, tmp_path: Path, timeout: float,
                              ) -> AsyncIterator[tuple[Cell, str, SeededVm, dict[str, Any]]]:
    """A cell whose first `serve` was killed (SIGKILL) while the test failover's injection
    command ran: the command lives on, orphaned, under the `flock` that holds its device's
    lock; a second `serve` (FAILOVER_INJECT_TIMEOUT_SECONDS=`timeout`) has taken the job up.
    Yields (the cell, the job id, the VM, the world before)."""
    vhost = await asyncio.to_thread(derived_vhost, amqp_url, "injlock")
    cell = await Cell(name="injlock", db_url=derived_database(database_url, "injlock"), amqp_url=vhost,
                      tmp=tmp_path, env_extra={"FAILOVER_INJECT_LOCK_DIR": str(tmp_path / "locks"),
                                               "FAILOVER_INJECT_TIMEOUT_SECONDS": str(timeout)}).open()
    job = str(uuid.uuid4())
    try:
        assert cell.control and cell.emu and cell.log and cell.db and cell.bus
        control = cell.control
        vm = await seed_vm(cell.db, control, cell.emu.appliance_vm_id, vm_name="injection lock")  # Windows
        before = await view(control, vm.volume_ids, cell.emu.appliance_vm_id)
        await control.add_fault(api="inject", command="inject", kind="hang", times=1)  # the first run hangs
        first = await cell.start_serve()
        await cell.bus.publish(FailoverRequested(request_id=uuid.UUID(job), vm_id=vm.vm_id, failover_type="test",
                                                 requested_by="crash-tests"))

        async def one_call() -> bool:
            return len(await control.calls(api="inject")) == 1
        await wait_until(one_call, 60, "the first run's write")
        assert len(_scripts(job)) == 1
        await first.kill()
        assert len(_scripts(job)) == 1
        await cell.start_serve()
        yield cell, job, vm, before
    finally:
        for pid in processes_with(job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await cell.close()


def _end_orphan(job: str) -> None:
    for pid in processes_with(job):
        os.kill(pid, signal.SIGKILL)  # the first run ends (as the operator, or its own end, would)


async def test_a_resumed_injection_waits_for_the_run_that_outlived_its_serve(
        database_url: str, amqp_url: str, tmp_path: Path) -> None:
    async with _orphaned_injection(database_url, amqp_url, tmp_path, 60) as (cell, job, _, _):
        assert cell.control and cell.log
        await wait_until(holds(lambda: any(m.startswith("waiting for an earlier run of the injection command")
                                           for m in _lines(cell, job))), 60, "the resumed step to wait")
        assert len(await cell.control.calls(api="inject")) == 1  # no second run while the first lives
        _end_orphan(job)
        await cell.log.wait_ended([job], 60)
        last = cell.log.stream(job)[-1]
        assert last.type == "JobCompleted", [e.type for e in cell.log.stream(job)]
        assert len(await cell.control.calls(api="inject")) == 2  # the resumed step's own run, after the first


async def test_the_rollback_does_not_revert_a_volume_the_orphaned_run_still_holds(
        database_url: str, amqp_url: str, tmp_path: Path) -> None:
    """Past the timeout the step fails DRIVER_INJECTION_BUSY, and its rollback does not detach
    and revert the volume under the run still going: it fails the same way, naming what is
    left; once the run has ended, a RollbackRequested puts everything back."""
    async with _orphaned_injection(database_url, amqp_url, tmp_path, 2) as (cell, job, vm, before):
        assert cell.control and cell.log and cell.bus and cell.emu
        await cell.log.wait_ended([job], 60)
        events = cell.log.stream(job)
        kinds = [e.type for e in events if e.type != "LogRecorded"]
        assert kinds[-4:] == ["StepFailed", "RollbackStarted", "RollbackFailed", "JobFailed"], kinds
        failed: Any = events[[e.type for e in events].index("StepFailed")]
        assert failed.step == "virtio-driver-injection" and failed.error.code == "DRIVER_INJECTION_BUSY"
        stuck: Any = next(e for e in events if e.type == "RollbackFailed")
        assert stuck.error.code == "DRIVER_INJECTION_BUSY" and "fuser -v" in stuck.error.message
        root = vm.volume_ids[0]
        touched = [c for c in await cell.control.calls() if root in str(c.get("params"))
                   and c["command"] in ("detach", "revertSnapshot")]
        assert touched == [], touched  # the orphan's volume was left alone
        _end_orphan(job)
        seen = len(events)
        await cell.bus.publish(RollbackRequested(request_id=uuid.uuid4(), job_id=uuid.UUID(job)))
        log = cell.log
        await log.wait(lambda: len(log.stream(job)) > seen and log.ended(job), 60, "the retried rollback")
        assert log.stream(job)[-1].rolled_back is True
        assert_restored(before, await view(cell.control, vm.volume_ids, cell.emu.appliance_vm_id))
