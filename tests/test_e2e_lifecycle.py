"""Every job leaves the world as it found it: rollback after a failure at each step, a failed
rollback and its retry, cleanup of a test failover, cancel, live failover (end to end)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from adapters.db.tables import job_commands, vm_replication_contexts
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import SeededVm, seed_vm
from schemas.commands import CancelRequested, CleanupRequested, FailoverRequested, RollbackRequested
from schemas.common import FAILOVER_STEPS
from schemas.events import Event
from statemachine.naming import sanitize_vm_name, test_vm_name

from .helpers import (
    ServeProcess,
    failover,
    failover_row,
    metric,
    projected,
    run_command,
    wait_until,
)
from .test_e2e_test_failover import check_stream
from .world import assert_restored, view


async def _seed(db: Any, control: EmulatorControl, emulators: EmulatorHandle, name: str, **kw: Any) -> SeededVm:
    return await seed_vm(db, control, emulators.appliance_vm_id, vm_name=name,
                         test_network_id=emulators.test_network_id, **kw)


async def _vm_status(db: Any, vm_id: str) -> str:
    async with db.connect() as conn:
        return str((await conn.execute(select(vm_replication_contexts.c.current_status).where(
            vm_replication_contexts.c.vmware_vm_id == vm_id))).scalar_one())


def _types(events: list[Event]) -> list[str]:
    return [e.type for e in events if e.type != "LogRecorded"]


# a fault at each step: (step, api, command, kind, match builder)
FAULTS = [
    ("cloudstack-snapshot", "cloudstack", "createSnapshot", "refuse", lambda vm, job: {"volumeid": vm.volume_ids[1]}),
    ("cloudstack-snapshot", "cloudstack", "createSnapshot", "async_fail", lambda vm, job: {"volumeid": vm.volume_ids[0]}),
    ("virtio-driver-injection", "inject", "inject", "exit_nonzero", lambda vm, job: {}),
    ("vm-creation", "cloudstack", "deployVirtualMachine", "async_fail", lambda vm, job: {}),
    ("vm-creation", "cloudstack", "deployVirtualMachine", "timeout", lambda vm, job: {}),
    # every try of the step (FAILOVER_RETRY_ATTEMPTS=3) fails; the rollback's re-attach to the
    # appliance, also an "attach", then works
    ("volume-attachment", "volume-daemon", "attach", "async_fail", lambda vm, job: {"times": 3}),
    ("volume-attachment", "volume-daemon", "attach-root", "timeout", lambda vm, job: {}),
    ("vm-startup-validation", "cloudstack", "startVirtualMachine", "refuse", lambda vm, job: {}),
]


@pytest.mark.parametrize("live", [False, True], ids=["test", "live"])
@pytest.mark.parametrize(("step", "api", "command", "kind", "match"), FAULTS,
                         ids=[f"{f[0]}-{f[3]}" for f in FAULTS])
async def test_failure_at_each_step_rolls_everything_back(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        step: str, api: str, command: str, kind: str, match: Any, live: bool) -> None:
    vm = await _seed(db, control, emulators, f"rb {step} {kind} {live}")
    job_id = uuid.uuid4()
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    spec = match(vm, job_id)
    times = spec.pop("times", 0)
    await control.add_fault(api=api, command=command, kind=kind, match=spec, times=times)
    events = await failover(bus, vm.vm_id, live=live, request_id=job_id, timeout=120)
    await control.clear_faults()
    check_stream(events, str(job_id))
    failed = [e for e in events if e.type == "StepFailed"]
    assert [e.step for e in failed] == [step], _types(events)
    if kind == "timeout":  # a wait past FAILOVER_*_TIMEOUT_SECONDS is not waited again (the attempts)
        assert failed[0].attempts == 1 and failed[0].error.code.endswith("_TIMEOUT"), failed[0]
    assert _types(events)[-3:] == ["RollbackStarted", "RollbackCompleted", "JobFailed"]
    assert events[-1].rolled_back is True and events[-1].failed_step == step
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
    row = await failover_row(db, str(job_id))
    assert row.status == "failed" and row.rolled_back and row.active_vm_id is None
    assert await _vm_status(db, vm.vm_id) == "ready_for_failover"
    views = await projected(db, str(job_id))
    statuses = {s.step_name: s.status for s in views["steps"]}
    assert statuses[step] == "failed"
    later = [s.step_name for s in views["steps"] if s.step_order > [x.step_order for x in views["steps"]
                                                                    if x.step_name == step][0]]
    assert all(statuses[s] == "pending" for s in later)
    # a failed job that rolled back completely blocks nothing
    again = await failover(bus, vm.vm_id, live=live, timeout=60)
    assert again[-1].type == "JobCompleted"


async def test_a_revert_whose_answer_was_lost_is_waited_for_and_the_rollback_completes(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """CloudStack started the rollback's revert and its answer was lost (a proxy's 502): the
    retry's revert fails while the first runs (its job finds the volume RevertSnapshotting, not
    Ready). The rollback waits for that revert to end, reverts again, and completes (it failed
    before, once the retries ran out while the first revert ran)."""
    vm = await _seed(db, control, emulators, "lost revert answer")
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    await control.add_fault(api="cloudstack", command="deployVirtualMachine", kind="refuse", times=0)
    await control.add_fault(api="cloudstack", command="revertSnapshot", kind="lost_answer", times=1)
    await control.set_latency(async_job_seconds=2.0)  # (longer than the retries' backoff: the first still runs)
    calls = len(await control.calls())
    try:
        events = await failover(bus, vm.vm_id, timeout=120)
    finally:
        await control.set_latency(async_job_seconds=0)
        await control.clear_faults()
    assert _types(events)[-3:] == ["RollbackStarted", "RollbackCompleted", "JobFailed"], _types(events)
    assert events[-1].rolled_back is True
    reverts = [c for c in (await control.calls())[calls:] if c["command"] == "revertSnapshot"]
    assert [c["status"] for c in reverts] == [502, 200, 200]  # lost; taken and failed at once; done
    assert any(e.type == "LogRecorded" and e.level == "WARN" and "another revert is running" in e.message
               for e in events)
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))


async def test_a_snapshot_that_never_finishes_is_left_to_the_operator_by_id(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """No one can delete a snapshot CloudStack is still creating: the rollback undoes the rest
    and names that snapshot in `manual_actions` instead of pretending."""
    vm = await _seed(db, control, emulators, "hung snapshot")
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    await control.add_fault(api="cloudstack", command="createSnapshot", kind="timeout",
                            match={"volumeid": vm.volume_ids[0]}, times=0)
    events = await failover(bus, vm.vm_id, timeout=120)
    assert _types(events)[-3:] == ["RollbackStarted", "RollbackFailed", "JobFailed"]
    after = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    manual = events[-2].model_dump(mode="json")["manual_actions"]
    assert [(a["action"], a["resource_type"], a["resource_id"]) for a in manual] == [
        ("delete", "snapshot", after["snapshots"][0])]
    assert after["holders"] == before["holders"] and after["content"] == before["content"]
    assert after["vms"] == before["vms"] and len(after["snapshots"]) == 1


async def test_a_snapshot_still_being_taken_at_the_rollback_is_deleted_once_it_is_taken(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """A snapshot slower than FAILOVER_SNAPSHOT_TIMEOUT_SECONDS (3 s here) fails its step, and
    is still BackingUp when the rollback comes to delete it (CloudStack would fail the delete):
    the rollback waits for it, deletes it once, and completes."""
    vm = await _seed(db, control, emulators, "slow snapshot")
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    await control.set_latency(async_job_seconds=4.5)
    calls = len(await control.calls())
    job_id = uuid.uuid4()
    queue = await bus.bind(f"job.{job_id}.#")
    events: list[Event] = []
    try:
        await bus.publish(_test_failover(vm.vm_id, job_id))

        async def collect() -> None:
            async for event in bus.events(queue):
                events.append(event)
                if event.type == "StepFailed":  # (the slow snapshot's job is under way: its end stays 4.5 s)
                    await control.set_latency(async_job_seconds=0)

        await asyncio.wait_for(collect(), 120)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await control.set_latency(async_job_seconds=0)
    assert _types(events)[-3:] == ["RollbackStarted", "RollbackCompleted", "JobFailed"], _types(events)
    assert next(e for e in events if e.type == "StepFailed").error.code == "CLOUDSTACK_JOB_TIMEOUT"
    deletes = [c for c in (await control.calls())[calls:] if c["command"] == "deleteSnapshot"]
    assert len(deletes) == 1  # none while it was being taken
    assert any(e.type == "LogRecorded" and "waiting for CloudStack to finish it" in e.message for e in events)
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))


async def test_a_transient_failure_is_retried_and_the_job_completes(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await _seed(db, control, emulators, "flaky cloud")
    await control.add_fault(api="cloudstack", command="deployVirtualMachine", kind="server_error", times=1)
    await control.add_fault(api="volume-daemon", command="attach-root", kind="async_fail", times=1)
    events = await failover(bus, vm.vm_id)
    assert events[-1].type == "JobCompleted"
    warnings = [e.message for e in events if e.type == "LogRecorded" and e.level == "WARN"]
    assert any("retrying" in w for w in warnings)


async def test_a_non_revertable_snapshot_stops_a_test_failover_before_injection(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await _seed(db, control, emulators, "no revert storage")
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    calls = len(await control.calls())
    await control.add_fault(api="cloudstack", command="createSnapshot", kind="not_revertable", times=0)
    events = await failover(bus, vm.vm_id)
    failed = [e for e in events if e.type == "StepFailed"]
    assert [(e.step, e.error.code) for e in failed] == [("cloudstack-snapshot", "SNAPSHOT_NOT_REVERTABLE")]
    assert "cannot be reverted" in failed[0].error.message
    assert not [c for c in (await control.calls())[calls:] if c["api"] == "inject"]
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))


async def test_failed_rollback_lists_manual_actions_and_rollback_requested_finishes_it(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await _seed(db, control, emulators, "stuck rollback")
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    job_id = uuid.uuid4()
    await control.add_fault(api="cloudstack", command="startVirtualMachine", kind="refuse", times=0)
    await control.add_fault(api="cloudstack", command="deleteSnapshot", kind="refuse", times=0)
    events = await failover(bus, vm.vm_id, request_id=job_id)
    assert _types(events)[-3:] == ["RollbackStarted", "RollbackFailed", "JobFailed"]
    assert events[-1].rolled_back is False
    manual = events[-2].model_dump(mode="json")["manual_actions"]
    snapshots = sorted((await view(control, vm.volume_ids, emulators.appliance_vm_id))["snapshots"])
    assert sorted(a["resource_id"] for a in manual if a["resource_type"] == "snapshot") == snapshots
    assert all(a["action"] == "delete" for a in manual)  # everything else was undone
    # the VM stays blocked until the rollback completes
    blocked = await failover(bus, vm.vm_id)
    assert blocked[0].type == "JobRejected" and blocked[0].reason == "conflict"
    assert "RollbackRequested" in blocked[0].detail

    await control.clear_faults()
    retry = RollbackRequested(request_id=uuid.uuid4(), job_id=job_id)
    more = await run_command(bus, retry, job_id)
    assert _types(more) == ["RollbackStarted", "RollbackCompleted", "JobFailed"]
    assert more[0].sequence == events[-1].sequence + 1  # the same stream, continued
    assert more[-1].rolled_back is True
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
    # and a second retry is not allowed any more
    refused = await run_command(bus, RollbackRequested(request_id=(rid := uuid.uuid4()), job_id=job_id), rid)
    assert refused[0].type == "JobRejected" and refused[0].reason == "not_allowed"


@pytest.mark.parametrize("snapshots_deleted", [True, False], ids=["snapshots-deleted", "snapshots-kept"])
async def test_a_rollback_retried_after_its_manual_actions_were_done_by_hand_completes_end_to_end(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        snapshots_deleted: bool) -> None:
    """The twin of tests/unit/test_rollback.py's, through the emulators' own APIs: the rollback
    fails at the root's revert (refused); the operator does what `manual_actions` says with
    CloudStack's API and the Volume Daemon's (the revert, the volume back on the appliance, the
    snapshots deleted or not), then retries the rollback, and it completes."""
    from cs import AIOCloudStack

    from tests.emulators.helpers import run_job

    vm = await _seed(db, control, emulators, f"by hand {snapshots_deleted}", disks=2)
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    await control.add_fault(api="cloudstack", command="deployVirtualMachine", kind="refuse", times=0)
    await control.add_fault(api="cloudstack", command="revertSnapshot", kind="refuse", times=0)
    job_id = uuid.uuid4()
    try:
        events = await failover(bus, vm.vm_id, request_id=job_id, timeout=120)
    finally:
        await control.clear_faults()
    assert _types(events)[-3:] == ["RollbackStarted", "RollbackFailed", "JobFailed"], _types(events)
    manual = events[-2].model_dump(mode="json")["manual_actions"]
    root = vm.volume_ids[0]
    assert {(a["action"], a["resource_id"]) for a in manual} >= {("revert", root), ("reattach", root)}
    snapshots = {s["volumeid"]: s["id"] for s in (await control.state())["snapshots"] if s["volumeid"] in vm.volume_ids
                 and not s.get("destroyed")}
    assert set(snapshots) == set(vm.volume_ids)

    # by hand, as an operator: revertSnapshot, the Volume Daemon's attach, deleteSnapshot
    async with AIOCloudStack(emulators.cloudstack_url, emulators.api_key, emulators.secret_key,
                             fetch_result=False, timeout=10) as cs, aiohttp.ClientSession() as http:
        assert (await run_job(cs, "revertSnapshot", id=snapshots[root]))["jobstatus"] == 1
        attach = await http.post(f"{emulators.volume_daemon_url}/api/v1/volumes/{root}/attach",
                                 json={"vm_id": emulators.appliance_vm_id})
        assert attach.status == 201, await attach.text()

        async def attached() -> bool:
            now = await view(control, vm.volume_ids, emulators.appliance_vm_id)
            return now["holders"] == before["holders"]

        await wait_until(attached, 10, "the root back on the appliance")
        if snapshots_deleted:
            for snapshot in snapshots.values():
                assert (await run_job(cs, "deleteSnapshot", id=snapshot))["jobstatus"] == 1

    retry = RollbackRequested(request_id=uuid.uuid4(), job_id=job_id)
    more = await run_command(bus, retry, job_id)
    assert _types(more) == ["RollbackStarted", "RollbackCompleted", "JobFailed"], _types(more)
    assert more[-1].rolled_back is True
    by_hand = [e for e in more if e.type == "LogRecorded" and e.level == "WARN" and "restored by hand" in e.message]
    assert len(by_hand) == (1 if snapshots_deleted else 0)
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))


async def _run_cancelling(bus: BusClient, first: Any, job_id: uuid.UUID, on: tuple[str, str | None],
                          cancel_id: uuid.UUID | None = None) -> list[Event]:
    """The command `first` for job `job_id` (a FailoverRequested, a RollbackRequested), with a
    CancelRequested (`cancel_id`) published when the event `on` (type, step) arrives: the job's
    events from there to its end."""
    queue = await bus.bind(f"job.{job_id}.#")
    events: list[Event] = []
    try:
        await bus.publish(first)

        async def collect() -> None:
            async for event in bus.events(queue):
                events.append(event)
                if (event.type, getattr(event, "step", None)) == on:
                    await bus.publish(CancelRequested(request_id=cancel_id or uuid.uuid4(), job_id=job_id))

        await asyncio.wait_for(collect(), 120)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
    return events


def _test_failover(vm_id: str, job_id: uuid.UUID) -> FailoverRequested:
    return FailoverRequested(request_id=job_id, vm_id=vm_id, failover_type="test")


async def _slow_with_a_cancel(bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
                              name: str, refused: str, on: tuple[str, str | None], cancel_id: uuid.UUID | None = None,
                              ) -> tuple[uuid.UUID, SeededVm, dict[str, Any], list[Event]]:
    """A test failover of a new VM with every CloudStack `refused` command refused and each
    CloudStack job and daemon operation taking 0.3 s, cancelled at the event `on`: (job id,
    the VM, the world before, its events)."""
    vm = await _seed(db, control, emulators, name)
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    await control.add_fault(api="cloudstack", command=refused, kind="refuse", times=0)
    await control.set_latency(async_job_seconds=0.3, operation_seconds=0.3)
    job_id = uuid.uuid4()
    try:
        return job_id, vm, before, await _run_cancelling(bus, _test_failover(vm.vm_id, job_id), job_id, on, cancel_id)
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)


async def test_a_cancelled_jobs_retried_rollback_ends_failed_as_the_contract_says(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """A cancel, then a rollback that does not complete (JobFailed, rolled_back false); its
    RollbackRequested ends JobFailed with rolled_back true (CONTRACT), not JobCancelled."""
    job_id, vm, before, events = await _slow_with_a_cancel(
        bus, db, control, emulators, "cancel then stuck rollback", "deleteSnapshot", ("StepStarted", "vm-creation"))
    assert _types(events)[-3:] == ["RollbackStarted", "RollbackFailed", "JobFailed"], _types(events)
    started: Any = next(e for e in events if e.type == "RollbackStarted")
    assert started.reason == "cancel requested" and events[-1].rolled_back is False
    await control.clear_faults()
    # the retry, and a cancel once it has begun (each operation taking 0.3 s): taken, it changes
    # nothing (the job still ends JobFailed)
    await control.set_latency(async_job_seconds=0.3, operation_seconds=0.3)
    cancel_id = uuid.uuid4()
    try:
        more = await _run_cancelling(bus, RollbackRequested(request_id=uuid.uuid4(), job_id=job_id), job_id,
                                     ("RollbackStarted", None), cancel_id)
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
    assert _types(more) == ["RollbackStarted", "RollbackCompleted", "JobFailed"], _types(more)
    again: Any = next(e for e in more if e.type == "RollbackStarted")
    assert again.reason == "rollback requested" and more[-1].rolled_back is True
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
    row = await failover_row(db, str(job_id))
    assert row.status == "failed" and row.rolled_back and not row.cancel_requested
    async with db.connect() as conn:
        outcome = (await conn.execute(select(job_commands.c.outcome).where(
            job_commands.c.request_id == str(cancel_id)))).scalar_one()
    assert outcome == "signalled"  # taken while the rollback ran, not refused as ended


async def test_a_cancel_during_a_rollback_changes_nothing_and_the_failure_stands(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """The job failed at a step; a cancel that arrives while it rolls back is taken (the job
    still runs) but changes nothing (a rollback is not stopped): the job ends JobFailed naming
    the step, as it would have without the cancel."""
    cancel_id = uuid.uuid4()
    job_id, vm, before, events = await _slow_with_a_cancel(
        bus, db, control, emulators, "cancel during rollback", "startVirtualMachine", ("RollbackStarted", None),
        cancel_id)
    assert _types(events)[-3:] == ["RollbackStarted", "RollbackCompleted", "JobFailed"], _types(events)
    assert events[-1].failed_step == "vm-startup-validation" and events[-1].rolled_back is True
    row = await failover_row(db, str(job_id))
    assert row.status == "failed" and not row.cancel_requested
    async with db.connect() as conn:
        outcome, detail = (await conn.execute(select(job_commands.c.outcome, job_commands.c.detail).where(
            job_commands.c.request_id == str(cancel_id)))).one()
    # taken while the job was rolling back (not refused as ended), and left at that
    assert outcome == "signalled" and "rolling back already" in detail, (outcome, detail)
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))


async def test_cleanup_puts_everything_back_content_included(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await _seed(db, control, emulators, "cleanup me", disks=3)
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    job_id = uuid.uuid4()
    done = await failover(bus, vm.vm_id, request_id=job_id)
    assert done[-1].type == "JobCompleted"
    during = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    assert during["content"] != before["content"]  # injection and boot wrote to the volumes
    cleanup_id = uuid.uuid4()
    events = await run_command(bus, CleanupRequested(request_id=cleanup_id, failover_job_id=job_id), cleanup_id)
    check_stream(events, str(cleanup_id))
    assert events[0].job_type == "cleanup" and str(events[0].correlation_id) == str(job_id)
    assert [e.step for e in events if e.type == "StepCompleted"] == [
        "power-off", "volume-detachment", "vm-deletion", "snapshot-revert", "volume-reattachment",
        "snapshot-deletion"]
    assert events[-1].type == "JobCompleted"
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
    assert (await failover_row(db, str(job_id))).status == "cleaned_up"
    assert await _vm_status(db, vm.vm_id) == "ready_for_failover"
    # cleaned up: a second cleanup is refused, and a new failover is allowed
    again = uuid.uuid4()
    refused = await run_command(bus, CleanupRequested(request_id=again, failover_job_id=job_id), again)
    assert refused[0].type == "JobRejected" and refused[0].reason == "not_allowed"
    assert (await failover(bus, vm.vm_id))[-1].type == "JobCompleted"


async def test_cleanup_refusals(serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl,
                                emulators: EmulatorHandle) -> None:
    unknown = uuid.uuid4()
    events = await run_command(bus, CleanupRequested(request_id=unknown, failover_job_id=uuid.uuid4()), unknown)
    assert [(e.type, e.reason) for e in events] == [("JobRejected", "not_found")]
    vm = await _seed(db, control, emulators, "live one", live_network_id=emulators.network_id)
    live = await failover(bus, vm.vm_id, live=True)
    assert live[-1].type == "JobCompleted"
    rid = uuid.uuid4()
    events = await run_command(bus, CleanupRequested(request_id=rid, failover_job_id=live[0].job_id), rid)
    assert [(e.type, e.reason) for e in events] == [("JobRejected", "not_allowed")]
    assert "live failover" in events[0].detail


async def test_live_failover_is_permanent(serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl,
                                          emulators: EmulatorHandle) -> None:
    prod = emulators.network_id
    vm = await _seed(db, control, emulators, "Prod SQL 01", live_network_id=prod)
    job_id = uuid.uuid4()
    events = await failover(bus, vm.vm_id, live=True, request_id=job_id)
    assert events[0].job_type == "live-failover" and events[-1].type == "JobCompleted"
    outputs = events[-1].model_dump(mode="json")["outputs"]
    world = await control.state()
    new_vm = next(v for v in world["vms"] if v["id"] == outputs["destination_vm_id"])
    assert new_vm["name"] == sanitize_vm_name("Prod SQL 01") == "prod-sql-01"
    assert [n["networkid"] for n in new_vm["nic"]] == [prod]
    kept = (await view(control, vm.volume_ids, emulators.appliance_vm_id))["snapshots"]
    assert sorted(s["snapshot_id"] for s in outputs["snapshots"]) == kept and len(kept) == 2
    assert await _vm_status(db, vm.vm_id) == "failed_over_live"
    assert (await failover(bus, vm.vm_id, live=True))[0].reason == "conflict"


@pytest.mark.parametrize("after_step", ["pre-failover-validation", "cloudstack-snapshot", "virtio-driver-injection",
                                        "vm-creation", "volume-attachment", "vm-startup-validation"])
async def test_cancel_at_each_step_rolls_back(serve: ServeProcess, bus: BusClient, db: Any,
                                              control: EmulatorControl, emulators: EmulatorHandle,
                                              after_step: str) -> None:
    vm = await _seed(db, control, emulators, f"cancel after {after_step}")
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    # slow enough that the cancel arrives while the step is running
    await control.set_latency(async_job_seconds=0.4, operation_seconds=0.4, api_seconds=0.1)
    job_id = uuid.uuid4()
    events = await _run_cancelling(bus, _test_failover(vm.vm_id, job_id), job_id, ("StepStarted", after_step))
    await control.set_latency(async_job_seconds=0, operation_seconds=0, api_seconds=0)
    check_stream(events, str(job_id))
    assert events[-1].type == "JobCancelled" and events[-1].rolled_back is True
    completed = [e.step for e in events if e.type in ("StepCompleted", "StepSkipped")]
    started = [e.step for e in events if e.type == "StepStarted"]
    # it stops at the first safe point after the cancel is recorded: the end of the running
    # step (or, when the step finished before the cancel arrived, of the next one)
    nxt = FAILOVER_STEPS[min(FAILOVER_STEPS.index(after_step) + 1, len(FAILOVER_STEPS) - 1)]
    assert completed[-1] in (after_step, nxt)  # (after the last step: that step, the job's last safe point)
    assert started == completed  # nothing was left half-done
    assert "StepFailed" not in _types(events)
    assert "RollbackCompleted" in _types(events)
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
    row = await failover_row(db, str(job_id))
    assert row.status == "cancelled" and row.active_vm_id is None
    # cancelling an ended job is refused
    rid = uuid.uuid4()
    refused = await run_command(bus, CancelRequested(request_id=rid, job_id=job_id), rid)
    assert [(e.type, e.reason) for e in refused] == [("JobRejected", "not_allowed")]


def test_test_vm_names_stay_valid() -> None:
    name = test_vm_name(sanitize_vm_name("x" * 80), str(uuid.uuid4()))
    assert len(name) <= 63 and "-test-" in name


async def test_a_running_job_blocks_its_vm_and_cannot_be_cleaned_up(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await _seed(db, control, emulators, "busy vm")
    await control.set_latency(async_job_seconds=0.5, operation_seconds=0.5)
    job_id = uuid.uuid4()
    queue = await bus.bind(f"job.{job_id}.#")
    await bus.publish(FailoverRequested(request_id=job_id, vm_id=vm.vm_id, failover_type="test"))
    answers: dict[str, Event] = {}
    events: list[Event] = []

    async def collect() -> None:
        async for event in bus.events(queue):
            events.append(event)
            if event.type == "StepStarted" and event.step == "cloudstack-snapshot" and not answers:
                second = await failover(bus, vm.vm_id)  # a second failover of the same VM
                answers["failover"] = second[0]
                rid = uuid.uuid4()
                early = await run_command(bus, CleanupRequested(request_id=rid, failover_job_id=job_id), rid)
                answers["cleanup"] = early[0]

    await asyncio.wait_for(collect(), 120)
    await control.set_latency(async_job_seconds=0, operation_seconds=0)
    assert events[-1].type == "JobCompleted"  # the running job was not disturbed
    assert (answers["failover"].type, answers["failover"].reason) == ("JobRejected", "conflict")
    assert str(job_id) in answers["failover"].detail and "wait for it to end, or cancel it" in answers["failover"].detail
    assert (answers["cleanup"].type, answers["cleanup"].reason) == ("JobRejected", "not_allowed")
    assert "only a completed test failover" in answers["cleanup"].detail


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
async def test_a_live_failover_never_touches_another_vm_of_its_name(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        stopped: bool) -> None:
    """A live failover names its VM after the source VM alone (no job id in it): a VM of that
    name already in CloudStack (made by hand, or for another source VM whose name sanitises
    the same) is not the job's. The job fails in its validation, before it changes anything
    (no snapshot taken, no root written), saying so, and that VM and its disks are left as they
    were (its rollback had destroyed it, and a retried step would have taken it as the job's own)."""
    vm = await _seed(db, control, emulators, f"Bystander {int(stopped)}", live_network_id=emulators.network_id)
    name = sanitize_vm_name(f"Bystander {int(stopped)}")
    other = await control.create_vm(name, state="Stopped" if stopped else "Running")
    disk = await control.create_volume(f"{name}-data", 10, vm_id=other["id"])
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    events = await failover(bus, vm.vm_id, live=True, timeout=60)
    assert events[-1].type == "JobFailed", _types(events)
    failed = events[-1].model_dump(mode="json")
    assert failed["error"]["code"] == "VM_NAME_TAKEN" and other["id"] in failed["error"]["message"], failed
    assert failed["failed_step"] == "pre-failover-validation" and failed["rolled_back"] is True
    world = await control.state()
    kept = [v for v in world["vms"] if v["id"] == other["id"]]
    assert kept and kept[0]["state"] == ("Stopped" if stopped else "Running"), kept
    assert [v["id"] for v in world["vms"] if v["name"] == name] == [other["id"]]  # no second one either
    volumes = {v["id"]: v for v in world["volumes"]}
    assert disk["id"] in volumes and volumes[disk["id"]].get("virtualmachineid") == other["id"]
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
    assert await _vm_status(db, vm.vm_id) != "failed_over_live"


async def test_a_volume_daemon_restart_under_a_failover_is_waited_out(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """The Volume Daemon restarts while the job waits on one of its operations: the daemon no
    longer knows it (404), so its outcome is unknown. The job forgets it, reads the volume as it
    is and acts again, and completes (the step failed, and the job was rolled back, before)."""
    vm = await _seed(db, control, emulators, "daemon restart")
    await control.set_latency(operation_seconds=1.0)
    job_id = uuid.uuid4()
    queue = await bus.bind(f"job.{job_id}.#")
    await bus.publish(FailoverRequested(request_id=job_id, vm_id=vm.vm_id, failover_type="test"))
    events: list[Event] = []
    restarted: list[int] = []

    async def under_way() -> bool:
        ops = (await control.state())["operations"]
        return any(op["status"] in ("pending", "executing") for op in ops)

    async def collect() -> None:
        async for event in bus.events(queue):
            events.append(event)
            if event.type == "StepStarted" and event.step == "volume-attachment":
                await wait_until(under_way, 10, "a daemon operation under way", interval=0.02)
                restarted.append(await control.restart_volume_daemon())

    try:
        await asyncio.wait_for(collect(), 120)
    finally:
        await control.set_latency(operation_seconds=0)
    assert restarted and restarted[0] >= 1
    check_stream(events, str(job_id))
    assert events[-1].type == "JobCompleted", _types(events)
    assert "StepFailed" not in _types(events)
    world = await control.state()
    test_vm = events[-1].model_dump(mode="json")["outputs"]["destination_vm_id"]
    volumes = {v["id"]: v for v in world["volumes"]}
    assert all(volumes[v].get("virtualmachineid") == test_vm for v in vm.volume_ids), \
        [(v, volumes[v].get("virtualmachineid")) for v in vm.volume_ids]


async def test_a_cleanup_that_failed_after_deleting_a_snapshot_can_be_run_again(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """A cleanup reverts every volume, re-attaches them and deletes the snapshots last: one that
    failed deleting the second snapshot has reverted everything already. Another cleanup finds
    the first snapshot gone, leaves its volume as the first one reverted it, and finishes (it
    tried to revert to the deleted snapshot, was refused, and every cleanup after failed the
    same way: the VM stuck in failed_over_test)."""
    vm = await _seed(db, control, emulators, "cleanup twice", disks=2)
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    job_id = uuid.uuid4()
    assert (await failover(bus, vm.vm_id, request_id=job_id))[-1].type == "JobCompleted"
    await control.add_fault("cloudstack", "refuse", command="deleteSnapshot", nth=2, times=0)
    first = uuid.uuid4()
    events = await run_command(bus, CleanupRequested(request_id=first, failover_job_id=job_id), first)
    assert events[-1].type == "JobFailed" and events[-1].failed_step == "snapshot-deletion", _types(events)
    await control.clear_faults()
    assert len((await view(control, vm.volume_ids, emulators.appliance_vm_id))["snapshots"]) == 1
    second = uuid.uuid4()
    events = await run_command(bus, CleanupRequested(request_id=second, failover_job_id=job_id), second)
    check_stream(events, str(second))
    assert events[-1].type == "JobCompleted", _types(events)
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
    assert (await failover_row(db, str(job_id))).status == "cleaned_up"
    assert await _vm_status(db, vm.vm_id) == "ready_for_failover"


async def test_failovers_past_cloudstacks_api_limit_slow_down_and_all_complete(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """CloudStack's API throttling at 10 calls a second: three test failovers at once make far
    more, and CloudStack refuses the rest of each second's with 429. None fails for it: a
    refused call goes again once CloudStack's window has ended (it did nothing), and
    `failover_cloudstack_throttled_total` counts every refusal."""
    vms = [await _seed(db, control, emulators, f"Throttled {i}") for i in range(3)]
    before = await metric(serve, "failover_cloudstack_throttled_total")
    refused_before = (await control.set_api_limit(10, interval_seconds=1.0))["refused"]
    try:
        ended = await asyncio.gather(*(failover(bus, vm.vm_id, timeout=120) for vm in vms))
    finally:
        refused = (await control.set_api_limit(0))["refused"] - refused_before
    assert [events[-1].type for events in ended] == ["JobCompleted"] * 3, [_types(e) for e in ended]
    assert refused > 0
    assert await metric(serve, "failover_cloudstack_throttled_total") - before == refused
