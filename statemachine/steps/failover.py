"""The six steps of a test or live failover (CONTRACT.md section 1)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from statemachine.context import JobContext
from statemachine.errors import StepError
from statemachine.naming import sanitize_vm_name, test_vm_name
from statemachine.ports import DeploySpec, LedgerEntry

from .resources import (
    claim_name,
    ensure_attached,
    ensure_detached,
    ensure_snapshot,
    ensure_vm,
    name_taken,
    progress_lines,
    run_vm_command,
)

# A whole disk as the appliance sees it: /dev/vdb, /dev/sdc, /dev/xvdd, /dev/hdb, /dev/nvme1n1,
# or a /dev/disk/by-{id,path,uuid,...} link to one. Matched in full (`fullmatch`: a trailing
# newline does not pass). Anything else is refused before the injection script, which runs as
# root, sees it: relative paths, "..", spaces, options, partitions, and the other nodes of /dev
# (/dev/null, /dev/mem, /dev/tty1, /dev/sda/../..., ...).
DEVICE_PATH = re.compile(
    r"/dev/(?:(?:x?v|s|h)d[a-z]{1,3}|nvme[0-9]{1,3}n[0-9]{1,3}"
    r"|disk/by-(?:id|path|uuid|partuuid|label|partlabel|diskseq)/[A-Za-z0-9_:+@-][A-Za-z0-9_.:+@-]{0,127})"
)


def valid_device_path(path: object) -> bool:
    """Whether `path` is a device path the injection script may be given."""
    return isinstance(path, str) and DEVICE_PATH.fullmatch(path) is not None and ".." not in path


MAX_DISPLAY_NAME = 250  # CloudStack's display_name column is VARCHAR(255)


def display_name(vm_name: str, fallback: str) -> str:
    """The CloudStack display name for a VMware VM name: its printable characters (no control or
    format characters, no lone surrogates), without "~" (the `cs` client signs it differently
    from CloudStack) and without characters beyond the Basic Multilingual Plane (CloudStack's
    tables are utf8mb3: an emoji would fail the deploy); whitespace and control characters
    become single spaces; at most 250 characters; `fallback` when nothing is left."""
    kept = "".join(
        " " if c.isspace() or unicodedata.category(c) == "Cc"
        else c if c.isprintable() and c != "~" and ord(c) <= 0xFFFF else ""
        for c in vm_name
    )
    return " ".join(kept.split())[:MAX_DISPLAY_NAME].strip() or fallback


@dataclass
class StepResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # the reason, when the step did not apply


def _plan(ctx: JobContext) -> dict[str, Any]:
    return ctx.row.plan


def _volumes(ctx: JobContext) -> list[dict[str, Any]]:
    return list(_plan(ctx)["volumes"])


def _root(ctx: JobContext) -> dict[str, Any]:
    return next(v for v in _volumes(ctx) if v["root"])


# --------------------------------------------------------------------------- 1


async def pre_failover_validation(ctx: JobContext) -> StepResult:
    """Check the platform tables and the volumes; resolve the plan every later step follows."""
    vm_id, test = ctx.row.vm_id, ctx.row.job_type == "test-failover"
    source = await ctx.ports.platform.source(vm_id, test=test)
    vm = source.vm
    if vm is None:
        raise StepError("VM_NOT_FOUND", f"VM {vm_id!r} is not in vm_replication_contexts; replicate it first")
    if not (vm.cpu_count or 0) > 0 or not (vm.memory_mb or 0) > 0:
        # (a default would bring a production server up with 1 vCPU and 1 GiB, unsaid)
        raise StepError("VM_SIZE_UNKNOWN", f"VM {vm_id!r} has no CPU count or memory in vm_replication_contexts "
                                           f"(cpu_count={vm.cpu_count!r}, memory_mb={vm.memory_mb!r}); set them to "
                                           "the source VM's vCPUs and MiB of memory and request the failover again")
    job = source.replication
    if job is None:
        raise StepError("NO_REPLICATION", f"VM {vm_id!r} has no replication job; replicate it first")
    if job.status != "completed":
        raise StepError(
            "REPLICATION_NOT_COMPLETED",
            f"the newest replication job {job.id} of VM {vm_id!r} is {job.status!r}, not 'completed'; "
            "wait for it to finish (or run a new sync) and request the failover again",
        )
    disks = source.disks
    if not disks:
        raise StepError("NO_DISKS", f"replication job {job.id} has no disks in vm_disks")
    missing = [d.disk_id for d in disks if d.volume_id is None]
    if missing:
        raise StepError(
            "VOLUME_NOT_FOUND",
            f"disk(s) {', '.join(missing)} of replication job {job.id} point to no ossea_volumes row; "
            "repair vm_disks.ossea_volume_id before failing over",
        )
    ordered = sorted(disks, key=lambda d: (d.unit_number if d.unit_number is not None else 1 << 30, d.disk_id))
    tied = [d.disk_id for d in ordered if d.unit_number == ordered[0].unit_number]
    if len(tied) > 1:  # (VMware numbers units per controller: scsi0:0 and scsi1:0 are both 0)
        ctx.log("WARN", f"disks {', '.join(tied)} share the lowest unit_number ({ordered[0].unit_number}): "
                        f"{tied[0]}, whose disk_id sorts first, is taken as the root (boot) disk; if another "
                        "is the boot disk, correct vm_disks.unit_number and request the failover again",
                disk_ids=tied, root_disk_id=tied[0])
    networks: list[str] = []
    for m in source.mappings:
        if m.destination_network_id not in networks:
            networks.append(m.destination_network_id)
    network_source = ("test" if test else "production") + " network mappings"
    if not networks:
        networks, network_source = [ctx.config.default_network_id], "FAILOVER_NETWORK_ID"
        if not test:  # (the contract's fallback; a production VM on it is worth a word)
            ctx.log("WARN", f"no production network mappings for VM {vm.vm_name} (network_mappings rows with "
                            f"is_test_network=0): the live VM goes on FAILOVER_NETWORK_ID "
                            f"({ctx.config.default_network_id}); if that is not its production network, "
                            "add its mappings and fail it over again", network_id=ctx.config.default_network_id)
    appliance = ctx.config.appliance_vm_id
    volumes: list[dict[str, Any]] = []
    for index, disk in enumerate(ordered):
        assert disk.volume_id is not None
        state = await ctx.retrying("look up volume", ctx.ports.volumes.get_volume, disk.volume_id)
        if state.vm_id != appliance:
            raise StepError(
                "VOLUME_NOT_ON_APPLIANCE",
                f"volume {disk.volume_id} (disk {disk.disk_id}) is attached to "
                f"{state.vm_id or 'no VM'}, not to the appliance {appliance}; "
                "re-attach it to the appliance (or finish the job that holds it) first",
            )
        volumes.append(
            {
                "volume_id": disk.volume_id,
                "disk_id": disk.disk_id,
                "unit_number": disk.unit_number,
                "size_gb": disk.size_gb,
                "root": index == 0,
                "appliance_device_id": state.device_id,
            }
        )
    option = ctx.row.options.get("driver_injection", "auto")
    windows = "windows" in (vm.os_type or "").lower()
    inject = option == "always" or (option == "auto" and windows)
    name = sanitize_vm_name(vm.vm_name)
    plan = {
        "replication_job_id": job.id,
        "vm_name": vm.vm_name,
        "cs_name": test_vm_name(name, ctx.row.job_id) if test else name,
        "display_name": display_name(vm.vm_name, name),
        "cpu_count": vm.cpu_count,
        "memory_mb": vm.memory_mb,
        "os_type": vm.os_type,
        "inject": inject,
        "inject_reason": f"options.driver_injection={option}, os_type={vm.os_type!r}",
        "networks": networks,
        "network_source": network_source,
        "volumes": volumes,
    }
    if not test:
        if (vm.power_state or "").lower() == "poweredon":
            ctx.log("WARN", f"the source VM {vm.vm_name} is powered on (vm_replication_contexts.power_state): the "
                            "live VM starts from the last replication, and whatever the source wrote since is not "
                            "in it; power the source off and let a final replication complete before a live "
                            "failover", power_state=vm.power_state)
        # a live VM's name is the source VM's alone: another job's hold on it, or a VM of it in
        # CloudStack now, is found here, before the injection writes the root (on storage that
        # cannot revert, a re-sync); the claim is kept (vm-creation's own is the same)
        await claim_name(ctx, name)
        taken = await ctx.retrying("VMs of the name", ctx.ports.cloudstack.find_vms, name)
        if taken:
            raise name_taken(name, taken)
    ctx.row.plan = plan
    ctx.log("INFO", f"validated VM {vm.vm_name}: {len(volumes)} volume(s), networks from {network_source}",
            volumes=[v["volume_id"] for v in volumes], networks=networks)
    return StepResult(
        outputs={
            "replication_job_id": job.id,
            "volumes": [v["volume_id"] for v in volumes],
            "root_volume_id": volumes[0]["volume_id"],
            "networks": networks,
            "vm_name": plan["cs_name"],
        }
    )


# --------------------------------------------------------------------------- 2


async def cloudstack_snapshot(ctx: JobContext) -> StepResult:
    """One BackedUp snapshot per replicated volume; a test failover needs them revertable."""
    kind = "test" if ctx.row.job_type == "test-failover" else "live"
    snaps = []
    for vol in _volumes(ctx):
        volume_id = vol["volume_id"]
        name = f"{kind}-failover-{ctx.row.job_id[:8]}-{volume_id[:8]}"
        snap = await ctx.retrying(
            f"snapshot of volume {volume_id}", ensure_snapshot, ctx, volume_id, name
        )
        ctx.log("INFO", f"snapshot {snap.id} of volume {volume_id} is BackedUp", snapshot_id=snap.id,
                volume_id=volume_id, revertable=snap.revertable)
        snaps.append({"volume_id": volume_id, "snapshot_id": snap.id, "revertable": snap.revertable})
    if kind == "test":
        bad = [s for s in snaps if not s["revertable"]]
        if bad:
            raise StepError(
                "SNAPSHOT_NOT_REVERTABLE",
                "snapshot(s) " + ", ".join(f"{s['snapshot_id']} (volume {s['volume_id']})" for s in bad)
                + " cannot be reverted on this primary storage, so a test failover could not be undone; "
                "nothing was written to the volumes. Use storage that supports snapshot revert "
                "(e.g. Ceph RBD, or KVM with qcow2) for test failovers",
            )
    root = snaps[0]["snapshot_id"]
    await ctx.commit(job={"ossea_snapshot_id": root})
    return StepResult(outputs={"snapshots": [{"volume_id": s["volume_id"], "snapshot_id": s["snapshot_id"]} for s in snaps]})


# --------------------------------------------------------------------------- 3


async def virtio_driver_injection(ctx: JobContext) -> StepResult:
    """Inject the VirtIO drivers into the root volume while the appliance holds it."""
    plan = _plan(ctx)
    if not plan["inject"]:
        return StepResult(skipped=f"driver injection not needed ({plan['inject_reason']})")
    root = _root(ctx)["volume_id"]
    ledger = await ctx.ledger()
    entry = ledger.get(f"write:{root}")
    if entry is not None and entry.status == "done":
        return StepResult(outputs={"device_path": entry.data.get("device_path"), "resumed": True})
    info = await ctx.retrying("device path lookup", lambda: ctx.ports.volumes.get_volume(root))
    path = info.device_path
    if info.vm_id != ctx.config.appliance_vm_id or not path:
        raise StepError(
            "DEVICE_PATH_UNKNOWN",
            f"the Volume Daemon reports no device path on the appliance for root volume {root}; "
            "check that the volume is attached to the appliance",
        )
    if not valid_device_path(path):
        raise StepError(
            "DEVICE_PATH_INVALID",
            f"the Volume Daemon returned {path!r} for volume {root}, which is not a /dev device path; "
            "the injection script was not run. Check the Volume Daemon",
        )
    entry = LedgerEntry(key=f"write:{root}", resource_type="volume", action="write", resource_id=root,
                        data={"device_path": path, "by": "virtio-driver-injection"})
    await ctx.record(entry)  # before the script runs: the volume may be written from now on

    await ctx.ports.injection.inject(path, ctx.row.job_id,
                                     progress_lines(ctx, source="inject-virtio-drivers", device_path=path))
    entry.status = "done"
    await ctx.record(entry)
    return StepResult(outputs={"device_path": path})


# --------------------------------------------------------------------------- 4


async def vm_creation(ctx: JobContext) -> StepResult:
    """Deploy the VM stopped, with the source VM's CPU and memory and the mapped networks."""
    plan, cfg = _plan(ctx), ctx.config
    zone_id = await ctx.retrying("zone lookup", lambda: ctx.ports.cloudstack.resolve_zone(cfg.zone))
    spec = DeploySpec(
        name=plan["cs_name"],
        display_name=plan["display_name"],
        zone_id=zone_id,
        template_id=cfg.template_id,
        service_offering_id=cfg.service_offering_id,
        disk_offering_id=cfg.disk_offering_id,
        network_ids=plan["networks"],
        cpu_count=plan["cpu_count"],
        memory_mb=plan["memory_mb"],
    )
    vm_id = await ctx.retrying("deploy VM", lambda: ensure_vm(ctx, spec))
    ctx.log("INFO", f"VM {spec.name} deployed stopped", destination_vm_id=vm_id)
    await ctx.commit(job={"destination_vm_id": vm_id})
    return StepResult(outputs={"destination_vm_id": vm_id, "name": spec.name, "zone_id": zone_id})


