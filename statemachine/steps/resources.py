"""Resumable resource operations: each looks up what may already exist (by the ledger, by
the deterministic name, by the saved CloudStack job id or daemon operation id) before it
creates or moves anything, so re-entering a step after a crash does every action once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from statemachine.context import JobContext
from statemachine.errors import NotFound, RefusedError, StepError, TransientError
from statemachine.ports import (
    CsSnapshot,
    CsVm,
    DaemonOperation,
    DeploySpec,
    LedgerEntry,
)

T = TypeVar("T")
# VM states in which a CloudStack job is still working on the VM (ours from before a crash,
# whose job id was never recorded, or anyone's): wait for it to settle before acting
_VM_BUSY = ("Starting", "Stopping", "Migrating")


async def settle(check: Callable[[], Awaitable[T | None]], timeout: float, code: str, what: str) -> T:
    """Poll `check` (growing pauses) until it returns something; a StepError after `timeout`,
    not tried again (as a wait on a job past its timeout). For work an earlier run started but
    whose job id it could not record."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise StepError(code, f"{what} did not finish within {timeout:.0f} s; look at it in CloudStack, and "
                                  "if it is only slow, raise FAILOVER_SNAPSHOT_TIMEOUT_SECONDS (snapshots) or "
                                  "FAILOVER_ASYNC_JOB_TIMEOUT_SECONDS")
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 2.0)


def progress_lines(ctx: JobContext, **fields: Any) -> Callable[[str], Awaitable[None]]:
    """An `on_line` for the injection port: each line a job log line (with `fields`), sent at
    once (a run, or a wait for one, takes minutes)."""
    async def on_line(line: str) -> None:
        ctx.log("INFO", line, **fields)
        await ctx.flush()
    return on_line


async def _entry(ctx: JobContext, key: str, resource_type: str, action: str,
                 **kw: object) -> tuple[LedgerEntry, bool]:
    """The ledger entry of `key`, recorded now as intended if there is none; and whether it is
    that fresh intent. A fresh intent means no call for it was ever made (the intent is
    written before the call), so nothing made under its name need be looked for."""
    ledger = await ctx.ledger()
    entry = ledger.get(key)
    if entry is None:
        entry = LedgerEntry(key=key, resource_type=resource_type, action=action, **kw)  # type: ignore[arg-type]
        await ctx.record(entry)
        return entry, True
    return entry, False


async def _lost(ctx: JobContext, entry: LedgerEntry, code: str, message: str) -> TransientError:
    """The system no longer knows the job or operation `entry` waited on (its id is cleared by
    the caller): its outcome is unknown, not failed. The entry is recorded without it, and the
    error to raise makes the step's retry look at the resource itself."""
    await ctx.record(entry)
    return TransientError(code, message)


async def wait_cs(ctx: JobContext, entry: LedgerEntry, timeout: float, *, made: bool = True) -> dict[str, Any]:
    """Wait for the entry's CloudStack job (its result). A failed job is forgotten so a retry
    starts anew; any other failure (no answer, the API limit, a wait past its timeout) keeps
    it, so a retry waits on the same job rather than starting a second one beside it (CloudStack
    refuses a revert while one runs: the volume is not Ready). `made`: the job creates the
    entry's resource (a snapshot, a VM), which a failed job leaves in Error for the rollback."""
    assert entry.cs_job_id is not None
    try:
        return await ctx.ports.cloudstack.wait_job(entry.cs_job_id, timeout)
    except StepError as exc:
        if exc.failed_job is not None:  # (also a refusal: a 531 in the job's result)
            # CloudStack keeps what a failed job created (state Error): remember it, so the
            # rollback removes it too, and let a retry (or a retried rollback) start anew
            if made and entry.resource_id:
                entry.data.setdefault("failed_ids", []).append(entry.resource_id)
                entry.resource_id = None
            if "calls" in entry.data:  # (a start's: `never_started`)
                entry.data["failed_calls"] = entry.data.get("failed_calls", 0) + 1
            entry.cs_job_id = None
            await ctx.record(entry)
            raise
        if not isinstance(exc, RefusedError) or exc.code != "CLOUDSTACK_REFUSED":
            raise
        # CloudStack no longer knows the job (431 on queryAsyncJobResult: it purges ended jobs
        # after job.expire.minutes, a day by default): the retry looks at the resource itself
        # (by its id, or name)
        lost = entry.cs_job_id
        entry.cs_job_id = None
        raise await _lost(ctx, entry, "CLOUDSTACK_JOB_LOST", f"CloudStack no longer knows async job {lost} "
                          f"({exc.message}); looking at {entry.resource_type} {entry.resource_id or entry.name} "
                          "itself") from exc


