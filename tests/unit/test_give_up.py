"""A job the engine crashed on ENGINE_CRASH_LIMIT times in a row at one point is given up there,
whatever that point's next trigger (statemachine/engine.py `_give_up`): each persisted state a
run can leave, with the runner's count of crashes at the limit, ends the job with one terminal
event, in CONTRACT's order, and the row ended. (The count itself, and a real crash, end to end:
tests/crash/test_engine_crash.py.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transitions.extensions.asyncio import AsyncMachine

from statemachine.engine import ENGINE_CRASH_LIMIT, drive
from statemachine.ports import JobRow
from tests.fakes import Harness, has_event, lose_lease_when

from .helpers import assert_stream_ok, last

CRASHED = (ENGINE_CRASH_LIMIT, "TypeError in steps/failover.py:61")


async def _stopped_after_snapshot(h: Harness, machine: AsyncMachine) -> str:
    """A Linux test failover stopped (its lease lost) at the commit that starts its third step:
    the snapshot step's end is written; its row as a new owner would read it."""
    vm = h.seed_vm("lin-give-up", os_type="Linux", disks=2)
    ctx = h.new_job(vm, "test-failover")
    h.store.hooks.append(lose_lease_when(has_event("StepStarted", step="virtio-driver-injection")))
    await drive(machine, ctx)
    h.store.hooks.clear()
    h.store.owner_ok = True
    return ctx.row.job_id


async def _resume_crashed(h: Harness, machine: AsyncMachine, job_id: str, **row: object) -> str:
    """The row changed as `row` says (the point the engine crashed at), then a new owner's run
    with the crashes at the limit."""
    persisted: JobRow = h.store.rows[job_id]
    for key, value in row.items():
        setattr(persisted, key, value)
    ctx = await h.resume_context(job_id)
    ctx.engine_crashes = CRASHED
    return await drive(machine, ctx)


def _tail(h: Harness, job_id: str) -> list[str]:
    return h.types(job_id)[-4:]


Check = Callable[[Harness, str], None]


def _rollback_left(h: Harness, job_id: str, started: bool) -> None:
    """A rollback given up: RollbackStarted (unless it was written before), RollbackFailed
    (ENGINE_CRASHED, what is left), JobFailed."""
    expected = ["RollbackStarted", "RollbackFailed", "JobFailed"] if started else ["RollbackFailed", "JobFailed"]
    assert _tail(h, job_id)[-len(expected):] == expected, h.types(job_id)
    stuck = last(h.events(job_id), "RollbackFailed")
    assert stuck.error.code == "ENGINE_CRASHED" and "RollbackRequested" in stuck.error.message
    assert stuck.manual_actions, "nothing named for the operator"
    assert last(h.events(job_id), "JobFailed").rolled_back is False


@pytest.mark.parametrize(("point", "row"), [
    # a cancel seen at the step boundary, the rollback's start crashing
    ("cancel", {"status": "cloudstack-snapshot", "resume_state": "cloudstack-snapshot", "cancel_requested": True}),
    # a failed step's rollback start crashing
    ("fail", {"status": "cloudstack-snapshot", "failed_step": "cloudstack-snapshot", "error_code": "X"}),
    # the rollback itself crashing (its RollbackStarted was written: not in this made-up row)
    ("resume rollback", {"status": "rolling_back", "rolled_back": None}),
    # a RollbackRequested's rollback crashing before it began
    ("retry_rollback", {"status": "failed", "rollback_requested": True, "rolled_back": False}),
])
async def test_a_rollback_or_its_start_given_up_names_what_is_left(
        h: Harness, machine: AsyncMachine, point: str, row: dict[str, object]) -> None:
    job_id = await _stopped_after_snapshot(h, machine)
    assert await _resume_crashed(h, machine, job_id, **row) == "failed", point
    _rollback_left(h, job_id, started=point != "resume rollback")
    assert_stream_ok(h.events(job_id))
    assert h.store.columns[job_id]["ended"] is True


async def test_a_step_given_up_fails_and_the_failover_rolls_back(h: Harness, machine: AsyncMachine) -> None:
    job_id = await _stopped_after_snapshot(h, machine)
    assert await _resume_crashed(h, machine, job_id, status="virtio-driver-injection", resume_state=None) == "failed"
    failed = last(h.events(job_id), "StepFailed")
    assert failed.step == "virtio-driver-injection" and failed.error.code == "ENGINE_CRASHED"
    assert failed.attempts == ENGINE_CRASH_LIMIT and "TypeError in steps/failover.py:61" in failed.error.message
    assert _tail(h, job_id)[-3:] == ["RollbackStarted", "RollbackCompleted", "JobFailed"]
    assert last(h.events(job_id), "JobFailed").rolled_back is True
    assert_stream_ok(h.events(job_id))


