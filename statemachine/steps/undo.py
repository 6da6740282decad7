"""Putting the world back: the phases shared by a failed job's rollback and a cleanup.

Every phase reads the world as it is now (CloudStack and the Volume Daemon) and the ledger of
the failover, so it can run again after a crash, or after a partial earlier attempt, and only
do what is still left. The order is the one that never loses a replica: stop the VM, detach
the replicated volumes from it, only then destroy it (destroying a VM destroys its ROOT
volume), revert what was written, give the volumes back to the appliance in their original
order, and delete the snapshots last.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from statemachine.context import JobContext
from statemachine.errors import NotFound, RefusedError, StepError, TransientError
from statemachine.ports import CsSnapshot, LedgerEntry

from .resources import (
    ensure_attached,
    ensure_detached,
    never_started,
    progress_lines,
    run_vm_command,
    settle,
    vm_of,
    wait_cs,
)


@dataclass
class Target:
    """What is being undone: a failover's plan and ledger (the job's own, or a cleanup's parent)."""

    plan: dict[str, Any]
    ledger: dict[str, LedgerEntry]
    actions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def volumes(self) -> list[dict[str, Any]]:
        return list(self.plan.get("volumes") or [])

    def written(self, everything: bool) -> list[dict[str, Any]]:
        """Volumes whose content may have changed: all once the VM may have run (or for a
        cleanup), else the root volume if the injection ran."""
        if everything or not never_started(self.ledger.get("start:vm")):
            return self.volumes
        return [v for v in self.volumes if f"write:{v['volume_id']}" in self.ledger]

    def snapshot_of(self, volume_id: str) -> str | None:
        entry = self.ledger.get(f"snapshot:{volume_id}")
        return entry.resource_id if entry else None

    def note(self, action: str, resource_type: str, resource_id: str, detail: str | None = None) -> None:
        self.actions.append(
            {"action": action, "resource_type": resource_type, "resource_id": resource_id, "detail": detail}
        )


def planned_actions(target: Target, everything: bool) -> list[dict[str, Any]]:
    """What a rollback will undo, in order (for `RollbackStarted`)."""
    out: list[dict[str, Any]] = []
    vm = target.ledger.get("vm")
    vm_id = (vm.resource_id or vm.name or "") if vm else ""
    if vm and "start:vm" in target.ledger:
        out.append({"action": "stop", "resource_type": "vm", "resource_id": vm_id, "detail": None})
    for key, entry in target.ledger.items():
        if key.startswith("attach:"):
            out.append({"action": "detach", "resource_type": "volume", "resource_id": entry.resource_id,
                        "detail": f"from VM {vm_id}"})
    if vm:
        out.append({"action": "destroy", "resource_type": "vm", "resource_id": vm_id, "detail": None})
    for vol in target.written(everything):
        out.append({"action": "revert", "resource_type": "volume", "resource_id": vol["volume_id"],
                    "detail": f"to snapshot {target.snapshot_of(vol['volume_id'])}"})
    moved = [e for k, e in target.ledger.items() if k.startswith(("detach:", "write:"))]
    for entry in moved:
        if entry.key.startswith("detach:") or everything:
            out.append({"action": "reattach", "resource_type": "volume", "resource_id": entry.resource_id,
                        "detail": "to the appliance"})
    for key, entry in target.ledger.items():
        if key.startswith("snapshot:"):
            out.append({"action": "delete", "resource_type": "snapshot",
                        "resource_id": entry.resource_id or entry.name, "detail": None})
    return [a for a in out if a["resource_id"]]


# --------------------------------------------------------------------------- phases


async def power_off(ctx: JobContext, target: Target) -> None:
    vm = await ctx.retrying("VM state", lambda: vm_of(ctx, target.ledger))
    if vm is not None and vm.state in ("Running", "Starting", "Migrating", "Stopping"):
        start = target.ledger.get("start:vm")
        if ctx.row.job_type != "cleanup" and start is not None and never_started(start):
            # every start's job failed, yet the VM runs: it ran, and every volume is reverted
            start.data["ran"] = True
            target.ledger["start:vm"] = await ctx.record(start)
            ctx.log("WARN", f"VM {vm.id} is {vm.state} though every start of it failed: it ran, so every "
                            "volume is reverted", vm_id=vm.id)
        await ctx.retrying("stop VM", lambda: run_vm_command(ctx, "undo:stop", vm.id, "stop"))
        target.note("stop", "vm", vm.id)
        ctx.log("INFO", f"VM {vm.id} stopped", vm_id=vm.id)