# --------------------------------------------------------------------------- snapshots


async def ensure_snapshot(ctx: JobContext, volume_id: str, name: str) -> CsSnapshot:
    """A `BackedUp` snapshot of the volume, taken at most once for this job."""
    cs = ctx.ports.cloudstack
    entry, fresh = await _entry(
        ctx, f"snapshot:{volume_id}", "snapshot", "create", name=name, data={"volume_id": volume_id}
    )
    taken: CsSnapshot | None = None  # as the finished job returned it
    if entry.status != "done":
        if entry.cs_job_id is None and entry.resource_id is None:
            found = None if fresh else await cs.find_snapshot(name, volume_id)
            if found is not None:
                entry.resource_id = found.id
            else:
                start = await cs.create_snapshot(volume_id, name)
                entry.resource_id, entry.cs_job_id = start.resource_id, start.job_id
            await ctx.record(entry)
        if entry.cs_job_id is not None:
            taken = cs.snapshot_in(await wait_cs(ctx, entry, ctx.config.snapshot_timeout))
    if taken is not None and taken.id == entry.resource_id and taken.state == "BackedUp":
        snap: CsSnapshot | None = taken
    else:
        snap = await cs.get_snapshot(entry.resource_id or "") if entry.resource_id else None
    if snap is not None and entry.cs_job_id is None and snap.state != "BackedUp" and snap.state.lower() != "error":
        # found by its name after a crash: its job (whose id was never recorded) may still be
        # running; wait for CloudStack to finish or fail it rather than failing the step
        snapshot_id = snap.id

        async def settled() -> tuple[CsSnapshot | None] | None:
            now = await cs.get_snapshot(snapshot_id)
            busy = now is not None and now.state != "BackedUp" and now.state.lower() != "error"
            return None if busy else (now,)

        (snap,) = await settle(settled, ctx.config.snapshot_timeout, "SNAPSHOT_NOT_READY",
                                f"snapshot {snapshot_id} of volume {volume_id}")
    if snap is None:
        entry.cs_job_id = entry.resource_id = None
        entry.status = "intended"
        await ctx.record(entry)
        raise TransientError(
            "SNAPSHOT_MISSING", f"snapshot {name} of volume {volume_id} vanished; taking it again"
        )
    if snap.state.lower() == "error":
        # CloudStack keeps a failed snapshot (state Error): remember it for the rollback's
        # deletion, and let the retry take a new one
        entry.data.setdefault("failed_ids", []).append(snap.id)
        entry.cs_job_id = entry.resource_id = None
        await ctx.record(entry)
        raise TransientError("SNAPSHOT_ERROR", f"snapshot {snap.id} of volume {volume_id} is in state Error")
    if snap.state != "BackedUp":
        raise TransientError(
            "SNAPSHOT_NOT_READY", f"snapshot {snap.id} is {snap.state}, expected BackedUp"
        )
    if entry.status != "done":
        entry.status = "done"
        entry.data["revertable"] = snap.revertable
        await ctx.record(entry, durable=False)  # its job id is recorded: a resume finds it done
    return snap


# --------------------------------------------------------------------------- the VM


