"""An outage of CloudStack shorter than FAILOVER_RETRY_WINDOW_SECONDS is ridden out: the step
tries again (each try's note on the job's progress while the outage lasts) and the job
completes. An outage longer than the window fails the step after it and rolls the job back;
a cancel asked for while a step waits to try again stops it there and rolls the job back.

Their own cell (database, vhost, emulators, serve), since the shared `serve` of the other tests
runs with the attempts alone (FAILOVER_RETRY_WINDOW_SECONDS=0)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from adapters.db.tables import resource_ledger
from failover.seed import SeededVm, seed_vm
from schemas.commands import CancelRequested, FailoverRequested
from schemas.events import Event
from statemachine.naming import sanitize_vm_name

from ..helpers import ServeProcess, failover_row
from ..world import assert_restored, view
from .support import Cell, derived_database, derived_vhost

WINDOW = 60.0  # longer than any outage below: only a cancel or the outage's end stops the tries
SHORT_WINDOW = 2.0


@pytest.fixture(scope="module")
async def cell(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cell]:
    vhost = await asyncio.to_thread(derived_vhost, amqp_url, "retrywin")
    opened = await Cell(name="retrywin", db_url=derived_database(database_url, "retrywin"), amqp_url=vhost,
                        tmp=tmp_path_factory.mktemp("retrywin")).open()
    try:
        yield opened
    finally:
        await opened.close()


async def _vm(cell: Cell, name: str) -> SeededVm:
    assert cell.db and cell.control and cell.emu
    return await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name=name, os_type="ubuntu64Guest",
                         test_network_id=cell.emu.test_network_id)


async def _request(cell: Cell, vm: SeededVm) -> str:
    assert cell.bus
    job = uuid.uuid4()
    await cell.bus.publish(FailoverRequested(request_id=job, vm_id=vm.vm_id, failover_type="test",
                                             requested_by="retry-window-tests"))
    return str(job)


def _retry_notes(events: list[Event], what: str) -> list[Event]:
    return [e for e in events if e.type == "LogRecorded" and e.message.startswith(f"{what}: attempt")]


def _types(events: list[Event]) -> list[str]:
    return [e.type for e in events if e.type != "LogRecorded"]


@contextlib.asynccontextmanager
async def _deploy_outage(cell: Cell, window: float, name: str, kind: str = "server_error",
                         errorcode: int | None = None,
                         ) -> AsyncIterator[tuple[str, SeededVm, dict[str, Any], ServeProcess]]:
    """A serve with the retry window `window`, a test failover of a new VM whose every deploy
    CloudStack answers with an internal error (or fails as `kind` says) until the faults are
    cleared: (job id, the VM, the world before, the serve)."""
    assert cell.control and cell.emu
    serve = await cell.start_serve(FAILOVER_RETRY_WINDOW_SECONDS=str(window))
    try:
        vm = await _vm(cell, name)
        before = await view(cell.control, vm.volume_ids, cell.emu.appliance_vm_id)
        await cell.control.add_fault(api="cloudstack", command="deployVirtualMachine", kind=kind, times=0,
                                     errorcode=errorcode)
        yield await _request(cell, vm), vm, before, serve
    finally:
        await cell.control.clear_faults()
        await serve.stop()


async def _restored(cell: Cell, vm: SeededVm, before: dict[str, Any]) -> None:
    assert cell.control and cell.emu
    await cell.control.clear_faults()
    assert_restored(before, await view(cell.control, vm.volume_ids, cell.emu.appliance_vm_id))


async def _outage_until(cell: Cell, job: str, notes: int) -> list[Event]:
    """Until the job's stream shows `notes` notes of a failed deploy: progress while it lasts."""
    assert cell.log
    log = cell.log
    await log.wait(lambda: len(_retry_notes(log.stream(job), "deploy VM")) >= notes, 60,
                   f"{notes} notes of the deploy's retries")
    return log.stream(job)


async def test_an_outage_shorter_than_the_window_is_ridden_out(cell: Cell) -> None:
    assert cell.control and cell.log
    async with _deploy_outage(cell, WINDOW, "outage ridden out") as (job, _, _, _):
        during = await _outage_until(cell, job, 5)  # more than FAILOVER_RETRY_ATTEMPTS=3
        assert "StepFailed" not in _types(during)
        notes = _retry_notes(during, "deploy VM")
        assert [n.fields["attempt"] for n in notes] == list(range(1, len(notes) + 1))
        note = notes[4]
        assert note.level == "WARN" and note.step == "vm-creation" and "retrying in" in note.message
        assert note.fields["code"] == "CLOUDSTACK_ERROR"
        await cell.control.clear_faults()  # the outage ends
        await cell.log.wait_ended([job], 60)
        events = cell.log.stream(job)
        assert events[-1].type == "JobCompleted", _types(events)
        assert "StepFailed" not in _types(events)


