"""Every fault kind, on the CloudStack API and the Volume Daemon, and how faults count."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from cs import AIOCloudStack
from cs.client import CloudStackException

from emulators.client import EmulatorControl, EmulatorControlError
from emulators.runner import EmulatorHandle

from .helpers import refused, run_job, succeed, wait_job, wait_until


async def test_refuse_is_a_431_at_once(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    volume = await control.create_volume("v", 1)
    await control.add_fault("cloudstack", "refuse", command="createSnapshot")
    status, error = await refused(cs.createSnapshot(volumeid=volume["id"]))
    assert status == 431
    assert set(error) == {"uuidList", "errorcode", "cserrorcode", "errortext"}
    assert await cs.listSnapshots() == {}
    await succeed(cs, "createSnapshot", volumeid=volume["id"])  # times=1: once only


async def test_server_error_is_a_530(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    await control.add_fault("cloudstack", "server_error", command="listZones")
    status, error = await refused(cs.listZones())
    assert status == 530
    assert error["errorcode"] == 530 and error["cserrorcode"] == 4250
    [call] = await control.calls(api="cloudstack", command="listZones")
    assert call["status"] == 530


async def test_async_fail_fails_the_job(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    volume = await control.create_volume("v", 1)
    await control.add_fault("cloudstack", "async_fail", command="createSnapshot")
    job = await run_job(cs, "createSnapshot", volumeid=volume["id"])
    assert (job["jobstatus"], job["jobresultcode"], job["jobresulttype"]) == (2, 530, "object")
    assert job["jobresult"]["errorcode"] == 530 and job["jobresult"]["errortext"]
    [snapshot] = (await cs.listSnapshots())["snapshot"]
    assert snapshot["state"] == "Error"


async def test_async_fail_with_an_errorcode_fails_the_job_with_it(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    """As CloudStack's async job dispatcher: the job's result carries the command's own code."""
    volume = await control.create_volume("v", 1)
    await control.add_fault("cloudstack", "async_fail", command="createSnapshot", errorcode=535)
    job = await run_job(cs, "createSnapshot", volumeid=volume["id"])
    assert (job["jobstatus"], job["jobresultcode"]) == (2, 535)
    assert job["jobresult"]["errorcode"] == 535 and "Maximum number of resources" in job["jobresult"]["errortext"]
    [snapshot] = (await cs.listSnapshots())["snapshot"]
    assert snapshot["state"] == "Error"