async def detach_from_vm(ctx: JobContext, target: Target) -> None:
    vm = await ctx.retrying("VM state", lambda: vm_of(ctx, target.ledger))
    if vm is None:
        return
    for vol in target.volumes:
        v = vol["volume_id"]
        state = await ctx.retrying("volume state", ctx.ports.volumes.get_volume, v)
        if state.vm_id == vm.id:
            await ctx.retrying(f"detach {v}", ensure_detached, ctx, f"undo:detach:{v}", v)
            target.note("detach", "volume", v, f"from VM {vm.id}")
            ctx.log("INFO", f"volume {v} detached from VM {vm.id}", volume_id=v)


async def delete_vm(ctx: JobContext, target: Target) -> None:
    cs = ctx.ports.cloudstack
    entry = target.ledger.get("vm")
    for failed in list(entry.data.get("failed_ids", [])) if entry else []:
        gone = await ctx.retrying("VM state", cs.get_vm, failed)
        if gone is not None and gone.state not in ("Destroyed", "Expunging"):
            await ctx.retrying("destroy failed VM", run_vm_command, ctx, f"undo:destroy:{failed}", failed, "destroy")
            target.note("destroy", "vm", failed, "left in state Error by a failed deploy")
    vm = await ctx.retrying("VM state", lambda: vm_of(ctx, target.ledger))
    replicated = {v["volume_id"] for v in target.volumes}
    leftovers = [e.resource_id for k, e in target.ledger.items()
                 if k.startswith("discard:") and e.resource_id and not e.data.get("deleted")]
    if vm is None or vm.state in ("Destroyed", "Expunging"):
        await _delete_leftovers(ctx, target, leftovers)
        return
    on_vm = await ctx.retrying("list VM volumes", lambda: cs.list_vm_volumes(vm.id))
    # a data disk the deploy made (disk offering) survives the VM's destruction: delete it
    # after. Once volume-attachment began, the ledger names every disk the deploy made (each of
    # its `discard:` entries lists them all): another volume on the VM is someone else's
    # (attached to the test VM by hand, say), and the destroy leaves it detached, whole
    extra = [v.id for v in on_vm if v.id not in replicated and v.type != "ROOT" and v.id not in leftovers]
    discards = [e for k, e in target.ledger.items() if k.startswith("discard:")]
    if discards:
        made = {i for e in discards for i in e.data.get("deploy_volumes", [e.resource_id])}
        leftovers += [i for i in extra if i in made]
        for foreign in (i for i in extra if i not in made):
            target.note("keep", "volume", foreign, f"not made by this job: left detached from VM {vm.id}")
            ctx.log("WARN", f"volume {foreign} on VM {vm.id} was not made by this job: it is not deleted, and "
                            "the VM's destruction leaves it detached; attach it where it belongs",
                    volume_id=foreign, vm_id=vm.id)
    else:
        leftovers += extra
    still = [v.id for v in on_vm if v.id in replicated]
    if still:  # guarantee 5: destroying the VM would destroy the replica attached as its ROOT
        raise StepError(
            "REPLICA_STILL_ATTACHED",
            f"VM {vm.id} still holds replicated volume(s) {', '.join(still)}; it was not destroyed. "
            "Detach them first",
        )
    await ctx.retrying("destroy VM", lambda: run_vm_command(ctx, "undo:destroy", vm.id, "destroy"))
    target.note("destroy", "vm", vm.id)
    ctx.log("INFO", f"VM {vm.id} destroyed", vm_id=vm.id)
    await _delete_leftovers(ctx, target, leftovers)