async def ensure_vm(ctx: JobContext, spec: DeploySpec) -> str:
    """The job's VM, deployed stopped, at most once; returns its id.

    Before its intent is recorded, no VM of the job's name may exist: one that does is not the
    job's (a live failover's name is the source VM's alone, and a VM made by hand or for
    another source VM whose name sanitises the same may hold it), and the job fails saying so,
    with no intent under that name: neither a retry nor the rollback ever looks the name up and
    takes that VM for the job's. A deploy CloudStack refuses (the name taken meanwhile) marks
    the intent as never made, for the same reason."""
    cs = ctx.ports.cloudstack
    ledger = await ctx.ledger()
    held = ledger.get("vm")
    if held is None or held.status != "done" or not held.resource_id:
        await claim_name(ctx, spec.name)
    # (a test failover's name carries 8 hex digits of its job's id: another job's VM left
    # behind can still hold it, so it is looked up too)
    if held is None or (held.data.get("refused") and not held.resource_id and held.cs_job_id is None):
        taken = await cs.find_vms(spec.name)
        if taken:
            raise name_taken(spec.name, taken)
    entry, fresh = await _entry(ctx, "vm", "vm", "create", name=spec.name)
    if entry.data.get("refused") and not entry.resource_id and entry.cs_job_id is None:
        fresh = True  # (its earlier deploy was refused: nothing of it exists under the name)
        entry.data.pop("refused", None)
        await ctx.record(entry)  # before the deploy: a resume after it must look the name up
    if entry.status == "done" and entry.resource_id:
        return entry.resource_id
    if entry.cs_job_id is None and entry.resource_id is None:
        found = None
        for vm in [] if fresh else _own(await cs.find_vms(spec.name), spec.display_name):
            if vm.state == "Error":  # a failed deploy of ours holds the name: remove it first
                await _destroy_failed(ctx, entry, vm.id)
            elif found is None:
                found = vm
        for failed in list(entry.data.get("failed_ids", [])):
            if await cs.get_vm(failed) is not None:
                await _destroy_failed(ctx, entry, failed)
        if found is not None:
            entry.resource_id = found.id
        else:
            try:
                start = await cs.deploy_vm(spec)
            except RefusedError:
                if fresh:  # the intent's first deploy: nothing was made under it, so no look-up by
                    entry.data["refused"] = True  # its name may adopt a VM for it
                    await ctx.record(entry)
                # (otherwise an earlier deploy under this intent, late or timed out, may hold the
                # name: the rollback looks it up and removes it)
                raise
            entry.resource_id, entry.cs_job_id = start.resource_id, start.job_id
        await ctx.record(entry)
    deployed = None
    if entry.cs_job_id is not None:
        deployed = cs.vm_in(await wait_cs(ctx, entry, ctx.config.async_job_timeout))
    if deployed is None or deployed.id != entry.resource_id:
        deployed = await cs.get_vm(entry.resource_id or "") if entry.resource_id else None
    if deployed is None:
        entry.resource_id = entry.cs_job_id = None
        await ctx.record(entry)
        raise TransientError("VM_MISSING", f"the deployed VM {spec.name} is not found; deploying again")
    entry.status = "done"
    await ctx.record(entry, durable=False)  # its id is recorded: a resume finds it deployed
    return deployed.id


def name_taken(name: str, taken: Sequence[CsVm]) -> StepError:
    """VMs of the job's name exist in CloudStack, which the job did not make."""
    return StepError(
        "VM_NAME_TAKEN",
        f"CloudStack already has a VM named {name} (" + ", ".join(f"{vm.id}, {vm.state}" for vm in taken)
        + "), which this job did not make; nothing was changed. Rename or remove that VM (or the source VM's "
        "name, if another source VM sanitises to the same name), then request the failover again",
    )


async def claim_name(ctx: JobContext, name: str) -> None:
    """Hold the VM's name for this job before its intent is recorded, and on every resume or
    rollback that may look it up: between the intent and the deploy's answer the name is the
    job's only hold on its VM, and another job that deployed under it meanwhile (for another
    source VM whose name sanitises the same: a live failover's name is the source VM's alone)
    would have its VM taken for this one's, then attached to, started, or destroyed by this
    one's rollback (`vm_of` looks up by name only while the job holds it)."""
    holder = await ctx.ports.store.claim_vm_name(ctx.row.job_id, name)
    if holder is None:
        return
    if holder.ended:
        what = (f"ended ({holder.status}) with what it made not rolled back: finish its rollback "
                f"(RollbackRequested for job {holder.job_id}) once its cause is fixed")
    else:
        what = f"is still running ({holder.status}): wait for it to end"
    raise StepError(
        "VM_NAME_TAKEN",
        f"job {holder.job_id} holds the VM name {name} (another source VM's name sanitises to the same) "
        f"and {what}, then request this failover again (or rename one of the source VMs); nothing was changed",
    )


async def _destroy_failed(ctx: JobContext, entry: LedgerEntry, vm_id: str) -> None:
    """Destroy a VM a failed deploy of this job left in Error, its job id recorded (under the
    rollback's own key for it) before the wait: a try after a wait that failed waits on the
    same destroy rather than destroying again while it runs."""
    await run_vm_command(ctx, f"undo:destroy:{vm_id}", vm_id, "destroy")
    ctx.log("WARN", f"removed VM {vm_id} left in state Error by a failed deploy", vm_id=vm_id)
    entry.data["failed_ids"] = [i for i in entry.data.get("failed_ids", []) if i != vm_id]
    await ctx.record(entry)


