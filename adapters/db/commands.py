"""Recording commands: each command becomes, in ONE transaction, a `job_commands` row (the
idempotency key), and either a new job with its `JobAccepted`, a change to an existing job, or
a `JobRejected`. Only after that commit is the delivery acked."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.expression import Insert, Update

from schemas.commands import (
    CancelRequested,
    CleanupRequested,
    Command,
    FailoverRequested,
    RollbackRequested,
)
from schemas.common import STEPS_BY_JOB_TYPE, JobType, RejectReason, utc_now
from schemas.events import JobAccepted, JobRejected, StepRef

from . import raw
from .engine import db_now_plus, utcnow
from .outbox import OUTBOX_INSERT, OutboxEvent, insert_event, outbox_event, outbox_row
from .store import SEED_JOB_TYPES
from .tables import failover_jobs, job_commands, vm_replication_contexts

_LIVE = SEED_JOB_TYPES["live-failover"]  # failover_jobs.job_type of a live failover

# The statements of the recording transaction, built once (run on the driver: adapters/db/raw.py)
_COMMAND_INSERT = job_commands.insert()
_COMMAND_OUTCOME = (update(job_commands).where(job_commands.c.request_id == bindparam("request_id"))
                    .values(outcome=bindparam("v_outcome"), job_id=bindparam("v_job_id"),
                            detail=bindparam("v_detail")))
_VM_NAME = select(vm_replication_contexts.c.vm_name).where(vm_replication_contexts.c.vmware_vm_id == bindparam("vm_id"))
BLOCKER = select(failover_jobs.c.job_id, failover_jobs.c.job_type, failover_jobs.c.status,
                  failover_jobs.c.rolled_back).where(failover_jobs.c.active_vm_id == bindparam("vm_id"))
_JOB_FOR_UPDATE = select(failover_jobs).where(failover_jobs.c.job_id == bindparam("job_id")).with_for_update()
_SET_CLEANUP = (update(failover_jobs).where(failover_jobs.c.job_id == bindparam("job_id"))
                .values(cleanup_job_id=bindparam("v_cleanup_job_id"), updated_at=bindparam("v_updated_at")))
_SET_CANCEL = (update(failover_jobs).where(failover_jobs.c.job_id == bindparam("job_id"))
               .values(cancel_requested=True, updated_at=bindparam("v_updated_at")))
_SAVEPOINT_REJ, _ROLLBACK_TO_REJ = text("SAVEPOINT rej"), text("ROLLBACK TO SAVEPOINT rej")
_ACCEPTED_ID = "@failover_accepted_id"  # the new JobAccepted's outbox id, read after the quick path's COMMIT
_NEW_JOB_COLUMNS = ("job_id", "request_id", "vm_id", "job_type", "status", "source_vm_name", "created_at",
                    "updated_at", "correlation_id", "parent_job_id", "requested_by", "options", "plan",
                    "last_sequence", "active_vm_id", "lease_owner")


@dataclass(frozen=True)
class Decision:
    outcome: str  # accepted | duplicate | rejected_<reason> | signalled
    job_id: str | None = None  # a job this process now owns and should run
    detail: str | None = None
    # the first event of a new stream written with the decision (JobAccepted, JobRejected): no
    # earlier event of its job can be waiting in the outbox, so it may be published at once
    events: tuple[OutboxEvent, ...] = ()
    # the job is a live failover (new, or its rollback retried): started before the jobs waiting
    # for room (`JobRunner.adopt`)
    first: bool = False


def _is_duplicate_key(exc: IntegrityError, key: str) -> bool:
    return "Duplicate entry" in str(exc.orig) and key in str(exc.orig)


class CommandRecorder:
    """Turns validated commands into jobs or rejections (guarantee 1: one job per request)."""

    def __init__(self, engine: AsyncEngine, owner: str, lease_seconds: float) -> None:
        self.engine = engine
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.on_outbox: Any = lambda: None
        expiry = db_now_plus(int(lease_seconds * 1e6))
        self._insert_job: Insert = failover_jobs.insert().values(
            **{c: bindparam(c, type_=failover_jobs.c[c].type) for c in _NEW_JOB_COLUMNS}, lease_expires_at=expiry)
        self._retake_for_rollback: Update = (
            update(failover_jobs).where(failover_jobs.c.job_id == bindparam("job_id"))
            .values(ended=False, rollback_requested=True, cancel_requested=False, lease_owner=bindparam("v_owner"),
                    lease_expires_at=expiry, updated_at=bindparam("v_updated_at")))

    async def record(self, cmd: Command) -> Decision:
        async with raw.transaction(self.engine) as tx:
            if isinstance(cmd, FailoverRequested) and tx.scripts:
                decision = await self._failover_quick(tx, cmd)
            else:
                decision = await self._record(tx, cmd)
        if decision.outcome != "duplicate":
            self.on_outbox()
        return decision

    async def _record(self, tx: raw.Transaction, cmd: Command) -> Decision:
        """The command's row, its decision, the row's outcome, statement by statement."""
        try:
            await tx.insert(_COMMAND_INSERT, [_received(cmd)])
        except IntegrityError:
            return Decision("duplicate")
        if isinstance(cmd, FailoverRequested):
            vm = next(iter(await tx.fetch(_VM_NAME, {"vm_id": cmd.vm_id})), None)
            decision = await self._failover(tx, cmd, None if vm is None else vm.vm_name)
        elif isinstance(cmd, CleanupRequested):
            decision = await self._cleanup(tx, cmd)
        elif isinstance(cmd, CancelRequested):
            decision = await self._cancel(tx, cmd)
        else:
            decision = await self._rollback(tx, cmd)
        await tx.execute(_COMMAND_OUTCOME, _outcome(cmd, decision))
        return decision

    async def _failover_quick(self, tx: raw.Transaction, cmd: FailoverRequested) -> Decision:
        """`_record` of a FailoverRequested, the same rows, in two round trips instead of six
        when it makes a job (the usual case): the command's row and the read of the VM's name as
        one script; then the job's row, its JobAccepted, the command's outcome and the COMMIT as
        one block (`raw.block`). Under load each round trip waited its turn in the event loop
        behind every running job's work: request -> JobAccepted was 45 ms of recording at 20
        jobs/s (bench/PROFILE.md). An unknown VM, or one another job holds (the job's INSERT,
        the block's first statement, fails alone: nothing of the block was written), goes on
        statement by statement in the same transaction."""
        try:
            _, found = await tx.script_select(tx.insert_sqls(_COMMAND_INSERT, [_received(cmd)]),
                                              tx.sql(_VM_NAME, {"vm_id": cmd.vm_id}))
        except IntegrityError:
            return Decision("duplicate")
        if not found:
            decision = await self._failover(tx, cmd, None)
        else:
            job, event = self._failover_job(cmd, found[0][0])
            row = outbox_row(event)
            writes = [tx.sql(self._insert_job, job), *tx.insert_sqls(OUTBOX_INSERT, [row]),
                      f"SET {_ACCEPTED_ID} = LAST_INSERT_ID()",
                      tx.sql(_COMMAND_OUTCOME, _outcome(cmd, Decision("accepted", job_id=job["job_id"])))]
            try:
                _, got = await tx.script_select(raw.as_block(writes) if tx.compound else writes,
                                                f"SELECT {_ACCEPTED_ID}", commit=True)
            except IntegrityError as exc:
                if not _is_duplicate_key(exc, "active_vm_id"):
                    raise
                decision = await self._conflict(tx, cmd)
            else:
                return Decision("accepted", job_id=job["job_id"], events=(outbox_event(int(got[0][0]), row),),
                                first=job["job_type"] == _LIVE)
        await tx.execute(_COMMAND_OUTCOME, _outcome(cmd, decision))
        return decision

    async def reject_invalid(self, request_id: uuid.UUID, command_type: str | None, vm_id: str | None,
                             detail: str, job_type: JobType | None = None) -> Decision:
        """A readable request_id but an invalid command: `JobRejected` `invalid`, once."""
        async with raw.transaction(self.engine) as tx:
            try:
                await tx.insert(_COMMAND_INSERT, [{
                    "request_id": str(request_id), "command_type": (command_type or "unknown")[:64],
                    "outcome": "rejected_invalid", "detail": detail, "received_at": utcnow()}])
            except IntegrityError:
                return Decision("duplicate")
            decision = await self._reject(tx, request_id, "invalid", detail, job_type=job_type, vm_id=vm_id)
        self.on_outbox()
        return decision

    # ------------------------------------------------------------------ each command

    async def _reject(self, tx: raw.Transaction, request_id: uuid.UUID, reason: RejectReason, detail: str, *,
                      job_type: JobType | None, vm_id: str | None, correlation_id: uuid.UUID | None = None) -> Decision:
        event = JobRejected(
            event_id=uuid.uuid4(), job_id=request_id, job_type=job_type, vm_id=vm_id, sequence=1,
            correlation_id=correlation_id or request_id, causation_id=request_id, occurred_at=utc_now(),
            reason=reason, detail=detail)
        await tx.execute(_SAVEPOINT_REJ, {})
        try:
            written = await insert_event(tx, event)
        except IntegrityError:
            # a job already owns this id's stream (e.g. cancel's request_id equal to a job id)
            await tx.execute(_ROLLBACK_TO_REJ, {})
            return Decision(f"rejected_{reason}", detail=detail)
        return Decision(f"rejected_{reason}", detail=detail, events=(written,))

    def _new_job(self, *, job_id: str, job_type: JobType, vm_id: str, vm_name: str, correlation_id: str,
                 requested_by: str, options: dict[str, Any] | None, active_vm_id: str | None,
                 parent_job_id: str | None = None, plan: dict[str, Any] | None = None) -> tuple[dict[str, Any], JobAccepted]:
        """A new job's row (the parameters of `_insert_job`) and its JobAccepted."""
        now = utcnow()
        job = {
            "job_id": job_id, "request_id": job_id, "vm_id": vm_id, "job_type": SEED_JOB_TYPES[job_type],
            "status": "pending", "source_vm_name": vm_name, "created_at": now, "updated_at": now,
            "correlation_id": correlation_id, "parent_job_id": parent_job_id, "requested_by": requested_by,
            "options": options or {}, "plan": plan, "last_sequence": 1, "active_vm_id": active_vm_id,
            "lease_owner": self.owner}
        steps = STEPS_BY_JOB_TYPE[job_type]
        event = JobAccepted(
            event_id=uuid.uuid4(), job_id=uuid.UUID(job_id), job_type=job_type, vm_id=vm_id, sequence=1,
            correlation_id=uuid.UUID(correlation_id), causation_id=uuid.UUID(job_id), occurred_at=utc_now(),
            vm_name=vm_name, requested_by=requested_by,
            steps=[StepRef(name=s, order=i + 1) for i, s in enumerate(steps)])
        return job, event

    async def _insert_new_job(self, tx: raw.Transaction, job: dict[str, Any], event: JobAccepted) -> OutboxEvent:
        await tx.execute(self._insert_job, job)
        return await insert_event(tx, event)

    def _failover_job(self, cmd: FailoverRequested, vm_name: str) -> tuple[dict[str, Any], JobAccepted]:
        job_id = str(cmd.request_id)
        return self._new_job(job_id=job_id, job_type=cmd.job_type, vm_id=cmd.vm_id, vm_name=vm_name,
                             correlation_id=job_id, requested_by=cmd.requested_by,
                             options=cmd.options.model_dump(), active_vm_id=cmd.vm_id)

    async def _failover(self, tx: raw.Transaction, cmd: FailoverRequested, vm_name: str | None) -> Decision:
        if vm_name is None:
            return await self._reject(tx, cmd.request_id, "not_found",
                                      f"VM {cmd.vm_id!r} is not in vm_replication_contexts: check the vm_id "
                                      "(the source VM's vmware_vm_id) or replicate the VM first",
                                      job_type=cmd.job_type, vm_id=cmd.vm_id)
        # (no savepoint: a duplicate key fails its INSERT alone, the transaction goes on, and a
        # job row that went in is written off with the whole transaction if its event fails)
        try:
            accepted = await self._insert_new_job(tx, *self._failover_job(cmd, vm_name))
        except IntegrityError as exc:
            if not _is_duplicate_key(exc, "active_vm_id"):
                raise
            return await self._conflict(tx, cmd)
        return Decision("accepted", job_id=str(cmd.request_id), events=(accepted,),
                        first=SEED_JOB_TYPES[cmd.job_type] == _LIVE)

    async def _conflict(self, tx: raw.Transaction, cmd: FailoverRequested) -> Decision:
        """The VM is held by another job: `JobRejected` `conflict`, naming it."""
        blocker = next(iter(await tx.fetch(BLOCKER, {"vm_id": cmd.vm_id})), None)
        return await self._reject(tx, cmd.request_id, "conflict", conflict_detail(cmd.vm_id, blocker),
                                  job_type=cmd.job_type, vm_id=cmd.vm_id)

    async def _cleanup(self, tx: raw.Transaction, cmd: CleanupRequested) -> Decision:
        parent_id = str(cmd.failover_job_id)
        parent = next(iter(await tx.fetch(_JOB_FOR_UPDATE, {"job_id": parent_id})), None)
        if parent is None or parent.job_type == "cleanup":
            return await self._reject(tx, cmd.request_id, "not_found",
                                      f"no failover job {parent_id}: check the failover_job_id",
                                      job_type="cleanup", vm_id=None)
        why = None
        if parent.job_type == "live":
            why = "it is a live failover, which is permanent and cannot be cleaned up"
        elif parent.status == "cleaned_up":
            why = "it has already been cleaned up"
        elif parent.status != "completed":
            why = f"it is {parent.status}; only a completed test failover can be cleaned up"
        elif parent.cleanup_job_id:
            why = f"cleanup job {parent.cleanup_job_id} is already running for it"
        if why:
            return await self._reject(tx, cmd.request_id, "not_allowed",
                                      f"failover job {parent_id} cannot be cleaned up: {why}",
                                      job_type="cleanup", vm_id=parent.vm_id,
                                      correlation_id=uuid.UUID(parent_id))
        job_id = str(cmd.request_id)
        accepted = await self._insert_new_job(tx, *self._new_job(
            job_id=job_id, job_type="cleanup", vm_id=parent.vm_id, vm_name=parent.source_vm_name,
            correlation_id=parent_id, requested_by=cmd.requested_by, options=None, active_vm_id=None,
            parent_job_id=parent_id, plan=parent.plan))
        await tx.execute(_SET_CLEANUP, {"job_id": parent_id, "v_cleanup_job_id": job_id, "v_updated_at": utcnow()})
        return Decision("accepted", job_id=job_id, events=(accepted,))

    async def _cancel(self, tx: raw.Transaction, cmd: CancelRequested) -> Decision:
        job = next(iter(await tx.fetch(_JOB_FOR_UPDATE, {"job_id": str(cmd.job_id)})), None)
        if job is None:
            return await self._reject(tx, cmd.request_id, "not_found", f"no job {cmd.job_id}",
                                      job_type=None, vm_id=None)
        if job.ended:
            return await self._reject(tx, cmd.request_id, "not_allowed",
                                      f"job {cmd.job_id} has already ended ({job.status}); only a running "
                                      "job can be cancelled", job_type=None, vm_id=job.vm_id)
        if job.status in ("rolling_back", "failed"):  # (failed, not ended: its rollback is being retried)
            # still running, so the cancel is taken (CONTRACT), but it changes nothing: a
            # rollback is not stopped, and the job ends as its rollback does (a failed step's,
            # or a retried rollback's, JobFailed stays JobFailed)
            return Decision("signalled", job_id=None,
                            detail=f"job {cmd.job_id} is rolling back already (after a failure, a cancel or a "
                                   "RollbackRequested); a rollback is not stopped: the job ends when it does")
        await tx.execute(_SET_CANCEL, {"job_id": job.job_id, "v_updated_at": utcnow()})
        return Decision("signalled", job_id=None)

    async def _rollback(self, tx: raw.Transaction, cmd: RollbackRequested) -> Decision:
        job = next(iter(await tx.fetch(_JOB_FOR_UPDATE, {"job_id": str(cmd.job_id)})), None)
        if job is None:
            return await self._reject(tx, cmd.request_id, "not_found", f"no job {cmd.job_id}",
                                      job_type=None, vm_id=None)
        if job.job_type == "cleanup" or job.status != "failed" or job.rolled_back is None or bool(job.rolled_back):
            return await self._reject(tx, cmd.request_id, "not_allowed",
                                      f"job {cmd.job_id} is {job.status} (rolled_back={job.rolled_back}); a "
                                      "rollback can be retried only for a failed failover whose rollback "
                                      "did not complete", job_type=None, vm_id=job.vm_id)
        await tx.execute(self._retake_for_rollback, {"job_id": job.job_id, "v_owner": self.owner,
                                                     "v_updated_at": utcnow()})
        return Decision("accepted", job_id=job.job_id, first=job.job_type == _LIVE)


def _received(cmd: Command) -> dict[str, Any]:
    """The command's row as it is received (its outcome follows in the same transaction)."""
    return {"request_id": str(cmd.request_id), "command_type": cmd.type, "outcome": "received",
            "received_at": utcnow()}


def _outcome(cmd: Command, decision: Decision) -> dict[str, Any]:
    return {"request_id": str(cmd.request_id), "v_outcome": decision.outcome, "v_job_id": decision.job_id,
            "v_detail": decision.detail}


def conflict_detail(vm_id: str, blocker: Any) -> str:
    """Why a request for `vm_id` is rejected `conflict` (`blocker`: the BLOCKER row), and what to do."""
    if blocker is None:
        return f"VM {vm_id!r} has another job starting at this moment; retry later"
    what = {"test": "test failover", "live": "live failover", "cleanup": "cleanup"}.get(blocker.job_type,
                                                                                       blocker.job_type)
    if blocker.status == "completed" and blocker.job_type == "test":
        todo = "publish a CleanupRequested for it first"
    elif blocker.status == "completed" and blocker.job_type == "live":
        todo = "the VM has been failed over for good"
    elif blocker.status == "failed":
        todo = "its rollback did not complete: finish it with a RollbackRequested (failoverctl rollback)"
    else:
        todo = "wait for it to end, or cancel it"
    return f"VM {vm_id!r} is held by {what} job {blocker.job_id} ({blocker.status}): {todo}"