# --------------------------------------------------------------------------- 5


async def volume_attachment(ctx: JobContext) -> StepResult:
    """Give up the disks the deploy made; move the replicated volumes to the VM, root first."""
    cs, ledger = ctx.ports.cloudstack, await ctx.ledger()
    vm_id = ledger["vm"].resource_id
    assert vm_id is not None
    replicated = {v["volume_id"] for v in _volumes(ctx)}
    listed = await ctx.retrying("list VM volumes", lambda: cs.list_vm_volumes(vm_id))
    # what the deploy made: still on the VM, or (after a crash) detached but not yet deleted
    own = [(v.id, v.type) for v in listed if v.id not in replicated]
    own += [(e.resource_id, "detached") for k, e in ledger.items()
            if k.startswith("discard:") and e.resource_id and not e.data.get("deleted")
            and e.resource_id not in {i for i, _ in own}]
    discarded = []
    for volume_id, kind in own:
        assert volume_id is not None
        # (each entry names all the deploy made: a rollback deletes those, and no other volume)
        await ctx.retrying(f"detach {kind} {volume_id}", ensure_detached, ctx, f"discard:{volume_id}", volume_id,
                           durable=True, data={"deploy_volumes": [i for i, _ in own]})
        await ctx.retrying(f"delete volume {volume_id}", cs.delete_volume, volume_id)
        entry = ledger[f"discard:{volume_id}"]
        entry.data["deleted"] = True
        await ctx.record(entry)
        ctx.log("INFO", f"removed the deploy's {kind} volume {volume_id}", volume_id=volume_id)
        discarded.append(volume_id)
    for vol in _volumes(ctx):
        v = vol["volume_id"]
        await ctx.retrying(f"detach {v} from the appliance", ensure_detached, ctx, f"detach:{v}", v,
                           data={"appliance_device_id": vol["appliance_device_id"]})
    attached = []
    for vol in _volumes(ctx):  # root first (device 0), then the others in unit_number order
        v = vol["volume_id"]
        device = await ctx.retrying(f"attach {v}", ensure_attached, ctx, f"attach:{v}", v, vm_id,
                                    root=vol["root"])
        ctx.log("INFO", f"volume {v} attached to {vm_id} as device {device}", volume_id=v, device_id=device)
        attached.append({"volume_id": v, "device_id": device})
    return StepResult(outputs={"discarded_volumes": discarded, "attached": attached})


