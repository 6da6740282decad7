"""CloudStack's rules as the emulator models them, through the real ``cs`` client."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from cs import AIOCloudStack

from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle

from .helpers import raw_call, refused, run_job, succeed, wait_job, wait_until


async def deploy(emu: EmulatorHandle, cs: AIOCloudStack, name: str, **extra: Any) -> dict[str, Any]:
    """Deploy a VM and wait for it; the VM."""
    result = await succeed(
        cs,
        "deployVirtualMachine",
        serviceofferingid=emu.service_offering_id,
        templateid=emu.template_id,
        zoneid=emu.zone_id,
        name=name,
        **extra,
    )
    vm: dict[str, Any] = result["virtualmachine"]
    return vm


async def volumes_of(cs: AIOCloudStack, vm_id: str) -> list[dict[str, Any]]:
    listed = await cs.listVolumes(virtualmachineid=vm_id)
    return sorted(listed.get("volume", []), key=lambda v: v["deviceid"])


async def content(control: EmulatorControl, volume_id: str) -> str:
    state = await control.state()
    [volume] = [v for v in state["volumes"] if v["id"] == volume_id]
    return str(volume["content"])


# --------------------------------------------------------------------------- lists
async def test_seed_lists(emu: EmulatorHandle, cs: AIOCloudStack) -> None:
    assert (await cs.listZones(name="zone1"))["zone"][0]["id"] == emu.zone_id
    assert (await cs.listServiceOfferings())["serviceoffering"][0]["iscustomized"] is True
    assert (await cs.listDiskOfferings())["diskoffering"][0]["id"] == emu.disk_offering_id
    templates = await cs.listTemplates(templatefilter="executable", id=emu.template_id)
    assert templates["count"] == 1
    networks = (await cs.listNetworks())["network"]
    assert sorted(n["name"] for n in networks) == ["default-net", "test-net"]
    [appliance] = (await cs.listVirtualMachines(id=emu.appliance_vm_id))["virtualmachine"]
    assert (appliance["name"], appliance["state"]) == ("migratekit-oma", "Running")
    assert await cs.listVolumes(virtualmachineid=emu.appliance_vm_id) == {}
    assert await cs.listSnapshots() == {}


async def test_list_pages_like_cloudstack(emu: EmulatorHandle, cs: AIOCloudStack) -> None:
    for i in range(5):
        await deploy(emu, cs, f"paged-{i}", startvm=False)
    page = await cs.listVirtualMachines(page=2, pagesize=2)
    assert page["count"] == 6 and len(page["virtualmachine"]) == 2
    everything = await cs.listVirtualMachines(fetch_list=True)
    assert len(everything) == 6


async def test_vm_names_match_as_substrings(emu: EmulatorHandle, cs: AIOCloudStack) -> None:
    await deploy(emu, cs, "web", startvm=False)
    await deploy(emu, cs, "web-2", startvm=False)
    found = await cs.listVirtualMachines(name="web")
    assert sorted(v["name"] for v in found["virtualmachine"]) == ["web", "web-2"]


async def test_missing_and_unknown_parameters_are_431(
    emu: EmulatorHandle, cs: AIOCloudStack
) -> None:
    status, error = await refused(
        cs.deployVirtualMachine(serviceofferingid=emu.service_offering_id, zoneid=emu.zone_id)
    )
    assert status == 431
    assert error == {
        "uuidList": [],
        "errorcode": 431,
        "cserrorcode": 9999,
        "errortext": "Unable to execute API command deployvirtualmachine due to missing "
        "parameter templateid",
    }
    status, error = await refused(cs.listTemplates())
    assert status == 431 and "templatefilter" in error["errortext"]
    status, error = await refused(cs.startVirtualMachine(id="00000000-0000-4000-8000-000000000000"))
    assert status == 431 and "Invalid parameter id" in error["errortext"]
    status, _ = await refused(cs.queryAsyncJobResult(jobid="nope"))
    assert status == 431


async def test_unknown_command_is_432(emu: EmulatorHandle, http: aiohttp.ClientSession) -> None:
    status, _, body = await raw_call(
        http, emu.cloudstack_url, emu.api_key, emu.secret_key, "rebootVirtualMachine", id="x"
    )
    assert status == 432
    assert body["errorresponse"]["errorcode"] == 432
    assert body["errorresponse"]["cserrorcode"] == 9999


# ----------------------------------------------------------------------- deploy
async def test_deploy_creates_a_running_vm_with_its_root_disk(
    emu: EmulatorHandle, cs: AIOCloudStack
) -> None:
    vm = await deploy(emu, cs, "deployed", displayname="Deployed VM")
    assert vm["state"] == "Running" and vm["displayname"] == "Deployed VM"
    [root] = await volumes_of(cs, vm["id"])
    assert (root["type"], root["deviceid"], root["state"]) == ("ROOT", 0, "Ready")
    assert root["name"].startswith("ROOT-")


async def test_deploy_with_a_disk_offering_adds_a_data_disk_and_startvm_false_stops(
    emu: EmulatorHandle, cs: AIOCloudStack
) -> None:
    vm = await deploy(emu, cs, "stopped", startvm=False, diskofferingid=emu.disk_offering_id)
    assert vm["state"] == "Stopped"
    root, data = await volumes_of(cs, vm["id"])
    assert (root["type"], root["deviceid"]) == ("ROOT", 0)
    assert (data["type"], data["deviceid"]) == ("DATADISK", 1)


@pytest.mark.parametrize("name", ["1abc", "-abc", "abc-", "a_b", "a.b", "x" * 64, "ünï", "a b"])
async def test_invalid_vm_names_are_431(emu: EmulatorHandle, cs: AIOCloudStack, name: str) -> None:
    status, error = await refused(
        cs.deployVirtualMachine(
            serviceofferingid=emu.service_offering_id,
            templateid=emu.template_id,
            zoneid=emu.zone_id,
            name=name,
        )
    )
    assert status == 431 and error["errortext"].startswith("Invalid name."), name
    assert (await cs.listVirtualMachines())["count"] == 1


@pytest.mark.parametrize("name", ["a", "a-b-1", "A" * 63, "Web01"])
async def test_valid_vm_names(emu: EmulatorHandle, cs: AIOCloudStack, name: str) -> None:
    assert (await deploy(emu, cs, name, startvm=False))["name"] == name


async def test_vm_names_are_unique_among_live_vms(emu: EmulatorHandle, cs: AIOCloudStack) -> None:
    vm = await deploy(emu, cs, "twin", startvm=False)
    status, error = await refused(
        cs.deployVirtualMachine(
            serviceofferingid=emu.service_offering_id,
            templateid=emu.template_id,
            zoneid=emu.zone_id,
            name="TWIN",
        )
    )
    assert status == 431 and "already exists" in error["errortext"]
    await succeed(cs, "destroyVirtualMachine", id=vm["id"])
    await deploy(emu, cs, "twin", startvm=False)


# ------------------------------------------------------------------ VM lifecycle
async def test_start_writes_to_every_attached_volume(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    vm = await deploy(emu, cs, "booter", startvm=False)
    [root] = await volumes_of(cs, vm["id"])
    before = await content(control, root["id"])
    assert before == f"initial:{root['id']}"
    started = await succeed(cs, "startVirtualMachine", id=vm["id"])
    assert started["virtualmachine"]["state"] == "Running"
    assert await content(control, root["id"]) == f"{before}|boot:{vm['id']}"
    status, _ = await refused(cs.startVirtualMachine(id=vm["id"]))
    assert status == 431
    stopped = await succeed(cs, "stopVirtualMachine", id=vm["id"], forced=True)
    assert stopped["virtualmachine"]["state"] == "Stopped"


async def test_start_is_refused_without_a_root_volume(
    emu: EmulatorHandle, cs: AIOCloudStack
) -> None:
    vm = await deploy(emu, cs, "rootless", startvm=False)
    [root] = await volumes_of(cs, vm["id"])
    await succeed(cs, "detachVolume", id=root["id"])
    status, error = await refused(cs.startVirtualMachine(id=vm["id"]))
    assert status == 431 and "ROOT" in error["errortext"]


async def test_destroying_a_vm_destroys_its_root_volume_and_keeps_data_disks(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    vm = await deploy(emu, cs, "doomed", diskofferingid=emu.disk_offering_id)
    root, data = await volumes_of(cs, vm["id"])
    result = await succeed(cs, "destroyVirtualMachine", id=vm["id"], expunge=True)
    assert result["virtualmachine"]["state"] == "Expunging"
    assert await cs.listVirtualMachines(id=vm["id"]) == {}
    assert await cs.listVolumes(id=root["id"]) == {}
    [kept] = (await cs.listVolumes(id=data["id"]))["volume"]
    assert kept["type"] == "DATADISK" and "virtualmachineid" not in kept and "deviceid" not in kept
    state = await control.state()
    [dead_vm] = [v for v in state["vms"] if v["id"] == vm["id"]]
    assert dead_vm["destroyed"] is True and dead_vm["state"] == "Expunging"
    [dead_root] = [v for v in state["volumes"] if v["id"] == root["id"]]
    assert dead_root["destroyed"] is True


# ---------------------------------------------------------------------- volumes
async def test_device_zero_only_on_a_stopped_vm_without_one(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    vm = await deploy(emu, cs, "target")
    [template_root] = await volumes_of(cs, vm["id"])
    replica = await control.create_volume("replica-root", 20, content="replica-data")
    # running VM: no device 0, and its ROOT can't be detached
    status, error = await refused(
        cs.attachVolume(id=replica["id"], virtualmachineid=vm["id"], deviceid=0)
    )
    assert status == 431 and "stopped" in error["errortext"]
    status, _ = await refused(cs.detachVolume(id=template_root["id"]))
    assert status == 431
    await succeed(cs, "stopVirtualMachine", id=vm["id"])
    # stopped, but device 0 is taken
    status, error = await refused(
        cs.attachVolume(id=replica["id"], virtualmachineid=vm["id"], deviceid=0)
    )
    assert status == 431 and "deviceId 0" in error["errortext"]
    detached = await succeed(cs, "detachVolume", id=template_root["id"])
    assert detached["volume"]["type"] == "DATADISK"
    attached = await succeed(
        cs, "attachVolume", id=replica["id"], virtualmachineid=vm["id"], deviceid=0
    )
    assert (attached["volume"]["type"], attached["volume"]["deviceid"]) == ("ROOT", 0)
    await succeed(cs, "startVirtualMachine", id=vm["id"])
    assert await content(control, replica["id"]) == f"replica-data|boot:{vm['id']}"


async def test_attach_rules_and_device_ids(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    vm = await deploy(emu, cs, "holder")
    one = await control.create_volume("one", 5)
    two = await control.create_volume("two", 5)
    three = await control.create_volume("three", 5)
    attached = await succeed(
        cs, "attachVolume", id=one["id"], virtualmachineid=vm["id"], deviceid=3
    )
    assert attached["volume"]["deviceid"] == 3
    status, _ = await refused(cs.attachVolume(id=two["id"], virtualmachineid=vm["id"], deviceid=3))
    assert status == 431
    status, error = await refused(cs.attachVolume(id=one["id"], virtualmachineid=vm["id"]))
    assert status == 431 and "already attached" in error["errortext"]
    attached = await succeed(cs, "attachVolume", id=two["id"], virtualmachineid=vm["id"])
    assert (attached["volume"]["deviceid"], attached["volume"]["type"]) == (1, "DATADISK")
    attached = await succeed(cs, "attachVolume", id=three["id"], virtualmachineid=vm["id"])
    assert attached["volume"]["deviceid"] == 2
    status, _ = await refused(cs.deleteVolume(id=three["id"]))
    assert status == 431
    await succeed(cs, "detachVolume", id=three["id"])
    assert await cs.deleteVolume(id=three["id"]) == {"success": True}
    assert await cs.listVolumes(id=three["id"]) == {}


async def test_a_rule_broken_by_the_time_the_job_runs_fails_the_job(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    await control.set_latency(async_job_seconds=0.05)
    vm = await deploy(emu, cs, "racer")
    volume = await control.create_volume("contested", 5)
    first = await cs.attachVolume(id=volume["id"], virtualmachineid=vm["id"])
    second = await cs.attachVolume(id=volume["id"], virtualmachineid=emu.appliance_vm_id)
    assert (await wait_job(cs, first["jobid"]))["jobstatus"] == 1
    failed = await wait_job(cs, second["jobid"])
    assert failed["jobstatus"] == 2 and failed["jobresultcode"] == 530
    assert failed["jobresult"]["errorcode"] == 530
    assert "already attached" in failed["jobresult"]["errortext"]


# -------------------------------------------------------------------- snapshots
async def test_snapshot_revert_and_delete(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    vm = await deploy(emu, cs, "snappy")
    [root] = await volumes_of(cs, vm["id"])
    await control.set_latency(async_job_seconds=0.05)
    answer = await cs.createSnapshot(volumeid=root["id"], name="before")
    [creating] = (await cs.listSnapshots(id=answer["id"]))["snapshot"]
    assert creating["state"] in ("Allocated", "BackingUp")  # (test_a_snapshot_being_taken_...)
    job = await wait_job(cs, answer["jobid"])
    snapshot = job["jobresult"]["snapshot"]
    assert snapshot == {
        **snapshot,
        "id": answer["id"],
        "name": "before",
        "volumeid": root["id"],
        "volumename": root["name"],
        "state": "BackedUp",
        "revertable": True,
        "intervaltype": "MANUAL",
        "snapshottype": "MANUAL",
    }
    assert "created" in snapshot
    await control.set_latency(async_job_seconds=0)
    saved = await content(control, root["id"])
    # the VM runs: the revert is taken, and its job fails (the rules are the job's)
    job = await run_job(cs, "revertSnapshot", id=snapshot["id"])
    assert job["jobstatus"] == 2 and "shutdown" in job["jobresult"]["errortext"]
    assert await content(control, root["id"]) == saved
    await succeed(cs, "stopVirtualMachine", id=vm["id"])
    await succeed(cs, "startVirtualMachine", id=vm["id"])
    await succeed(cs, "stopVirtualMachine", id=vm["id"])
    assert await content(control, root["id"]) != saved
    reverted = await succeed(cs, "revertSnapshot", id=snapshot["id"])
    assert reverted["snapshot"]["id"] == snapshot["id"]
    assert await content(control, root["id"]) == saved
    assert await succeed(cs, "deleteSnapshot", id=snapshot["id"]) == {"success": True}
    assert await cs.listSnapshots(volumeid=root["id"]) == {}
    status, _ = await refused(cs.revertSnapshot(id=snapshot["id"]))
    assert status == 431


async def test_a_snapshot_being_taken_shows_its_state_and_cannot_be_deleted(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    """As CloudStack's: Allocated once the call answered, BackingUp while its job copies it,
    BackedUp at the end. deleteSnapshot's rules are its job's: a snapshot still being taken,
    or already deleted, fails the job (the call is taken)."""
    volume = await control.create_volume("taking", 5, content="v1")
    await control.set_latency(async_job_seconds=2.0)
    answer = await cs.createSnapshot(volumeid=volume["id"])

    async def state() -> str:
        [snapshot] = (await cs.listSnapshots(id=answer["id"]))["snapshot"]
        return str(snapshot["state"])

    async def backing_up() -> bool:
        return await state() == "BackingUp"

    assert await state() == "Allocated"
    await wait_until(backing_up, 3, "the snapshot's job under way")
    await control.set_latency(async_job_seconds=0)
    early = await wait_job(cs, (await cs.deleteSnapshot(id=answer["id"]))["jobid"])
    assert (early["jobstatus"], early["jobresult"]["errortext"]) == (
        2, f"Can't delete snapshot {answer['id']} due to it is in BackingUp Status")
    assert (await wait_job(cs, answer["jobid"], timeout=5))["jobstatus"] == 1
    assert await state() == "BackedUp"
    assert await succeed(cs, "deleteSnapshot", id=answer["id"]) == {"success": True}
    again = await wait_job(cs, (await cs.deleteSnapshot(id=answer["id"]))["jobid"])
    assert (again["jobstatus"], again["jobresult"]["errortext"]) == (
        2, f"Snapshot with id: {answer['id']} is already destroyed")


async def test_a_revert_while_one_runs_is_refused(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    """As CloudStack's: the volume is RevertSnapshotting while a revert's job runs, and a
    revert needs it Ready, which its job checks as it begins (it fails at once)."""
    volume = await control.create_volume("reverting", 5, content="v1")
    snap = await succeed(cs, "createSnapshot", volumeid=volume["id"])
    await control.set_latency(async_job_seconds=0.3)
    first = await cs.revertSnapshot(id=snap["snapshot"]["id"])
    [during] = (await cs.listVolumes(id=volume["id"]))["volume"]
    assert during["state"] == "RevertSnapshotting"
    second = await cs.revertSnapshot(id=snap["snapshot"]["id"])  # taken: its job fails
    beside = await wait_job(cs, second["jobid"], timeout=0.2)  # (before the first's 0.3 s)
    assert (beside["jobstatus"], beside["jobresult"]["errortext"]) == (2, "The volume is not in Ready state.")
    assert (await wait_job(cs, first["jobid"]))["jobstatus"] == 1
    [after] = (await cs.listVolumes(id=volume["id"]))["volume"]
    assert after["state"] == "Ready"
    await control.add_fault("cloudstack", "async_fail", command="revertSnapshot")
    failed = await cs.revertSnapshot(id=snap["snapshot"]["id"])
    assert (await wait_job(cs, failed["jobid"]))["jobstatus"] == 2
    [after_failure] = (await cs.listVolumes(id=volume["id"]))["volume"]
    assert after_failure["state"] == "Ready"


async def test_revert_onto_a_detached_volume(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    volume = await control.create_volume("loose", 5, content="v1")
    snap = await succeed(cs, "createSnapshot", volumeid=volume["id"])
    assert snap["snapshot"]["name"].startswith("detached_loose_")
    vm = await deploy(emu, cs, "writer")
    await succeed(cs, "attachVolume", id=volume["id"], virtualmachineid=vm["id"])
    await succeed(cs, "stopVirtualMachine", id=vm["id"])
    await succeed(cs, "startVirtualMachine", id=vm["id"])
    await succeed(cs, "detachVolume", id=volume["id"])
    assert await content(control, volume["id"]) == f"v1|boot:{vm['id']}"
    await succeed(cs, "revertSnapshot", id=snap["snapshot"]["id"])
    assert await content(control, volume["id"]) == "v1"


async def test_async_job_lifecycle(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    await control.set_latency(async_job_seconds=0.1)
    volume = await control.create_volume("slow", 5)
    answer = await cs.createSnapshot(volumeid=volume["id"])
    assert set(answer) == {"id", "jobid"}
    pending = await cs.queryAsyncJobResult(jobid=answer["jobid"])
    assert pending["jobstatus"] == 0 and pending["jobresultcode"] == 0
    assert "jobresult" not in pending
    assert pending["cmd"].endswith("CreateSnapshotCmd") and "created" in pending
    assert pending["jobinstanceid"] == answer["id"]
    done = await wait_job(cs, answer["jobid"])
    assert done["jobstatus"] == 1 and done["jobresulttype"] == "object"
    assert done["jobresult"]["snapshot"]["state"] == "BackedUp"
    attach = await cs.attachVolume(id=volume["id"], virtualmachineid=emu.appliance_vm_id)
    assert set(attach) == {"jobid"}
    # the effect comes with the job: until then the volume is still detached
    assert "virtualmachineid" not in (await cs.listVolumes(id=volume["id"]))["volume"][0]
    assert (await wait_job(cs, attach["jobid"]))["jobresult"]["volume"]["deviceid"] == 1


async def test_list_async_jobs_from_a_start_date_with_pages(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    """listAsyncJobs(startdate): the account's jobs created at or after it, oldest first, each
    as queryAsyncJobResult shows it (its jobresult once ended); paged; a bad date is a 431."""
    await control.set_latency(async_job_seconds=0.2)
    volume = await control.create_volume("listed", 5)
    first = await cs.createSnapshot(volumeid=volume["id"])
    second = await cs.createSnapshot(volumeid=volume["id"])
    created = (await cs.queryAsyncJobResult(jobid=first["jobid"]))["created"]
    listed = await cs.listAsyncJobs(startdate=created)
    assert listed["count"] == 2
    assert [j["jobid"] for j in listed["asyncjobs"]] == [first["jobid"], second["jobid"]]
    assert all(j["jobstatus"] == 0 and "jobresult" not in j for j in listed["asyncjobs"])
    await wait_job(cs, second["jobid"])
    done = (await cs.listAsyncJobs(startdate=created, page=2, pagesize=1))["asyncjobs"]
    assert [j["jobid"] for j in done] == [second["jobid"]] and done[0]["jobresult"]["snapshot"]["state"] == "BackedUp"
    assert await cs.listAsyncJobs(startdate="2999-01-01T00:00:00+0000") == {}
    status, error = await refused(cs.listAsyncJobs(startdate="yesterday"))
    assert status == 431 and "startdate" in error["errortext"]
