"""The control API, latency, scale, and ``python -m emulators`` as a process."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cs import AIOCloudStack

from emulators.client import EmulatorControl, EmulatorControlError
from emulators.runner import EmulatorHandle, start_emulators

from .helpers import refused, succeed, wait_job, wait_until

ROOT = Path(__file__).resolve().parents[2]


async def test_seed_state(emu: EmulatorHandle, control: EmulatorControl) -> None:
    state = await control.state()
    assert [z["name"] for z in state["zones"]] == [emu.zone_name] == ["zone1"]
    assert [t["id"] for t in state["templates"]] == [emu.template_id]
    assert [o["id"] for o in state["service_offerings"]] == [emu.service_offering_id]
    assert [o["id"] for o in state["disk_offerings"]] == [emu.disk_offering_id]
    assert {n["name"]: n["id"] for n in state["networks"]}["default-net"] == emu.network_id
    [appliance] = state["vms"]
    assert appliance == {
        **appliance,
        "id": emu.appliance_vm_id,
        "name": "migratekit-oma",
        "state": "Running",
        "destroyed": False,
    }
    assert state["volumes"] == state["snapshots"] == state["async_jobs"] == []
    assert state["operations"] == state["faults"] == []


async def test_reset_keeps_the_seed_ids_and_forgets_the_rest(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    vm = await control.create_vm("extra", id="11111111-1111-4111-8111-111111111111")
    assert vm["id"] == "11111111-1111-4111-8111-111111111111" and vm["state"] == "Running"
    volume = await control.create_volume("data", 2, vm_id=vm["id"], content="hello")
    assert (volume["content"], volume["device_id"], volume["type"]) == ("hello", 1, "DATADISK")
    root = await control.create_volume("root", 2, vm_id=vm["id"], device_id=0)
    assert root["type"] == "ROOT" and root["content"] == f"initial:{root['id']}"
    await control.add_fault("cloudstack", "refuse", command="listZones")
    await control.set_latency(api_seconds=0.01)
    await control.reset()
    state = await control.state()
    assert [v["id"] for v in state["vms"]] == [emu.appliance_vm_id]
    assert state["volumes"] == [] and state["faults"] == []
    assert state["latency"] == {"async_job_seconds": 0, "operation_seconds": 0, "api_seconds": 0}
    assert (await cs.listZones())["zone"][0]["id"] == emu.zone_id
    assert [c["command"] for c in await control.calls()] == ["listZones"]


async def test_control_refuses_bad_setups(control: EmulatorControl) -> None:
    with pytest.raises(EmulatorControlError):
        await control.create_vm("migratekit-oma")
    with pytest.raises(EmulatorControlError):
        await control.create_volume("v", 1, vm_id="no-such-vm")
    with pytest.raises(EmulatorControlError):
        await control.set_latency(api_seconds=-1)
    with pytest.raises(EmulatorControlError, match="--event-bus-url"):  # started without an event bus
        await control.set_event_bus(True)
    with pytest.raises(EmulatorControlError, match="errorcode"):
        await control.add_fault("cloudstack", "server_error", errorcode=429)
    with pytest.raises(EmulatorControlError, match="errorcode"):
        await control.add_fault("volume-daemon", "server_error", errorcode=533)
    with pytest.raises(EmulatorControlError, match="errorcode"):
        await control.add_fault("cloudstack", "refuse", errorcode=533)
    with pytest.raises(EmulatorControlError, match="max_calls"):
        await control.set_api_limit(-1)
    with pytest.raises(EmulatorControlError, match="interval_seconds"):
        await control.set_api_limit(5, interval_seconds=0)


async def test_the_api_limit_refuses_an_accounts_calls_past_it_until_its_window_ends(
    cs: AIOCloudStack, control: EmulatorControl
) -> None:
    """As CloudStack's rate-limit plugin: `max_calls` per window from the account's first call;
    a call past it is answered 429 naming when to retry (and is counted: the window's calls go on
    being refused until it ends); then a new window begins."""
    await control.set_api_limit(2, interval_seconds=0.5)
    try:
        await cs.listZones()
        await cs.listZones()
        status, error = await refused(cs.listZones())
        assert status == 429 and error["errorcode"] == 429 and error["cserrorcode"] == 9999
        text = error["errortext"]
        assert text.startswith("The given user has reached his/her account api limit, please retry after [")
        after_ms = int(text.split("[")[1].split("]")[0])
        assert 0 < after_ms <= 500
        await asyncio.sleep(after_ms / 1000 + 0.05)  # (until the window's end the refusal named)
        await cs.listZones()
        assert (await control.set_api_limit(0))["refused"] == 1
    finally:
        await control.set_api_limit(0)


async def test_the_call_log_names_every_call_and_never_a_secret(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    volume = await control.create_volume("v", 1)
    await succeed(cs, "createSnapshot", volumeid=volume["id"], name="snap")
    await refused(cs.listTemplates())
    async with http.get(f"{emu.volume_daemon_url}/api/v1/volumes/{volume['id']}") as response:
        assert response.status == 200
    calls = await control.calls()
    assert [c["seq"] for c in calls] == list(range(1, len(calls) + 1))
    commands = [(c["api"], c["command"]) for c in calls]
    assert commands[0] == ("cloudstack", "createSnapshot")
    assert ("cloudstack", "queryAsyncJobResult") in commands
    assert commands[-2:] == [("cloudstack", "listTemplates"), ("volume-daemon", "get-volume")]
    assert calls[0]["params"] == {"volumeid": volume["id"], "name": "snap"}
    assert calls[-2]["status"] == 431 and calls[-1]["status"] == 200
    text = json.dumps(calls)
    assert emu.api_key not in text and emu.secret_key not in text and "signature" not in text
    only = await control.calls(api="cloudstack", command="createsnapshot")
    assert len(only) == 1
    assert [c["seq"] for c in await control.calls(since=calls[-2]["seq"])] == [calls[-1]["seq"]]


async def test_api_latency_delays_every_answer(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    await control.set_latency(api_seconds=0.2)
    started = time.monotonic()
    await cs.listZones()
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    async with http.get(f"{emu.volume_daemon_url}/health") as response:
        assert response.status == 200
    assert time.monotonic() - started >= 0.2


async def test_async_job_latency(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    await control.set_latency(async_job_seconds=0.3)
    volume = await control.create_volume("v", 1)
    started = time.monotonic()
    answer = await cs.createSnapshot(volumeid=volume["id"])
    assert (await cs.queryAsyncJobResult(jobid=answer["jobid"]))["jobstatus"] == 0
    await wait_job(cs, answer["jobid"])
    assert time.monotonic() - started >= 0.3


async def test_a_thousand_concurrent_jobs_with_two_second_latencies(
    emu: EmulatorHandle, cs: AIOCloudStack, control: EmulatorControl
) -> None:
    volumes = [emu.world.add_volume(f"bulk-{i}", 1) for i in range(1000)]
    await control.set_latency(async_job_seconds=2.0)
    gate = asyncio.Semaphore(50)

    async def snapshot(volume_id: str) -> dict[str, Any]:
        async with gate:
            result: dict[str, Any] = await cs.createSnapshot(volumeid=volume_id)
            return result

    started = time.monotonic()
    answers = await asyncio.gather(*(snapshot(v.id) for v in volumes))
    submitted = time.monotonic() - started
    assert submitted < 5.0, f"submitting 1000 jobs took {submitted:.1f}s"
    assert (await cs.queryAsyncJobResult(jobid=answers[-1]["jobid"]))["jobstatus"] == 0

    async def all_done() -> bool:
        return all(job.status == 1 for job in emu.world.jobs.values())

    await wait_until(all_done, timeout=15, what="1000 jobs")
    elapsed = time.monotonic() - started
    assert elapsed < submitted + 2.0 + 2.0, f"1000 jobs took {elapsed:.1f}s"
    assert len(emu.world.jobs) == 1000


async def test_a_call_log_of_a_hundred_thousand_entries(
    emu: EmulatorHandle, control: EmulatorControl
) -> None:
    for i in range(100_000):
        emu.world.calls.record("cloudstack", "listVolumes" if i % 2 else "listZones", {"i": i})
    emu.world.calls.record("inject", "inject", {"job_id": "x"})
    started = time.monotonic()
    [found] = await control.calls(api="inject")
    tail = await control.calls(since=99_999)
    assert time.monotonic() - started < 2.0
    assert found["seq"] == 100_001 and [c["seq"] for c in tail] == [100_000, 100_001]


async def test_start_emulators_with_a_given_appliance_id() -> None:
    handle = await start_emulators(appliance_vm_id="22222222-2222-4222-8222-222222222222")
    try:
        async with EmulatorControl(handle.volume_daemon_url) as control:
            [vm] = (await control.state())["vms"]
        assert vm["id"] == handle.appliance_vm_id == "22222222-2222-4222-8222-222222222222"
        assert handle.cloudstack_url.endswith("/client/api")
    finally:
        await handle.close()


async def test_python_m_emulators_runs_until_sigterm(tmp_path: Path) -> None:
    state_file = tmp_path / "emulators.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emulators", "--cloudstack-port", "0", "--volume-daemon-port",
        "0", "--state-file", str(state_file), "--api-key", "k", "--secret-key", "s",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        assert b"listening" in line and b"/client/api" in line
        ids = json.loads(state_file.read_text())
        assert ids["api_key"] == "k" and ids["zone_name"] == "zone1"
        async with AIOCloudStack(ids["cloudstack_url"], "k", "s") as cs:
            assert (await cs.listZones())["zone"][0]["id"] == ids["zone_id"]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{ids['volume_daemon_url']}/health") as response:
                assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_event_bus_publishes_only_while_asked_to(amqp_url: str) -> None:
    """Started with an event bus, the emulators publish each async job's end on it; the control
    API stops and restarts that (the benchmark publishes only in the phase that listens)."""
    handle = await start_emulators(event_bus_url=amqp_url, event_bus_exchange="cloudstack-events-emulator-test")
    try:
        bus = handle.event_bus
        assert bus is not None
        async with EmulatorControl(handle.control_url) as control, AIOCloudStack(
                handle.cloudstack_url, handle.api_key, handle.secret_key, fetch_result=True, timeout=10) as cs:
            volume = str((await control.create_volume("v", 1, vm_id=handle.appliance_vm_id))["id"])

            async def published(count: int) -> bool:
                return bus.published == count

            await cs.createSnapshot(volumeid=volume, name="one")
            await wait_until(lambda: published(1), 10, "the first job's end on the bus")
            assert (await control.set_event_bus(False))["publish"] is False
            await cs.createSnapshot(volumeid=volume, name="two")
            assert (await control.set_event_bus(True))["published"] == 1
            await cs.createSnapshot(volumeid=volume, name="three")
            await wait_until(lambda: published(2), 10, "the third job's end on the bus")
    finally:
        await handle.close()
