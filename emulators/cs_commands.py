"""The CloudStack commands the emulator serves: parameters in, the response's inner object out.

Each handler takes the world, the command's parameters and the programmed fault kind (only
async commands get one), and returns what goes under ``<command>response``; refusals raise
CloudStackError. Async commands answer ``{"id"?, "jobid"}`` at once: ``id`` only for the
commands that create something (deploy, createSnapshot), as CloudStack does.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from emulators import views
from emulators.cs_params import Params
from emulators.model import Volume, cs_time
from emulators.world import World

Handler = Callable[[World, Params, str | None], dict[str, Any]]
# the version whose rules this emulator follows (where it was checked against Apache CloudStack's
# source: the 4.19-4.20 line)
CLOUDSTACK_VERSION = "4.20.0.0"
TEMPLATE_FILTERS = (
    "featured", "self", "selfexecutable", "sharedexecutable", "executable", "community", "all",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Command:
    handler: Handler
    is_async: bool


def _listing(key: str, items: Iterable[dict[str, Any]], p: Params) -> dict[str, Any]:
    """A list response: ``{"count": n, key: [...]}``, or ``{}`` when nothing matches."""
    everything = list(items)
    if not everything:
        return {}
    page = p.integer("page", minimum=1)
    size = p.integer("pagesize", minimum=1)
    shown = everything
    if page is not None and size is not None:
        shown = everything[(page - 1) * size : page * size]
    if not shown:
        return {"count": len(everything)}
    return {"count": len(everything), key: shown}


def _contains(value: str | None, wanted: str | None) -> bool:
    """CloudStack's ``name LIKE %wanted%`` (MySQL compares without case)."""
    return wanted is None or (value is not None and wanted.lower() in value.lower())


def _equals(value: str | None, wanted: str | None) -> bool:
    return wanted is None or (value is not None and value.lower() == wanted.lower())


