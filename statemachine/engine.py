"""The engine: one `JobModel` per running job on the shared machine, driven to an end state.

Entering a step's state runs the step (its adapters) and commits its events; the model then
names the next trigger, and `drive` fires it. A step is re-entered after a crash (`resume`),
never skipped or run twice: the ledger makes its actions idempotent. Cancels are seen at the
safe points between steps, never in the middle of an adapter call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from transitions import EventData
from transitions.extensions.asyncio import AsyncMachine

from schemas.events import (
    JobCancelled,
    JobCompleted,
    JobFailed,
    RollbackCompleted,
    RollbackFailed,
    RollbackStarted,
    StepCompleted,
    StepFailed,
    StepSkipped,
    StepStarted,
)

from .context import JobContext
from .errors import CancelWhileRetrying, HandBack, LeaseLost, StepError
from .machine import STEP_STATES, steps_for, unbind
from .steps.failover import FAILOVER_STEP_FUNCS, StepResult
from .steps.undo import CLEANUP_STEP_FUNCS, Target, manual_actions, planned_actions, undo_all

STEP_FUNCS = {**FAILOVER_STEP_FUNCS, **CLEANUP_STEP_FUNCS}
_END = {"completed", "failed", "cancelled", "cleaned_up"}
# the engine crashed on a job this many times in a row in one state (an exception no step
# turned into a StepError: a bug, or data it cannot read): the next run gives the job up there
# (the step fails, or the rollback ends with what is left to undo) instead of crashing again
ENGINE_CRASH_LIMIT = 5


def _percent(order: int, total: int) -> int:
    return round(100 * order / total)


class JobModel:
    """A job as a model of the shared machine. Callbacks are named in `machine.build_machine`."""

    state: str

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.next_trigger: str | None = None
        self.resuming = False
        self.rollback_ok: bool | None = None

    # conditions
    def is_failover(self, event: EventData) -> bool:
        return self.ctx.row.job_type != "cleanup"

    def is_cleanup(self, event: EventData) -> bool:
        return self.ctx.row.job_type == "cleanup"

    def was_cancelled(self, event: EventData) -> bool:
        return self.ctx.row.cancel_requested or self.ctx.cancel_seen

    def ends_cancelled(self, event: EventData) -> bool:
        """A rollback that a cancel began ends the job cancelled; one that a failed step began
        ends it failed, a cancel asked for during it notwithstanding (the failure is what
        happened), and so does a retried rollback (CONTRACT: `JobFailed`; the retake clears
        the cancel)."""
        return self.was_cancelled(event) and not self.ctx.row.failed_step and not self.ctx.row.error_code

    # ------------------------------------------------------------------ steps

    async def enter_step(self, event: EventData) -> None:
        ctx, step = self.ctx, event.state.name
        row = ctx.row
        steps = steps_for(row.job_type)
        order, total = steps.index(step) + 1, len(steps)
        ctx.current_step = step
        ctx.observer.state_changed(row.job_id, (event.transition.source if event.transition else None), step)
        if self.resuming:
            self.resuming = False
            ctx.log("INFO", f"resuming step {step} (job taken over after an interruption)", owner=ctx.owner)
            await ctx.commit(job={"status": step})
        else:
            # the previous step's end, staged, is written with this start: one transaction
            # between two steps, the safe point where a cancel is seen
            after = ctx.has_staged
            if await ctx.commit(
                [(StepStarted, {"step": step, "step_order": order, "total_steps": total,
                                "percent_complete": _percent(order - 1, total)})],
                job={"status": step, **({"started_at": time.time()} if order == 1 else {})},
                unless_cancelled=True,
            ) and after:
                ctx.current_step = None
                ctx.log("WARN", f"cancel requested: stopping after step {steps[order - 2]}")
                self.next_trigger = "cancel"
                return
        began = time.monotonic()
        try:
            result: StepResult = await STEP_FUNCS[step](ctx)
        except CancelWhileRetrying as stop:
            # a cancel seen between two tries of a transient failure: the step stops there and
            # the job is cancelled as after a step (a failover's rollback undoes what its
            # ledger shows, a look-up deciding what an unfinished call left)
            ctx.observer.step_finished(row.job_type, step, "cancelled", time.monotonic() - began)
            message = f"cancel requested: stopping step {step} while it retried {stop.what}"
            ctx.log("WARN", message, error=str(stop.error), code=stop.error.code)
            ctx.current_step = None
            # the step's end (job_steps shows it stopped, not running); the job's failed step
            # stays unset: a cancel, not the step, ends it
            # (`resume_state`: a new owner goes on with the cancel, never runs the step again)
            await ctx.commit([(StepFailed, {"step": step, "step_order": order,
                                            "error": {"code": "CANCELLED", "message": f"{message} ({stop.error})"},
                                            "attempts": stop.error.attempts})], job={"resume_state": step})
            self.next_trigger = "cancel"
            return
        except StepError as exc:
            ctx.observer.step_finished(row.job_type, step, "failed", time.monotonic() - began)
            ctx.log("ERROR", f"step {step} failed: {exc.message}", code=exc.code)
            await ctx.commit(
                [(StepFailed, {"step": step, "step_order": order,
                               "error": {"code": exc.code, "message": exc.message},
                               "attempts": exc.attempts})],
                job={"failed_step": step, "error_code": exc.code, "error_message": exc.message},
            )
            self.next_trigger = "fail"
            return
        outcome = "skipped" if result.skipped else "completed"
        ctx.observer.step_finished(row.job_type, step, outcome, time.monotonic() - began)
        job: dict[str, Any] = {"resume_state": step}
        if step == "pre-failover-validation":
            job["plan"] = row.plan
        if result.skipped:
            ev: tuple[Any, dict[str, Any]] = (StepSkipped, {
                "step": step, "step_order": order, "percent_complete": _percent(order, total),
                "reason": result.skipped})
        else:
            ev = (StepCompleted, {"step": step, "step_order": order,
                                  "percent_complete": _percent(order, total), "outputs": result.outputs})
        # written with the next step's start, which sees a cancel
        ctx.stage([ev], job=job)
        ctx.current_step = None
        if order == total and row.job_type != "cleanup" and (self.was_cancelled(event) or await ctx.commit()):
            # a failover's last step's end is its last safe point: a cancel accepted while it
            # ran rolls it back like one after any other step (JobCompleted would ignore it).
            # (A cleanup's last step has undone everything: it completes.)
            ctx.log("WARN", f"cancel requested: stopping after step {step}, the last")
            self.next_trigger = "cancel"
            return
        self.next_trigger = "step_done"

    # ------------------------------------------------------------------ rollback

    async def enter_rollback(self, event: EventData) -> None:
        ctx, row = self.ctx, self.ctx.row
        ctx.current_step = None
        ctx.observer.state_changed(row.job_id, (event.transition.source if event.transition else None), "rolling_back")
        target = Target(plan=row.plan, ledger=dict(await ctx.ledger()))
        if self.resuming:
            self.resuming = False
            ctx.log("INFO", "resuming the rollback (job taken over after an interruption)", owner=ctx.owner)
            await ctx.commit(job={"status": "rolling_back"})
        else:
            reason = _rollback_reason(row, cancelled=self.was_cancelled(event))
            await ctx.commit(
                [(RollbackStarted, {"reason": reason, "actions": planned_actions(target, everything=False)})],
                job={"status": "rolling_back", "resume_state": None, "rollback_requested": False,
                     "rolled_back": None},  # (a retried rollback's outcome is not known yet)
            )
        try:
            await undo_all(ctx, target, everything=False)
        except StepError as exc:
            ctx.log("ERROR", f"rollback failed: {exc.message}", code=exc.code)
            manual = await manual_actions(ctx, target, everything=False)
            ctx.observer.rollback_ended("failed")
            await ctx.commit([(RollbackFailed, {"error": {"code": exc.code, "message": exc.message},
                                                "manual_actions": manual})],
                             job={"rolled_back": False})
            self.rollback_ok = False
            self.next_trigger = "rollback_incomplete"
            return
        ctx.observer.rollback_ended("completed")
        await ctx.commit([(RollbackCompleted, {"actions": target.actions})], job={"rolled_back": True})
        self.rollback_ok = True
        self.next_trigger = "rolled_back"

    # ------------------------------------------------------------------ ends

    async def enter_end(self, event: EventData) -> None:
        ctx, row, state = self.ctx, self.ctx.row, event.state.name
        ctx.observer.state_changed(row.job_id, (event.transition.source if event.transition else None), None)
        duration = max(0.0, time.time() - row.created_at)
        job: dict[str, Any] = {"status": state, "ended": True, "completed_at": time.time(),
                               "lease_owner": None, "lease_expires_at": None}
        vm_status = None
        parent: dict[str, Any] = {}
        if state == "completed":
            ledger = await ctx.ledger()
            if row.job_type == "cleanup":
                outputs: dict[str, Any] = {"failover_job_id": row.parent_job_id}
                vm_status = "ready_for_failover"
                parent = {"status": "cleaned_up", "active_vm_id": None}
            else:
                snaps = [{"volume_id": e.data.get("volume_id"), "snapshot_id": e.resource_id}
                         for k, e in ledger.items() if k.startswith("snapshot:")]
                outputs = {"destination_vm_id": ledger["vm"].resource_id, "snapshots": snaps,
                           "vm_name": row.plan.get("cs_name")}
                vm_status = "failed_over_test" if row.job_type == "test-failover" else "failed_over_live"
            events: list[tuple[Any, dict[str, Any]]] = [
                (JobCompleted, {"outputs": outputs, "duration_seconds": round(duration, 3)})]
        elif state == "cancelled":
            rolled = row.job_type != "cleanup" and bool(self.rollback_ok)
            events = [(JobCancelled, {"rolled_back": rolled})]
            job["active_vm_id"] = None
            if row.job_type == "cleanup":
                parent = {"cleanup_job_id": None}
        else:  # failed
            error = {"code": row.error_code or "FAILED", "message": row.error_message or "the job failed"}
            if row.job_type == "cleanup":
                rolled = False
                parent = {"cleanup_job_id": None}
            else:
                rolled = bool(self.rollback_ok)
            if rolled or row.job_type == "cleanup":
                job["active_vm_id"] = None
            events = [(JobFailed, {"failed_step": row.failed_step, "error": error, "rolled_back": rolled})]
        await ctx.commit(events, job=job, vm_status=vm_status, parent=parent)
        outcome = state
        ctx.observer.job_ended(row.job_type, outcome, duration)
        self.next_trigger = None


def _rollback_reason(row: Any, *, cancelled: bool, error_code: str | None = None) -> str:
    """`RollbackStarted.reason`, from the same facts as the job's end: a failed step first,
    then the job's error, then a cancel."""
    code = row.error_code or error_code
    if row.failed_step:
        return f"step {row.failed_step} failed: {code}"
    if code:
        return f"the job failed: {code}"
    return "cancel requested" if cancelled else "rollback requested"


