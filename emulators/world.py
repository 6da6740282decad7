"""The emulated world: CloudStack's resources, the Volume Daemon's operations, and the rules.

One ``World`` is shared by the CloudStack app, the Volume Daemon app and the control routes,
on one asyncio loop (no threads). The rules are CloudStack's, as DESIGN.md lists them: a ROOT
volume dies with its VM, a volume becomes ROOT only at device 0 of a stopped VM, a snapshot is
reverted only onto a detached volume or one whose VM is stopped.

Every rule is checked when the command arrives (a refusal is a 431 at once) and again when
its async job runs (a refusal then fails the job), as things may have changed in between.
While a job runs the VM shows CloudStack's transitional state (``Starting``, ``Stopping``),
which refuses other state changes, as CloudStack's per-VM job queue does.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from emulators import views
from emulators.model import (
    GIB,
    AsyncJob,
    CloudStackError,
    DiskOffering,
    Network,
    ServiceOffering,
    Snapshot,
    Template,
    VirtualMachine,
    Volume,
    Zone,
    internal_error,
    new_id,
    param_error,
)
from emulators.state import APPLIANCE_NAME, WorldState, device_path_for

__all__ = ["APPLIANCE_NAME", "World", "WorldState", "device_path_for"]

_HOSTNAME = re.compile(r"^[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
INVALID_NAME = (
    "Invalid name. Vm name can contain ASCII letters 'a' through 'z', the digits '0' through "
    "'9', and the hyphen ('-'), must be between 1 and 63 characters long, and can't start or "
    'end with "-" and can\'t start with digit'
)
NOT_RUNNING_OR_STOPPED = "Please specify a VM that is either running or stopped."


class World(WorldState):
    """The emulated world: its state (``WorldState``) with CloudStack's rules as methods."""

    # ---------------------------------------------------------------------- VMs
    def deploy_vm(
        self,
        *,
        name: str | None,
        displayname: str | None,
        offering: ServiceOffering,
        template: Template,
        zone: Zone,
        networks: list[Network],
        startvm: bool,
        cpunumber: int | None,
        memory: int | None,
        disk_offering: DiskOffering | None,
        fault: str | None = None,
    ) -> tuple[VirtualMachine, AsyncJob]:
        """deployVirtualMachine: the VM and its volumes exist at once (as CloudStack's create
        phase makes them); the job readies the volumes and, with ``startvm``, boots the VM."""
        if name is None:
            name = f"VM-{new_id()}"
        if not _HOSTNAME.match(name):
            raise param_error(INVALID_NAME)
        if self.live_vm_named(name) is not None:
            raise param_error(
                f"The vm with hostName {name} already exists in the network domain: "
                f"cs1cloud.internal; network={networks[0].name}"
            )
        self._vm_number += 1
        number = self._vm_number
        vm = VirtualMachine(
            new_id(), name, displayname or name, "Starting" if startvm else "Stopped", number,
            cpunumber or offering.default_cpunumber, memory or offering.default_memory, zone.id,
            template.id, offering.id, [n.id for n in networks],
        )  # fmt: skip
        self.enter(vm)
        root_id = new_id()
        created = [
            Volume(
                root_id, f"ROOT-{number}", "ROOT", template.size_gb * GIB, zone.id,
                f"initial:{root_id}", vm.id, 0, state="Allocated",
            )
        ]  # fmt: skip
        if disk_offering is not None:
            data_id = new_id()
            created.append(
                Volume(
                    data_id, f"DATA-{number}", "DATADISK", disk_offering.disksize_gb * GIB,
                    zone.id, f"initial:{data_id}", vm.id, 1, state="Allocated",
                    diskoffering_id=disk_offering.id,
                )
            )  # fmt: skip
        for volume in created:
            self.join(volume)

        def run() -> dict[str, Any]:
            if vm.destroyed:
                raise internal_error(f"VM {vm.name} was destroyed while being deployed")
            for volume in created:
                if volume.state == "Allocated":
                    volume.state = "Ready"
            if startvm:
                self._boot(vm)
            return {"virtualmachine": views.vm_json(self, vm)}

        def on_fail() -> None:
            if not vm.destroyed:
                vm.state = "Error"

        job = self.runner.submit_job(
            "deployVirtualMachine", "VirtualMachine", vm.id, run, on_fail, fault
        )
        return vm, job

    def _require_root(self, vm: VirtualMachine) -> None:
        root = self.volume_at(vm.id, 0)
        if root is None or root.type != "ROOT":
            raise param_error(
                f"VM {vm.name} has no ROOT volume at device id 0; attach one with "
                "attachVolume deviceid=0 before starting it"
            )

    def _boot(self, vm: VirtualMachine) -> None:
        self._require_root(vm)
        vm.state = "Running"
        for volume in self.attached_volumes(vm.id):
            self.write(volume, f"boot:{vm.id}")

    @staticmethod
    def _require_live(vm: VirtualMachine) -> None:
        if vm.destroyed:
            raise param_error(f"Unable to find a virtual machine with id {vm.id}: it is destroyed")

    def start_vm(self, vm: VirtualMachine, fault: str | None = None) -> AsyncJob:
        """startVirtualMachine: needs a stopped VM with a ROOT at device 0; a boot writes to
        every attached volume."""
        self._require_live(vm)
        if vm.state == "Running":
            raise param_error(f"The virtual machine {vm.id} ({vm.displayname}) is already running")
        if vm.state != "Stopped":
            raise param_error(f"VM {vm.name} is in state {vm.state} and can't be started now")
        self._require_root(vm)
        vm.state = "Starting"

        def run() -> dict[str, Any]:
            self._boot(vm)
            return {"virtualmachine": views.vm_json(self, vm)}

        def on_fail() -> None:
            if vm.state == "Starting":
                vm.state = "Stopped"

        return self.runner.submit_job(
            "startVirtualMachine", "VirtualMachine", vm.id, run, on_fail, fault
        )

    def stop_vm(self, vm: VirtualMachine, fault: str | None = None) -> AsyncJob:
        """stopVirtualMachine: Running -> Stopping -> Stopped (a stopped VM stays stopped)."""
        self._require_live(vm)
        if vm.state not in ("Running", "Stopped"):
            raise param_error(f"VM {vm.name} is in state {vm.state} and can't be stopped now")
        was_running = vm.state == "Running"
        if was_running:
            vm.state = "Stopping"

        def run() -> dict[str, Any]:
            if vm.state == "Stopping":
                vm.state = "Stopped"
            return {"virtualmachine": views.vm_json(self, vm)}

        def on_fail() -> None:
            if was_running and vm.state == "Stopping":
                vm.state = "Running"

        return self.runner.submit_job(
            "stopVirtualMachine", "VirtualMachine", vm.id, run, on_fail, fault
        )

    def destroy_vm(self, vm: VirtualMachine, expunge: bool, fault: str | None = None) -> AsyncJob:
        """destroyVirtualMachine: the VM and the ROOT volume at its device 0 are destroyed;
        its data disks are detached and kept."""
        self._require_live(vm)
        if vm.state not in ("Running", "Stopped", "Error"):
            raise param_error(f"VM {vm.name} is in state {vm.state} and can't be destroyed now")
        previous = vm.state
        if previous == "Running":
            vm.state = "Stopping"

        def run() -> dict[str, Any]:
            for volume in self.attached_volumes(vm.id):
                if volume.device_id == 0 and volume.type == "ROOT":
                    volume.destroyed = True
                    volume.state = "Expunged" if expunge else "Destroy"
                else:
                    self.place(volume, None, None)
                    volume.type = "DATADISK"
            vm.destroyed = True
            vm.state = "Expunging" if expunge else "Destroyed"
            return {"virtualmachine": views.vm_json(self, vm)}

        def on_fail() -> None:
            if not vm.destroyed:
                vm.state = previous

        return self.runner.submit_job(
            "destroyVirtualMachine", "VirtualMachine", vm.id, run, on_fail, fault
        )

    # ------------------------------------------------------------------ volumes
    def check_attach(self, volume: Volume, vm: VirtualMachine, device_id: int | None) -> int:
        """The device id an attach would use, or a 431 CloudStackError saying why not."""
        if volume.destroyed:
            raise param_error(f"Volume {volume.name} ({volume.id}) has been removed")
        if volume.vm_id is not None:
            owner = self.vms[volume.vm_id]
            raise param_error(f"Volume {volume.name} is already attached to VM {owner.name}")
        self._require_live(vm)
        if vm.state not in ("Running", "Stopped"):
            raise param_error(NOT_RUNNING_OR_STOPPED)
        if device_id is None:
            return self.lowest_free_device(vm.id)
        if device_id < 0:
            raise param_error(f"deviceId {device_id} is invalid: it must be 0 or greater")
        if device_id == 0 and vm.state != "Stopped":
            raise param_error(
                f"A volume can be attached as device 0 (ROOT) only to a stopped VM; "
                f"VM {vm.name} is {vm.state}"
            )
        taken = self.volume_at(vm.id, device_id)
        if taken is not None:
            raise param_error(
                f"deviceId {device_id} is used by volume {taken.name} of VM {vm.name}"
            )
        return device_id

    def apply_attach(self, volume: Volume, vm: VirtualMachine, device_id: int | None) -> int:
        """Attach now (rules re-checked): device 0 makes the volume ROOT, else DATADISK."""
        device = self.check_attach(volume, vm, device_id)
        self.place(volume, vm.id, device)
        volume.type = "ROOT" if device == 0 else "DATADISK"
        return device

    def attach_volume(
        self, volume: Volume, vm: VirtualMachine, device_id: int | None, fault: str | None = None
    ) -> AsyncJob:
        """attachVolume."""
        self.check_attach(volume, vm, device_id)

        def run() -> dict[str, Any]:
            self.apply_attach(volume, vm, device_id)
            return {"volume": views.volume_json(self, volume)}

        return self.runner.submit_job("attachVolume", "Volume", volume.id, run, None, fault)

    def check_detach(self, volume: Volume) -> VirtualMachine:
        """The VM a detach would take the volume from, or a 431 saying why not."""
        if volume.destroyed:
            raise param_error(f"Volume {volume.name} ({volume.id}) has been removed")
        if volume.vm_id is None:
            raise param_error(f"Volume {volume.name} is not attached to any VM")
        vm = self.vms[volume.vm_id]
        if volume.type == "ROOT" and vm.state != "Stopped":
            raise param_error(
                f"The ROOT volume {volume.name} can be detached only from a stopped VM; "
                f"VM {vm.name} is {vm.state}"
            )
        if vm.state not in ("Running", "Stopped"):
            raise param_error(NOT_RUNNING_OR_STOPPED)
        return vm

    def apply_detach(self, volume: Volume) -> VirtualMachine:
        """Detach now (rules re-checked); a detached ROOT becomes a DATADISK."""
        vm = self.check_detach(volume)
        self.place(volume, None, None)
        volume.type = "DATADISK"
        return vm

    def detach_volume(self, volume: Volume, fault: str | None = None) -> AsyncJob:
        """detachVolume."""
        self.check_detach(volume)

        def run() -> dict[str, Any]:
            self.apply_detach(volume)
            return {"volume": views.volume_json(self, volume)}

        return self.runner.submit_job("detachVolume", "Volume", volume.id, run, None, fault)

    def delete_volume(self, volume: Volume) -> None:
        """deleteVolume (synchronous): only a detached volume."""
        if volume.destroyed:
            raise param_error(f"Volume {volume.name} ({volume.id}) has been removed")
        if volume.vm_id is not None:
            raise param_error("Please specify a volume that is not attached to any VM.")
        volume.destroyed, volume.state = True, "Expunged"

    # ---------------------------------------------------------------- snapshots
    def create_snapshot(
        self, volume: Volume, name: str | None, fault: str | None = None
    ) -> tuple[Snapshot, AsyncJob]:
        """createSnapshot: Allocated at once (CloudStack's create step), BackingUp while the job
        works (the copy to secondary storage, the long part), BackedUp with the volume's content
        when it ends (``not_revertable`` fault: revertable false)."""
        if volume.destroyed:
            raise param_error(f"Volume {volume.name} ({volume.id}) has been removed")
        if volume.state != "Ready":
            raise param_error(
                f"VolumeId: {volume.id} is not in Ready state but {volume.state}. "
                "Cannot take snapshot."
            )
        if name is None:
            owner = self.vms.get(volume.vm_id) if volume.vm_id else None
            stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
            name = f"{owner.name if owner else 'detached'}_{volume.name}_{stamp}"
        snapshot = Snapshot(new_id(), name, volume.id, volume.name, volume.type, volume.zone_id)
        self.snapshots[snapshot.id] = snapshot

        def run() -> dict[str, Any]:
            if volume.destroyed:
                raise internal_error(f"Volume {volume.name} was removed during the snapshot")
            if snapshot.destroyed:  # (deleted while Allocated: CloudStack allows that)
                raise internal_error(f"Snapshot {snapshot.id} was deleted before it was taken")
            snapshot.content = volume.content
            snapshot.state = "BackedUp"
            snapshot.revertable = fault != "not_revertable"
            return {"snapshot": views.snapshot_json(snapshot)}

        def on_fail() -> None:
            if not snapshot.destroyed:
                snapshot.state = "Error"

        def begin() -> None:
            if snapshot.state == "Allocated":
                snapshot.state = "BackingUp"

        job = self.runner.submit_job("createSnapshot", "Snapshot", snapshot.id, run, on_fail, fault, begin)
        return snapshot, job

    def check_revert(self, snapshot: Snapshot) -> Volume:
        """The volume a revert would restore, or a 431 saying why not."""
        if snapshot.destroyed:
            raise param_error(f"Snapshot {snapshot.id} has been deleted")
        if snapshot.state != "BackedUp":
            raise param_error(
                f"Snapshot {snapshot.id} is in state {snapshot.state}; only a BackedUp "
                "snapshot can be reverted"
            )
        if not snapshot.revertable:
            raise param_error(
                f"Snapshot {snapshot.id} is not revertable: its storage does not support "
                "reverting volume snapshots"
            )
        volume = self.volumes.get(snapshot.volume_id)
        if volume is None or volume.destroyed:
            raise param_error(f"The volume {snapshot.volume_name} of the snapshot has been removed")
        if volume.vm_id is not None and self.vms[volume.vm_id].state != "Stopped":
            raise param_error(
                "The VM the specified disk is attached to is not in the shutdown state."
            )
        return volume

    def revert_snapshot(self, snapshot: Snapshot, fault: str | None = None) -> AsyncJob:
        """revertSnapshot: the volume's content becomes the snapshot's. As CloudStack's
        (RevertSnapshotCmd is async, and SnapshotManagerImpl.revertSnapshot runs in its job): a
        snapshot deleted is refused at the call (the id's look-up, 431), every other rule fails
        the job as it begins (530, the rule's text): a volume not Ready (RevertSnapshotting while
        a revert runs), its VM not stopped, a snapshot not BackedUp or not revertable."""
        if snapshot.destroyed:
            raise param_error(f"Snapshot {snapshot.id} has been deleted")
        try:
            volume = self.check_revert(snapshot)
            if volume.state != "Ready":
                raise param_error("The volume is not in Ready state.")
        except CloudStackError as exc:
            return self.runner.submit_failed_job("revertSnapshot", "Snapshot", snapshot.id, exc)
        volume.state = "RevertSnapshotting"

        def run() -> dict[str, Any]:
            volume.state = "Ready"
            self.check_revert(snapshot)
            volume.content = snapshot.content or volume.content
            return {"snapshot": views.snapshot_json(snapshot)}

        def on_fail() -> None:
            if volume.state == "RevertSnapshotting":
                volume.state = "Ready"

        return self.runner.submit_job("revertSnapshot", "Snapshot", snapshot.id, run, on_fail, fault)

    def delete_snapshot(self, snapshot: Snapshot, fault: str | None = None) -> AsyncJob:
        """deleteSnapshot: the snapshot disappears from the lists. As CloudStack's (the id's
        look-up includes removed rows; SnapshotManagerImpl.deleteSnapshot and the snapshot
        strategy run in the job), every rule fails the job: a snapshot already deleted, or
        one a job is taking (DefaultSnapshotStrategy refuses Creating, BackingUp and Copying,
        and deletes one in any other state, Allocated included), checked as the job begins
        (it fails at once) and again as it ends."""

        def check() -> None:
            if snapshot.destroyed:
                raise param_error(f"Snapshot with id: {snapshot.id} is already destroyed")
            if snapshot.state in ("Creating", "BackingUp", "Copying"):
                raise param_error(f"Can't delete snapshot {snapshot.id} due to it is in {snapshot.state} Status")

        try:
            check()
        except CloudStackError as exc:
            return self.runner.submit_failed_job("deleteSnapshot", "Snapshot", snapshot.id, exc)

        def run() -> dict[str, Any]:
            check()
            snapshot.destroyed, snapshot.state = True, "Destroyed"
            return {"success": True}

        return self.runner.submit_job("deleteSnapshot", "Snapshot", snapshot.id, run, None, fault)

    # ------------------------------------------------------------------- inject
    def inject_write(self, device_path: str, job_id: str) -> Volume | None:
        """The driver injection's write to the appliance volume at a device path, if any."""
        volume = self.volume_at_path(device_path)
        if volume is not None:
            self.write(volume, f"virtio:{job_id}")
        return volume