async def _delete_leftovers(ctx: JobContext, target: Target, volume_ids: Sequence[str | None]) -> None:
    """Volumes the deploy created that are not replicas: delete them (gone is fine)."""
    cs = ctx.ports.cloudstack
    for volume_id in volume_ids:
        if not volume_id:
            continue
        try:
            await ctx.retrying("volume state", ctx.ports.volumes.get_volume, volume_id)
        except NotFound:
            continue  # a ROOT destroyed with its VM, or already deleted
        await ctx.retrying(f"detach {volume_id}", ensure_detached, ctx, f"undo:discard:{volume_id}", volume_id,
                           durable=True)
        await ctx.retrying(f"delete volume {volume_id}", cs.delete_volume, volume_id)
        target.note("delete", "volume", volume_id, "created by the deploy")
        ctx.log("INFO", f"volume {volume_id} made by the deploy deleted", volume_id=volume_id)


# a live failover may run on storage whose snapshots CloudStack cannot revert (revertable
# false): its rollback cannot put the written volume back, and says what can
_NOT_REVERTABLE = ("snapshot {snapshot} of volume {v} is not revertable on its storage (CloudStack's revertable "
                   "false), so the volume cannot be reverted to it; it is left detached (the replication must "
                   "not write onto it as it is). Restore its content another way (a volume made from the "
                   "snapshot, copied onto it), or re-sync the replication in full; then attach it to the "
                   "appliance, delete the snapshot and retry the rollback")


_GONE = ("gone (deleted outside this job?): {which}. A volume cannot be reverted to a snapshot that is gone; "
         "it is left detached (the replication must not write onto it as it is). Restore its content another "
         "way (re-sync the replication in full), attach it to the appliance and retry: the retry takes it as "
         "restored")


async def revert_volumes(ctx: JobContext, target: Target, everything: bool) -> None:
    for vol in target.written(everything):
        v = vol["volume_id"]
        snapshot = target.snapshot_of(v)
        if snapshot is None:
            raise StepError("SNAPSHOT_MISSING", f"volume {v} was written but has no snapshot in the ledger")
        key = f"undo:revert:{v}"
        if target.ledger.get(key) and target.ledger[key].status == "done":
            continue
        try:
            await _revert_one(ctx, target, vol, snapshot, key)
        except StepError as exc:
            # the failure (and a rollback's manual actions) asks for the volumes left to revert
            # to be restored by hand: each is marked as asked (with the failure's commit), so
            # that a retry finding its snapshot deleted since takes it as restored. A snapshot
            # gone before any try is named in the failure, all of them at once
            gone = await _ask_by_hand(ctx, target, everything, v, gone_too=exc.code == "SNAPSHOT_GONE")
            if exc.code == "SNAPSHOT_GONE" and gone:
                raise StepError("SNAPSHOT_GONE", _GONE.format(which=", ".join(
                    f"snapshot {target.snapshot_of(u)} of volume {u}" for u in gone))) from exc
            raise
        if target.ledger[key].data.get("by_hand"):
            target.note("revert", "volume", v, f"to snapshot {snapshot}, by hand (the snapshot is gone)")
            continue
        target.note("revert", "volume", v, f"to snapshot {snapshot}")
        ctx.log("INFO", f"volume {v} reverted to snapshot {snapshot}", volume_id=v, snapshot_id=snapshot)


