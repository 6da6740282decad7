"""The Volume Daemon stand-in: its endpoints and the operation lifecycle, over real HTTP."""

from __future__ import annotations

from typing import Any

import aiohttp
from cs import AIOCloudStack

from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle

from .helpers import wait_until


class Daemon:
    """A tiny client of the daemon API for the tests."""

    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        self.base, self.http = base, http

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        async with self.http.post(f"{self.base}{path}", **kwargs) as response:
            return response.status, await response.json()

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(f"{self.base}{path}") as response:
            return response.status, await response.json()

    async def finished(self, op: dict[str, Any]) -> dict[str, Any]:
        """Wait until the operation has completed or failed; its last state."""

        async def done() -> dict[str, Any] | None:
            status, body = await self.get(f"/api/v1/operations/{op['id']}")
            assert status == 200
            return body if body["status"] in ("completed", "failed") else None

        result: dict[str, Any] = await wait_until(done, what=f"operation {op['id']}")
        return result

    async def run(self, volume_id: str, action: str, body: Any = None) -> dict[str, Any]:
        status, op = await self.post(f"/api/v1/volumes/{volume_id}/{action}", body)
        assert status == 201, op
        return await self.finished(op)


async def test_health(emu: EmulatorHandle, http: aiohttp.ClientSession) -> None:
    daemon = Daemon(emu.volume_daemon_url, http)
    assert await daemon.get("/health") == (200, {"status": "healthy"})


async def test_attach_to_the_appliance_gives_device_paths(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl
) -> None:
    daemon = Daemon(emu.volume_daemon_url, http)
    first = await control.create_volume("disk-a", 10)
    second = await control.create_volume("disk-b", 10)
    status, op = await daemon.post(
        f"/api/v1/volumes/{first['id']}/attach", {"vm_id": emu.appliance_vm_id}
    )
    assert status == 201
    assert op == {
        **op,
        "type": "attach",
        "status": "pending",
        "volume_id": first["id"],
        "vm_id": emu.appliance_vm_id,
        "response": None,
        "error": None,
        "completed_at": None,
    }
    assert op["created_at"] and op["updated_at"]
    done = await daemon.finished(op)
    assert done["status"] == "completed" and done["completed_at"]
    assert done["response"] == {"device_id": 1, "device_path": "/dev/vdb"}
    done = await daemon.run(second["id"], "attach", {"vm_id": emu.appliance_vm_id})
    assert done["response"] == {"device_id": 2, "device_path": "/dev/vdc"}
    assert await daemon.get(f"/api/v1/volumes/{second['id']}") == (
        200,
        {
            "volume_id": second["id"],
            "vm_id": emu.appliance_vm_id,
            "device_id": 2,
            "device_path": "/dev/vdc",
            "type": "DATADISK",
            "state": "attached",
        },
    )
    calls = await control.calls(api="volume-daemon", command="attach")
    assert [c["params"]["volume_id"] for c in calls] == [first["id"], second["id"]]
    assert all(c["status"] == 201 for c in calls)


async def test_attach_root_detach_and_paths_off_the_appliance(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl
) -> None:
    daemon = Daemon(emu.volume_daemon_url, http)
    vm = await control.create_vm("test-vm", state="Stopped")
    volume = await control.create_volume("replica", 10, vm_id=emu.appliance_vm_id)
    done = await daemon.run(volume["id"], "detach")
    assert done["status"] == "completed" and done["vm_id"] == emu.appliance_vm_id
    assert (await daemon.get(f"/api/v1/volumes/{volume['id']}"))[1] == {
        "volume_id": volume["id"],
        "vm_id": None,
        "device_id": None,
        "device_path": None,
        "type": "DATADISK",
        "state": "detached",
    }
    done = await daemon.run(volume["id"], "attach-root", {"vm_id": vm["id"]})
    assert done["status"] == "completed"
    assert done["response"] == {"device_id": 0, "device_path": None}
    _, seen = await daemon.get(f"/api/v1/volumes/{volume['id']}")
    assert (seen["type"], seen["device_id"], seen["device_path"]) == ("ROOT", 0, None)