async def test_the_way_into_the_next_step_given_up_fails_the_job_not_the_done_step(
        h: Harness, machine: AsyncMachine) -> None:
    job_id = await _stopped_after_snapshot(h, machine)
    assert await _resume_crashed(h, machine, job_id, status="cloudstack-snapshot",
                                 resume_state="cloudstack-snapshot") == "failed"
    events = h.events(job_id)
    assert not [e for e in events if e.type == "StepFailed"], h.types(job_id)
    assert _tail(h, job_id)[-3:] == ["RollbackStarted", "RollbackCompleted", "JobFailed"]
    ended = last(events, "JobFailed")
    assert ended.error.code == "ENGINE_CRASHED" and ended.failed_step is None and ended.rolled_back is True
    assert_stream_ok(events)


async def test_a_give_up_after_a_step_holds_when_the_process_stops_right_after_it(
        h: Harness, machine: AsyncMachine) -> None:
    """The give-up at a step's end is in the row: a new owner (its own count of crashes at
    zero) goes on with the failure, not with the next step."""
    job_id = await _stopped_after_snapshot(h, machine)
    h.store.hooks.append(lose_lease_when(has_event("RollbackStarted")))  # (the give-up's commit went in)
    await _resume_crashed(h, machine, job_id, status="cloudstack-snapshot", resume_state="cloudstack-snapshot")
    h.store.hooks.clear()
    h.store.owner_ok = True
    assert await drive(machine, await h.resume_context(job_id)) == "failed"
    started = [e.step for e in h.events(job_id) if e.type == "StepStarted"]
    assert started == ["pre-failover-validation", "cloudstack-snapshot"], started  # (no step after it)
    assert last(h.events(job_id), "JobFailed").error.code == "ENGINE_CRASHED"


@pytest.mark.parametrize("rolled_back", [True, False])
async def test_the_end_given_up_is_written_from_the_row(h: Harness, machine: AsyncMachine, rolled_back: bool) -> None:
    job_id = await _stopped_after_snapshot(h, machine)
    assert await _resume_crashed(h, machine, job_id, status="rolling_back", rolled_back=rolled_back,
                                 failed_step="vm-creation", error_code="CLOUDSTACK_JOB_FAILED",
                                 error_message="deploy failed") == "failed"
    ended = last(h.events(job_id), "JobFailed")
    # the job's own failure stands (the crash is in the log), as does what its rollback did
    assert ended.error.code == "CLOUDSTACK_JOB_FAILED" and ended.failed_step == "vm-creation"
    assert ended.rolled_back is rolled_back and h.store.columns[job_id]["rolled_back"] is rolled_back
    assert h.types(job_id)[-1] == "JobFailed" and h.store.columns[job_id]["ended"] is True


async def test_a_job_not_started_given_up_ends_with_nothing_to_undo(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("lin-pending", os_type="Linux", disks=1)
    ctx = h.new_job(vm, "test-failover")
    ctx.engine_crashes = CRASHED
    assert await drive(machine, ctx) == "failed"
    assert h.types(ctx.row.job_id) == ["JobAccepted", "JobFailed"]
    ended = last(h.events(ctx.row.job_id), "JobFailed")
    assert ended.error.code == "ENGINE_CRASHED" and ended.rolled_back is True  # (its VM is not held)
    assert h.store.columns[ctx.row.job_id]["active_vm_id"] is None


async def test_a_give_up_that_crashes_as_often_again_ends_the_job(h: Harness, machine: AsyncMachine) -> None:
    job_id = await _stopped_after_snapshot(h, machine)
    persisted = h.store.rows[job_id]
    persisted.status, persisted.rolled_back = "rolling_back", None
    ctx = await h.resume_context(job_id)
    ctx.engine_crashes = (2 * ENGINE_CRASH_LIMIT, "ValueError in engine.py:1")
    assert await drive(machine, ctx) == "failed"
    assert h.types(job_id)[-1] == "JobFailed" and "RollbackFailed" not in h.types(job_id)
    # not NULL: a rollback not completed can be retried (RollbackRequested), and the VM freed
    assert h.store.columns[job_id]["rolled_back"] is False