async def drive(machine: AsyncMachine, ctx: JobContext) -> str:
    """Run a job this process owns from its persisted state to an end state (or until its
    lease is lost). Returns the state it stopped in."""
    row = ctx.row
    model = JobModel(ctx)
    initial = row.status
    machine.add_model(model, initial=initial)
    if ctx.taken_over:
        ctx.log("INFO", f"job taken over by process {ctx.owner} in state {initial}", owner=ctx.owner,
                state=initial)
    try:
        if initial == "pending":
            if row.cancel_requested:
                model.next_trigger = "cancel"
            else:
                ctx.observer.job_started(row.job_type)
                model.next_trigger = "start"
        elif initial in STEP_STATES:
            if row.failed_step == initial:  # its StepFailed was committed: go on as that run would
                model.next_trigger = "fail"
            elif row.resume_state == initial:  # the step completed before the interruption
                # (an error with no failed step: the engine gave the job up after that step)
                model.next_trigger = ("fail" if row.error_code else "cancel" if row.cancel_requested
                                      else "step_done")
            else:
                model.resuming, model.next_trigger = True, "resume"
        elif initial == "rolling_back":
            # the rollback's outcome was committed (RollbackCompleted / RollbackFailed) but not
            # the job's end: end it as that run would have, without undoing (and announcing) again
            if row.rolled_back is True:
                model.rollback_ok, model.next_trigger = True, "rolled_back"
            elif row.rolled_back is False:
                model.rollback_ok, model.next_trigger = False, "rollback_incomplete"
            else:
                model.resuming, model.next_trigger = True, "resume"
        elif initial == "failed" and row.rollback_requested:
            model.next_trigger = "retry_rollback"
        if ctx.engine_crashes[0] >= ENGINE_CRASH_LIMIT and model.next_trigger:
            await _give_up(model, machine, initial)
        while model.next_trigger:
            if ctx.draining and model.next_trigger in ("start", "step_done", "cancel"):
                await ctx.flush()  # the step's end, staged for the next start
                return model.state  # a safe point: the next owner carries on from here
            trigger, model.next_trigger = model.next_trigger, None
            ok = await model.trigger(trigger)  # type: ignore[attr-defined]
            if not ok:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                raise RuntimeError(f"trigger {trigger!r} not allowed from state {model.state!r}")
        return model.state
    except (LeaseLost, HandBack):  # (HandBack: draining, between two tries in a step)
        return model.state
    finally:
        machine.remove_model(model)
        unbind(model)


