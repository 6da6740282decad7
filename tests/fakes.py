"""In-memory fakes of every port in `statemachine/ports.py`, small but faithful.

One `FakeWorld` holds what CloudStack and the Volume Daemon would hold (zones, VMs, volumes,
snapshots, async jobs, daemon operations). `FakeCloudStack`, `FakeVolumeDaemon` and
`FakeInjection` all act on that one world, as the real systems act on one cloud. The rules are
CloudStack's, as DESIGN.md lists them (and `emulators/world.py` models them over HTTP):

- destroying a VM destroys the volume attached as its ROOT (device 0); its data disks are
  detached and kept;
- a volume becomes ROOT only by an attach at device 0 of a *stopped* VM that has no device-0
  volume; a ROOT detaches only from a stopped VM, and becomes a data disk;
- a VM starts only with a ROOT at device 0, and a boot writes to every attached volume;
- `revertSnapshot` needs a BackedUp, revertable snapshot and the volume detached or its VM
  stopped; it gives the volume the content the snapshot took;
- async commands answer a job id at once; the job runs at once (or fails, when programmed) and
  `wait_job` reports it, as the adapter does (`CLOUDSTACK_JOB_FAILED` is transient);
- a refusal (a broken rule, an unknown id) is a `RefusedError` at once, as CloudStack's 431 is.

`FakeWorld.faults` fails the Nth call of an operation, named as the API names it
(`createSnapshot`, `deployVirtualMachine`, `startVirtualMachine`, `attach`, `attach-root`,
`detach`, `get-volume`, `inject`, ...), with a `RefusedError`, a `TransientError`, or a job /
operation that runs and fails (`job_fail`; `job_denied`: a CloudStack job failed with 531, a
refusal, as the adapter reports it; `job_slow`: a CloudStack job whose first wait ends past its
timeout, as the adapter reports it, and which has ended by the next; `job_late`: a CloudStack
job still running, its resource untouched, until a wait on it finds it ended; `job_stuck`: a
CloudStack job still running (a snapshot in BackingUp) until the test ends it with
`FakeWorld.finish`, every wait on it meanwhile ending past its timeout).

`FakeJobStore` is the job's transactions: it keeps each `JobRow` and every column written, the
events (the outbox) and the ledger, each commit all or nothing, copied (so what a crashed process
still holds in memory is not what the store has), and fenced: while `owner_ok` is False (or the
row's `last_sequence` differs from the caller's) a commit raises `LeaseLost` and writes nothing.
`Harness` wires it all and builds jobs for seeded VMs.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from schemas.common import STEPS_BY_JOB_TYPE, JobType, is_uuid_text, utc_now
from schemas.events import Event, JobAccepted, StepRef
from statemachine.context import EngineConfig, JobContext, Ports
from statemachine.errors import LeaseLost, NotFound, RefusedError, StepError, TransientError
from statemachine.machine import END_STATES
from statemachine.ports import (
    AsyncStart,
    Commit,
    CsSnapshot,
    CsVm,
    CsVolume,
    DaemonOperation,
    DaemonVolume,
    DeploySpec,
    DiskVolume,
    JobRow,
    LedgerEntry,
    NameHolder,
    NetworkMapping,
    PlatformSource,
    ReplicationJob,
    VmContext,
)

FaultKind = Literal["refused", "transient", "job_fail", "job_denied", "job_slow", "job_late", "job_stuck"]
_HOSTNAME = re.compile(r"[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def new_id() -> str:
    return str(uuid.uuid4())


def device_path_for(device_id: int) -> str:
    """`/dev/vda` for device 0, `/dev/vdb` for 1, ... `/dev/vdaa` past `z` (as virtio names them)."""
    letters, n = "", device_id
    while n >= 0:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
    return "/dev/vd" + letters


# =========================================================================== faults


@dataclass
class FaultRule:
    op: str
    kind: FaultKind
    nth: int  # the first call (1-based, counted per operation) that fails
    times: int | None  # how many calls in a row fail from there (None: all of them)
    fired: int = 0


class Faults:
    """Programmable failures, counted per operation name across the whole world."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.rules: list[FaultRule] = []
        self._armed: list[tuple[str, str, FaultKind, int | None]] = []

    def add(self, op: str, kind: FaultKind = "refused", *, nth: int = 1, times: int | None = 1) -> FaultRule:
        """Fail calls `nth` .. `nth + times - 1` of `op` (counted from the world's creation)."""
        rule = FaultRule(op, kind, nth, times)
        self.rules.append(rule)
        return rule

    def add_next(self, op: str, kind: FaultKind = "refused", *, times: int | None = 1) -> FaultRule:
        """Fail the next call(s) of `op`, whatever was called before."""
        return self.add(op, kind, nth=self.counts[op] + 1, times=times)

    def arm_after(self, trigger_op: str, op: str, kind: FaultKind = "refused", *, times: int | None = 1) -> None:
        """Once `trigger_op` has been called, fail the next call(s) of `op`."""
        self._armed.append((trigger_op, op, kind, times))

    def clear(self) -> None:
        self.rules.clear()
        self._armed.clear()

    def check(self, op: str) -> FaultKind | None:
        for armed in [a for a in self._armed if a[0] == op]:
            self._armed.remove(armed)
            _, target, kind, times = armed
            self.add(target, kind, nth=self.counts[target] + 1 + (target == op), times=times)
        self.counts[op] += 1
        n = self.counts[op]
        for rule in self.rules:
            if rule.op == op and n >= rule.nth and (rule.times is None or n < rule.nth + rule.times):
                rule.fired += 1
                return rule.kind
        return None


class Refusal(Exception):
    """A world rule refused the request (CloudStack's 431, the daemon's 4xx)."""


# =========================================================================== the world


@dataclass
class Vm:
    id: str
    name: str
    display_name: str
    state: str  # Stopped | Running | Error (Destroyed VMs are expunged: gone from the lists)
    zone_id: str
    template_id: str | None = None
    service_offering_id: str | None = None
    network_ids: list[str] = field(default_factory=list)
    cpu_count: int | None = None
    memory_mb: int | None = None
    destroyed: bool = False


@dataclass
class Volume:
    id: str
    name: str
    type: str  # ROOT | DATADISK
    vm_id: str | None
    device_id: int | None
    content: str
    state: str = "Ready"  # Allocated until its deploy job ran
    revertable_storage: bool = True  # whether its primary storage can revert snapshots
    destroyed: bool = False