async def test_rule_violations_fail_the_operation(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl, cs: AIOCloudStack
) -> None:
    daemon = Daemon(emu.volume_daemon_url, http)
    running = await control.create_vm("running-vm")
    root = await control.create_volume("root", 10, vm_id=running["id"], device_id=0)
    other = await control.create_volume("other", 10)
    # device 0 on a running VM
    failed = await daemon.run(other["id"], "attach-root", {"vm_id": running["id"]})
    assert failed["status"] == "failed" and "stopped" in failed["error"]
    assert failed["response"] is None
    # a ROOT detach from a running VM
    failed = await daemon.run(root["id"], "detach")
    assert failed["status"] == "failed" and "ROOT" in failed["error"]
    # already attached
    failed = await daemon.run(root["id"], "attach", {"vm_id": emu.appliance_vm_id})
    assert failed["status"] == "failed" and "already attached" in failed["error"]
    # detached volume
    failed = await daemon.run(other["id"], "detach")
    assert failed["status"] == "failed"
    # device 0 taken on a stopped VM
    stopped = await control.create_vm("stopped-vm", state="Stopped")
    await control.create_volume("its-root", 10, vm_id=stopped["id"], device_id=0)
    failed = await daemon.run(other["id"], "attach-root", {"vm_id": stopped["id"]})
    assert failed["status"] == "failed" and "deviceId 0" in failed["error"]


async def test_bad_requests_and_unknown_things(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl
) -> None:
    daemon = Daemon(emu.volume_daemon_url, http)
    volume = await control.create_volume("v", 1)
    unknown = "00000000-0000-4000-8000-000000000000"
    status, body = await daemon.post(f"/api/v1/volumes/{unknown}/attach", {"vm_id": unknown})
    assert status == 404 and body["code"] == "NOT_FOUND" and body["error"]
    status, body = await daemon.post(f"/api/v1/volumes/{volume['id']}/attach", {"vm_id": unknown})
    assert status == 404
    status, body = await daemon.post(f"/api/v1/volumes/{volume['id']}/attach", {})
    assert (status, body["code"]) == (400, "INVALID_REQUEST")
    async with http.post(
        f"{emu.volume_daemon_url}/api/v1/volumes/{volume['id']}/attach", data=b"{not json"
    ) as response:
        assert response.status == 400
    assert (await daemon.get(f"/api/v1/volumes/{unknown}"))[0] == 404
    assert (await daemon.get(f"/api/v1/operations/{unknown}"))[0] == 404
    status, _ = await daemon.post(f"/api/v1/volumes/{volume['id']}/detach", {})
    assert status == 201


async def test_operations_wait_for_the_operation_latency(
    emu: EmulatorHandle, http: aiohttp.ClientSession, control: EmulatorControl
) -> None:
    daemon = Daemon(emu.volume_daemon_url, http)
    await control.set_latency(operation_seconds=0.2)
    volume = await control.create_volume("slow", 1)
    status, op = await daemon.post(
        f"/api/v1/volumes/{volume['id']}/attach", {"vm_id": emu.appliance_vm_id}
    )
    assert (status, op["status"]) == (201, "pending")

    async def executing() -> bool:
        _, seen = await daemon.get(f"/api/v1/operations/{op['id']}")
        return bool(seen["status"] == "executing")

    await wait_until(executing, what="executing")
    # still not attached while the operation runs
    assert (await daemon.get(f"/api/v1/volumes/{volume['id']}"))[1]["state"] == "detached"
    done = await daemon.finished(op)
    assert done["status"] == "completed"
    assert (await daemon.get(f"/api/v1/volumes/{volume['id']}"))[1]["state"] == "attached"
    _, listed = await daemon.get(f"/api/v1/operations?volume_id={volume['id']}")
    assert [o["id"] for o in listed] == [op["id"]]