async def test_a_cancel_while_retrying_stops_the_step_and_rolls_back(cell: Cell) -> None:
    assert cell.log and cell.bus
    async with _deploy_outage(cell, WINDOW, "cancel while retrying") as (job, vm, before, _):
        await _outage_until(cell, job, 2)
        await cell.bus.publish(CancelRequested(request_id=uuid.uuid4(), job_id=uuid.UUID(job)))
        await cell.log.wait_ended([job], 60)  # within the window: the cancel, not the window, ended it
        events = cell.log.stream(job)
        kinds = _types(events)
        assert kinds[-3:] == ["RollbackStarted", "RollbackCompleted", "JobCancelled"], kinds
        # the step shows as stopped by the cancel (job_steps), the job as cancelled, not failed
        stopped: Any = next(e for e in events if e.type == "StepFailed")
        assert stopped.step == "vm-creation" and stopped.error.code == "CANCELLED"
        assert events[-1].rolled_back is True
        row = await failover_row(cell.db, job)
        assert row.status == "cancelled" and row.failed_step is None
        assert any(e.type == "LogRecorded" and e.message.startswith(
            "cancel requested: stopping step vm-creation while it retried deploy VM") for e in events)
        await _restored(cell, vm, before)


async def test_an_outage_longer_than_the_window_fails_the_step_after_it(cell: Cell) -> None:
    assert cell.log
    async with _deploy_outage(cell, SHORT_WINDOW, "outage outlasts the window") as (job, vm, before, _):
        await cell.log.wait_ended([job], 60)
        events = cell.log.stream(job)
        kinds = _types(events)
        assert kinds[-3:] == ["RollbackStarted", "RollbackCompleted", "JobFailed"], kinds
        failed: Any = next(e for e in events if e.type == "StepFailed")
        notes = _retry_notes(events, "deploy VM")
        # tried past the attempts (3) until the window had passed since the first failure
        assert failed.step == "vm-creation" and failed.attempts == len(notes) + 1 > 3
        # the tries went on until the window had passed (from the first failure, just before
        # the first note), and no try was made after a failure past it
        assert (failed.occurred_at - notes[0].occurred_at).total_seconds() >= SHORT_WINDOW - 0.5
        assert (notes[-1].occurred_at - notes[0].occurred_at).total_seconds() < SHORT_WINDOW + 0.5
        await _restored(cell, vm, before)


async def test_an_async_job_that_failed_is_not_retried_through_the_window(cell: Cell) -> None:
    """The window is for outages: a deploy whose CloudStack job fails (no capacity, say) fails
    the step after the attempts alone, not after minutes of deploys."""
    assert cell.log
    async with _deploy_outage(cell, WINDOW, "deploy fails", kind="async_fail") as (job, vm, before, _):
        await cell.log.wait_ended([job], 30)
        events = cell.log.stream(job)
        failed: Any = next(e for e in events if e.type == "StepFailed")
        assert failed.step == "vm-creation" and failed.error.code == "CLOUDSTACK_JOB_FAILED"
        assert failed.attempts == 3  # FAILOVER_RETRY_ATTEMPTS
        await _restored(cell, vm, before)


@pytest.mark.parametrize(("errorcode", "code", "attempts", "advice"), [
    (535, "CLOUDSTACK_RESOURCE_LIMIT", 3, "updateResourceLimit"),
    (531, "CLOUDSTACK_PERMISSION_DENIED", 1, "give that account access"),
], ids=["resource-limit", "permission-denied"])
async def test_a_deploy_job_failed_for_the_accounts_limit_or_rights_says_so_and_leaves_nothing(
        cell: Cell, errorcode: int, code: str, attempts: int, advice: str) -> None:
    """CloudStack fails a deploy's async job with the command's own code (its jobresult): past
    the account's resource limit (535) the step tries its attempts, a permission denied (531)
    is not tried again; the failure names the cause and what to do, and the VMs the failed
    jobs left (in Error) are destroyed by the rollback."""
    assert cell.log
    async with _deploy_outage(cell, WINDOW, f"deploy fails {errorcode}", kind="async_fail",
                              errorcode=errorcode) as (job, vm, before, _):
        await cell.log.wait_ended([job], 30)
        events = cell.log.stream(job)
        failed: Any = next(e for e in events if e.type == "StepFailed")
        assert failed.step == "vm-creation" and failed.error.code == code
        assert failed.attempts == attempts and advice in failed.error.message
        assert f"({errorcode})" in failed.error.message and "DeployVMCmd" in failed.error.message
        assert _types(events)[-1] == "JobFailed"
        assert cell.control
        # each try deployed anew (a failed job's outcome does not change by asking again)
        deploys = await cell.control.calls(api="cloudstack", command="deployVirtualMachine")
        assert [c["params"].get("displayname") for c in deploys].count(vm.vm_name) == attempts
        await _restored(cell, vm, before)  # no VM of the failed deploys left