@dataclass
class Snapshot:
    id: str
    name: str
    volume_id: str
    state: str  # Allocated (at the call) | BackingUp (its job running) | BackedUp | Error
    revertable: bool = False
    content: str | None = None
    destroyed: bool = False


@dataclass
class CsJob:
    id: str
    command: str
    resource_id: str | None
    status: int  # 0 pending, 1 succeeded, 2 failed
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    denied: bool = False  # failed with a 531 (permission denied)
    slow: bool = False  # its first wait ends past its timeout
    later: Callable[[], dict[str, Any]] | None = None  # a job still running: it runs as a wait asks
    stuck: bool = False  # still running until `FakeWorld.finish` ends it
    on_fail: Callable[[], None] | None = None


@dataclass
class Operation:
    id: str
    type: str  # attach | attach-root | detach
    volume_id: str
    vm_id: str | None
    status: str  # completed | failed
    error: str | None = None
    device_id: int | None = None
    device_path: str | None = None


class FakeWorld:
    """CloudStack's resources and the Volume Daemon's operations, with CloudStack's rules."""

    def __init__(self) -> None:
        self.faults = Faults()
        self.zone_id = new_id()
        self.zones = {self.zone_id: "zone1"}
        self.template_id = new_id()
        self.service_offering_id = new_id()
        self.disk_offering_id = new_id()
        self.default_network_id = new_id()
        self.test_network_id = new_id()
        self.prod_network_id = new_id()
        self.networks = {self.default_network_id, self.test_network_id, self.prod_network_id}
        self.vms: dict[str, Vm] = {}
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.jobs: dict[str, CsJob] = {}
        self.operations: dict[str, Operation] = {}
        self._numbers = itertools.count(1)
        self.appliance = self.add_vm("migratekit-oma", "Running")
        self.add_volume("oma-root", vm_id=self.appliance.id, device_id=0)

    # ------------------------------------------------------------------ seeding
    def add_vm(self, name: str, state: str = "Running") -> Vm:
        vm = Vm(new_id(), name, name, state, self.zone_id)
        self.vms[vm.id] = vm
        return vm

    def add_volume(
        self, name: str, *, vm_id: str | None = None, device_id: int | None = None,
        content: str | None = None, revertable_storage: bool = True,
    ) -> Volume:
        vid = new_id()
        if vm_id is not None and device_id is None:
            device_id = self.lowest_free_device(vm_id)
        if vm_id is not None and self.volume_at(vm_id, device_id or 0) is not None:
            raise ValueError(f"device {device_id} of VM {vm_id} is taken")
        volume = Volume(vid, name, "ROOT" if device_id == 0 else "DATADISK", vm_id, device_id,
                        content if content is not None else f"data:{name}",
                        revertable_storage=revertable_storage)
        self.volumes[vid] = volume
        return volume

    # ------------------------------------------------------------------ lookups
    def live_vms(self) -> list[Vm]:
        return [vm for vm in self.vms.values() if not vm.destroyed]

    def live_volumes(self) -> list[Volume]:
        return [v for v in self.volumes.values() if not v.destroyed]

    def live_snapshots(self) -> list[Snapshot]:
        return [s for s in self.snapshots.values() if not s.destroyed]

    def attached(self, vm_id: str) -> list[Volume]:
        """The live volumes attached to a VM, by device id."""
        found = [v for v in self.live_volumes() if v.vm_id == vm_id]
        return sorted(found, key=lambda v: v.device_id or 0)

    def volume_at(self, vm_id: str, device_id: int) -> Volume | None:
        return next((v for v in self.attached(vm_id) if v.device_id == device_id), None)

    def lowest_free_device(self, vm_id: str) -> int:
        taken = {v.device_id for v in self.attached(vm_id)}
        device = 1
        while device in taken:
            device += 1
        return device

    def device_path(self, volume: Volume) -> str | None:
        """Only a volume on the appliance has a device path (the daemon runs there)."""
        if volume.destroyed or volume.vm_id != self.appliance.id or volume.device_id is None:
            return None
        return device_path_for(volume.device_id)

    def volume_at_path(self, path: str) -> Volume | None:
        return next((v for v in self.attached(self.appliance.id) if self.device_path(v) == path), None)

    def vm(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None or vm.destroyed:
            raise Refusal(f"Unable to find a virtual machine with id {vm_id}")
        return vm

    def volume(self, volume_id: str) -> Volume:
        volume = self.volumes.get(volume_id)
        if volume is None or volume.destroyed:
            raise Refusal(f"Unable to find volume with id {volume_id}")
        return volume

    def snapshot(self, snapshot_id: str) -> Snapshot:
        snap = self.snapshots.get(snapshot_id)
        if snap is None or snap.destroyed:
            raise Refusal(f"Unable to find snapshot with id {snapshot_id}")
        return snap

    def observable(self) -> dict[str, Any]:
        """Everything a user of the cloud could see, to compare before and after."""
        return {
            "vms": {vm.id: (vm.name, vm.state) for vm in self.live_vms()},
            "volumes": {v.id: (v.type, v.vm_id, v.device_id, v.content, v.state) for v in self.live_volumes()},
            "snapshots": {s.id: (s.name, s.volume_id, s.state) for s in self.live_snapshots()},
        }

    # ------------------------------------------------------------------ async jobs
    def submit_job(
        self, command: str, resource_id: str | None, run: Callable[[], dict[str, Any]],
        on_fail: Callable[[], None] | None, fault: FaultKind | None,
        begin: Callable[[], None] | None = None,
    ) -> CsJob:
        """The job runs at once: its rules are checked as it runs (a refusal fails it).
        `begin` is the job starting its work (a state it shows while it runs)."""
        job = CsJob(new_id(), command, resource_id, 0, slow=fault == "job_slow", on_fail=on_fail)
        self.jobs[job.id] = job
        if begin is not None:
            begin()
        if fault in ("job_late", "job_stuck"):
            job.later, job.stuck = run, fault == "job_stuck"
            return job
        try:
            if fault in ("job_fail", "job_denied"):
                job.denied = fault == "job_denied"
                raise Refusal(f"injected fault: {command} failed")
            job.result = run()
            job.status = 1
        except Refusal as exc:
            self._failed(job, exc)
        return job

    def _failed(self, job: CsJob, exc: Refusal) -> None:
        job.status, job.error = 2, str(exc)
        if job.on_fail is not None:
            job.on_fail()

    def finish(self, job_id: str) -> None:
        """A job still running (`job_late`, `job_stuck`) ends now."""
        job = self.jobs[job_id]
        run, job.later, job.stuck = job.later, None, False
        assert run is not None, f"job {job_id} is not running"
        try:
            job.result, job.status = run(), 1
        except Refusal as exc:
            self._failed(job, exc)

    # ------------------------------------------------------------------ VMs
    def write(self, volume: Volume, tag: str) -> None:
        volume.content = f"{volume.content}|{tag}"

    def deploy(self, spec: DeploySpec, fault: FaultKind | None) -> tuple[Vm, CsJob]:
        if not _HOSTNAME.fullmatch(spec.name):
            raise Refusal(f"Invalid name {spec.name!r}: VM names follow hostname rules")
        if any(vm.name.lower() == spec.name.lower() for vm in self.live_vms()):
            raise Refusal(f"The vm with hostName {spec.name} already exists in the network domain")
        if spec.zone_id not in self.zones:
            raise Refusal(f"Unable to find zone {spec.zone_id}")
        if spec.template_id != self.template_id:
            raise Refusal(f"Unable to find template {spec.template_id}")
        if spec.service_offering_id != self.service_offering_id:
            raise Refusal(f"Unable to find service offering {spec.service_offering_id}")
        if spec.disk_offering_id is not None and spec.disk_offering_id != self.disk_offering_id:
            raise Refusal(f"Unable to find disk offering {spec.disk_offering_id}")
        if not spec.network_ids or any(n not in self.networks for n in spec.network_ids):
            raise Refusal(f"Unable to find network(s) {list(spec.network_ids)}")
        number = next(self._numbers)
        vm = Vm(new_id(), spec.name, spec.display_name, "Stopped", spec.zone_id, spec.template_id,
                spec.service_offering_id, list(spec.network_ids), spec.cpu_count, spec.memory_mb)
        self.vms[vm.id] = vm
        created = [Volume(new_id(), f"ROOT-{number}", "ROOT", vm.id, 0, f"template:{number}", state="Allocated")]
        if spec.disk_offering_id is not None:
            created.append(Volume(new_id(), f"DATA-{number}", "DATADISK", vm.id, 1, f"empty:{number}",
                                  state="Allocated"))
        for volume in created:
            self.volumes[volume.id] = volume

        def run() -> dict[str, Any]:
            for volume in created:
                volume.state = "Ready"
            return {"virtualmachine": {"id": vm.id, "state": vm.state}}

        def on_fail() -> None:
            vm.state = "Error"

        return vm, self.submit_job("deployVirtualMachine", vm.id, run, on_fail, fault)

    def _require_root(self, vm: Vm) -> None:
        root = self.volume_at(vm.id, 0)
        if root is None or root.type != "ROOT":
            raise Refusal(f"VM {vm.name} has no ROOT volume at device id 0")

    def start(self, vm: Vm, fault: FaultKind | None) -> CsJob:
        if vm.state == "Running":
            raise Refusal(f"The virtual machine {vm.id} ({vm.display_name}) is already running")
        if vm.state != "Stopped":
            raise Refusal(f"VM {vm.name} is in state {vm.state} and can't be started now")
        self._require_root(vm)

        def run() -> dict[str, Any]:
            self._require_root(vm)
            vm.state = "Running"
            for volume in self.attached(vm.id):
                self.write(volume, f"boot:{vm.id}")
            return {"virtualmachine": {"id": vm.id, "state": vm.state}}

        return self.submit_job("startVirtualMachine", vm.id, run, None, fault)

    def stop(self, vm: Vm, fault: FaultKind | None) -> CsJob:
        if vm.state not in ("Running", "Stopped"):
            raise Refusal(f"VM {vm.name} is in state {vm.state} and can't be stopped now")

        def run() -> dict[str, Any]:
            vm.state = "Stopped"
            return {"virtualmachine": {"id": vm.id, "state": vm.state}}

        return self.submit_job("stopVirtualMachine", vm.id, run, None, fault)

    def destroy(self, vm: Vm, fault: FaultKind | None) -> CsJob:
        """Expunge the VM: the ROOT at its device 0 goes with it, data disks are detached."""
        if vm.state not in ("Running", "Stopped", "Error"):
            raise Refusal(f"VM {vm.name} is in state {vm.state} and can't be destroyed now")

        def run() -> dict[str, Any]:
            for volume in self.attached(vm.id):
                if volume.device_id == 0 and volume.type == "ROOT":
                    volume.destroyed = True
                else:
                    volume.vm_id, volume.device_id, volume.type = None, None, "DATADISK"
            vm.destroyed, vm.state = True, "Expunging"
            return {}

        return self.submit_job("destroyVirtualMachine", vm.id, run, None, fault)

    # ------------------------------------------------------------------ volumes
    def check_attach(self, volume: Volume, vm: Vm, device_id: int | None) -> int:
        if volume.destroyed:
            raise Refusal(f"Volume {volume.id} has been removed")
        if volume.vm_id is not None:
            raise Refusal(f"Volume {volume.name} is already attached to VM {volume.vm_id}")
        if vm.destroyed or vm.state not in ("Running", "Stopped"):
            raise Refusal("Please specify a VM that is either running or stopped.")
        if device_id is None:
            return self.lowest_free_device(vm.id)
        if device_id == 0 and vm.state != "Stopped":
            raise Refusal(f"A volume can be attached as device 0 (ROOT) only to a stopped VM; {vm.name} is {vm.state}")
        if self.volume_at(vm.id, device_id) is not None:
            raise Refusal(f"deviceId {device_id} is used by another volume of VM {vm.name}")
        return device_id

    def apply_attach(self, volume: Volume, vm: Vm, device_id: int | None) -> int:
        device = self.check_attach(volume, vm, device_id)
        volume.vm_id, volume.device_id = vm.id, device
        volume.type = "ROOT" if device == 0 else "DATADISK"
        return device

    def apply_detach(self, volume: Volume) -> None:
        if volume.destroyed:
            raise Refusal(f"Volume {volume.id} has been removed")
        if volume.vm_id is None:
            raise Refusal(f"Volume {volume.name} is not attached to any VM")
        vm = self.vms[volume.vm_id]
        if volume.type == "ROOT" and vm.state != "Stopped":
            raise Refusal(f"The ROOT volume {volume.name} can be detached only from a stopped VM")
        if vm.state not in ("Running", "Stopped"):
            raise Refusal("Please specify a VM that is either running or stopped.")
        volume.vm_id, volume.device_id, volume.type = None, None, "DATADISK"

    def delete_volume(self, volume: Volume) -> None:
        if volume.vm_id is not None:
            raise Refusal("Please specify a volume that is not attached to any VM.")
        volume.destroyed = True

    # ------------------------------------------------------------------ snapshots
    def create_snapshot(self, volume: Volume, name: str, fault: FaultKind | None) -> tuple[Snapshot, CsJob]:
        if volume.state != "Ready":
            raise Refusal(f"VolumeId: {volume.id} is not in Ready state but {volume.state}")
        snap = Snapshot(new_id(), name, volume.id, "Allocated")
        self.snapshots[snap.id] = snap

        def begin() -> None:
            snap.state = "BackingUp"

        def run() -> dict[str, Any]:
            if snap.destroyed:  # (deleted while Allocated: CloudStack allows that)
                raise Refusal(f"Snapshot {snap.id} was deleted before it was taken")
            snap.content = volume.content
            snap.state = "BackedUp"
            snap.revertable = volume.revertable_storage
            return {"snapshot": {"id": snap.id, "name": snap.name, "volumeid": snap.volume_id, "state": snap.state,
                                 "revertable": snap.revertable}}

        def on_fail() -> None:
            if not snap.destroyed:
                snap.state = "Error"

        return snap, self.submit_job("createSnapshot", snap.id, run, on_fail, fault, begin)

    def check_revert(self, snap: Snapshot) -> Volume:
        if snap.state != "BackedUp":
            raise Refusal(f"Snapshot {snap.id} is in state {snap.state}; only a BackedUp snapshot can be reverted")
        if not snap.revertable:
            raise Refusal(f"Snapshot {snap.id} is not revertable: its storage does not support it")
        volume = self.volume(snap.volume_id)
        if volume.vm_id is not None and self.vms[volume.vm_id].state != "Stopped":
            raise Refusal("The VM the specified disk is attached to is not in the shutdown state.")
        return volume

    def revert(self, snap: Snapshot, fault: FaultKind | None) -> CsJob:
        """As CloudStack's: its rules are the job's (a deleted snapshot alone is refused at the call)."""

        def run() -> dict[str, Any]:
            volume = self.check_revert(snap)
            volume.content = snap.content or volume.content
            return {}

        return self.submit_job("revertSnapshot", snap.id, run, None, fault)

    def delete_snapshot(self, snap: Snapshot, fault: FaultKind | None) -> CsJob:
        """As CloudStack's: its rules are the job's (a snapshot a job is taking fails it; one
        Allocated, whose job has not begun or failed first, goes)."""

        def run() -> dict[str, Any]:
            if snap.destroyed:
                raise Refusal(f"Snapshot with id: {snap.id} is already destroyed")
            if snap.state in ("Creating", "BackingUp", "Copying"):
                raise Refusal(f"Can't delete snapshot {snap.id} due to it is in {snap.state} Status")
            snap.destroyed = True
            return {"success": True}

        return self.submit_job("deleteSnapshot", snap.id, run, None, fault)


async def _network_turn() -> None:
    """A round trip yields to the loop (so concurrent jobs interleave), and takes no time."""
    await asyncio.sleep(0)


# =========================================================================== CloudStack


class FakeCloudStack:
    """`CloudStackPort` on the fake world, with the adapter's error translation."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def count(self, op: str) -> int:
        return sum(1 for name, _ in self.calls if name == op)

    async def _begin(self, op: str, **params: Any) -> FaultKind | None:
        await _network_turn()
        self.calls.append((op, params))
        fault = self.world.faults.check(op)
        if fault == "refused":
            raise RefusedError("CLOUDSTACK_REFUSED", f"CloudStack refused {op} (431): injected fault")
        if fault == "transient":
            raise TransientError("CLOUDSTACK_ERROR", f"CloudStack failed {op} (530): injected fault")
        return fault

    @staticmethod
    def _refused(op: str, exc: Refusal) -> RefusedError:
        return RefusedError("CLOUDSTACK_REFUSED", f"CloudStack refused {op} (431): {exc}")

    async def _sync(self, op: str, **params: Any) -> None:
        if await self._begin(op, **params) == "job_fail":  # a sync command has no job: a 530
            raise TransientError("CLOUDSTACK_ERROR", f"CloudStack failed {op} (530): injected fault")

    async def resolve_zone(self, zone: str) -> str:
        if is_uuid_text(zone):
            return zone
        await self._sync("listZones", name=zone)
        for zid, name in self.world.zones.items():
            if name == zone:
                return zid
        raise RefusedError("ZONE_NOT_FOUND", f"CloudStack has no zone named {zone!r}; check FAILOVER_ZONE")

    async def wait_job(self, job_id: str, timeout: float) -> dict[str, Any]:
        await self._sync("queryAsyncJobResult", jobid=job_id)
        job = self.world.jobs.get(job_id)
        if job is None:
            raise RefusedError("CLOUDSTACK_REFUSED", f"CloudStack refused queryAsyncJobResult (431): no job {job_id}")
        if job.stuck:
            raise StepError("CLOUDSTACK_JOB_TIMEOUT", f"CloudStack async job {job_id} did not finish within "
                                                      f"{timeout:.0f} s")  # (final, as the adapter's)
        if job.later is not None:  # it has ended by now
            self.world.finish(job_id)
        if job.slow:
            job.slow = False
            raise StepError("CLOUDSTACK_JOB_TIMEOUT", f"CloudStack async job {job_id} did not finish within "
                                                      f"{timeout:.0f} s")  # (final, as the adapter's)
        if job.status == 2:
            failed: StepError = (
                RefusedError("CLOUDSTACK_PERMISSION_DENIED", f"CloudStack refused async job {job_id} for the API key's "
                                                             f"account (531): {job.error}") if job.denied else
                TransientError("CLOUDSTACK_JOB_FAILED", f"CloudStack async job {job_id} failed: {job.error}"))
            failed.failed_job = job_id  # as the adapter marks it
            raise failed
        if job.status != 1:
            raise StepError("CLOUDSTACK_JOB_TIMEOUT", f"CloudStack async job {job_id} did not finish")  # (final)
        return job.result

    @staticmethod
    def _snap(s: Snapshot) -> CsSnapshot:
        return CsSnapshot(s.id, s.name, s.volume_id, s.state, s.revertable)

    def snapshot_in(self, job_result: dict[str, Any]) -> CsSnapshot | None:
        s = job_result.get("snapshot")
        if not isinstance(s, dict) or not {"id", "state", "revertable"} <= s.keys():
            return None
        return CsSnapshot(s["id"], s.get("name", ""), s.get("volumeid", ""), s["state"], s["revertable"])

    def vm_in(self, job_result: dict[str, Any]) -> CsVm | None:
        v = job_result.get("virtualmachine")
        if not isinstance(v, dict) or not {"id", "state"} <= v.keys():
            return None
        return CsVm(v["id"], v.get("name", ""), v["state"], v.get("displayname", ""))

    async def create_snapshot(self, volume_id: str, name: str) -> AsyncStart:
        fault = await self._begin("createSnapshot", volumeid=volume_id, name=name)
        try:
            snap, job = self.world.create_snapshot(self.world.volume(volume_id), name, fault)
        except Refusal as exc:
            raise self._refused("createSnapshot", exc) from None
        return AsyncStart(snap.id, job.id)

    async def find_snapshots(self, name: str, volume_id: str) -> list[CsSnapshot]:
        await self._sync("listSnapshots", name=name, volumeid=volume_id)
        return [self._snap(s) for s in self.world.live_snapshots() if s.name == name and s.volume_id == volume_id]

    async def find_snapshot(self, name: str, volume_id: str) -> CsSnapshot | None:
        found = [s for s in await self.find_snapshots(name, volume_id) if s.state.lower() != "error"]
        return found[0] if found else None

    async def get_snapshot(self, snapshot_id: str) -> CsSnapshot | None:
        await self._sync("listSnapshots", id=snapshot_id)
        snap = self.world.snapshots.get(snapshot_id)
        return self._snap(snap) if snap is not None and not snap.destroyed else None

    async def revert_snapshot(self, snapshot_id: str) -> AsyncStart:
        fault = await self._begin("revertSnapshot", id=snapshot_id)
        try:
            job = self.world.revert(self.world.snapshot(snapshot_id), fault)
        except Refusal as exc:
            raise self._refused("revertSnapshot", exc) from None
        return AsyncStart(None, job.id)

    async def volume_state(self, volume_id: str) -> str | None:
        await self._sync("listVolumes", id=volume_id)
        volume = self.world.volumes.get(volume_id)
        return volume.state if volume is not None and not volume.destroyed else None

    async def delete_snapshot(self, snapshot_id: str) -> AsyncStart:
        fault = await self._begin("deleteSnapshot", id=snapshot_id)
        try:
            job = self.world.delete_snapshot(self.world.snapshot(snapshot_id), fault)
        except Refusal as exc:
            raise self._refused("deleteSnapshot", exc) from None
        return AsyncStart(None, job.id)

    async def deploy_vm(self, spec: DeploySpec) -> AsyncStart:
        if "~" in spec.name or "~" in spec.display_name:
            raise StepError("INVALID_NAME", "VM names must not contain '~'")
        fault = await self._begin("deployVirtualMachine", name=spec.name, displayname=spec.display_name,
                                  zoneid=spec.zone_id, networkids=list(spec.network_ids), startvm=False)
        try:
            vm, job = self.world.deploy(spec, fault)
        except Refusal as exc:
            raise self._refused("deployVirtualMachine", exc) from None
        return AsyncStart(vm.id, job.id)

    async def find_vms(self, name: str) -> list[CsVm]:
        await self._sync("listVirtualMachines", name=name)
        return [CsVm(vm.id, vm.name, vm.state, vm.display_name) for vm in self.world.live_vms() if vm.name == name]

    async def find_vm(self, name: str) -> CsVm | None:
        found = [vm for vm in await self.find_vms(name) if vm.state != "Error"]
        return found[0] if found else None

    async def get_vm(self, vm_id: str) -> CsVm | None:
        await self._sync("listVirtualMachines", id=vm_id)
        vm = self.world.vms.get(vm_id)
        return CsVm(vm.id, vm.name, vm.state, vm.display_name) if vm is not None and not vm.destroyed else None

    async def _vm_command(self, op: str, vm_id: str, action: Callable[[Vm, FaultKind | None], CsJob]) -> AsyncStart:
        fault = await self._begin(op, id=vm_id)
        try:
            job = action(self.world.vm(vm_id), fault)
        except Refusal as exc:
            raise self._refused(op, exc) from None
        return AsyncStart(None, job.id)

    async def start_vm(self, vm_id: str) -> AsyncStart:
        return await self._vm_command("startVirtualMachine", vm_id, self.world.start)

    async def stop_vm(self, vm_id: str) -> AsyncStart:
        return await self._vm_command("stopVirtualMachine", vm_id, self.world.stop)

    async def destroy_vm(self, vm_id: str) -> AsyncStart:
        return await self._vm_command("destroyVirtualMachine", vm_id, self.world.destroy)

    async def list_vm_volumes(self, vm_id: str) -> list[CsVolume]:
        await self._sync("listVolumes", virtualmachineid=vm_id)
        return [CsVolume(v.id, v.name, v.type, v.vm_id, v.device_id) for v in self.world.attached(vm_id)]

    async def delete_volume(self, volume_id: str) -> None:
        await self._sync("deleteVolume", id=volume_id)
        existing = self.world.volumes.get(volume_id)
        if existing is None or existing.destroyed:
            return  # the port's rule, as the real adapter does: already gone is done
        try:
            self.world.delete_volume(self.world.volume(volume_id))
        except Refusal as exc:
            raise self._refused("deleteVolume", exc) from None


# =========================================================================== Volume Daemon


class FakeVolumeDaemon:
    """`VolumeDaemonPort` on the same world: attach, attach-root and detach as operations."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def count(self, op: str) -> int:
        return sum(1 for name, _ in self.calls if name == op)

    async def _begin(self, op: str, **params: Any) -> FaultKind | None:
        await _network_turn()
        self.calls.append((op, params))
        fault = self.world.faults.check(op)
        if fault == "refused":
            raise RefusedError("VOLUME_DAEMON_REFUSED", f"the Volume Daemon refused {op} (409): injected fault")
        if fault == "transient":
            raise TransientError("VOLUME_DAEMON_ERROR", f"the Volume Daemon failed {op} (500): injected fault")
        return fault

    def _volume(self, volume_id: str) -> Volume:
        volume = self.world.volumes.get(volume_id)
        if volume is None or volume.destroyed:
            raise NotFound("VOLUME_DAEMON_NOT_FOUND", f"the Volume Daemon refused (404): volume {volume_id} not found")
        return volume

    async def get_volume(self, volume_id: str) -> DaemonVolume:
        if await self._begin("get-volume", volume_id=volume_id) == "job_fail":
            raise TransientError("VOLUME_DAEMON_ERROR", "the Volume Daemon failed get-volume (500): injected fault")
        v = self._volume(volume_id)
        return DaemonVolume(v.id, v.vm_id, v.device_id, self.world.device_path(v), v.type)

    def _run(self, op_type: str, volume: Volume, vm_id: str | None, fault: FaultKind | None,
             action: Callable[[], None]) -> str:
        op = Operation(new_id(), op_type, volume.id, vm_id, "completed")
        self.world.operations[op.id] = op
        try:
            if fault == "job_fail":
                raise Refusal(f"injected fault: {op_type} failed")
            action()
            op.device_id, op.device_path = volume.device_id, self.world.device_path(volume)
        except Refusal as exc:
            op.status, op.error = "failed", str(exc)
        return op.id

    async def _attach(self, op_type: str, volume_id: str, vm_id: str) -> str:
        fault = await self._begin(op_type, volume_id=volume_id, vm_id=vm_id)
        volume = self._volume(volume_id)
        vm = self.world.vms.get(vm_id)
        if vm is None or vm.destroyed:
            raise RefusedError("VOLUME_DAEMON_REFUSED", f"the Volume Daemon refused (404): VM {vm_id} not found")
        device = 0 if op_type == "attach-root" else None

        def action() -> None:
            self.world.apply_attach(volume, vm, device)

        return self._run(op_type, volume, vm_id, fault, action)

    async def attach(self, volume_id: str, vm_id: str) -> str:
        return await self._attach("attach", volume_id, vm_id)

    async def attach_root(self, volume_id: str, vm_id: str) -> str:
        return await self._attach("attach-root", volume_id, vm_id)

    async def detach(self, volume_id: str) -> str:
        fault = await self._begin("detach", volume_id=volume_id)
        volume = self._volume(volume_id)
        return self._run("detach", volume, volume.vm_id, fault, lambda: self.world.apply_detach(volume))

    async def wait_operation(self, operation_id: str, timeout: float) -> DaemonOperation:
        if await self._begin("get-operation", operation_id=operation_id) == "job_fail":
            raise TransientError("VOLUME_DAEMON_ERROR", "the Volume Daemon failed get-operation (500): injected fault")
        op = self.world.operations.get(operation_id)
        if op is None:
            raise RefusedError("VOLUME_DAEMON_REFUSED", f"the Volume Daemon refused (404): no operation {operation_id}")
        return DaemonOperation(op.id, op.status, op.error, op.device_id, op.device_path)


# =========================================================================== injection


class FakeInjection:
    """`InjectionPort`: writes to the appliance volume at the device path, prints some lines.

    `job_fail` runs the script (it writes) and then fails; `refused` / `transient` fail it
    before it runs."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.calls: list[tuple[str, str]] = []

    async def inject(self, device_path: str, job_id: str, on_line: Callable[[str], Awaitable[None]]) -> None:
        await _network_turn()
        self.calls.append((device_path, job_id))
        fault = self.world.faults.check("inject")
        if fault == "refused":
            raise RefusedError("DRIVER_INJECTION_NOT_RUN", "cannot run the injection command: injected fault")
        if fault == "transient":
            raise TransientError("DRIVER_INJECTION_TIMEOUT", "the injection command timed out: injected fault")
        volume = self.world.volume_at_path(device_path)
        if volume is None:
            raise StepError("DRIVER_INJECTION_FAILED", f"the injection command exited with status 1: no {device_path}")
        await on_line(f"mounting {device_path}")
        self.world.write(volume, f"virtio:{job_id}")
        await on_line("virtio drivers injected")
        if fault == "job_fail":
            raise StepError("DRIVER_INJECTION_FAILED", "the injection command exited with status 2 (injected fault)")

    async def wait_idle(self, device_path: str, on_line: Callable[[str], Awaitable[None]]) -> None:
        """No run outlives this fake's own call."""
        await _network_turn()


# =========================================================================== platform


class FakePlatform:
    """`PlatformPort`: the migration platform's tables."""

    def __init__(self) -> None:
        self.contexts: dict[str, VmContext] = {}
        self.replication_jobs: dict[str, list[ReplicationJob]] = {}  # by vm_id, oldest first
        self.disk_rows: dict[str, list[DiskVolume]] = {}  # by replication job id
        self.mappings: dict[tuple[str, bool], list[NetworkMapping]] = {}

    async def source(self, vm_id: str, test: bool) -> PlatformSource:
        await _network_turn()
        jobs = self.replication_jobs.get(vm_id) or []
        newest = jobs[-1] if jobs else None
        return PlatformSource(vm=self.contexts.get(vm_id), replication=newest,
                              disks=list(self.disk_rows.get(newest.id, [])) if newest else [],
                              mappings=list(self.mappings.get((vm_id, test), [])))

    def set_status(self, vm_id: str, status: str) -> None:
        self.contexts[vm_id] = replace(self.contexts[vm_id], current_status=status)


# =========================================================================== the job store

CommitHook = Callable[["FakeJobStore", JobRow, Commit], None]


class FakeJobStore:
    """`JobStorePort`: rows, columns, the outbox and the ledger, in fenced all-or-nothing commits."""

    def __init__(self, platform: FakePlatform) -> None:
        self.platform = platform
        self.rows: dict[str, JobRow] = {}
        self.columns: dict[str, dict[str, Any]] = {}  # every column ever written, by job
        self.events: list[Event] = []  # the outbox, every job, in commit order
        self._ledgers: dict[str, dict[str, LedgerEntry]] = {}
        self.claims: dict[str, str] = {}  # VM name -> the job holding it
        self.owner_ok = True
        self.commits = 0  # successful commits
        self.hooks: list[CommitHook] = []  # run first in every commit (may flip owner_ok or cancel)
        self.cancel_after: set[str] = set()  # jobs whose cancel comes in just after this commit

    # ------------------------------------------------------------------ test controls
    def insert(self, row: JobRow, vm_name: str) -> None:
        """What the command recorder does: the row (last_sequence 1) and its JobAccepted."""
        assert row.last_sequence == 1
        self.rows[row.job_id] = copy.deepcopy(row)
        self.columns[row.job_id] = {}
        self._ledgers[row.job_id] = {}
        job_type: JobType = row.job_type  # type: ignore[assignment]
        steps = STEPS_BY_JOB_TYPE[job_type]
        self.events.append(JobAccepted(
            event_id=uuid.uuid4(), job_id=uuid.UUID(row.job_id), job_type=job_type, vm_id=row.vm_id,
            sequence=1, correlation_id=uuid.UUID(row.correlation_id), causation_id=uuid.UUID(row.request_id),
            occurred_at=utc_now(), vm_name=vm_name, requested_by=row.requested_by,
            steps=[StepRef(name=s, order=i + 1) for i, s in enumerate(steps)]))

    def request_cancel(self, job_id: str) -> None:
        self.rows[job_id].cancel_requested = True

    def request_rollback(self, job_id: str) -> None:
        self.rows[job_id].rollback_requested = True

    def events_of(self, job_id: str) -> list[Event]:
        return [e for e in self.events if str(e.job_id) == job_id]

    def row(self, job_id: str) -> JobRow:
        return self.rows[job_id]

    # ------------------------------------------------------------------ the port
    async def commit(self, job: JobRow, commit: Commit) -> bool:
        await _network_turn()
        for hook in list(self.hooks):
            hook(self, job, commit)
        stored = self.rows[job.job_id]
        if not self.owner_ok or stored.last_sequence != job.last_sequence:
            raise LeaseLost(job.job_id)
        # a tail is written only while no cancel is asked for
        cancelled = stored.cancel_requested
        commit = commit if cancelled else commit.with_tail()
        # everything is checked before anything is written: the transaction is all or nothing
        expected = list(range(stored.last_sequence + 1, stored.last_sequence + 1 + len(commit.events)))
        got = [e.sequence for e in commit.events]
        if got != expected:
            raise AssertionError(f"event sequences {got} do not follow {stored.last_sequence}")
        for event in commit.events:
            assert str(event.job_id) == job.job_id, "an event of another job"
            json.loads(event.model_dump_json())  # the outbox stores JSON
        for entry in commit.ledger:
            json.dumps(entry.data)
        json.dumps({k: v for k, v in commit.job.items()})
        for key, value in commit.job.items():
            self.columns[job.job_id][key] = copy.deepcopy(value)
            if hasattr(stored, key):
                setattr(stored, key, copy.deepcopy(value))
        stored.last_sequence += len(commit.events)
        ledger = self._ledgers[job.job_id]
        for entry in commit.ledger:
            ledger[entry.key] = copy.deepcopy(entry)
        if commit.vm_status:
            self.platform.set_status(job.vm_id, commit.vm_status)
        if commit.parent and job.parent_job_id:
            parent = self.rows[job.parent_job_id]
            for key, value in commit.parent.items():
                self.columns[job.parent_job_id][key] = copy.deepcopy(value)
                if hasattr(parent, key):
                    setattr(parent, key, copy.deepcopy(value))
        self.events.extend(commit.events)
        self.commits += 1
        if job.job_id in self.cancel_after:
            self.cancel_after.discard(job.job_id)
            stored.cancel_requested = True
        return cancelled

    async def ledger(self, job_id: str) -> list[LedgerEntry]:
        await _network_turn()
        return [copy.deepcopy(e) for e in self._ledgers.get(job_id, {}).values()]

    async def cleanup_ledgers(self, parent_job_id: str, vm_id: str) -> list[LedgerEntry]:
        await _network_turn()
        return [copy.deepcopy(e) for job_id, row in self.rows.items()
                if row.job_type == "cleanup" and row.parent_job_id == parent_job_id and row.vm_id == vm_id
                for e in self._ledgers.get(job_id, {}).values()]

    async def vm_name_holder(self, name: str) -> str | None:
        await _network_turn()
        return self.claims.get(name)

    async def claim_vm_name(self, job_id: str, name: str) -> NameHolder | None:
        await _network_turn()
        holder = self.rows.get(self.claims.get(name, job_id))
        ended = holder is not None and holder.status in END_STATES
        if holder is None or holder.job_id == job_id or (
                ended and (holder.status in ("completed", "cleaned_up") or holder.rolled_back is True)):
            self.claims[name] = job_id
            return None
        return NameHolder(job_id=holder.job_id, status=holder.status, ended=ended)

    async def load(self, job_id: str) -> JobRow | None:
        await _network_turn()
        row = self.rows.get(job_id)
        return copy.deepcopy(row) if row is not None else None

    def ledger_now(self, job_id: str) -> dict[str, LedgerEntry]:
        return dict(self._ledgers.get(job_id, {}))


# ------------------------------------------------------------------ commit hooks


def lose_lease_at(n: int) -> CommitHook:
    """A hook: the store's `n`th commit from now (1-based) finds the lease lost, as every later one."""
    seen = [0]

    def hook(store: FakeJobStore, job: JobRow, commit: Commit) -> None:
        seen[0] += 1
        if seen[0] >= n:
            store.owner_ok = False

    return hook


def lose_lease_when(predicate: Callable[[Commit], bool]) -> CommitHook:
    """A hook: the first commit for which `predicate` holds (and every later one) loses the lease."""

    def hook(store: FakeJobStore, job: JobRow, commit: Commit) -> None:
        if predicate(commit):
            store.owner_ok = False

    return hook


def cancel_when(predicate: Callable[[Commit], bool]) -> CommitHook:
    """A hook: a cancel is requested just after the first commit `predicate` matches (so the
    commit that starts a step is not gated by it: the step runs, and the cancel is seen at the
    next safe point)."""

    def hook(store: FakeJobStore, job: JobRow, commit: Commit) -> None:
        if predicate(commit) and not fired:
            fired.append(True)
            store.cancel_after.add(job.job_id)  # once this commit is in: it is not gated by it

    fired: list[bool] = []
    return hook


def at_commit(predicate: Callable[[Commit], bool], action: Callable[[], None]) -> CommitHook:
    """A hook: `action` runs at each commit `predicate` matches (the world changing then)."""

    def hook(store: FakeJobStore, job: JobRow, commit: Commit) -> None:
        if predicate(commit):
            action()

    return hook


def has_event(type_name: str, **fields: Any) -> Callable[[Commit], bool]:
    """A commit predicate: the commit carries an event of this type with these field values."""

    def match(commit: Commit) -> bool:
        return any(e.type == type_name and all(getattr(e, k, None) == v for k, v in fields.items())
                   for e in commit.with_tail().events)

    return match


# =========================================================================== the harness


@dataclass
class SeededVm:
    vm_id: str
    vm_name: str
    os_type: str | None
    replication_job_id: str
    volume_ids: list[str]  # in unit_number order: the root first
    disk_ids: list[str]

    @property
    def root_volume_id(self) -> str:
        return self.volume_ids[0]


class Harness:
    """The fake world, the ports on it, and jobs for seeded VMs."""

    def __init__(self, *, disk_offering: bool = False, retry_attempts: int = 3) -> None:
        self.world = FakeWorld()
        self.cloudstack = FakeCloudStack(self.world)
        self.volumes = FakeVolumeDaemon(self.world)
        self.injection = FakeInjection(self.world)
        self.platform = FakePlatform()
        self.store = FakeJobStore(self.platform)
        self.ports = Ports(self.cloudstack, self.volumes, self.injection, self.platform, self.store)
        self.config = EngineConfig(
            zone="zone1",
            template_id=self.world.template_id,
            service_offering_id=self.world.service_offering_id,
            disk_offering_id=self.world.disk_offering_id if disk_offering else None,
            default_network_id=self.world.default_network_id,
            appliance_vm_id=self.world.appliance.id,
            snapshot_timeout=5, async_job_timeout=5, volume_operation_timeout=5,
            retry_attempts=retry_attempts, retry_backoff=0, retry_backoff_max=0,
        )

    @property
    def faults(self) -> Faults:
        return self.world.faults

    def seed_vm(
        self, name: str = "WIN-SQL01", *, os_type: str | None = "Windows Server 2019", disks: int = 3,
        replication_status: str = "completed", gap: bool = False, unit_numbers: list[int] | None = None,
        revertable: bool = True, test_mappings: bool = True, prod_mappings: bool = True,
        power_state: str | None = "poweredOff",
    ) -> SeededVm:
        """A replicated VM: its context, a replication job, disks and their volumes on the
        appliance (with `gap`, an unrelated volume sits between each two of them)."""
        vm_id = f"42{new_id()[2:]}"
        units = unit_numbers if unit_numbers is not None else list(range(disks))
        job = ReplicationJob(f"job-{new_id()[:8]}", replication_status)
        appliance = self.world.appliance.id
        volume_ids, disk_ids, rows = [], [], []
        for i, unit in enumerate(units):
            if gap and i:
                self.world.add_volume(f"other-{new_id()[:6]}", vm_id=appliance)
            volume = self.world.add_volume(f"{name}-disk{unit}", vm_id=appliance,
                                           content=f"replica:{name}:{unit}", revertable_storage=revertable)
            disk_id = f"disk-{2000 + 16 * units[:i].count(unit) + unit}"  # (as VMware's keys: a controller's 16)
            volume_ids.append(volume.id)
            disk_ids.append(disk_id)
            rows.append(DiskVolume(disk_id, unit, 40 + unit, 100 + i, volume.id))
        self.platform.contexts[vm_id] = VmContext(vm_id, f"ctx-{new_id()[:8]}", name, "ready_for_failover",
                                                  4, 8192, os_type, power_state)
        self.platform.replication_jobs[vm_id] = [ReplicationJob(f"job-{new_id()[:8]}", "completed"), job]
        self.platform.disk_rows[job.id] = list(reversed(rows))  # the table's order is not the unit order
        if test_mappings:
            self.platform.mappings[(vm_id, True)] = [
                NetworkMapping("VM Network", self.world.test_network_id, "test-net"),
                NetworkMapping("Backup", self.world.test_network_id, "test-net"),
            ]
        if prod_mappings:
            self.platform.mappings[(vm_id, False)] = [
                NetworkMapping("VM Network", self.world.prod_network_id, "prod-net")]
        order = sorted(range(len(units)), key=lambda i: units[i])
        return SeededVm(vm_id, name, os_type, job.id, [volume_ids[i] for i in order], [disk_ids[i] for i in order])

    def _context(self, row: JobRow) -> JobContext:
        return JobContext(row=row, ports=self.ports, config=self.config)

    def new_job(
        self, vm: SeededVm, job_type: str = "test-failover", *, options: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> JobContext:
        """A JobRow as the command recorder makes it (pending, JobAccepted at sequence 1) and its context."""
        job_id = job_id or new_id()
        row = JobRow(
            job_id=job_id, request_id=job_id, job_type=job_type, vm_id=vm.vm_id, vm_name=vm.vm_name,
            correlation_id=job_id, parent_job_id=None, requested_by="tests@example.com", status="pending",
            last_sequence=1, resume_state=None, options={"driver_injection": "auto", **(options or {})},
            plan={}, cancel_requested=False, rollback_requested=False, failed_step=None, error_code=None,
            error_message=None, created_at=time.time(), started_at=None,
        )
        self.store.insert(row, vm.vm_name)
        return self._context(copy.deepcopy(row))

    def new_cleanup(self, failover_job_id: str) -> JobContext:
        """A cleanup of a completed test failover (its plan copied from the failover's row)."""
        parent = self.store.rows[failover_job_id]
        job_id = new_id()
        row = JobRow(
            job_id=job_id, request_id=job_id, job_type="cleanup", vm_id=parent.vm_id, vm_name=parent.vm_name,
            correlation_id=failover_job_id, parent_job_id=failover_job_id, requested_by="tests@example.com",
            status="pending", last_sequence=1, resume_state=None, options={}, plan=copy.deepcopy(parent.plan),
            cancel_requested=False, rollback_requested=False, failed_step=None, error_code=None,
            error_message=None, created_at=time.time(), started_at=None,
        )
        self.store.insert(row, parent.vm_name)
        self.store.columns[failover_job_id]["cleanup_job_id"] = job_id
        return self._context(copy.deepcopy(row))

    async def resume_context(self, job_id: str) -> JobContext:
        """A new owner's context: the row as persisted, the ledger to be loaded afresh."""
        row = await self.store.load(job_id)
        assert row is not None
        return self._context(row)

    def events(self, job_id: str) -> list[Event]:
        return self.store.events_of(job_id)

    def types(self, job_id: str, *, logs: bool = False) -> list[str]:
        return [e.type for e in self.events(job_id) if logs or e.type != "LogRecorded"]