async def _revert_one(ctx: JobContext, target: Target, vol: dict[str, Any], snapshot: str, key: str) -> None:
    cs, vd, v = ctx.ports.cloudstack, ctx.ports.volumes, vol["volume_id"]
    wrote = target.ledger.get(f"write:{v}")
    if wrote is not None and wrote.status != "done" and wrote.data.get("device_path") \
            and ctx.row.job_type != "cleanup":
        # the job's own injection did not finish: a run of it that outlived a killed process
        # may still write the volume (still at that device: the injection comes before any
        # move); it ends before the volume is detached and reverted
        path = wrote.data["device_path"]
        await ctx.ports.injection.wait_idle(path, progress_lines(ctx, device_path=path))
    state = await ctx.retrying("volume state", vd.get_volume, v)
    if state.vm_id is not None:  # revertSnapshot needs the volume detached (or its VM stopped)
        earlier = target.ledger.get(f"undo:predetach:{v}")
        if earlier is not None and earlier.status == "done":
            # an earlier try of this rollback detached it, and it was attached again since
            # (by hand, following the manual actions): detached again, not taken as done
            earlier.status, earlier.operation_id = "intended", None
        await ctx.retrying(f"detach {v}", ensure_detached, ctx, f"undo:predetach:{v}", v,
                           data={"appliance_device_id": vol["appliance_device_id"]})

    async def revert() -> None:
        entry = target.ledger.get(key) or LedgerEntry(key=key, resource_type="volume", action="revert",
                                                       resource_id=v, data={"snapshot_id": snapshot})
        if entry.cs_job_id is None:
            try:
                if target.ledger[f"snapshot:{v}"].data.get("revertable") is False:
                    raise StepError("SNAPSHOT_NOT_REVERTABLE", _NOT_REVERTABLE.format(v=v, snapshot=snapshot))
                start = await cs.revert_snapshot(snapshot)
            except StepError as exc:
                if exc.transient or await cs.get_snapshot(snapshot) is not None:
                    raise
                elif entry.data.get("refused"):
                    # an earlier try failed and asked for it by hand; the snapshot is gone
                    # since: deleted by hand, which is asked for only once the volume was
                    # restored (the operator's word is all there is)
                    ctx.log("WARN", f"snapshot {snapshot} of volume {v} is gone since an earlier try: the "
                                    "volume is taken as restored by hand", volume_id=v, snapshot_id=snapshot)
                    entry.status, entry.data["by_hand"] = "done", True
                    await ctx.record(entry)
                    target.ledger[key] = entry
                    return
                else:
                    raise StepError("SNAPSHOT_GONE", _GONE.format(which=f"snapshot {snapshot} of volume {v}")) from exc
            entry.cs_job_id = start.job_id
            await ctx.record(entry)
            target.ledger[key] = entry
        # a poll that failed (an outage, the API limit) waits on the same job again: a
        # second revert beside it would fail (the volume is not Ready while it runs)
        try:
            await wait_cs(ctx, entry, ctx.config.async_job_timeout, made=False)
        except StepError as exc:
            if exc.failed_job is not None and await _revert_ended(ctx, v):
                raise TransientError("REVERT_RAN_BESIDE", f"revert of volume {v} failed while another revert of it "
                                     "ran; that one has ended: reverting again") from exc
            raise
        entry.status = "done"
        await ctx.record(entry, durable=False)  # its job id is recorded: a resume waits on it again

    await ctx.retrying(f"revert {v}", revert)


REVERTING = "RevertSnapshotting"  # CloudStack's Volume.State while a revert runs


async def _revert_ended(ctx: JobContext, volume_id: str) -> bool:
    """Whether another revert was running on the volume when ours failed (CloudStack fails a
    revert's job at once while one runs: the volume is RevertSnapshotting, not Ready), waited
    for until it ended. It is most likely an earlier call of this rollback whose answer was
    lost (no job id came back), or another revert to the same snapshot (an earlier cleanup's,
    an operator's following the manual actions): the caller reverts again once it ended; to
    the same snapshot a second revert changes nothing the first did, and does it if the first
    failed."""
    cs = ctx.ports.cloudstack
    if await cs.volume_state(volume_id) != REVERTING:
        return False
    ctx.log("WARN", f"another revert is running on volume {volume_id} (an earlier call's whose answer was lost, "
                    "most likely): waiting for it to end, then reverting again", volume_id=volume_id)

    async def ended() -> tuple[str | None] | None:
        state = await cs.volume_state(volume_id)
        return None if state == REVERTING else (state,)

    await settle(ended, ctx.config.async_job_timeout, "CLOUDSTACK_JOB_TIMEOUT",
                 f"the revert running on volume {volume_id}")
    return True


async def _ask_by_hand(ctx: JobContext, target: Target, everything: bool, first: str, *,
                       gone_too: bool) -> list[str]:
    """Marks the volumes left to revert, from `first` on, as asked to be restored by hand: those
    whose snapshot exists (the manual actions ask for a revert to it), and with `gone_too` those
    whose snapshot is gone (the failure names them); returns the latter. A volume whose revert
    job was recorded is not marked (a retry waits on it); a lookup that fails marks nothing. The
    marks go with the failure's commit."""
    left = [vol["volume_id"] for vol in target.written(everything)]
    gone: list[str] = []
    for v in left[left.index(first):]:
        key = f"undo:revert:{v}"
        entry = target.ledger.get(key)
        snapshot = target.snapshot_of(v)
        if snapshot is None or (entry is not None and (entry.status == "done" or entry.cs_job_id)):
            continue
        try:
            exists = await ctx.ports.cloudstack.get_snapshot(snapshot) is not None
        except StepError:
            continue
        if not exists:
            gone.append(v)
            if not gone_too:
                continue
        entry = entry or LedgerEntry(key=key, resource_type="volume", action="revert", resource_id=v,
                                     data={"snapshot_id": snapshot})
        entry.data["refused"] = True
        await ctx.record(entry, durable=False)
        target.ledger[key] = entry
    return gone