async def _give_up(model: JobModel, machine: AsyncMachine, state: str) -> None:
    """The engine crashed ENGINE_CRASH_LIMIT times in a row on the job at this point: end what
    it was doing as a failure an operator can act on, instead of crashing again.

    - a step: it fails, and a failover goes on to its rollback (a cleanup ends failed); the
      way into the next step (a step done): the job fails there, its steps as they are;
    - a job not started: it ends failed, nothing having been done;
    - a rollback, or the way into one (after a failed step, a cancel, a RollbackRequested):
      it ends incomplete, naming what is left to undo (a RollbackRequested tries it again once
      the cause is fixed);
    - the job's end itself, or this very give-up crashing as often again: the job ends failed
      with only what its row already holds."""
    ctx, row = model.ctx, model.ctx.row
    crashes, what = ctx.engine_crashes
    trigger, cleanup = model.next_trigger, row.job_type == "cleanup"
    code = "ENGINE_CRASHED"
    message = (f"the orchestrator crashed {crashes} times in a row on this job in {state} ({what}) and gave "
               f"that up instead of trying again; serve's log has each crash's traceback under job {row.job_id}: "
               "report it with them")
    model.resuming = False
    ctx.log("ERROR", message, code=code, state=state)
    if (crashes >= 2 * ENGINE_CRASH_LIMIT or trigger in ("rolled_back", "rollback_incomplete")
            or (cleanup and trigger in ("fail", "cancel")) or state == "pending"):
        await _end_failed(model, machine, code, message, nothing_done=state == "pending")
    elif state == "rolling_back" or trigger in ("fail", "cancel", "retry_rollback"):
        message += ("; undo what manual_actions lists (or fix the cause and send a RollbackRequested: "
                    "failoverctl rollback)")
        events: list[tuple[Any, dict[str, Any]]] = []
        if state != "rolling_back":
            events.append((RollbackStarted, {"reason": _rollback_reason(row, cancelled=False, error_code=code),
                                             "actions": []}))
        events.append((RollbackFailed, {"error": {"code": code, "message": message},
                                        "manual_actions": await _left_to_undo(ctx)}))
        ctx.observer.rollback_ended("failed")
        await ctx.commit(events, job={"status": "rolling_back", "resume_state": None, "rollback_requested": False,
                                      "rolled_back": False, **({} if row.error_code else {"error_code": code,
                                                                                         "error_message": message})})
        machine.set_state("rolling_back", model)
        model.rollback_ok, model.next_trigger = False, "rollback_incomplete"
    else:  # resume: the step fails; step_done: the job fails after it, the step staying done
        job: dict[str, Any] = {"error_code": code, "error_message": message}
        failed: list[tuple[Any, dict[str, Any]]] = []
        if trigger == "resume" and state in STEP_STATES:
            failed.append((StepFailed, {"step": state, "step_order": steps_for(row.job_type).index(state) + 1,
                                        "error": {"code": code, "message": message}, "attempts": crashes}))
            job["failed_step"] = state
        await ctx.commit(failed, job=job)
        model.next_trigger = "fail"