async def vm_of(ctx: JobContext, ledger: dict[str, LedgerEntry]) -> CsVm | None:
    """The job's VM as CloudStack has it now (by the ledger's id, else by its name: only while
    the job holds the name, and only a VM of the job's display name)."""
    cs = ctx.ports.cloudstack
    entry = ledger.get("vm")
    if entry is None:
        return None
    if entry.resource_id:
        return await cs.get_vm(entry.resource_id)
    if entry.data.get("refused") and entry.cs_job_id is None:
        return None  # its deploy was refused: a VM of its name is not the job's (ensure_vm)
    if not entry.name:
        return None
    # (a cleanup looks at its failover's ledger: the name is that job's; a completed test
    # failover recorded its VM's id, so this is the job's own ledger in practice)
    owner = ctx.row.parent_job_id if ctx.row.job_type == "cleanup" and ctx.row.parent_job_id else ctx.row.job_id
    holder = await ctx.ports.store.vm_name_holder(entry.name)
    if holder != owner:
        # Only a job that recorded its deploy before the claims existed, and whose name another
        # job holds now (or held, and released by completing), gets here: a VM of the name may
        # be that job's, and is never looked up. Its own, if its deploy went through with the
        # answer lost, is left for the operator.
        ctx.log_once(f"vm-name-held:{entry.name}", "WARN",
                     f"the VM name {entry.name} is held by job {holder or '(none)'}, not this job: no VM of "
                     f"that name is touched. If this job deployed one before its answer was recorded (before "
                     f"the claims existed), remove it by hand (the VMs named {entry.name} in CloudStack; this "
                     f"job's display name is {ctx.row.plan.get('display_name')!r})", vm_name=entry.name)
        return None
    own = _own(await cs.find_vms(entry.name), ctx.row.plan.get("display_name"))
    return own[0] if own else None


def _own(vms: list[CsVm], display_name: str | None) -> list[CsVm]:
    """Of the VMs of the job's name, those that may be its own: a VM whose display name CloudStack
    gives and differs from the job's was made for another source VM of the same sanitised name
    (the display name is the source VM's own name), or by hand."""
    if not display_name:
        return vms
    return [vm for vm in vms if not vm.display_name or vm.display_name == display_name]


def never_started(entry: LedgerEntry | None) -> bool:
    """Whether the job's VM never ran under this start intent (`start:vm`): every start call
    CloudStack answered was refused, or its job failed (no capacity on any host, say), and none
    went unanswered (a call whose answer was lost may have started it), and the rollback did
    not find the VM running (`ran`: CloudStack can fail a start's job after the hypervisor
    booted the VM). Then only what the injection wrote changed: the data disks need no revert.
    An entry without the count (made before the count was, or its first call's count lost in a
    crash) may have started."""
    if entry is None:
        return True
    if entry.status == "done" or entry.cs_job_id is not None or "calls" not in entry.data or entry.data.get("ran"):
        return False
    return int(entry.data.get("failed_calls", 0)) >= int(entry.data["calls"])


async def run_vm_command(ctx: JobContext, key: str, vm_id: str, command: str) -> None:
    """start / stop / destroy, with the async job id saved before waiting."""
    cs = ctx.ports.cloudstack
    entry, _ = await _entry(ctx, key, "vm", command, resource_id=vm_id)
    if entry.status == "done":
        return
    if entry.cs_job_id is None:
        # resumed after a crash between the call and recording its job id: look first, and
        # let a job still working on the VM (that call's, perhaps) finish before deciding
        async def not_busy() -> tuple[CsVm | None] | None:
            now = await cs.get_vm(vm_id)
            return None if now is not None and now.state in _VM_BUSY else (now,)

        (vm,) = await settle(not_busy, ctx.config.async_job_timeout, "CLOUDSTACK_JOB_TIMEOUT",
                              f"the job working on VM {vm_id}")
        settled = {"start": ("Running",), "stop": ("Stopped",), "destroy": ("Destroyed", "Expunging")}[command]
        if (vm is None and command == "destroy") or (vm is not None and vm.state in settled):
            entry.status = "done"
            await ctx.record(entry, durable=False)  # nothing was called: a resume looks again
            return
        call = {"start": cs.start_vm, "stop": cs.stop_vm, "destroy": cs.destroy_vm}[command]
        if command == "start":  # counted (see `never_started`)
            # the first call's count goes with the next commit (lost in a crash, the entry
            # has none: the VM may have run); a later one's before the call, since a crash
            # would leave the failures counted before it equal to the calls
            again = "calls" in entry.data
            entry.data["calls"] = entry.data.get("calls", 0) + 1
            await ctx.record(entry, durable=again)
        try:
            start = await call(vm_id)
        except RefusedError:
            if command == "start":  # refused: nothing was started (a malformed answer is not this)
                entry.data["failed_calls"] = entry.data.get("failed_calls", 0) + 1
                await ctx.record(entry, durable=False)
            raise
        entry.cs_job_id = start.job_id
        await ctx.record(entry)
    await wait_cs(ctx, entry, ctx.config.async_job_timeout, made=False)
    entry.status = "done"
    await ctx.record(entry, durable=False)  # its job id is recorded: a resume waits on it again


