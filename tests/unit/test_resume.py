"""Crash and takeover: the lease is lost at a commit (the process is gone from there on), a new
owner builds its context from the persisted row and ledger, and the job ends as an
uninterrupted run would, with every external resource created exactly once (guarantee 3).

Every commit of a run is a cut point: at a step boundary, between the ledger write before a
call and the one after it, in the rollback, at the final commit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from transitions.extensions.asyncio import AsyncMachine

from statemachine.context import JobContext
from statemachine.engine import drive, is_ended
from statemachine.errors import LeaseLost
from tests.fakes import Harness, SeededVm, cancel_when, has_event, lose_lease_at, lose_lease_when

from .helpers import assert_failed_over, assert_restored, assert_stream_ok, last, of_type

Scenario = Callable[[Harness], tuple[SeededVm, JobContext]]


def windows_test_failover(h: Harness) -> tuple[SeededVm, JobContext]:
    vm = h.seed_vm("WIN-RESUME", os_type="Windows Server 2019", disks=3)
    return vm, h.new_job(vm, "test-failover")


def linux_live_failover(h: Harness) -> tuple[SeededVm, JobContext]:
    vm = h.seed_vm("lin-resume", os_type="Linux", disks=2)
    return vm, h.new_job(vm, "live-failover")


async def _uninterrupted_commits(make: Scenario, machine: AsyncMachine, **harness: object) -> int:
    h = Harness(**harness)  # type: ignore[arg-type]
    _, ctx = make(h)
    await drive(machine, ctx)
    return h.store.commits


async def _crash_then_resume(
    make: Scenario, machine: AsyncMachine, cut: int, prepare: Callable[[Harness], None] | None = None,
    **harness: object,
) -> tuple[Harness, SeededVm, str, str, str]:
    """Run until the `cut`th commit loses the lease; resume in a new context; return both end states."""
    h = Harness(**harness)  # type: ignore[arg-type]
    vm, ctx = make(h)
    if prepare:
        prepare(h)
    h.store.hooks.append(lose_lease_at(cut))
    first = await drive(machine, ctx)
    assert not h.store.owner_ok, "the cut point was never reached"
    h.store.hooks.clear()
    h.store.owner_ok = True  # the new owner's lease
    resumed = await h.resume_context(ctx.row.job_id)
    second = await drive(machine, resumed)
    return h, vm, ctx.row.job_id, first, second


async def _every_cut(
    make: Scenario, machine: AsyncMachine, check: Callable[[Harness, SeededVm, str, str], Awaitable[None] | None],
    prepare: Callable[[Harness], None] | None = None, **harness: object,
) -> int:
    total = await _uninterrupted_commits(make, machine, **harness) if prepare is None else None
    if total is None:
        h = Harness(**harness)  # type: ignore[arg-type]
        _, ctx = make(h)
        prepare(h)  # type: ignore[misc]
        await drive(machine, ctx)
        total = h.store.commits
    failures = []
    for cut in range(1, total + 1):
        h, vm, job_id, first, second = await _crash_then_resume(make, machine, cut, prepare, **harness)
        try:
            assert not is_ended(first) or cut == total, f"stopped in {first}"
            await check(h, vm, job_id, second)  # type: ignore[misc]
        except AssertionError as exc:
            failures.append(f"cut at commit {cut} (first run stopped in {first!r}): {exc}")
    assert not failures, f"{len(failures)} of {total} cut points failed:\n" + "\n".join(failures)
    return total


async def _completed_once(h: Harness, vm: SeededVm, job_id: str, state: str) -> None:
    assert state == "completed"
    events = h.events(job_id)
    assert_stream_ok(events)
    assert_failed_over(h, vm, last(events, "JobCompleted").outputs["destination_vm_id"])
    # every external resource created exactly once
    assert h.cloudstack.count("deployVirtualMachine") == 1
    assert h.cloudstack.count("createSnapshot") == len(vm.volume_ids)
    assert h.cloudstack.count("startVirtualMachine") == 1
    assert len(h.world.live_snapshots()) == len(vm.volume_ids)
    steps = [e.step for e in of_type(events, "StepCompleted") + of_type(events, "StepSkipped")]
    assert sorted(steps) == sorted(set(steps)) and len(steps) == 6, steps  # each step finished once


async def test_resume_a_windows_test_failover_at_every_commit(machine: AsyncMachine) -> None:
    total = await _every_cut(windows_test_failover, machine, _completed_once)
    assert total > 30


async def test_resume_a_live_failover_with_a_disk_offering_at_every_commit(machine: AsyncMachine) -> None:
    await _every_cut(linux_live_failover, machine, _completed_once, disk_offering=True)


def windows_interleaved(h: Harness) -> tuple[SeededVm, JobContext]:
    vm = h.seed_vm("WIN-GAPS", os_type="Windows Server 2019", disks=3, gap=True)
    return vm, h.new_job(vm, "test-failover")


@pytest.mark.parametrize(
    ("make", "fault"),
    [
        # it booted the VM (every volume written), then failed
        (windows_test_failover, ("arm_after", "startVirtualMachine", "listVirtualMachines")),
        # one replica is off the appliance, the next one is not: the rollback re-orders them
        (windows_interleaved, ("add", "detach", 3)),
    ],
    ids=["after-boot", "mid-detach-interleaved"],
)
async def test_resume_a_rollback_at_every_commit(machine: AsyncMachine, make: Scenario, fault: tuple) -> None:  # type: ignore[type-arg]
    """The job fails; a crash anywhere (in the steps or the rollback) still ends in a complete
    rollback."""
    before: dict[str, object] = {}

    def prepare(h: Harness) -> None:
        before["world"] = h.world.observable()
        if fault[0] == "arm_after":
            h.faults.arm_after(fault[1], fault[2], "refused")
        else:
            h.faults.add(fault[1], "refused", nth=fault[2])

    async def rolled_back(h: Harness, vm: SeededVm, job_id: str, state: str) -> None:
        events = h.events(job_id)
        assert_stream_ok(events)
        if state == "completed":
            # the cut fell on the StepFailed commit: the failure was never recorded, and the
            # one-off fault is spent, so the step may succeed when it runs again
            assert of_type(events, "StepFailed") == [], "a job that published StepFailed completed"
            await _completed_once(h, vm, job_id, state)
            return
        assert state == "failed"
        assert last(events, "JobFailed").rolled_back is True
        assert_restored(h, before["world"], vm)  # type: ignore[arg-type]
        assert h.cloudstack.count("deployVirtualMachine") == 1
        assert h.cloudstack.count("createSnapshot") == len(vm.volume_ids)

    await _every_cut(make, machine, rolled_back, prepare)


async def test_a_lost_lease_writes_nothing_more(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("WIN-FENCE", disks=2)
    ctx = h.new_job(vm)
    h.store.hooks.append(lose_lease_at(11))
    state = await drive(machine, ctx)
    stored = h.store.row(ctx.row.job_id)
    assert stored.status == state or stored.resume_state == state
    assert h.store.commits == 10
    assert not any(m for m in machine.models if getattr(m, "ctx", None) is ctx)
    # the process keeps nothing it could still write: the next commit from it is fenced too
    h.store.hooks.clear()
    h.store.owner_ok = True
    stale = JobContext(row=ctx.row, ports=h.ports, config=h.config)
    stale.row.last_sequence -= 1  # a row it read before another owner wrote
    with pytest.raises(LeaseLost):
        await stale.commit()


async def test_drain_stops_at_a_safe_point_and_a_new_owner_finishes(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("WIN-DRAIN", disks=2)
    ctx = h.new_job(vm)

    def drain(store, job, commit) -> None:  # type: ignore[no-untyped-def]
        if has_event("StepStarted", step="vm-creation")(commit):  # SIGTERM while the step runs
            ctx.draining = True

    h.store.hooks.append(drain)
    assert await drive(machine, ctx) == "vm-creation"
    row = h.store.row(ctx.row.job_id)
    # the step's end, which would have ridden the next step's start, was written before stopping
    assert (row.status, row.resume_state) == ("vm-creation", "vm-creation")
    assert of_type(h.events(ctx.row.job_id), "StepCompleted")[-1].step == "vm-creation"
    h.store.hooks.clear()
    resumed = await h.resume_context(ctx.row.job_id)
    assert await drive(machine, resumed) == "completed"
    await _completed_once(h, vm, ctx.row.job_id, "completed")
    # a takeover at a step boundary is silent: no "resuming" line, the next step just starts
    events = h.events(ctx.row.job_id)
    assert not any("resuming" in e.message for e in of_type(events, "LogRecorded"))


async def test_a_recorded_step_failure_is_not_undone_by_a_takeover(h: Harness, machine: AsyncMachine) -> None:
    """StepFailed is committed, then the process dies before the rollback starts: the new owner
    must roll back (as the uninterrupted run would), not run the failed step again."""
    vm = h.seed_vm("WIN-FAILED-ONCE", os_type="Linux", disks=2)
    before = h.world.observable()
    h.faults.add("startVirtualMachine", "refused")  # once
    ctx = h.new_job(vm)
    h.store.hooks.append(lose_lease_when(has_event("RollbackStarted")))
    assert await drive(machine, ctx) == "rolling_back"
    assert h.store.row(ctx.row.job_id).failed_step == "vm-startup-validation"
    h.store.hooks.clear()
    h.store.owner_ok = True
    resumed = await h.resume_context(ctx.row.job_id)
    state = await drive(machine, resumed)
    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    after_failure = [e.type for e in events][[e.type for e in events].index("StepFailed"):]
    assert "StepCompleted" not in after_failure, after_failure
    assert state == "failed" and last(events, "JobFailed").rolled_back is True
    assert_restored(h, before, vm)


@pytest.mark.parametrize("cut_at", ["RollbackStarted", "RollbackCompleted", "JobCancelled"])
async def test_a_cancelled_job_taken_over_mid_rollback_still_ends_cancelled(
    h: Harness, machine: AsyncMachine, cut_at: str
) -> None:
    vm = h.seed_vm("WIN-CANCEL-CRASH", os_type="Windows", disks=2)
    before = h.world.observable()
    ctx = h.new_job(vm)
    h.store.hooks.append(cancel_when(has_event("StepStarted", step="vm-creation")))
    h.store.hooks.append(lose_lease_when(has_event(cut_at)))
    await drive(machine, ctx)
    h.store.hooks.clear()
    h.store.owner_ok = True
    assert await drive(machine, await h.resume_context(ctx.row.job_id)) == "cancelled"
    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    assert last(events, "JobCancelled").rolled_back is True
    assert_restored(h, before, vm)


@pytest.mark.parametrize("outcome", ["RollbackCompleted", "RollbackFailed"])
async def test_a_rollback_whose_outcome_was_committed_is_not_run_again(
    h: Harness, machine: AsyncMachine, outcome: str
) -> None:
    """The rollback's outcome is committed, then the process dies before the job's end: the new
    owner ends the job as that run would have, without undoing (and announcing) it a second time."""
    vm = h.seed_vm("WIN-ROLLED", os_type="Linux", disks=2)
    # unanswered, every try: the job fails and rolls back, every volume (the VM may have run)
    h.faults.add("startVirtualMachine", "transient", times=None)
    if outcome == "RollbackFailed":
        h.faults.add("revertSnapshot", "refused", times=None)
    ctx = h.new_job(vm)
    h.store.hooks.append(lose_lease_when(has_event("JobFailed")))
    await drive(machine, ctx)
    assert h.store.row(ctx.row.job_id).status == "rolling_back"
    assert of_type(h.events(ctx.row.job_id), outcome), "the rollback's outcome was not committed"
    calls = len(h.cloudstack.calls)
    h.store.hooks.clear()
    h.store.owner_ok = True
    assert await drive(machine, await h.resume_context(ctx.row.job_id)) == "failed"
    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    assert [e.type for e in events if e.type != "LogRecorded"][-4:] == [
        "StepFailed", "RollbackStarted", outcome, "JobFailed"]
    assert last(events, "JobFailed").rolled_back is (outcome == "RollbackCompleted")
    assert len(h.cloudstack.calls) == calls, "the new owner called CloudStack again"