async def _end_failed(model: JobModel, machine: AsyncMachine, code: str, message: str, *,
                      nothing_done: bool = False) -> None:
    """The job's end, failed, from what its row holds (no ledger, no plan: its end crashed).
    The row's own error, if it has one, is the job's; the crash is in the log."""
    ctx, row = model.ctx, model.ctx.row
    cleanup = row.job_type == "cleanup"
    rolled = not cleanup and (nothing_done or row.rolled_back is True)
    error = {"code": row.error_code or code, "message": row.error_message or message}
    job: dict[str, Any] = {"status": "failed", "ended": True, "completed_at": time.time(), "lease_owner": None,
                           "lease_expires_at": None, "error_code": error["code"], "error_message": error["message"]}
    if not cleanup:  # (never left NULL: a rollback not completed can be retried, RollbackRequested)
        job["rolled_back"] = rolled
    if rolled or cleanup:
        job["active_vm_id"] = None
    await ctx.commit([(JobFailed, {"failed_step": row.failed_step, "error": error, "rolled_back": rolled})],
                     job=job, parent={"cleanup_job_id": None} if cleanup else {})
    ctx.observer.job_ended(row.job_type, "failed", max(0.0, time.time() - row.created_at))
    machine.set_state("failed", model)
    model.next_trigger = None


