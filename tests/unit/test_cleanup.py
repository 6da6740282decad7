"""Cleanup of a test failover: the world as before the failover, from the failover's ledger."""

from __future__ import annotations

import dataclasses

import pytest
from transitions.extensions.asyncio import AsyncMachine

from schemas.common import CLEANUP_STEPS
from statemachine.engine import drive
from tests.fakes import Harness, SeededVm, at_commit, cancel_when, has_event, lose_lease_at

from .helpers import assert_restored, assert_stream_ok, last, of_type


async def _failed_over(h: Harness, machine: AsyncMachine, name: str = "WIN-CLEAN", disks: int = 3,
                       gap: bool = True) -> tuple[SeededVm, dict, str]:  # type: ignore[type-arg]
    vm = h.seed_vm(name, os_type="Windows Server 2019", disks=disks, gap=gap)
    before = h.world.observable()
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    # the test VM and the injection wrote to every volume
    assert all("boot:" in h.world.volumes[v].content for v in vm.volume_ids)
    return vm, before, ctx.row.job_id


async def test_cleanup_puts_the_world_back(h: Harness, machine: AsyncMachine) -> None:
    vm, before, failover_id = await _failed_over(h, machine)
    cleanup = h.new_cleanup(failover_id)

    assert await drive(machine, cleanup) == "completed"

    events = h.events(cleanup.row.job_id)
    assert_stream_ok(events)
    expected = [t for step in CLEANUP_STEPS for t in ("StepStarted", "StepCompleted")]
    assert [e.type for e in events if e.type != "LogRecorded"] == ["JobAccepted", *expected, "JobCompleted"]
    assert [e.step for e in of_type(events, "StepCompleted")] == list(CLEANUP_STEPS)
    for e in events:
        assert e.job_type == "cleanup" and str(e.correlation_id) == failover_id
    assert last(events, "JobCompleted").outputs == {"failover_job_id": failover_id}
    assert_restored(h, before, vm)
    assert h.store.row(failover_id).status == "cleaned_up"
    assert h.store.columns[failover_id]["active_vm_id"] is None
    # what each step did, in the safe order
    outputs = {e.step: [a["action"] for a in e.outputs["actions"]] for e in of_type(events, "StepCompleted")}
    assert outputs["power-off"] == ["stop"]
    assert outputs["volume-detachment"] == ["detach"] * 3
    assert outputs["vm-deletion"] == ["destroy"]
    assert outputs["snapshot-revert"] == ["revert"] * 3
    assert outputs["volume-reattachment"] == ["reattach"] * 3
    assert outputs["snapshot-deletion"] == ["delete"] * 3


async def test_a_volume_someone_attached_to_the_test_vm_is_left_whole(h: Harness, machine: AsyncMachine) -> None:
    """During the test, someone attached a volume of their own to the test VM. The cleanup
    destroys the VM (the volume comes off with it) but deletes only what the deploy made,
    and says what it left."""
    vm, before, failover_id = await _failed_over(h, machine, disks=2, gap=False)
    test_vm = h.store.ledger_now(failover_id)["vm"].resource_id
    assert test_vm is not None
    theirs = h.world.add_volume("restored-scratch", vm_id=test_vm, content="their data")
    cleanup = h.new_cleanup(failover_id)
    assert await drive(machine, cleanup) == "completed"
    kept = h.world.volumes[theirs.id]
    assert not kept.destroyed and kept.vm_id is None and kept.content == "their data"
    assert ("deleteVolume", {"id": theirs.id}) not in h.cloudstack.calls
    events = h.events(cleanup.row.job_id)
    assert any(e.level == "WARN" and theirs.id in e.message for e in of_type(events, "LogRecorded"))
    outputs = {e.step: e.outputs["actions"] for e in of_type(events, "StepCompleted")}
    assert {"action": "keep", "resource_type": "volume", "resource_id": theirs.id,
            "detail": f"not made by this job: left detached from VM {test_vm}"} in outputs["vm-deletion"]
    del h.world.volumes[theirs.id]  # (theirs: not in the world the failover began with)
    assert_restored(h, before, vm)


