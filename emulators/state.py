"""The world's state: the seed resources, what exists now, and how to look it up.

``WorldState`` holds CloudStack's resources (zones, offerings, templates, networks, VMs,
volumes, snapshots), the async jobs and daemon operations (``JobRunner``), the call log,
the faults and the latencies. ``World`` (``world.py``) adds CloudStack's rules to it.
All ids are UUID4 strings; everything runs on one asyncio loop, with no threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from emulators import views
from emulators.calllog import CallLog
from emulators.faults import FaultBook
from emulators.jobs import JobRunner
from emulators.model import (
    GIB,
    ApiLimit,
    AsyncJob,
    DiskOffering,
    Latency,
    Network,
    Operation,
    ServiceOffering,
    Snapshot,
    Template,
    VirtualMachine,
    Volume,
    Zone,
    new_id,
)

APPLIANCE_NAME = "migratekit-oma"


def device_path_for(device_id: int) -> str:
    """``/dev/vda`` for device 0, ``/dev/vdb`` for 1, ..., ``/dev/vdaa`` past ``z``."""
    letters, n = "", device_id
    while n >= 0:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
    return "/dev/vd" + letters


class WorldState:
    """All the emulated state, the seed, and the lookups the rules and the APIs use."""

    def __init__(
        self,
        *,
        api_key: str,
        secret_key: str,
        appliance_vm_id: str | None = None,
        template_id: str | None = None,
        service_offering_id: str | None = None,
        network_id: str | None = None,
    ) -> None:
        self.api_keys = {api_key: secret_key}
        # Fixed for the life of the process: reset() keeps them.
        self.zone_id = new_id()
        # fixed ids can be given, so a service configured in advance (compose) finds them
        self.template_id = template_id or new_id()
        self.service_offering_id = service_offering_id or new_id()
        self.disk_offering_id = new_id()
        self.network_id = network_id or new_id()
        self.test_network_id = new_id()
        self.appliance_vm_id = appliance_vm_id or new_id()
        self.account_id = new_id()
        self.user_id = new_id()
        self.faults = FaultBook()
        self.latency = Latency()
        self.api_limit = ApiLimit()
        self.calls = CallLog()
        self.runner = JobRunner(lambda: self.latency)
        # the emulated CloudStack event bus (emulators/events.py), when the emulators were
        # started with one; it publishes while `runner.on_job_end` is its `job_ended`
        self.event_bus: Any = None
        self.reset()

    # ----------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """A fresh world: the seed resources (same ids), no faults, no latency, no calls."""
        self.runner.reset()
        self.calls.reset()
        self.faults.clear()
        self.latency = Latency()
        self.api_limit = ApiLimit()
        # CloudStack's allow.user.expunge.recover.vm for the key's account (false by default:
        # a user account may not expunge; listCapabilities shows it)
        self.allow_user_expunge_recover_vm = False
        self.zones = {self.zone_id: Zone(self.zone_id, "zone1")}
        self.service_offerings = {
            self.service_offering_id: ServiceOffering(self.service_offering_id, "Custom")
        }
        self.disk_offerings = {self.disk_offering_id: DiskOffering(self.disk_offering_id, "Small")}
        self.templates = {self.template_id: Template(self.template_id, "migratekit-base")}
        self.networks = {
            self.network_id: Network(self.network_id, "default-net", self.zone_id),
            self.test_network_id: Network(self.test_network_id, "test-net", self.zone_id),
        }
        self.vms: dict[str, VirtualMachine] = {}
        self.volumes: dict[str, Volume] = {}
        # each VM's volumes (a benchmark's world holds thousands: no lookup walks them all), and
        # each volume's place in the order they were made (the order listings show them in)
        self._on_vm: dict[str, dict[str, Volume]] = {}
        self._rank: dict[str, int] = {}
        # VMs by their lower-cased name (every one ever made: a destroyed VM's name is free again)
        self._named: dict[str, list[VirtualMachine]] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self._vm_number = 0
        self.add_vm(APPLIANCE_NAME, "Running", self.appliance_vm_id)

    def close(self) -> None:
        """Stop every timer and release requests held by ``timeout`` faults."""
        self.runner.close()

    @property
    def jobs(self) -> dict[str, AsyncJob]:
        """CloudStack async jobs by id."""
        return self.runner.jobs

    @property
    def operations(self) -> dict[str, Operation]:
        """Volume Daemon operations by id."""
        return self.runner.operations

    def state(self) -> dict[str, Any]:
        """The whole world as the control API shows it."""
        return views.state_json(self)

    # ------------------------------------------------------------- seed helpers
    def add_vm(self, name: str, state: str = "Running", vm_id: str | None = None) -> VirtualMachine:
        """Create a VM directly (control API, seed) with no volumes; ValueError if refused."""
        if state not in ("Running", "Stopped"):
            raise ValueError("state must be Running or Stopped")
        if not name:
            raise ValueError("name is required")
        if vm_id is not None and vm_id in self.vms:
            raise ValueError(f"a VM with id {vm_id} already exists")
        if self.live_vm_named(name) is not None:
            raise ValueError(f"a VM named {name} already exists")
        offering = self.service_offerings[self.service_offering_id]
        self._vm_number += 1
        vm = VirtualMachine(
            vm_id or new_id(), name, name, state, self._vm_number,
            offering.default_cpunumber, offering.default_memory, self.zone_id,
            self.template_id, self.service_offering_id, [self.network_id],
        )  # fmt: skip
        self.enter(vm)
        return vm

    def enter(self, vm: VirtualMachine) -> None:
        """A new VM joins the world."""
        self.vms[vm.id] = vm
        self._named.setdefault(vm.name.lower(), []).append(vm)

    def add_volume(
        self,
        name: str,
        size_gb: float,
        *,
        vm_id: str | None = None,
        device_id: int | None = None,
        content: str | None = None,
        volume_id: str | None = None,
    ) -> Volume:
        """Create a volume directly (control API): detached, or attached at a free device id
        (device 0 makes it the VM's ROOT). ValueError if refused."""
        if not name:
            raise ValueError("name is required")
        if volume_id is not None and volume_id in self.volumes:
            raise ValueError(f"a volume with id {volume_id} already exists")
        if vm_id is not None:
            vm = self.vms.get(vm_id)
            if vm is None or vm.destroyed:
                raise ValueError(f"no VM with id {vm_id}")
            if device_id is None:
                device_id = self.lowest_free_device(vm_id)
            elif device_id < 0 or self.volume_at(vm_id, device_id) is not None:
                raise ValueError(f"device id {device_id} is not free on VM {vm_id}")
        elif device_id is not None:
            raise ValueError("device_id needs vm_id")
        new = volume_id or new_id()
        volume = Volume(
            new, name, "ROOT" if device_id == 0 else "DATADISK", int(size_gb * GIB), self.zone_id,
            content if content is not None else f"initial:{new}", vm_id, device_id,
        )  # fmt: skip
        self.join(volume)
        return volume

    def join(self, volume: Volume) -> None:
        """A new volume joins the world (attached where its ``vm_id`` says)."""
        self.volumes[volume.id] = volume
        self._rank[volume.id] = len(self._rank)
        if volume.vm_id is not None:
            self._on_vm.setdefault(volume.vm_id, {})[volume.id] = volume

    def place(self, volume: Volume, vm_id: str | None, device_id: int | None) -> None:
        """Attach the volume to ``vm_id`` at ``device_id``, or detach it (None, None)."""
        if volume.vm_id is not None:
            self._on_vm.get(volume.vm_id, {}).pop(volume.id, None)
        volume.vm_id, volume.device_id = vm_id, device_id
        if vm_id is not None:
            self._on_vm.setdefault(vm_id, {})[volume.id] = volume

    # ------------------------------------------------------------------ lookups
    def live_vm_named(self, name: str) -> VirtualMachine | None:
        """The non-destroyed VM with this name (hostnames compare without case), if any."""
        return next((vm for vm in self._named.get(name.lower(), ()) if not vm.destroyed), None)

    def _live_on(self, vm_id: str) -> Iterator[Volume]:
        """The live volumes attached to a VM, unsorted (the appliance holds every replicated
        volume: thousands in a benchmark)."""
        return (v for v in self._on_vm.get(vm_id, {}).values() if not v.destroyed)

    def volumes_on(self, vm_id: str) -> list[Volume]:
        """The live volumes attached to a VM, in the order they were made."""
        rank = self._rank
        return sorted(self._live_on(vm_id), key=lambda v: rank[v.id])

    def attached_volumes(self, vm_id: str) -> list[Volume]:
        """The live volumes attached to a VM, by device id."""
        return sorted(self.volumes_on(vm_id), key=lambda v: v.device_id or 0)

    def volume_at(self, vm_id: str, device_id: int) -> Volume | None:
        """The live volume at a device id of a VM, if any."""
        return next((v for v in self._live_on(vm_id) if v.device_id == device_id), None)

    def lowest_free_device(self, vm_id: str) -> int:
        """The lowest device id >= 1 that no volume of the VM uses."""
        taken = {v.device_id for v in self._live_on(vm_id)}
        device = 1
        while device in taken:
            device += 1
        return device

    def device_path(self, volume: Volume) -> str | None:
        """``/dev/vd<letter>`` of the volume's device id, only while on the appliance VM."""
        if volume.destroyed or volume.vm_id != self.appliance_vm_id or volume.device_id is None:
            return None
        return device_path_for(volume.device_id)

    def volume_at_path(self, device_path: str) -> Volume | None:
        """The volume attached to the appliance at a device path, if any."""
        return next((v for v in self._live_on(self.appliance_vm_id) if self.device_path(v) == device_path), None)

    @staticmethod
    def write(volume: Volume, tag: str) -> None:
        """A write to the volume: its content changes and says what wrote it."""
        volume.content = f"{volume.content}|{tag}"