def list_zones(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listZones(id?, name?)."""
    zone = p.entity("id", world.zones)
    name = p.get("name")
    items = (
        views.zone_json(z)
        for z in world.zones.values()
        if (zone is None or z is zone) and _equals(z.name, name)
    )
    return _listing("zone", items, p)


def list_service_offerings(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listServiceOfferings(id?, name?)."""
    wanted = p.entity("id", world.service_offerings)
    name = p.get("name")
    items = (
        views.service_offering_json(o)
        for o in world.service_offerings.values()
        if (wanted is None or o is wanted) and _equals(o.name, name)
    )
    return _listing("serviceoffering", items, p)


def list_disk_offerings(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listDiskOfferings(id?, name?)."""
    wanted = p.entity("id", world.disk_offerings)
    name = p.get("name")
    items = (
        views.disk_offering_json(o)
        for o in world.disk_offerings.values()
        if (wanted is None or o is wanted) and _equals(o.name, name)
    )
    return _listing("diskoffering", items, p)


def list_templates(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listTemplates(templatefilter, id?, name?)."""
    flt = p.require("templatefilter")
    if flt.lower() not in TEMPLATE_FILTERS:
        raise p.error(
            f"Unable to execute API command listtemplates due to invalid value. Invalid "
            f"parameter templatefilter value={flt}; expected one of {', '.join(TEMPLATE_FILTERS)}"
        )
    wanted = p.entity("id", world.templates)
    name = p.get("name")
    items = (
        views.template_json(world, t)
        for t in world.templates.values()
        if (wanted is None or t is wanted) and _equals(t.name, name)
    )
    return _listing("template", items, p)


def list_networks(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listNetworks(id?, zoneid?)."""
    wanted = p.entity("id", world.networks)
    zone = p.entity("zoneid", world.zones)
    items = (
        views.network_json(world, n)
        for n in world.networks.values()
        if (wanted is None or n is wanted) and (zone is None or n.zone_id == zone.id)
    )
    return _listing("network", items, p)


def list_virtual_machines(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listVirtualMachines(id?, name? (a substring match, as CloudStack's), state?)."""
    wanted = p.entity("id", world.vms)
    name, state = p.get("name"), p.get("state")
    items = (
        views.vm_json(world, vm)
        for vm in (world.vms.values() if wanted is None else (wanted,))
        if not vm.destroyed
        and _contains(vm.name, name)
        and _equals(vm.state, state)
    )
    return _listing("virtualmachine", items, p)


def list_volumes(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listVolumes(id?, virtualmachineid?, type?, name? (substring))."""
    wanted = p.entity("id", world.volumes)
    vm = p.entity("virtualmachineid", world.vms)
    kind, name = p.get("type"), p.get("name")
    if wanted is not None:
        candidates: Iterable[Volume] = (wanted,)
    else:  # a VM's: the ones attached to it (in the order they were made, as all are listed)
        candidates = world.volumes.values() if vm is None else world.volumes_on(vm.id)
    items = (
        views.volume_json(world, v)
        for v in candidates
        if not v.destroyed
        and (vm is None or v.vm_id == vm.id)
        and _equals(v.type, kind)
        and _contains(v.name, name)
    )
    return _listing("volume", items, p)


def list_snapshots(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listSnapshots(id?, volumeid?, name? (substring))."""
    wanted = p.entity("id", world.snapshots)
    volume = p.entity("volumeid", world.volumes)
    name = p.get("name")
    items = (
        views.snapshot_json(s)
        for s in (world.snapshots.values() if wanted is None else (wanted,))
        if not s.destroyed
        and (volume is None or s.volume_id == volume.id)
        and _contains(s.name, name)
    )
    return _listing("snapshot", items, p)


def query_async_job_result(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """queryAsyncJobResult(jobid)."""
    job = p.required_entity("jobid", world.jobs)
    return views.job_json(world, job)


def list_async_jobs(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listAsyncJobs(startdate?, page?, pagesize?): the account's async jobs created on or
    after startdate's day, oldest first (by id), each as queryAsyncJobResult shows it."""
    since = p.date("startdate")
    order = world.runner.job_order
    # the jobs are kept in the order they were made, with `created` as cs_time prints it (which
    # sorts as text): the first one on or after the day is a bisection, not a walk through all
    start = 0 if since is None else bisect_left(order, cs_time(since), key=lambda job: job.created)
    count = len(order) - start
    # like the database's LIMIT: only the page asked for is rendered
    page, size = p.integer("page", minimum=1), p.integer("pagesize", minimum=1)
    if page is not None and size is not None:
        shown = order[start + (page - 1) * size : start + page * size]
    else:
        shown = order[start:]
    if not count:
        return {}
    if not shown:
        return {"count": count}
    return {"count": count, "asyncjobs": [views.job_json(world, job) for job in shown]}


def list_capabilities(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """listCapabilities: a few of CloudStack's fields (those a client of this emulator reads)."""
    return {"capability": {
        "cloudstackversion": CLOUDSTACK_VERSION,
        "allowuserexpungerecovervm": world.allow_user_expunge_recover_vm,
        "allowuserforcestopvm": True,
    }}


def deploy_virtual_machine(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """deployVirtualMachine(serviceofferingid, templateid, zoneid, name?, displayname?,
    networkids?, startvm?, details[0].cpuNumber?, details[0].memory?, diskofferingid?)."""
    offering = p.required_entity("serviceofferingid", world.service_offerings)
    template = p.required_entity("templateid", world.templates)
    zone = p.required_entity("zoneid", world.zones)
    networks = p.entities("networkids", world.networks) or [world.networks[world.network_id]]
    disk_offering = p.entity("diskofferingid", world.disk_offerings)
    vm, job = world.deploy_vm(
        name=p.get("name"),
        displayname=p.get("displayname"),
        offering=offering,
        template=template,
        zone=zone,
        networks=networks,
        startvm=p.boolean("startvm", True),
        cpunumber=p.integer("details[0].cpunumber", minimum=1),
        memory=p.integer("details[0].memory", minimum=1),
        disk_offering=disk_offering,
        fault=fault,
    )
    return {"id": vm.id, "jobid": job.id}


def start_virtual_machine(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """startVirtualMachine(id)."""
    return {"jobid": world.start_vm(p.required_entity("id", world.vms), fault).id}


def stop_virtual_machine(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """stopVirtualMachine(id, forced?)."""
    p.boolean("forced", False)
    return {"jobid": world.stop_vm(p.required_entity("id", world.vms), fault).id}


def destroy_virtual_machine(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """destroyVirtualMachine(id, expunge?)."""
    vm = p.required_entity("id", world.vms)
    return {"jobid": world.destroy_vm(vm, p.boolean("expunge", False), fault).id}


def attach_volume(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """attachVolume(id, virtualmachineid, deviceid?)."""
    volume = p.required_entity("id", world.volumes)
    vm = p.required_entity("virtualmachineid", world.vms)
    device_id = p.integer("deviceid")
    return {"jobid": world.attach_volume(volume, vm, device_id, fault).id}


def detach_volume(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """detachVolume(id)."""
    return {"jobid": world.detach_volume(p.required_entity("id", world.volumes), fault).id}


def delete_volume(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """deleteVolume(id), synchronous."""
    world.delete_volume(p.required_entity("id", world.volumes))
    return {"success": True}


def create_snapshot(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """createSnapshot(volumeid, name?)."""
    volume = p.required_entity("volumeid", world.volumes)
    snapshot, job = world.create_snapshot(volume, p.get("name"), fault)
    return {"id": snapshot.id, "jobid": job.id}


def revert_snapshot(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """revertSnapshot(id)."""
    return {"jobid": world.revert_snapshot(p.required_entity("id", world.snapshots), fault).id}


def delete_snapshot(world: World, p: Params, fault: str | None) -> dict[str, Any]:
    """deleteSnapshot(id)."""
    return {"jobid": world.delete_snapshot(p.required_entity("id", world.snapshots), fault).id}


COMMANDS: dict[str, Command] = {
    "listZones": Command(list_zones, False),
    "listCapabilities": Command(list_capabilities, False),
    "listServiceOfferings": Command(list_service_offerings, False),
    "listDiskOfferings": Command(list_disk_offerings, False),
    "listTemplates": Command(list_templates, False),
    "listNetworks": Command(list_networks, False),
    "listVirtualMachines": Command(list_virtual_machines, False),
    "listVolumes": Command(list_volumes, False),
    "listSnapshots": Command(list_snapshots, False),
    "queryAsyncJobResult": Command(query_async_job_result, False),
    "listAsyncJobs": Command(list_async_jobs, False),
    "deployVirtualMachine": Command(deploy_virtual_machine, True),
    "startVirtualMachine": Command(start_virtual_machine, True),
    "stopVirtualMachine": Command(stop_virtual_machine, True),
    "destroyVirtualMachine": Command(destroy_virtual_machine, True),
    "attachVolume": Command(attach_volume, True),
    "detachVolume": Command(detach_volume, True),
    "deleteVolume": Command(delete_volume, False),
    "createSnapshot": Command(create_snapshot, True),
    "revertSnapshot": Command(revert_snapshot, True),
    "deleteSnapshot": Command(delete_snapshot, True),
}