async def test_cleanup_resumes_at_every_commit(machine: AsyncMachine) -> None:
    failures = []
    probe = Harness()
    _, _, fid = await _failed_over(probe, machine, gap=False)
    ctx = probe.new_cleanup(fid)
    start = probe.store.commits
    await drive(machine, ctx)
    total = probe.store.commits - start
    for cut in range(1, total + 1):
        h = Harness()
        vm, before, failover_id = await _failed_over(h, machine, gap=False)
        cleanup = h.new_cleanup(failover_id)
        h.store.hooks.append(lose_lease_at(cut))
        first = await drive(machine, cleanup)
        h.store.hooks.clear()
        h.store.owner_ok = True
        second = await drive(machine, await h.resume_context(cleanup.row.job_id))
        try:
            assert second == "completed"
            assert_stream_ok(h.events(cleanup.row.job_id))
            assert_restored(h, before, vm)
            assert h.cloudstack.count("destroyVirtualMachine") == 1
        except AssertionError as exc:
            failures.append(f"cut at commit {cut} (first run stopped in {first!r}): {exc}")
    assert not failures, f"{len(failures)} of {total} cut points failed:\n" + "\n".join(failures)


async def test_a_failed_cleanup_is_not_rolled_back_and_can_run_again(h: Harness, machine: AsyncMachine) -> None:
    vm, before, failover_id = await _failed_over(h, machine)
    h.faults.add("revertSnapshot", "refused", nth=2)
    first = h.new_cleanup(failover_id)

    assert await drive(machine, first) == "failed"

    events = h.events(first.row.job_id)
    assert_stream_ok(events)
    assert of_type(events, "RollbackStarted") == []
    end = last(events, "JobFailed")
    assert (end.failed_step, end.rolled_back) == ("snapshot-revert", False)
    assert h.store.row(failover_id).status == "completed"  # still to be cleaned up
    assert h.store.columns[failover_id]["cleanup_job_id"] is None
    assert not any(h.world.volumes[v].destroyed for v in vm.volume_ids)

    again = h.new_cleanup(failover_id)
    assert await drive(machine, again) == "completed"
    assert_restored(h, before, vm)
    assert h.store.row(failover_id).status == "cleaned_up"


@pytest.mark.parametrize("deleted", [[1], [0, 1]], ids=["one", "both"])
async def test_a_snapshot_deleted_outside_the_job_fails_the_cleanup_until_the_operator_restored_the_volume(
        h: Harness, machine: AsyncMachine, deleted: list[int]) -> None:
    """Someone deleted a test failover's snapshots during the test. The cleanup cannot revert
    those volumes and does not pretend it did (the test VM's writes would go back to the
    appliance and into the next failover): it fails SNAPSHOT_GONE naming every one of them,
    each left detached, saying to re-sync it. Once the operator did, the next cleanup takes
    them as restored."""
    vm, before, failover_id = await _failed_over(h, machine, disks=2, gap=False)
    volumes = [vm.volume_ids[i] for i in deleted]
    gone = {s.volume_id: s for s in h.world.live_snapshots() if s.volume_id in volumes}
    for snap in gone.values():
        snap.destroyed = True
    first = h.new_cleanup(failover_id)
    assert await drive(machine, first) == "failed"
    end = last(h.events(first.row.job_id), "JobFailed")
    assert (end.failed_step, end.error.code) == ("snapshot-revert", "SNAPSHOT_GONE")
    assert "re-sync" in end.error.message
    for v in volumes:
        assert f"snapshot {gone[v].id} of volume {v}" in end.error.message
        assert h.world.volumes[v].vm_id is None

    for v in volumes:  # by hand: re-synced, back on the appliance
        volume = h.world.volumes[v]
        volume.content = gone[v].content
        volume.vm_id, volume.device_id = h.world.appliance.id, before["volumes"][v][2]
    again = h.new_cleanup(failover_id)
    assert await drive(machine, again) == "completed"
    assert len([e for e in of_type(h.events(again.row.job_id), "LogRecorded")
                if e.level == "WARN" and "restored by hand" in e.message]) == len(volumes)
    assert_restored(h, before, vm)