# --------------------------------------------------------------------------- volume moves


async def ensure_detached(ctx: JobContext, key: str, volume_id: str, *, data: dict[str, object] | None = None,
                          durable: bool = False) -> None:
    """The volume detached from whatever VM holds it, through the Volume Daemon.

    Its "done" goes with the job's next commit unless `durable`: a caller that next deletes
    the volume (with no record before that call) needs it written first, or a resume would
    wait for the detach and then not find the volume."""
    vd = ctx.ports.volumes
    entry, _ = await _entry(ctx, key, "volume", "detach", resource_id=volume_id, data=dict(data or {}))
    if entry.status == "done":
        return
    if entry.operation_id is not None:
        await _wait_op(ctx, entry)
    current = await vd.get_volume(volume_id)
    if current.vm_id is not None:
        entry.data.setdefault("from_vm_id", current.vm_id)
        entry.data.setdefault("from_device_id", current.device_id)
        entry.operation_id = await vd.detach(volume_id)
        await ctx.record(entry)
        await _wait_op(ctx, entry)
    entry.status = "done"
    await ctx.record(entry, durable=durable)  # its operation id is recorded: a resume finds it ended


async def ensure_attached(ctx: JobContext, key: str, volume_id: str, vm_id: str, *, root: bool) -> int | None:
    """The volume attached to `vm_id` (as device 0 when `root`), through the Volume Daemon."""
    vd = ctx.ports.volumes
    entry, _ = await _entry(
        ctx, key, "volume", "attach-root" if root else "attach", resource_id=volume_id, data={"vm_id": vm_id}
    )
    if entry.status == "done":
        return entry.data.get("device_id")
    if entry.operation_id is not None:
        await _wait_op(ctx, entry)
    current = await vd.get_volume(volume_id)
    device_id = current.device_id
    if current.vm_id == vm_id and (not root or current.device_id == 0):
        pass
    elif current.vm_id is not None:
        raise StepError(
            "VOLUME_BUSY",
            f"volume {volume_id} is attached to VM {current.vm_id}, not free to attach to {vm_id}; "
            "detach it or check which job holds it",
        )
    else:
        entry.operation_id = await (vd.attach_root if root else vd.attach)(volume_id, vm_id)
        await ctx.record(entry)
        op = await _wait_op(ctx, entry)
        # the operation's response names the device; only an answer without it needs a look-up
        device_id = op.device_id if op.device_id is not None else (await vd.get_volume(volume_id)).device_id
    entry.status = "done"
    entry.data["device_id"] = device_id
    await ctx.record(entry, durable=False)  # its operation id is recorded: a resume finds it ended
    return device_id


async def _wait_op(ctx: JobContext, entry: LedgerEntry) -> DaemonOperation:
    assert entry.operation_id is not None
    try:
        op = await ctx.ports.volumes.wait_operation(entry.operation_id, ctx.config.volume_operation_timeout)
    except NotFound as exc:
        # the daemon no longer knows the operation (it restarted): the retry reads the volume as
        # it is now and acts on that
        lost = entry.operation_id
        entry.operation_id = None
        raise await _lost(ctx, entry, "VOLUME_OPERATION_LOST", f"the Volume Daemon no longer knows operation "
                          f"{lost} on volume {entry.resource_id} (restarted?): {exc.message}; reading the "
                          "volume's state again") from exc
    if op.status != "completed":
        entry.operation_id = None
        await ctx.record(entry)
        raise TransientError(
            "VOLUME_OPERATION_FAILED",
            f"Volume Daemon operation {op.id} on volume {entry.resource_id} ended {op.status}: {op.error}",
        )
    return op
