"""A whole test failover and its cleanup, step by step as the service does them, against the
emulators: the world ends as it began (same attachments, same contents, nothing left)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
from cs import AIOCloudStack

from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle

from .helpers import succeed, wait_until

ROOT = Path(__file__).resolve().parents[2]


async def daemon_op(
    http: aiohttp.ClientSession, emu: EmulatorHandle, volume_id: str, action: str, vm_id: str = ""
) -> dict[str, Any]:
    body = {"vm_id": vm_id} if vm_id else {}
    url = f"{emu.volume_daemon_url}/api/v1/volumes/{volume_id}/{action}"
    async with http.post(url, json=body) as response:
        assert response.status == 201
        op = await response.json()

    async def ended() -> dict[str, Any] | None:
        async with http.get(f"{emu.volume_daemon_url}/api/v1/operations/{op['id']}") as r:
            seen: dict[str, Any] = await r.json()
        return seen if seen["status"] in ("completed", "failed") else None

    done = await wait_until(ended, what=f"{action} of {volume_id}")
    assert done["status"] == "completed", done
    return done


async def test_test_failover_then_cleanup(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    await control.set_latency(async_job_seconds=0.01, operation_seconds=0.01)
    appliance = emu.appliance_vm_id
    root = await control.create_volume("win-disk0", 40, vm_id=appliance, content="c0")
    data = await control.create_volume("win-disk1", 100, vm_id=appliance, content="d0")
    before = {v["id"]: v for v in (await control.state())["volumes"]}

    # cloudstack-snapshot
    snaps = [
        (await succeed(cs, "createSnapshot", volumeid=v["id"]))["snapshot"] for v in (root, data)
    ]
    assert all(s["revertable"] and s["state"] == "BackedUp" for s in snaps)

    # virtio-driver-injection, on the root volume's device path
    async with http.get(f"{emu.volume_daemon_url}/api/v1/volumes/{root['id']}") as response:
        device_path = (await response.json())["device_path"]
    assert device_path == "/dev/vdb"
    inject = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emulators.inject", "--control-url", emu.control_url,
        device_path, "job-42", cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(inject.wait(), timeout=20) == 0

    # vm-creation
    vm = (
        await succeed(
            cs,
            "deployVirtualMachine",
            serviceofferingid=emu.service_offering_id,
            templateid=emu.template_id,
            zoneid=emu.zone_id,
            name="win-server-test",
            displayname="win-server (test failover)",
            networkids=[emu.test_network_id],
            details={"cpuNumber": 4, "memory": 8192},
            startvm=False,
            diskofferingid=emu.disk_offering_id,
        )
    )["virtualmachine"]

    # volume-attachment: give up what the deploy made, move the replicas over
    for made in (await cs.listVolumes(virtualmachineid=vm["id"]))["volume"]:
        await succeed(cs, "detachVolume", id=made["id"])
        assert await cs.deleteVolume(id=made["id"]) == {"success": True}
    for volume in (root, data):
        await daemon_op(http, emu, volume["id"], "detach")
    assert (await daemon_op(http, emu, root["id"], "attach-root", vm["id"]))["response"] == {
        "device_id": 0,
        "device_path": None,
    }
    await daemon_op(http, emu, data["id"], "attach", vm["id"])

    # vm-startup-validation
    started = await succeed(cs, "startVirtualMachine", id=vm["id"])
    assert started["virtualmachine"]["state"] == "Running"
    contents = {v["id"]: v["content"] for v in (await control.state())["volumes"]}
    assert contents[root["id"]] == f"c0|virtio:job-42|boot:{vm['id']}"

    # cleanup: power-off, volume-detachment, vm-deletion, snapshot-revert,
    # volume-reattachment, snapshot-deletion
    await succeed(cs, "stopVirtualMachine", id=vm["id"])
    for volume in (root, data):
        await daemon_op(http, emu, volume["id"], "detach")
    await succeed(cs, "destroyVirtualMachine", id=vm["id"], expunge=True)
    for snapshot in snaps:
        await succeed(cs, "revertSnapshot", id=snapshot["id"])
    for volume in (root, data):
        await daemon_op(http, emu, volume["id"], "attach", appliance)
    for snapshot in snaps:
        await succeed(cs, "deleteSnapshot", id=snapshot["id"])

    after = {v["id"]: v for v in (await control.state())["volumes"] if not v["destroyed"]}
    for volume_id in (root["id"], data["id"]):
        for key in ("content", "vm_id", "device_id", "type"):
            assert after[volume_id][key] == before[volume_id][key], (volume_id, key)
    assert await cs.listSnapshots() == {}
    assert [v["id"] for v in (await cs.listVirtualMachines())["virtualmachine"]] == [appliance]