async def test_a_snapshot_delete_whose_job_cloudstack_no_longer_knows_is_looked_at_not_failed(
        h: Harness, machine: AsyncMachine) -> None:
    """CloudStack answers 431 for the snapshot delete's job (it purged it): the outcome is
    unknown, not a refusal. The retry looks at the snapshot, finds it gone, and the cleanup
    completes without a second delete."""
    vm, before, failover_id = await _failed_over(h, machine, disks=2, gap=False)
    h.faults.arm_after("deleteSnapshot", "queryAsyncJobResult", "refused")
    cleanup = h.new_cleanup(failover_id)
    assert await drive(machine, cleanup) == "completed"
    assert any(e.level == "WARN" and "CLOUDSTACK_JOB_LOST" in str(e.fields)
               for e in of_type(h.events(cleanup.row.job_id), "LogRecorded"))
    deleted = [p["id"] for op, p in h.cloudstack.calls if op == "deleteSnapshot"]
    assert len(deleted) == len(set(deleted)) == len(vm.volume_ids)
    assert_restored(h, before, vm)


async def test_a_cancelled_cleanup_stops_at_a_safe_point(h: Harness, machine: AsyncMachine) -> None:
    vm, before, failover_id = await _failed_over(h, machine)
    h.store.hooks.append(cancel_when(has_event("StepStarted", step="vm-deletion")))
    cleanup = h.new_cleanup(failover_id)

    assert await drive(machine, cleanup) == "cancelled"

    events = h.events(cleanup.row.job_id)
    assert_stream_ok(events)
    assert [e.step for e in of_type(events, "StepCompleted")] == ["power-off", "volume-detachment", "vm-deletion"]
    assert last(events, "JobCancelled").rolled_back is False
    assert of_type(events, "RollbackStarted") == []
    # a new cleanup finishes the job
    h.store.hooks.clear()
    assert await drive(machine, h.new_cleanup(failover_id)) == "completed"
    assert_restored(h, before, vm)


async def test_a_snapshot_still_being_copied_is_waited_for_the_others_deleted_and_it_named(
        h: Harness, machine: AsyncMachine) -> None:
    """CloudStack is copying one snapshot (Copying: copySnapshot to another zone, say) when the
    cleanup comes to delete them, and refuses to delete it meanwhile: the others are deleted,
    that one waited for up to FAILOVER_SNAPSHOT_TIMEOUT_SECONDS and then named in the failure;
    the cleanup sent again once the copy has ended deletes it and completes."""
    vm, before, failover_id = await _failed_over(h, machine, "LNX-COPYING", disks=3)
    h.config = dataclasses.replace(h.config, snapshot_timeout=0.3)
    snapshots = sorted(h.world.live_snapshots(), key=lambda s: vm.volume_ids.index(s.volume_id))
    copying = snapshots[0]  # (the first one looked at: the others come after its wait)

    copy_begins = at_commit(has_event("StepStarted", step="snapshot-deletion"),
                            lambda: setattr(copying, "state", "Copying"))
    h.store.hooks.append(copy_begins)
    cleanup = h.new_cleanup(failover_id)
    assert await drive(machine, cleanup) == "failed"
    failed = last(h.events(cleanup.row.job_id), "StepFailed")
    assert (failed.step, failed.error.code) == ("snapshot-deletion", "SNAPSHOT_STILL_CREATING")
    assert copying.id in failed.error.message and all(s.id not in failed.error.message for s in snapshots[1:])
    assert h.world.live_snapshots() == [copying]
    assert h.cloudstack.count("deleteSnapshot") == 2  # none of it while it was being copied

    h.store.hooks.remove(copy_begins)
    copying.state = "BackedUp"  # the copy ended
    again = h.new_cleanup(failover_id)
    assert await drive(machine, again) == "completed"
    assert_restored(h, before, vm)