async def test_a_drain_stops_a_step_between_two_tries_and_the_next_process_resumes_it(cell: Cell) -> None:
    """SIGTERM during an outage: the step waiting to try again is handed back at once (nothing
    is in flight), not after FAILOVER_DRAIN_SECONDS; the next process resumes it."""
    assert cell.log and cell.control
    async with _deploy_outage(cell, WINDOW, "drain while retrying") as (job, _, _, serve):
        await _outage_until(cell, job, 5)  # the pauses are 0.8 s and growing
        began = time.monotonic()
        assert await serve.stop() == 0
        took = time.monotonic() - began
        assert took < 10, f"serve took {took:.1f} s to drain (FAILOVER_DRAIN_SECONDS=20)"
        await cell.control.clear_faults()  # the outage ends
        second = await cell.start_serve(FAILOVER_RETRY_WINDOW_SECONDS=str(WINDOW))
        try:
            await cell.log.wait_ended([job], 60)
        finally:
            await second.stop()
        events = cell.log.stream(job)
        assert events[-1].type == "JobCompleted", _types(events)
        assert any(e.type == "LogRecorded" and e.message.startswith("resuming step vm-creation") for e in events)


async def test_a_vm_name_another_job_holds_is_not_deployed_or_taken_meanwhile(cell: Cell) -> None:
    """Two source VMs whose names sanitise to the same: their live failovers want one VM name.
    The first records its intent to deploy under it, and its deploys fail through an outage
    (nothing made yet). The second, asked for meanwhile, finds no VM of the name: it must
    still not deploy one, since the first would then take that VM for its own on its next try
    (its intent is looked up by the name), attach its disks to it and start it, or destroy it
    in its rollback. It fails at once, naming the first job, changing nothing; the first
    deploys its own VM once the outage ends."""
    assert cell.control and cell.emu and cell.log and cell.bus and cell.db
    first_vm = await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name="Twin web_01",
                             os_type="ubuntu64Guest", live_network_id=cell.emu.network_id)
    second_vm = await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name="Twin web 01",
                              os_type="ubuntu64Guest", live_network_id=cell.emu.network_id)
    name = sanitize_vm_name("Twin web_01")
    assert sanitize_vm_name("Twin web 01") == name
    second_before = await view(cell.control, second_vm.volume_ids, cell.emu.appliance_vm_id)
    serve = await cell.start_serve(FAILOVER_RETRY_WINDOW_SECONDS=str(WINDOW))
    try:
        await cell.control.add_fault(api="cloudstack", command="deployVirtualMachine", kind="server_error",
                                     match={"displayname": "Twin web_01"}, times=0)
        first = uuid.uuid4()
        await cell.bus.publish(FailoverRequested(request_id=first, vm_id=first_vm.vm_id, failover_type="live",
                                                 requested_by="name-claim-tests"))
        await _outage_until(cell, str(first), 2)
        second = uuid.uuid4()
        await cell.bus.publish(FailoverRequested(request_id=second, vm_id=second_vm.vm_id, failover_type="live",
                                                 requested_by="name-claim-tests"))
        await cell.log.wait_ended([str(second)], 60)
        events = cell.log.stream(str(second))
        assert events[-1].type == "JobFailed", _types(events)
        failed: Any = events[-1]
        # (in its validation: before its snapshots and its injection)
        assert failed.failed_step == "pre-failover-validation" and failed.rolled_back is True
        assert failed.error.code == "VM_NAME_TAKEN" and str(first) in failed.error.message, failed.error
        assert "still running" in failed.error.message and name in failed.error.message
        world = await cell.control.state()
        assert [v for v in world["vms"] if v["name"] == name] == []  # the second deployed nothing
        assert_restored(second_before, await view(cell.control, second_vm.volume_ids, cell.emu.appliance_vm_id))

        await cell.control.clear_faults()  # the outage ends: the first deploys its own VM
        await cell.log.wait_ended([str(first)], 60)
        events = cell.log.stream(str(first))
        assert events[-1].type == "JobCompleted", _types(events)
        world = await cell.control.state()
        named = [v for v in world["vms"] if v["name"] == name]
        assert len(named) == 1 and named[0]["displayname"] == "Twin web_01", named
        async with cell.db.connect() as conn:
            held = (await conn.execute(select(resource_ledger.c.job_id, resource_ledger.c.resource_id).where(
                resource_ledger.c.resource_key == "vm",
                resource_ledger.c.job_id.in_([str(first), str(second)])))).all()
        assert [tuple(r) for r in held] == [(str(first), named[0]["id"])]
    finally:
        await cell.control.clear_faults()
        await serve.stop()