async def reattach_to_appliance(ctx: JobContext, target: Target) -> None:
    """Every replicated volume back on the appliance, in its original relative order."""
    vd, appliance = ctx.ports.volumes, ctx.config.appliance_vm_id
    ordered = sorted(target.volumes, key=lambda v: (v["appliance_device_id"] or 0, v["unit_number"] or 0))
    states = {}
    for vol in ordered:
        v = vol["volume_id"]
        states[v] = await ctx.retrying("volume state", vd.get_volume, v)
    elsewhere = [v for v, s in states.items() if s.vm_id not in (None, appliance)]
    if elsewhere:
        raise StepError("VOLUME_BUSY", f"volume(s) {', '.join(elsewhere)} are attached to another VM")
    missing = [i for i, vol in enumerate(ordered) if states[vol["volume_id"]].vm_id is None]
    if not missing:
        return
    # Re-attaching takes the lowest free device ids: to keep the original order, volumes
    # after the first missing one come off and go back on in order too.
    for vol in ordered[missing[0]:]:
        v = vol["volume_id"]
        if states[v].vm_id == appliance:
            await ctx.retrying(f"detach {v}", ensure_detached, ctx, f"undo:reorder:{v}", v)
    for vol in ordered[missing[0]:]:
        v = vol["volume_id"]
        device = await ctx.retrying(f"attach {v} to the appliance", ensure_attached, ctx,
                                    f"undo:reattach:{v}", v, appliance, root=False)
        target.note("reattach", "volume", v, f"to the appliance as device {device}")
        ctx.log("INFO", f"volume {v} re-attached to the appliance as device {device}", volume_id=v,
                device_id=device)


# the states in which CloudStack's deleteSnapshot refuses a snapshot (DefaultSnapshotStrategy:
# a job is taking it, or copying it); it deletes one in any other (Allocated, CreatedOnPrimary,
# Error, Destroying, BackedUp)
SNAPSHOT_IN_WORK = ("Creating", "BackingUp", "Copying")


async def _snapshot_settled(ctx: JobContext, snapshot_id: str, deadline: float) -> CsSnapshot | None:
    """The snapshot once no job works on it (None: gone), or as it is at `deadline`."""
    cs = ctx.ports.cloudstack

    async def settled() -> tuple[CsSnapshot | None] | None:
        now = await ctx.retrying("snapshot state", cs.get_snapshot, snapshot_id)
        done = now is None or now.state not in SNAPSHOT_IN_WORK or time.monotonic() >= deadline
        return (now,) if done else None

    # (its own deadline is only a bound on the looks themselves: `settled` ends at `deadline`)
    (snap,) = await settle(settled, max(0.0, deadline - time.monotonic()) + ctx.config.snapshot_timeout,
                           "SNAPSHOT_STILL_CREATING", f"snapshot {snapshot_id}")
    return snap