async def _left_to_undo(ctx: JobContext) -> list[dict[str, Any]]:
    """What an operator must still undo, as a failed rollback names it; where working that out
    crashes too, each resource the ledger holds that was not undone, to be checked by hand, or
    failing that, the ledger itself."""
    try:
        actions = await manual_actions(ctx, Target(plan=ctx.row.plan, ledger=dict(await ctx.ledger())),
                                       everything=False)
    except Exception:
        try:
            entries = await ctx.ports.store.ledger(ctx.row.job_id)
        except Exception:
            entries = []
        actions = [{"action": "check", "resource_type": e.resource_type, "resource_id": e.resource_id or e.name,
                    "detail": f"{e.action} by this job ({e.status}): undo it by hand if it is still there"
                              + ("" if e.resource_id else f" (its id never came back: look it up by the name {e.name})")}
                   for e in entries if (e.resource_id or e.name) and e.status not in ("undone", "failed")
                   and not e.key.startswith("undo:")]
        if not actions:
            actions = [{"action": "check", "resource_type": "job", "resource_id": ctx.row.job_id,
                        "detail": "the job's resource_ledger rows: undo by hand what they name"}]
    # (a damaged plan can name ids that are not strings: they would fail the event itself)
    return [a for a in actions if isinstance(a.get("resource_id"), str) and isinstance(a.get("resource_type"), str)]


def is_ended(state: str) -> bool:
    return state in _END