# --------------------------------------------------------------------------- 6


async def vm_startup_validation(ctx: JobContext) -> StepResult:
    """Start the VM and wait until CloudStack reports it Running."""
    ledger = await ctx.ledger()
    vm_id = ledger["vm"].resource_id
    assert vm_id is not None
    await ctx.retrying("start VM", lambda: run_vm_command(ctx, "start:vm", vm_id, "start"))
    vm = await ctx.retrying("VM state", lambda: ctx.ports.cloudstack.get_vm(vm_id))
    if vm is None or vm.state != "Running":
        raise StepError(
            "VM_NOT_RUNNING",
            f"VM {vm_id} is {vm.state if vm else 'gone'} after start, expected Running; "
            "check its console in CloudStack",
        )
    ctx.log("INFO", f"VM {vm.name} is Running", destination_vm_id=vm_id)
    return StepResult(outputs={"destination_vm_id": vm_id, "state": vm.state})


FAILOVER_STEP_FUNCS = {
    "pre-failover-validation": pre_failover_validation,
    "cloudstack-snapshot": cloudstack_snapshot,
    "virtio-driver-injection": virtio_driver_injection,
    "vm-creation": vm_creation,
    "volume-attachment": volume_attachment,
    "vm-startup-validation": vm_startup_validation,
}