async def test_async_fail_of_a_start_leaves_the_vm_stopped(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    vm = await control.create_vm("vm", state="Stopped")
    await control.create_volume("root", 1, vm_id=vm["id"], device_id=0)
    await control.add_fault("cloudstack", "async_fail", command="startVirtualMachine")
    assert (await run_job(cs, "startVirtualMachine", id=vm["id"]))["jobstatus"] == 2
    assert (await cs.listVirtualMachines(id=vm["id"]))["virtualmachine"][0]["state"] == "Stopped"


async def test_lost_answer_does_the_command_and_answers_502(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    """The command is done (its job runs) and the answer is a proxy's 502, not CloudStack's."""
    volume = await control.create_volume("v", 1)
    await control.add_fault("cloudstack", "lost_answer", command="createSnapshot")
    with pytest.raises(CloudStackException) as caught:
        await cs.createSnapshot(volumeid=volume["id"])
    assert caught.value.response.status == 502
    [call] = await control.calls(api="cloudstack", command="createSnapshot")
    assert call["status"] == 502

    async def made() -> bool:
        listed = (await cs.listSnapshots()).get("snapshot", [])
        return [s["state"] for s in listed] == ["BackedUp"]

    await wait_until(made, 5, "the snapshot whose answer was lost to be made")


async def test_timeout_leaves_the_job_pending(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    volume = await control.create_volume("v", 1)
    await control.add_fault("cloudstack", "timeout", command="createSnapshot")
    stuck = await cs.createSnapshot(volumeid=volume["id"])
    await succeed(cs, "createSnapshot", volumeid=volume["id"])  # a later job completes
    job = await cs.queryAsyncJobResult(jobid=stuck["jobid"])
    assert job["jobstatus"] == 0
    assert (await cs.listSnapshots(id=stuck["id"]))["snapshot"][0]["state"] == "BackingUp"  # (latency 0)


async def test_timeout_of_a_synchronous_command_never_answers(
    emu: EmulatorHandle, control: EmulatorControl
) -> None:
    await control.add_fault("cloudstack", "timeout", command="listZones")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        cs = AIOCloudStack(emu.cloudstack_url, emu.api_key, emu.secret_key, session=session)
        with pytest.raises(asyncio.TimeoutError):
            await cs.listZones()
    [call] = await control.calls(command="listZones")
    assert call["status"] == "timeout"


@pytest.mark.parametrize("variant", ["truncated", "wrong_shape"])
async def test_malformed_answers(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl, variant: str
) -> None:
    volume = await control.create_volume("v", 1)
    await control.add_fault("cloudstack", "malformed", command="createSnapshot", variant=variant)
    if variant == "truncated":
        with pytest.raises(CloudStackException):
            await cs.createSnapshot(volumeid=volume["id"])
    else:
        assert await cs.createSnapshot(volumeid=volume["id"]) == ["unexpected", "shape"]
    # the command itself went through: the outcome is unknown to the caller, not undone

    async def snapshot_done() -> bool:
        listed = await cs.listSnapshots(volumeid=volume["id"])
        return bool(listed) and listed["snapshot"][0]["state"] == "BackedUp"

    await wait_until(snapshot_done, what="the snapshot")


async def test_not_revertable_snapshots_cannot_be_reverted(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    volume = await control.create_volume("v", 1)
    await control.add_fault("cloudstack", "not_revertable", command="createSnapshot")
    snapshot = (await succeed(cs, "createSnapshot", volumeid=volume["id"]))["snapshot"]
    assert snapshot["revertable"] is False
    job = await run_job(cs, "revertSnapshot", id=snapshot["id"])  # taken; its job fails at once
    assert job["jobstatus"] == 2 and "not revertable" in job["jobresult"]["errortext"]


async def test_nth_times_and_match(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    target = await control.create_volume("target", 1)
    other = await control.create_volume("other", 1)
    fault_id = await control.add_fault(
        "cloudstack", "refuse", command="createSnapshot", match={"volumeid": target["id"]},
        nth=2, times=2,
    )  # fmt: skip
    outcomes = []
    for volume in (target, other, target, target, other, target):
        try:
            await cs.createSnapshot(volumeid=volume["id"])
            outcomes.append("ok")
        except CloudStackException:
            outcomes.append("refused")
    assert outcomes == ["ok", "ok", "refused", "refused", "ok", "ok"]
    [fault] = await control.faults()
    assert fault == {**fault, "id": fault_id, "seen": 3, "fired": 2, "active": False}
    await control.add_fault("cloudstack", "refuse", command="listZones", times=0)
    for _ in range(3):
        await refused(cs.listZones())
    await control.clear_faults()
    assert await control.faults() == []
    assert (await cs.listZones())["count"] == 1


async def test_invalid_fault_descriptions_are_400(control: EmulatorControl) -> None:
    for bad in (
        {"api": "cloudstack", "kind": "exit_nonzero"},
        {"api": "nowhere", "kind": "refuse"},
        {"api": "cloudstack", "kind": "explode"},
        {"api": "cloudstack", "kind": "not_revertable", "command": "listZones"},
        {"api": "cloudstack", "kind": "refuse", "nth": 0},
        {"api": "inject", "kind": "lost_answer"},
    ):
        with pytest.raises(EmulatorControlError) as caught:
            await control._request("POST", "faults", json=bad)
        assert caught.value.status == 400, bad


# ----------------------------------------------------------------- the daemon
async def _attach(
    http: aiohttp.ClientSession, emu: EmulatorHandle, volume_id: str
) -> aiohttp.ClientResponse:
    return await http.post(
        f"{emu.volume_daemon_url}/api/v1/volumes/{volume_id}/attach",
        json={"vm_id": emu.appliance_vm_id},
    )


async def test_daemon_refuse_and_server_error(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl
) -> None:
    volume = await control.create_volume("v", 1)
    await control.add_fault("volume-daemon", "refuse", command="attach")
    async with await _attach(http, emu, volume["id"]) as response:
        assert response.status == 409
        assert (await response.json())["code"] == "CONFLICT"
    await control.add_fault("volume-daemon", "server_error", command="attach")
    async with await _attach(http, emu, volume["id"]) as response:
        assert response.status == 500
        assert (await response.json())["code"] == "INTERNAL_ERROR"
    assert (await control.state())["operations"] == []


async def test_daemon_lost_answer_does_the_operation_and_answers_502(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl
) -> None:
    volume = await control.create_volume("v", 1)
    await control.add_fault("volume-daemon", "lost_answer", command="attach")
    async with await _attach(http, emu, volume["id"]) as response:
        assert response.status == 502

    async def attached() -> bool:
        [op] = (await control.state())["operations"]
        return op["status"] == "completed"

    await wait_until(attached, 5, "the operation whose answer was lost to complete")
    listed = {v["id"]: v for v in (await control.state())["volumes"]}
    assert listed[volume["id"]]["virtualmachineid"] == emu.appliance_vm_id


async def test_daemon_async_fail_and_timeout(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl
) -> None:
    first = await control.create_volume("first", 1)
    second = await control.create_volume("second", 1)
    await control.add_fault("volume-daemon", "timeout", match={"volume_id": first["id"]})
    await control.add_fault("volume-daemon", "async_fail", match={"volume_id": second["id"]})
    async with await _attach(http, emu, first["id"]) as response:
        stuck = await response.json()
    async with await _attach(http, emu, second["id"]) as response:
        failing = await response.json()

    async def failed() -> bool:
        ops = {op["id"]: op for op in (await control.state())["operations"]}
        return bool(ops[failing["id"]]["status"] == "failed")

    await wait_until(failed, what="the failed operation")
    ops = {op["id"]: op for op in (await control.state())["operations"]}
    assert ops[stuck["id"]]["status"] == "executing"
    assert ops[failing["id"]]["error"]
    volumes = {v["id"]: v for v in (await control.state())["volumes"]}
    assert volumes[first["id"]]["vm_id"] is None and volumes[second["id"]]["vm_id"] is None


async def test_daemon_malformed(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl
) -> None:
    volume = await control.create_volume("v", 1)
    await control.add_fault("volume-daemon", "malformed", command="get-volume")
    async with http.get(f"{emu.volume_daemon_url}/api/v1/volumes/{volume['id']}") as response:
        assert response.status == 200
        with pytest.raises(ValueError):
            await response.json()


async def test_jobs_keep_their_fault_through_latency(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    await control.set_latency(async_job_seconds=0.05)
    volume = await control.create_volume("v", 1)
    await control.add_fault("cloudstack", "async_fail", command="createSnapshot")
    answer = await cs.createSnapshot(volumeid=volume["id"])
    assert (await cs.queryAsyncJobResult(jobid=answer["jobid"]))["jobstatus"] == 0
    assert (await wait_job(cs, answer["jobid"]))["jobstatus"] == 2


async def test_a_failed_deploy_leaves_an_error_vm_to_destroy(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    await control.add_fault("cloudstack", "async_fail", command="deployVirtualMachine")
    answer = await cs.deployVirtualMachine(
        serviceofferingid=emu.service_offering_id,
        templateid=emu.template_id,
        zoneid=emu.zone_id,
        name="unlucky",
    )
    assert (await wait_job(cs, answer["jobid"]))["jobstatus"] == 2
    [vm] = (await cs.listVirtualMachines(id=answer["id"]))["virtualmachine"]
    assert vm["state"] == "Error"
    await succeed(cs, "destroyVirtualMachine", id=vm["id"], expunge=True)
    assert await cs.listVolumes(virtualmachineid=vm["id"]) == {}
