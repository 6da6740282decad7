"""The world's records rendered as CloudStack API JSON (and the extras the state view adds).

Fields follow CloudStack's response classes; as in CloudStack, a field with no value is left
out rather than sent as null (a detached volume has no ``virtualmachineid`` nor ``deviceid``).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from emulators.model import (
    GIB,
    JOB_PENDING,
    AsyncJob,
    DiskOffering,
    Network,
    Operation,
    ServiceOffering,
    Snapshot,
    Template,
    VirtualMachine,
    Volume,
    Zone,
)

if TYPE_CHECKING:
    from emulators.state import WorldState as World

ACCOUNT = {"account": "admin", "domain": "ROOT"}

JOB_CLASSES = {
    "deployVirtualMachine": "org.apache.cloudstack.api.command.admin.vm.DeployVMCmdByAdmin",
    "startVirtualMachine": "org.apache.cloudstack.api.command.admin.vm.StartVMCmdByAdmin",
    "stopVirtualMachine": "org.apache.cloudstack.api.command.admin.vm.StopVMCmdByAdmin",
    "destroyVirtualMachine": "org.apache.cloudstack.api.command.admin.vm.DestroyVMCmdByAdmin",
    "attachVolume": "org.apache.cloudstack.api.command.admin.volume.AttachVolumeCmdByAdmin",
    "detachVolume": "org.apache.cloudstack.api.command.admin.volume.DetachVolumeCmdByAdmin",
    "createSnapshot": "org.apache.cloudstack.api.command.user.snapshot.CreateSnapshotCmd",
    "revertSnapshot": "org.apache.cloudstack.api.command.user.snapshot.RevertSnapshotCmd",
    "deleteSnapshot": "org.apache.cloudstack.api.command.user.snapshot.DeleteSnapshotCmd",
}


def zone_json(zone: Zone) -> dict[str, Any]:
    """A listZones item."""
    return {
        "id": zone.id,
        "name": zone.name,
        "networktype": "Advanced",
        "allocationstate": "Enabled",
        "securitygroupsenabled": False,
        "localstorageenabled": False,
        "dhcpprovider": "VirtualRouter",
    }


def service_offering_json(offering: ServiceOffering) -> dict[str, Any]:
    """A listServiceOfferings item (a custom offering: cpu and memory come with the deploy)."""
    return {
        "id": offering.id,
        "name": offering.name,
        "displaytext": offering.name,
        "iscustomized": offering.iscustomized,
        "storagetype": "shared",
        "offerha": False,
        "limitcpuuse": False,
        "issystem": False,
        "defaultuse": False,
    }


def disk_offering_json(offering: DiskOffering) -> dict[str, Any]:
    """A listDiskOfferings item."""
    return {
        "id": offering.id,
        "name": offering.name,
        "displaytext": offering.name,
        "disksize": offering.disksize_gb,
        "iscustomized": False,
        "storagetype": "shared",
        "provisioningtype": "thin",
    }


def template_json(world: World, template: Template) -> dict[str, Any]:
    """A listTemplates item."""
    return {
        "id": template.id,
        "name": template.name,
        "displaytext": template.name,
        "ostypename": template.ostypename,
        "size": template.size_gb * GIB,
        "isready": True,
        "ispublic": True,
        "isfeatured": True,
        "format": "QCOW2",
        "hypervisor": "KVM",
        "templatetype": "USER",
        "status": "Download Complete",
        "zoneid": world.zone_id,
        "zonename": world.zones[world.zone_id].name,
        **ACCOUNT,
    }


def network_json(world: World, network: Network) -> dict[str, Any]:
    """A listNetworks item."""
    return {
        "id": network.id,
        "name": network.name,
        "displaytext": network.name,
        "zoneid": network.zone_id,
        "zonename": world.zones[network.zone_id].name,
        "state": "Implemented",
        "type": "Isolated",
        "traffictype": "Guest",
        **ACCOUNT,
    }


def _nic(world: World, vm: VirtualMachine, index: int, network_id: str) -> dict[str, Any]:
    network = world.networks.get(network_id)
    nic_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{vm.id}/{network_id}")
    return {
        "id": str(nic_id),
        "networkid": network_id,
        "networkname": network.name if network else None,
        "isdefault": index == 0,
        "traffictype": "Guest",
        "ipaddress": f"10.1.{index}.{vm.number % 250 + 2}",
        "macaddress": "02:00:" + ":".join(f"{b:02x}" for b in nic_id.bytes[:4]),
    }


def vm_json(world: World, vm: VirtualMachine) -> dict[str, Any]:
    """A listVirtualMachines item."""
    template = world.templates.get(vm.template_id)
    offering = world.service_offerings.get(vm.serviceoffering_id)
    body: dict[str, Any] = {
        "id": vm.id,
        "name": vm.name,
        "displayname": vm.displayname,
        "instancename": f"i-2-{vm.number}-VM",
        "state": vm.state,
        "cpunumber": vm.cpunumber,
        "cpuspeed": 1000,
        "memory": vm.memory,
        "zoneid": vm.zone_id,
        "zonename": world.zones[vm.zone_id].name,
        "templateid": vm.template_id,
        "templatename": template.name if template else None,
        "serviceofferingid": vm.serviceoffering_id,
        "serviceofferingname": offering.name if offering else None,
        "hypervisor": "KVM",
        "haenable": False,
        "created": vm.created,
        "nic": [_nic(world, vm, i, n) for i, n in enumerate(vm.network_ids)],
        **ACCOUNT,
    }
    return {k: v for k, v in body.items() if v is not None}


def volume_json(world: World, volume: Volume) -> dict[str, Any]:
    """A listVolumes item; the VM fields only while attached."""
    body: dict[str, Any] = {
        "id": volume.id,
        "name": volume.name,
        "type": volume.type,
        "state": volume.state,
        "size": volume.size,
        "zoneid": volume.zone_id,
        "zonename": world.zones[volume.zone_id].name,
        "created": volume.created,
        "storagetype": "shared",
        "provisioningtype": "thin",
        "destroyed": volume.destroyed,
        "diskofferingid": volume.diskoffering_id,
        **ACCOUNT,
    }
    vm = world.vms.get(volume.vm_id) if volume.vm_id else None
    if vm is not None and not volume.destroyed:
        body.update(
            virtualmachineid=vm.id,
            vmname=vm.name,
            vmdisplayname=vm.displayname,
            vmstate=vm.state,
            deviceid=volume.device_id,
        )
    return {k: v for k, v in body.items() if v is not None}


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """A listSnapshots item."""
    return {
        "id": snapshot.id,
        "name": snapshot.name,
        "volumeid": snapshot.volume_id,
        "volumename": snapshot.volume_name,
        "volumetype": snapshot.volume_type,
        "state": snapshot.state,
        "revertable": snapshot.revertable,
        "created": snapshot.created,
        "intervaltype": "MANUAL",
        "snapshottype": "MANUAL",
        "zoneid": snapshot.zone_id,
        "locationtype": "PRIMARY",
        **ACCOUNT,
    }


def job_json(world: World, job: AsyncJob) -> dict[str, Any]:
    """A queryAsyncJobResult answer; ``jobresult``/``jobresulttype`` only once the job ended."""
    body: dict[str, Any] = {
        "accountid": world.account_id,
        "userid": world.user_id,
        "cmd": JOB_CLASSES.get(job.command, job.command),
        "jobstatus": job.status,
        "jobprocstatus": 0,
        "jobresultcode": job.result_code,
        "jobinstancetype": job.instance_type,
        "jobinstanceid": job.instance_id,
        "created": job.created,
        "jobid": job.id,
    }
    if job.status != JOB_PENDING:
        body["jobresulttype"] = "object"
        body["jobresult"] = job.result
        body["completed"] = job.completed
    return {k: v for k, v in body.items() if v is not None}


def volume_state_json(world: World, volume: Volume) -> dict[str, Any]:
    """A volume as the state view shows it: CloudStack's fields plus ``content``, ``vm_id``
    (for a destroyed ROOT, the VM it died with) and ``device_id``."""
    return {
        **volume_json(world, volume),
        "content": volume.content,
        "vm_id": volume.vm_id,
        "device_id": volume.device_id,
    }


def state_json(world: World) -> dict[str, Any]:
    """The control API's view of the whole world, destroyed resources and contents included."""
    return {
        "appliance_vm_id": world.appliance_vm_id,
        "zones": [zone_json(z) for z in world.zones.values()],
        "service_offerings": [service_offering_json(o) for o in world.service_offerings.values()],
        "disk_offerings": [disk_offering_json(o) for o in world.disk_offerings.values()],
        "templates": [template_json(world, t) for t in world.templates.values()],
        "networks": [network_json(world, n) for n in world.networks.values()],
        "vms": [{**vm_json(world, vm), "destroyed": vm.destroyed} for vm in world.vms.values()],
        "volumes": [volume_state_json(world, vol) for vol in world.volumes.values()],
        "snapshots": [
            {**snapshot_json(s), "content": s.content, "destroyed": s.destroyed}
            for s in world.snapshots.values()
        ],
        "async_jobs": [{**job_json(world, j), "command": j.command} for j in world.jobs.values()],
        "operations": [operation_json(op) for op in world.operations.values()],
        "faults": world.faults.list(),
        "latency": world.latency.as_json(),
    }


def operation_json(op: Operation) -> dict[str, Any]:
    """A Volume Daemon operation."""
    return {
        "id": op.id,
        "type": op.type,
        "status": op.status,
        "volume_id": op.volume_id,
        "vm_id": op.vm_id,
        "request": op.request,
        "response": op.response,
        "error": op.error,
        "created_at": op.created_at,
        "updated_at": op.updated_at,
        "completed_at": op.completed_at,
    }