async def delete_snapshots(ctx: JobContext, target: Target) -> None:
    cs = ctx.ports.cloudstack
    deleting: dict[str, str] = {}  # snapshot id: its delete's job, while it is waited on
    tried: set[str] = set()  # snapshots a delete was asked for
    # how long the phase waits, all told, for snapshots CloudStack is still taking; those still
    # in work then are left (and named), the others deleted
    deadline = time.monotonic() + ctx.config.snapshot_timeout
    stuck: list[str] = []
    for key, entry in list(target.ledger.items()):
        if not key.startswith("snapshot:"):
            continue
        volume_id = entry.data.get("volume_id", "")
        # the snapshot, failed attempts (state Error), and any of that name a crash hid from us
        ids = {i for i in [entry.resource_id, *entry.data.get("failed_ids", [])] if i}
        if entry.name:
            named = await ctx.retrying("snapshot lookup",
                                       cs.find_snapshots, entry.name or "", volume_id)
            ids |= {s.id for s in named}
        for snapshot_id in sorted(ids):
            snap = await ctx.retrying("snapshot state", cs.get_snapshot, snapshot_id)
            if snap is not None and snap.state in SNAPSHOT_IN_WORK:
                # CloudStack refuses to delete it until its job ends (a snapshot whose wait
                # timed out, or taken by a run a crash cut short): wait for that
                ctx.log("INFO", f"snapshot {snap.id} of volume {volume_id} is {snap.state}: waiting for CloudStack "
                                "to finish it before deleting it", snapshot_id=snap.id)
                snap = await _snapshot_settled(ctx, snap.id, deadline)
                if snap is not None and snap.state in SNAPSHOT_IN_WORK:
                    stuck.append(f"snapshot {snap.id} of volume {volume_id} ({snap.state})")
                    ctx.log("WARN", f"snapshot {snap.id} of volume {volume_id} is still {snap.state}: not deleted "
                                    "(CloudStack refuses to while its job works on it)", snapshot_id=snap.id)
                    continue
            if snap is None:
                continue

            async def delete(snapshot_id: str = snap.id) -> None:
                # a poll that failed waits on the same job again (not a second delete of a
                # snapshot being destroyed); a job that failed (or one CloudStack purged) is
                # tried anew, unless the snapshot is gone by then
                if snapshot_id not in deleting:
                    if snapshot_id in tried and await cs.get_snapshot(snapshot_id) is None:
                        return
                    tried.add(snapshot_id)
                    deleting[snapshot_id] = (await cs.delete_snapshot(snapshot_id)).job_id
                try:
                    await cs.wait_job(deleting[snapshot_id], ctx.config.async_job_timeout)
                except StepError as exc:
                    if exc.failed_job is not None:
                        del deleting[snapshot_id]
                    elif isinstance(exc, RefusedError) and exc.code == "CLOUDSTACK_REFUSED":
                        lost = deleting.pop(snapshot_id)
                        raise TransientError("CLOUDSTACK_JOB_LOST", f"CloudStack no longer knows async job {lost} "
                                             f"({exc.message}); looking at snapshot {snapshot_id} itself") from exc
                    raise

            await ctx.retrying(f"delete snapshot {snap.id}", delete)
            target.note("delete", "snapshot", snap.id)
            ctx.log("INFO", f"snapshot {snap.id} deleted", snapshot_id=snap.id)
    if stuck:
        raise StepError("SNAPSHOT_STILL_CREATING",
                        f"still in work in CloudStack after {ctx.config.snapshot_timeout:.0f} s, so not deleted "
                        f"(CloudStack refuses to while a job works on a snapshot): {', '.join(stuck)}; once "
                        "CloudStack has finished or failed that work, retry (or delete them by hand); if CloudStack "
                        "is only slow, raise FAILOVER_SNAPSHOT_TIMEOUT_SECONDS")


async def undo_all(ctx: JobContext, target: Target, everything: bool) -> None:
    """The whole undo, in the only safe order."""
    await power_off(ctx, target)
    await detach_from_vm(ctx, target)
    await delete_vm(ctx, target)
    await revert_volumes(ctx, target, everything)
    await reattach_to_appliance(ctx, target)
    await delete_snapshots(ctx, target)


async def _exists(cs: Any, snapshot_id: str, seen: dict[str, bool]) -> bool:
    """Whether CloudStack lists the snapshot (True when the lookup fails: best effort), asked
    once per snapshot (`seen`)."""
    if snapshot_id not in seen:
        try:
            seen[snapshot_id] = await cs.get_snapshot(snapshot_id) is not None
        except Exception:
            seen[snapshot_id] = True
    return seen[snapshot_id]


