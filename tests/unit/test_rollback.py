"""Failures, retries, cancels and rollbacks: a failed or cancelled failover leaves the world as
it found it (CONTRACT.md: no test VM, no snapshot, every replicated volume back on the
appliance in its original relative order with its pre-failover content)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import pytest
from transitions.extensions.asyncio import AsyncMachine

from schemas.common import FAILOVER_STEPS
from statemachine.engine import drive
from statemachine.ports import Commit, JobRow
from tests.fakes import FakeJobStore, FaultKind, Harness, at_commit, cancel_when, has_event

from .helpers import (
    appliance_order,
    assert_failed_over,
    assert_restored,
    assert_stream_ok,
    last,
    of_type,
)


@dataclass(frozen=True)
class Failure:
    """A fault programmed on one call, and the step it must fail."""

    op: str
    step: str
    kind: FaultKind = "refused"
    nth: int = 1
    times: int | None = 1
    after: str | None = None  # arm the fault only once this operation has been called

    def program(self, h: Harness) -> None:
        if self.after:
            h.faults.arm_after(self.after, self.op, self.kind, times=self.times)
        else:
            h.faults.add(self.op, self.kind, nth=self.nth, times=self.times)

    def __str__(self) -> str:
        return f"{self.op}#{self.nth}{'-after-' + self.after if self.after else ''}-{self.kind}"


# get-volume: each validation looks every volume up once, then the injection looks the root up
FAILURES = [
    Failure("createSnapshot", "cloudstack-snapshot", nth=2),  # one snapshot exists already
    Failure("createSnapshot", "cloudstack-snapshot", nth=3),
    # (a refused queryAsyncJobResult is a job CloudStack no longer knows, not a failure:
    # test_an_async_job_cloudstack_no_longer_knows_is_looked_at_through_its_resource)
    Failure("get-volume", "virtio-driver-injection", nth=4),  # the device path lookup
    Failure("inject", "virtio-driver-injection"),  # refused before it ran
    Failure("inject", "virtio-driver-injection", "job_fail"),  # it wrote, then failed
    Failure("deployVirtualMachine", "vm-creation"),
    Failure("listZones", "vm-creation"),
    Failure("listVolumes", "volume-attachment"),
    Failure("detach", "volume-attachment", nth=1),  # the template's root disk
    Failure("deleteVolume", "volume-attachment"),  # the template's root disk, detached already
    Failure("detach", "volume-attachment", nth=3),  # the second replicated volume
    Failure("attach-root", "volume-attachment"),
    Failure("attach", "volume-attachment", nth=2),  # the root is on the VM, one data disk too
    Failure("startVirtualMachine", "vm-startup-validation"),
    Failure("startVirtualMachine", "vm-startup-validation", "job_fail", times=None),  # every attempt
    Failure("listVirtualMachines", "vm-startup-validation", after="startVirtualMachine"),  # it booted
]


@pytest.mark.parametrize("failure", FAILURES, ids=str)
@pytest.mark.parametrize("gap", [False, True], ids=["packed", "interleaved"])
async def test_a_failure_rolls_everything_back(
    h: Harness, machine: AsyncMachine, failure: Failure, gap: bool
) -> None:
    vm = h.seed_vm("WIN-APP", os_type="Windows Server 2016", disks=3, gap=gap)
    before = h.world.observable()
    order = appliance_order(h, vm)
    failure.program(h)
    ctx = h.new_job(vm, "test-failover")

    assert await drive(machine, ctx) == "failed"

    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    step_failed = last(events, "StepFailed")
    assert step_failed.step == failure.step
    if failure.kind == "refused":
        assert step_failed.attempts == 1
    kinds = [e.type for e in events if e.type != "LogRecorded"]
    assert kinds[-4:] == ["StepFailed", "RollbackStarted", "RollbackCompleted", "JobFailed"]
    started = [e.step for e in of_type(events, "StepStarted")]
    assert started == list(FAILOVER_STEPS[: FAILOVER_STEPS.index(failure.step) + 1])
    end = last(events, "JobFailed")
    assert end.rolled_back is True and end.failed_step == failure.step
    assert end.error.code == step_failed.error.code
    assert last(events, "RollbackStarted").reason.startswith(f"step {failure.step} failed")
    assert_restored(h, before, vm)
    assert appliance_order(h, vm) == order
    row = h.store.row(ctx.row.job_id)
    assert row.status == "failed" and h.store.columns[ctx.row.job_id]["rolled_back"] is True


@pytest.mark.parametrize(
    "failure",
    [
        Failure("listVolumes", "volume-attachment"),  # before the deploy's disks are given up
        Failure("deleteVolume", "volume-attachment", nth=2),  # the ROOT is deleted, the DATA disk detached
        Failure("detach", "volume-attachment"),  # the ROOT's detach refused: the DATA disk is still the deploy's
        Failure("attach", "volume-attachment"),
    ],
    ids=str,
)
async def test_the_deploys_own_disks_are_removed_by_the_rollback(machine: AsyncMachine, failure: Failure) -> None:
    """With FAILOVER_DISK_OFFERING_ID the deploy makes a data disk too: destroying the VM would
    only detach it (CloudStack keeps data disks), so the rollback must delete it."""
    h = Harness(disk_offering=True)
    vm = h.seed_vm("WIN-OFFER", os_type="Linux", disks=2)
    before = h.world.observable()
    failure.program(h)
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    assert last(h.events(ctx.row.job_id), "JobFailed").rolled_back is True
    assert_restored(h, before, vm)


async def test_written_volumes_are_reverted(h: Harness, machine: AsyncMachine) -> None:
    """The VM booted (writing every volume) and the injection wrote the root: all reverted."""
    vm = h.seed_vm("WIN-BOOT", os_type="Windows", disks=2)
    original = {v: h.world.volumes[v].content for v in vm.volume_ids}
    h.faults.arm_after("startVirtualMachine", "listVirtualMachines")
    ctx = h.new_job(vm, "test-failover")

    assert await drive(machine, ctx) == "failed"

    assert h.cloudstack.count("revertSnapshot") == 2
    assert {v: h.world.volumes[v].content for v in vm.volume_ids} == original
    actions = last(h.events(ctx.row.job_id), "RollbackCompleted").actions
    assert [a.action for a in actions] == ["stop", "detach", "detach", "destroy", "revert", "revert",
                                           "reattach", "reattach", "delete", "delete"]
    planned = last(h.events(ctx.row.job_id), "RollbackStarted").actions
    assert {a.action for a in planned} >= {"stop", "detach", "destroy", "revert", "reattach", "delete"}


async def test_the_replicated_root_never_dies_with_the_vm(h: Harness, machine: AsyncMachine) -> None:
    """Guarantee 5: the rollback detaches the replica (a ROOT of the test VM) before destroying."""
    vm = h.seed_vm("WIN-ROOT", os_type="Windows", disks=2)
    h.faults.add("attach", "refused")  # after attach-root made the replica the VM's ROOT
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    assert not any(h.world.volumes[v].destroyed for v in vm.volume_ids)
    assert h.world.volumes[vm.root_volume_id].type == "DATADISK"
    destroys = [i for i, (op, _) in enumerate(h.cloudstack.calls) if op == "destroyVirtualMachine"]
    assert len(destroys) == 1
    assert h.volumes.count("detach") >= 3  # template root, 2 replicas off the appliance, root off the VM


# --------------------------------------------------------------------------- transient failures


@pytest.mark.parametrize(
    "failure",
    [
        Failure("createSnapshot", "cloudstack-snapshot", "transient"),
        Failure("queryAsyncJobResult", "cloudstack-snapshot", "transient"),
        Failure("get-volume", "pre-failover-validation", "transient"),
        Failure("get-volume", "virtio-driver-injection", "transient", nth=3),
        Failure("listZones", "vm-creation", "transient"),
        Failure("deployVirtualMachine", "vm-creation", "transient"),
        Failure("deployVirtualMachine", "vm-creation", "job_fail"),  # leaves a VM in Error
        Failure("listVolumes", "volume-attachment", "transient"),
        Failure("detach", "volume-attachment", "transient", nth=2),
        Failure("detach", "volume-attachment", "job_fail", nth=2),  # the operation fails
        Failure("attach-root", "volume-attachment", "job_fail"),
        Failure("attach", "volume-attachment", "transient"),
        Failure("get-operation", "volume-attachment", "transient"),
        Failure("deleteVolume", "volume-attachment", "transient"),
        Failure("startVirtualMachine", "vm-startup-validation", "transient"),
        Failure("startVirtualMachine", "vm-startup-validation", "job_fail"),
    ],
    ids=str,
)
async def test_a_transient_failure_once_is_retried(h: Harness, machine: AsyncMachine, failure: Failure) -> None:
    vm = h.seed_vm("WIN-RETRY", os_type="Windows", disks=2)
    failure.program(h)
    ctx = h.new_job(vm, "test-failover")

    assert await drive(machine, ctx) == "completed"

    assert h.faults.rules[0].fired == 1
    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    assert of_type(events, "StepFailed") == []
    warns = [e for e in of_type(events, "LogRecorded") if e.level == "WARN"]
    assert any("retrying" in w.message for w in warns)
    assert_failed_over(h, vm, last(events, "JobCompleted").outputs["destination_vm_id"])


@pytest.mark.parametrize(("nth", "waiting"), [(1, "snapshot of volume"), (2, "deploy VM"), (3, "start VM")],
                         ids=["snapshot", "deploy", "start"])
async def test_an_async_job_cloudstack_no_longer_knows_is_looked_at_through_its_resource(
        h: Harness, machine: AsyncMachine, nth: int, waiting: str) -> None:
    """CloudStack answers 431 for a job it has purged (ended jobs go after job.expire.minutes):
    the job's outcome is unknown, not failed. The wait forgets it and the retry looks at the
    snapshot or the VM itself, and the job completes (the step failed before)."""
    vm = h.seed_vm("LNX-PURGED", os_type="Linux", disks=1)
    h.faults.add("queryAsyncJobResult", "refused", nth=nth)
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    assert h.faults.rules[0].fired == 1
    events = h.events(ctx.row.job_id)
    assert of_type(events, "StepFailed") == []
    assert any(e.level == "WARN" and e.message.startswith(waiting) and "retrying" in e.message
               for e in of_type(events, "LogRecorded"))
    assert_failed_over(h, vm, last(events, "JobCompleted").outputs["destination_vm_id"])


async def test_a_failed_snapshot_job_is_retried_and_the_failed_one_left_for_cleanup(
    h: Harness, machine: AsyncMachine
) -> None:
    """CloudStack keeps a snapshot whose job failed (state Error); the retry takes a new one,
    the ledger remembers the failed one."""
    vm = h.seed_vm("WIN-SNAPFAIL", os_type="Linux", disks=2)
    h.faults.add("createSnapshot", "job_fail")
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    backed = [s for s in h.world.live_snapshots() if s.state == "BackedUp"]
    assert sorted(s.volume_id for s in backed) == sorted(vm.volume_ids)
    failed = [s for s in h.world.live_snapshots() if s.state == "Error"]
    assert len(failed) == 1
    entry = h.store.ledger_now(ctx.row.job_id)[f"snapshot:{failed[0].volume_id}"]
    assert failed[0].id in entry.data.get("failed_ids", [])


async def test_a_failed_deploys_vm_whose_destroy_was_not_seen_to_end_is_not_destroyed_twice(
        h: Harness, machine: AsyncMachine) -> None:
    """A deploy's job failed (its VM left in Error); the retry destroys that VM, and its wait on
    the destroy fails (CloudStack did not answer) while the destroy runs: the next try waits on
    the same destroy job rather than destroying again (CloudStack would run a second destroy
    after the first, and fail it: the VM is gone), and the failover completes."""
    vm = h.seed_vm("LNX-DEPLOYFAIL", os_type="Linux", disks=1)
    h.faults.add("deployVirtualMachine", "job_fail")
    h.faults.add("destroyVirtualMachine", "job_late")
    h.faults.arm_after("destroyVirtualMachine", "queryAsyncJobResult", "transient")
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    assert h.cloudstack.count("destroyVirtualMachine") == 1
    assert [vm.state for vm in h.world.live_vms() if vm.state == "Error"] == []
    events = h.events(ctx.row.job_id)
    assert any(e.level == "WARN" and "left in state Error by a failed deploy" in e.message
               for e in of_type(events, "LogRecorded"))
    assert_failed_over(h, vm, last(events, "JobCompleted").outputs["destination_vm_id"])


@pytest.mark.parametrize(("fault", "all_reverted"), [("job_fail", False), ("refused", False), ("transient", True)],
                         ids=["start-jobs-failed", "start-refused", "start-unanswered"])
async def test_a_start_that_never_ran_has_only_the_injected_root_reverted(
        h: Harness, machine: AsyncMachine, fault: FaultKind, all_reverted: bool) -> None:
    """A live failover whose start CloudStack refused, or whose start jobs all failed (no host
    with capacity, say): the VM never ran, so its rollback reverts the root the injection wrote
    and leaves the data disks as they were (on storage that cannot revert, one disk to re-sync
    rather than every one). A start that went unanswered may have run: every disk is reverted."""
    vm = h.seed_vm("WIN-NOHOST", os_type="Windows Server 2019", disks=3)  # (the injection writes its root)
    before = h.world.observable()
    h.faults.add("startVirtualMachine", fault, times=None)
    ctx = h.new_job(vm, "live-failover")
    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    assert last(events, "StepFailed").step == "vm-startup-validation"
    assert last(events, "JobFailed").rolled_back is True
    snapshots = {s.id: s.volume_id for s in h.world.snapshots.values()}
    reverted = [snapshots[p["id"]] for op, p in h.cloudstack.calls if op == "revertSnapshot"]
    assert reverted == (vm.volume_ids if all_reverted else vm.volume_ids[:1])
    assert_restored(h, before, vm)


async def test_a_vm_found_running_though_every_start_failed_has_every_volume_reverted(
        h: Harness, machine: AsyncMachine) -> None:
    """CloudStack can fail a start's job after the hypervisor booted the VM: the rollback finds
    it running, takes it as having run, and reverts every volume (not only the injected root)."""
    vm = h.seed_vm("WIN-BOOTED", os_type="Windows Server 2019", disks=3)
    before = h.world.observable()
    h.faults.add("startVirtualMachine", "job_fail", times=None)

    def boots_anyway(store: FakeJobStore, job: JobRow, commit: Commit) -> None:
        if any(e.type == "StepFailed" for e in commit.with_tail().events):
            [made] = [v for v in h.world.vms.values() if v.name.startswith("win-booted")]
            made.state = "Running"

    h.store.hooks.append(boots_anyway)
    ctx = h.new_job(vm, "live-failover")
    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    assert last(events, "JobFailed").rolled_back is True
    assert any(e.level == "WARN" and "though every start of it failed" in e.message
               for e in of_type(events, "LogRecorded"))
    snapshots = {s.id: s.volume_id for s in h.world.snapshots.values()}
    assert [snapshots[p["id"]] for op, p in h.cloudstack.calls if op == "revertSnapshot"] == vm.volume_ids
    assert_restored(h, before, vm)


async def test_a_persistent_transient_failure_exhausts_the_retries(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("WIN-DOWN", os_type="Windows", disks=2)
    before = h.world.observable()
    h.faults.add("deployVirtualMachine", "transient", times=None)
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    assert h.cloudstack.count("deployVirtualMachine") == h.config.retry_attempts
    failed = last(h.events(ctx.row.job_id), "StepFailed")
    assert (failed.step, failed.error.code, failed.attempts) == ("vm-creation", "CLOUDSTACK_ERROR", 3)
    assert_restored(h, before, vm)


async def test_step_failed_attempts_counts_the_real_attempts(h: Harness, machine: AsyncMachine) -> None:
    """The injection is not retried: a transient error from it is one attempt, not retry_attempts."""
    vm = h.seed_vm("WIN-INJ", os_type="Windows", disks=1)
    h.faults.add("inject", "transient")
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    assert len(h.injection.calls) == 1
    assert last(h.events(ctx.row.job_id), "StepFailed").attempts == 1


# --------------------------------------------------------------------------- snapshots that cannot be reverted


async def test_a_non_revertable_snapshot_stops_a_test_failover_before_injection(
    h: Harness, machine: AsyncMachine
) -> None:
    vm = h.seed_vm("WIN-NOREVERT", os_type="Windows", disks=2, revertable=False)
    before = h.world.observable()
    ctx = h.new_job(vm, "test-failover")

    assert await drive(machine, ctx) == "failed"

    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    end = last(events, "JobFailed")
    assert (end.failed_step, end.error.code, end.rolled_back) == (
        "cloudstack-snapshot", "SNAPSHOT_NOT_REVERTABLE", True)
    assert h.injection.calls == []
    assert "virtio-driver-injection" not in [e.step for e in of_type(events, "StepStarted")]
    assert h.cloudstack.count("revertSnapshot") == 0
    assert h.cloudstack.count("deleteSnapshot") == 2
    assert_restored(h, before, vm)


async def test_a_non_revertable_snapshot_is_fine_for_a_live_failover(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("WIN-LIVE", os_type="Windows", disks=2, revertable=False)
    ctx = h.new_job(vm, "live-failover")
    assert await drive(machine, ctx) == "completed"
    assert len(h.injection.calls) == 1


async def test_a_live_failover_on_storage_that_cannot_revert_says_what_can_be_done_and_finishes_after_it(
        h: Harness, machine: AsyncMachine) -> None:
    """A live failover on storage whose snapshots CloudStack cannot revert fails after the
    driver injection wrote its root volume. The rollback does not ask CloudStack for a revert
    it refuses: it fails SNAPSHOT_NOT_REVERTABLE, the volume left detached (replication must
    not write onto it as it is), and `manual_actions` says how to restore it another way.
    Once the operator did, the retried rollback completes."""
    vm = h.seed_vm("WIN-NOREVERT", os_type="Windows", disks=2, revertable=False)
    before = h.world.observable()
    h.faults.add("deployVirtualMachine", "refused")
    ctx = h.new_job(vm, "live-failover")
    job_id = ctx.row.job_id
    assert await drive(machine, ctx) == "failed"
    assert len(h.injection.calls) == 1  # the root was written
    rb = last(h.events(job_id), "RollbackFailed")
    assert rb.error.code == "SNAPSHOT_NOT_REVERTABLE" and "re-sync the replication" in rb.error.message
    assert h.cloudstack.count("revertSnapshot") == 0
    root = vm.volume_ids[0]
    [revert] = [a for a in rb.manual_actions if a.action == "revert"]
    assert revert.resource_id == root and "not revertable" in (revert.detail or "")
    assert h.world.volumes[root].vm_id is None and not h.world.volumes[root].destroyed

    # by hand: the root's content restored from its snapshot, the volume back on the appliance,
    # the snapshot deleted
    snapshot = next(s for s in h.world.live_snapshots() if s.volume_id == root)
    volume = h.world.volumes[root]
    volume.content = snapshot.content
    volume.vm_id, volume.device_id = h.world.appliance.id, before["volumes"][root][2]
    snapshot.destroyed = True
    h.store.request_rollback(job_id)
    assert await drive(machine, await h.resume_context(job_id)) == "failed"
    assert [e.type for e in h.events(job_id) if e.type != "LogRecorded"][-2:] == ["RollbackCompleted", "JobFailed"]
    assert_restored(h, before, vm)


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("step", FAILOVER_STEPS[:-1])
async def test_cancel_stops_after_the_running_step_and_rolls_back(
    h: Harness, machine: AsyncMachine, step: str
) -> None:
    vm = h.seed_vm("WIN-CANCEL", os_type="Windows", disks=3, gap=True)
    before = h.world.observable()
    h.store.hooks.append(cancel_when(has_event("StepStarted", step=step)))
    ctx = h.new_job(vm, "test-failover")

    assert await drive(machine, ctx) == "cancelled"

    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    index = FAILOVER_STEPS.index(step)
    assert [e.step for e in of_type(events, "StepStarted")] == list(FAILOVER_STEPS[: index + 1])
    finished = [e.step for e in events if e.type in ("StepCompleted", "StepSkipped")]
    assert finished == list(FAILOVER_STEPS[: index + 1])  # the step ran to its end: a safe point
    kinds = [e.type for e in events if e.type != "LogRecorded"]
    assert kinds[-3:] == ["RollbackStarted", "RollbackCompleted", "JobCancelled"]
    assert last(events, "RollbackStarted").reason == "cancel requested"
    assert last(events, "JobCancelled").rolled_back is True
    assert of_type(events, "JobFailed") == []
    assert any(e.level == "WARN" and "cancel" in e.message for e in of_type(events, "LogRecorded"))
    assert_restored(h, before, vm)
    assert h.store.row(ctx.row.job_id).status == "cancelled"


@pytest.mark.parametrize("job_type", ["test-failover", "live-failover"])
async def test_cancel_during_the_last_step_rolls_back(h: Harness, machine: AsyncMachine, job_type: str) -> None:
    """The last step's end is the job's last safe point: a cancel accepted while that step ran
    (the consumer answered it as a running job's) rolls the job back as after any other step,
    where it used to be ignored and the job completed (a live failover then for good)."""
    vm = h.seed_vm("WIN-LATE", os_type="Windows", disks=2)
    before = h.world.observable()
    h.store.hooks.append(cancel_when(has_event("StepStarted", step=FAILOVER_STEPS[-1])))
    ctx = h.new_job(vm, job_type)
    assert await drive(machine, ctx) == "cancelled"
    events = h.events(ctx.row.job_id)
    assert [e.step for e in of_type(events, "StepCompleted")][-1] == FAILOVER_STEPS[-1]
    assert last(events, "RollbackStarted").reason == "cancel requested"
    assert last(events, "JobCancelled").rolled_back is True and of_type(events, "JobCompleted") == []
    assert_restored(h, before, vm)


# --------------------------------------------------------------------------- a rollback that fails, and its retry


async def test_a_failed_rollback_lists_manual_actions_and_can_be_retried(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("WIN-STUCK", os_type="Windows", disks=2)
    before = h.world.observable()
    h.faults.add("startVirtualMachine", "transient", times=None)  # unanswered: the VM may have run
    h.faults.add("revertSnapshot", "refused", times=None)
    ctx = h.new_job(vm, "test-failover")
    job_id = ctx.row.job_id

    assert await drive(machine, ctx) == "failed"

    events = h.events(job_id)
    assert_stream_ok(events)
    kinds = [e.type for e in events if e.type != "LogRecorded"]
    assert kinds[-4:] == ["StepFailed", "RollbackStarted", "RollbackFailed", "JobFailed"]
    rb = last(events, "RollbackFailed")
    assert rb.error.code == "CLOUDSTACK_REFUSED"
    snapshots = {s.volume_id: s.id for s in h.world.live_snapshots()}
    manual = {(a.action, a.resource_type, a.resource_id) for a in rb.manual_actions}
    for v in vm.volume_ids:  # the real CloudStack ids, all of them
        assert ("revert", "volume", v) in manual
        assert ("reattach", "volume", v) in manual
        assert ("delete", "snapshot", snapshots[v]) in manual
    assert not any(a.action == "destroy" for a in rb.manual_actions)  # the VM is gone already
    end = last(events, "JobFailed")
    assert (end.rolled_back, end.failed_step) == (False, "vm-startup-validation")
    assert h.store.columns[job_id]["rolled_back"] is False
    assert not any(h.world.volumes[v].destroyed for v in vm.volume_ids)

    # RollbackRequested: the command recorder flags the row, a process drives it again
    h.faults.clear()
    h.store.request_rollback(job_id)
    retry = await h.resume_context(job_id)
    assert await drive(machine, retry) == "failed"

    events = h.events(job_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    kinds = [e.type for e in events if e.type != "LogRecorded"]
    assert kinds[-3:] == ["RollbackStarted", "RollbackCompleted", "JobFailed"]
    end = last(events, "JobFailed")
    assert (end.rolled_back, end.failed_step, end.error.code) == (True, "vm-startup-validation", "CLOUDSTACK_ERROR")
    assert_restored(h, before, vm)
    row = h.store.row(job_id)
    assert row.status == "failed" and row.rollback_requested is False


async def test_a_rollback_whose_destroy_job_was_denied_destroys_anew_when_retried(
        h: Harness, machine: AsyncMachine) -> None:
    """The VM's destroy job fails for the account's rights (531 in its result: a refusal, not
    tried again). Once the operator gave the account access, the retried rollback destroys the
    VM with a new job, not by waiting on the failed one again (it would fail again until
    CloudStack purged it, a day later)."""
    vm = h.seed_vm("LNX-DENIED", os_type="Linux", disks=1)
    before = h.world.observable()
    h.faults.add("startVirtualMachine", "refused")
    h.faults.add("destroyVirtualMachine", "job_denied")
    ctx = h.new_job(vm, "test-failover")
    job_id = ctx.row.job_id
    assert await drive(machine, ctx) == "failed"
    rb = last(h.events(job_id), "RollbackFailed")
    assert rb.error.code == "CLOUDSTACK_PERMISSION_DENIED"
    assert h.cloudstack.count("destroyVirtualMachine") == 1  # a refusal: not tried again

    h.faults.clear()  # the account was given access
    h.store.request_rollback(job_id)
    assert await drive(machine, await h.resume_context(job_id)) == "failed"
    assert [e.type for e in h.events(job_id) if e.type != "LogRecorded"][-2:] == ["RollbackCompleted", "JobFailed"]
    assert h.cloudstack.count("destroyVirtualMachine") == 2
    assert_restored(h, before, vm)


@pytest.mark.parametrize("command", ["revertSnapshot", "deleteSnapshot"])
async def test_a_rollback_whose_wait_on_a_revert_or_delete_failed_waits_on_the_same_job_again(
        h: Harness, machine: AsyncMachine, command: str) -> None:
    """CloudStack does not answer one poll of the rollback's revert (or snapshot delete) job:
    the retry waits on that job again, not a second revert beside it (CloudStack refuses a
    revert while one runs: the volume is not Ready) or a second delete of a snapshot being
    destroyed. The rollback completes with one call per volume."""
    vm = h.seed_vm("WIN-POLLFAIL", os_type="Windows", disks=2)
    before = h.world.observable()
    h.faults.add("startVirtualMachine", "refused")
    h.faults.arm_after(command, "queryAsyncJobResult", "transient")
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    assert last(events, "JobFailed").rolled_back is True
    assert any(e.level == "WARN" and "retrying" in e.message and "CLOUDSTACK_ERROR" in str(e.fields)
               for e in of_type(events, "LogRecorded"))  # the poll did fail
    snapshots = [p["id"] for op, p in h.cloudstack.calls if op == command]
    assert snapshots and len(snapshots) == len(set(snapshots)), snapshots  # one call per snapshot
    assert_restored(h, before, vm)


@pytest.mark.parametrize("snapshots_deleted", [True, False], ids=["snapshots-deleted", "snapshots-kept"])
@pytest.mark.parametrize("failing", ["startVirtualMachine", "deployVirtualMachine"],
                         ids=["after-the-start: every volume", "after-the-injection: the root, predetached"])
@pytest.mark.parametrize("revert", ["refused", "job_fail"], ids=["revert-refused", "revert-job-failed"])
async def test_a_rollback_retried_after_its_manual_actions_were_done_by_hand_completes(
        h: Harness, machine: AsyncMachine, snapshots_deleted: bool, failing: str, revert: FaultKind) -> None:
    """The rollback failed at the revert (after detaching the written volumes for it). The
    operator does what `manual_actions` says (each volume reverted, back on the appliance, its
    snapshot deleted or not), then retries the rollback, as the README says: it completes,
    taking a volume whose snapshot is gone as restored by hand, and detaching again one it had
    detached before (it trusted that detach and failed the revert again)."""
    vm = h.seed_vm("WIN-BYHAND", os_type="Windows", disks=2)
    before = h.world.observable()
    # (a start unanswered, every try, may have run the VM: every volume is to revert)
    h.faults.add(failing, "transient" if failing == "startVirtualMachine" else "refused", times=None)
    h.faults.add("revertSnapshot", revert, times=None)
    ctx = h.new_job(vm, "test-failover")
    job_id = ctx.row.job_id
    assert await drive(machine, ctx) == "failed"
    manual = last(h.events(job_id), "RollbackFailed").manual_actions
    written = [a.resource_id for a in manual if a.action == "revert"]
    assert written == (vm.volume_ids if failing == "startVirtualMachine" else vm.volume_ids[:1])
    assert all(h.world.volumes[v].vm_id is None for v in written)  # detached for the revert

    # by hand: revert each while detached, attach it back to the appliance where it was, then
    # delete the snapshots (or not)
    snapshots = {s.volume_id: s for s in h.world.live_snapshots()}
    for v in written:
        assert ("reattach", "volume", v) in {(a.action, a.resource_type, a.resource_id) for a in manual}
        volume = h.world.volumes[v]
        volume.content = snapshots[v].content
        volume.vm_id, volume.device_id = h.world.appliance.id, before["volumes"][v][2]
    for snap in snapshots.values():
        snap.destroyed = snapshots_deleted  # (kept: the retry reverts again, then deletes them)

    h.faults.clear()
    h.store.request_rollback(job_id)
    assert await drive(machine, await h.resume_context(job_id)) == "failed"
    events = h.events(job_id)
    assert [e.type for e in events if e.type != "LogRecorded"][-2:] == ["RollbackCompleted", "JobFailed"]
    by_hand = [e for e in of_type(events, "LogRecorded") if e.level == "WARN" and "restored by hand" in e.message]
    assert len(by_hand) == (len(written) if snapshots_deleted else 0)
    assert_restored(h, before, vm)


async def test_a_wait_past_its_timeout_ends_a_failovers_step_but_not_a_rollback(
        h: Harness, machine: AsyncMachine) -> None:
    """A deploy job past FAILOVER_ASYNC_JOB_TIMEOUT_SECONDS fails its step at once (waiting
    again would stretch the operator's timeout by the attempts); the rollback's revert past it
    is waited on again, the same job, and the rollback completes (undoing is worth the wait)."""
    vm = h.seed_vm("WIN-SLOW", os_type="Windows", disks=2)
    before = h.world.observable()
    h.faults.add("deployVirtualMachine", "job_slow")
    h.faults.add("revertSnapshot", "job_slow")
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    failed = last(events, "StepFailed")
    assert (failed.step, failed.error.code, failed.attempts) == ("vm-creation", "CLOUDSTACK_JOB_TIMEOUT", 1)
    assert h.cloudstack.count("deployVirtualMachine") == 1
    assert [e.type for e in events if e.type != "LogRecorded"][-2:] == ["RollbackCompleted", "JobFailed"]
    assert any(e.level == "WARN" and e.message.startswith("revert") and "CLOUDSTACK_JOB_TIMEOUT" in str(e.fields)
               for e in of_type(events, "LogRecorded"))
    snapshots = [p["id"] for op, p in h.cloudstack.calls if op == "revertSnapshot"]
    assert len(snapshots) == len(set(snapshots))  # the same job waited on again, not a second revert
    assert_restored(h, before, vm)


async def test_a_failed_rollback_leaves_the_replicas_intact(h: Harness, machine: AsyncMachine) -> None:
    """The VM cannot be destroyed: the replicas were detached from it first, so none is lost."""
    vm = h.seed_vm("WIN-NODESTROY", os_type="Linux", disks=2)
    h.faults.add("startVirtualMachine", "refused")
    h.faults.add("destroyVirtualMachine", "refused", times=None)
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    rb = last(h.events(ctx.row.job_id), "RollbackFailed")
    vm_cs_id = h.store.ledger_now(ctx.row.job_id)["vm"].resource_id
    assert ("destroy", "vm", vm_cs_id) in {(a.action, a.resource_type, a.resource_id) for a in rb.manual_actions}
    assert not any(h.world.volumes[v].destroyed for v in vm.volume_ids)
    assert all(h.world.volumes[v].vm_id is None for v in vm.volume_ids)


def _stuck_snapshot_job(h: Harness) -> str:
    [job] = [j for j in h.world.jobs.values() if j.stuck and j.command == "createSnapshot"]
    return job.id


async def test_a_snapshot_still_being_taken_is_deleted_once_its_job_ends(h: Harness, machine: AsyncMachine) -> None:
    """A snapshot whose wait timed out is still being taken (BackingUp: the copy to secondary
    storage) when the rollback comes to delete it, and CloudStack fails a delete then: the
    rollback waits for the snapshot's job to end and deletes it once, and the world is as
    before."""
    vm = h.seed_vm("LNX-SLOWSNAP", os_type="Linux", disks=2)
    before = h.world.observable()
    h.faults.add("createSnapshot", "job_stuck", nth=2)

    h.store.hooks.append(at_commit(has_event("RollbackStarted"), lambda: asyncio.get_running_loop().call_later(
        0.3, h.world.finish, _stuck_snapshot_job(h))))
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    assert last(events, "StepFailed").error.code == "CLOUDSTACK_JOB_TIMEOUT"
    assert last(events, "JobFailed").rolled_back is True
    assert h.world.live_snapshots() == []
    assert h.cloudstack.count("deleteSnapshot") == 2  # each once: none while its snapshot was being taken
    assert_restored(h, before, vm)


async def test_a_snapshot_never_finished_fails_the_rollback_saying_so(h: Harness, machine: AsyncMachine) -> None:
    """The snapshot's job never ends: the rollback waits FAILOVER_SNAPSHOT_TIMEOUT_SECONDS for it,
    then fails naming it (a delete now would fail), and lists its deletion as a manual action."""
    vm = h.seed_vm("LNX-STUCKSNAP", os_type="Linux", disks=1)
    h.config = dataclasses.replace(h.config, snapshot_timeout=0.4)
    h.faults.add("createSnapshot", "job_stuck")
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    rb = last(h.events(ctx.row.job_id), "RollbackFailed")
    [snapshot] = h.world.live_snapshots()
    assert snapshot.state == "BackingUp"
    assert rb.error.code == "SNAPSHOT_STILL_CREATING"
    assert snapshot.id in rb.error.message and "FAILOVER_SNAPSHOT_TIMEOUT_SECONDS" in rb.error.message
    assert ("delete", "snapshot", snapshot.id) in {(a.action, a.resource_type, a.resource_id)
                                                   for a in rb.manual_actions}
    assert h.cloudstack.count("deleteSnapshot") == 0


async def test_a_snapshot_left_allocated_by_a_failed_job_is_deleted_without_waiting(
        h: Harness, machine: AsyncMachine) -> None:
    """CloudStack can fail a snapshot's job before it began taking it (the volume not Ready,
    say), leaving the snapshot Allocated; its delete removes such a snapshot. The rollback
    deletes it at once, not after waiting for a job that has ended."""
    vm = h.seed_vm("LNX-ALLOCATED", os_type="Linux", disks=2)
    before = h.world.observable()
    h.config = dataclasses.replace(h.config, snapshot_timeout=2)
    h.faults.add("createSnapshot", "job_fail", nth=2, times=None)

    def left_allocated() -> None:
        for snap in h.world.live_snapshots():
            if snap.state == "Error":
                snap.state = "Allocated"

    h.store.hooks.append(at_commit(has_event("RollbackStarted"), left_allocated))
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    assert last(events, "JobFailed").rolled_back is True
    assert h.world.live_snapshots() == []
    assert not any("waiting for CloudStack" in e.message for e in of_type(events, "LogRecorded"))
    assert_restored(h, before, vm)