async def manual_actions(ctx: JobContext, target: Target, everything: bool) -> list[dict[str, Any]]:
    """What an operator must still do, from the world as it is now (best effort: where a
    lookup fails, the ledger's ids are listed)."""
    out: list[dict[str, Any]] = []
    seen: dict[str, bool] = {}  # snapshot id: whether CloudStack lists it
    cs, vd, appliance = ctx.ports.cloudstack, ctx.ports.volumes, ctx.config.appliance_vm_id
    try:
        vm = await vm_of(ctx, target.ledger)
    except Exception:
        entry = target.ledger.get("vm")
        vm = None
        if entry and entry.resource_id:
            out.append({"action": "destroy", "resource_type": "vm", "resource_id": entry.resource_id,
                        "detail": "stop it, detach every replicated volume from it, then destroy it"})
    if vm is not None and vm.state not in ("Destroyed", "Expunging"):
        out.append({"action": "destroy", "resource_type": "vm", "resource_id": vm.id,
                    "detail": "stop it, detach every replicated volume from it, then destroy it (expunge)"})
    written = {v["volume_id"] for v in target.written(everything)}
    for vol in target.volumes:
        v = vol["volume_id"]
        reverted = target.ledger.get(f"undo:revert:{v}")
        if v in written and not (reverted and reverted.status == "done"):
            snap = target.ledger.get(f"snapshot:{v}")
            detail = f"revert to snapshot {target.snapshot_of(v)} while detached"
            if reverted is not None and reverted.cs_job_id:
                detail = (f"CloudStack's revert job {reverted.cs_job_id} for it (to snapshot "
                          f"{target.snapshot_of(v)}) may still run: let it end, then retry the rollback")
            elif snap is not None and snap.resource_id and not await _exists(cs, snap.resource_id, seen):
                detail = (f"its snapshot {snap.resource_id} is gone: restore its content another way (re-sync the "
                          "replication in full) while detached")
            elif snap is not None and snap.data.get("revertable") is False:
                detail += (" (not revertable on its storage: restore its content from a volume made from the "
                           "snapshot, or re-sync the replication in full)")
            out.append({"action": "revert", "resource_type": "volume", "resource_id": v, "detail": detail})
        try:
            state = await vd.get_volume(v)
            on_appliance = state.vm_id == appliance
        except Exception:
            on_appliance = False
        if not on_appliance:
            out.append({"action": "reattach", "resource_type": "volume", "resource_id": v,
                        "detail": f"attach to the appliance {appliance} (original device "
                                  f"{vol['appliance_device_id']})"})
    for key, entry in target.ledger.items():
        if key.startswith("snapshot:") and entry.resource_id:
            if await _exists(cs, entry.resource_id, seen):
                out.append({"action": "delete", "resource_type": "snapshot", "resource_id": entry.resource_id,
                            "detail": "delete it once the volume is reverted and back on the appliance"})
    return out


# --------------------------------------------------------------------------- cleanup steps


async def _cleanup_target(ctx: JobContext) -> Target:
    parent = ctx.row.parent_job_id
    assert parent is not None
    ledger = {e.key: e for e in await ctx.ports.store.ledger(parent)}
    # An earlier cleanup of this failover that failed may have reverted volumes and deleted
    # their snapshots (they go last): its reverts done count (there is no snapshot left to
    # revert to again). Its other entries do not: what they moved, the world is read for.
    for e in await ctx.ports.store.cleanup_ledgers(parent, ctx.row.vm_id):
        if e.key.startswith("undo:revert:") and (e.status == "done" or e.data.get("refused")):
            ledger[e.key] = e  # (a refused one: an earlier cleanup said what to do by hand)
    # the cleanup's own entries (undo:*) make its phases resumable
    ledger.update({k: e for k, e in (await ctx.ledger()).items()})
    return Target(plan=ctx.row.plan, ledger=ledger)


def _cleanup_step(phase: str):  # type: ignore[no-untyped-def]
    async def run(ctx: JobContext) -> Any:
        from .failover import StepResult

        target = await _cleanup_target(ctx)
        if phase == "power-off":
            await power_off(ctx, target)
        elif phase == "volume-detachment":
            await detach_from_vm(ctx, target)
        elif phase == "vm-deletion":
            await delete_vm(ctx, target)
        elif phase == "snapshot-revert":
            await revert_volumes(ctx, target, everything=True)
        elif phase == "volume-reattachment":
            await reattach_to_appliance(ctx, target)
        elif phase == "snapshot-deletion":
            await delete_snapshots(ctx, target)
        return StepResult(outputs={"actions": target.actions})

    return run


CLEANUP_STEP_FUNCS = {
    name: _cleanup_step(name)
    for name in ("power-off", "volume-detachment", "vm-deletion", "snapshot-revert",
                 "volume-reattachment", "snapshot-deletion")
}
