"""The driver-injection stand-in, run as a real subprocess the way the service runs it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle

from .helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


async def start_inject(emu: EmulatorHandle, device: str, job: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emulators.inject", "--control-url", emu.control_url, device, job,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def run_inject(emu: EmulatorHandle, device: str, job: str) -> tuple[int, str, str]:
    process = await start_inject(emu, device, job)
    out, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_injection_writes_to_the_volume_at_the_device_path(
    emu: EmulatorHandle, control: EmulatorControl
) -> None:
    await control.create_volume("other", 1, vm_id=emu.appliance_vm_id)
    root = await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id, content="win")
    code, out, err = await run_inject(emu, "/dev/vdc", "job-1")
    assert code == 0, err
    assert "Setting up the source" in out and "Injecting virtio-win drivers..." in out
    assert out.rstrip().endswith("Finishing off")
    state = await control.state()
    [volume] = [v for v in state["volumes"] if v["id"] == root["id"]]
    assert volume["content"] == "win|virtio:job-1"
    [call] = await control.calls(api="inject")
    assert call["params"] == {"device_path": "/dev/vdc", "job_id": "job-1"}
    assert call["status"] == "ok"


async def test_exit_nonzero_fault(emu: EmulatorHandle, control: EmulatorControl) -> None:
    root = await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id, content="win")
    await control.add_fault("inject", "exit_nonzero")
    code, _, err = await run_inject(emu, "/dev/vdb", "job-2")
    assert code == 1
    assert "error" in err
    state = await control.state()
    [volume] = [v for v in state["volumes"] if v["id"] == root["id"]]
    assert volume["content"] == "win"


async def test_no_volume_at_the_device_path(emu: EmulatorHandle) -> None:
    code, _, err = await run_inject(emu, "/dev/vdq", "job-3")
    assert code == 1 and "/dev/vdq" in err


async def test_hang_fault_never_exits(emu: EmulatorHandle, control: EmulatorControl) -> None:
    await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id)
    await control.add_fault("inject", "hang", match={"job_id": "job-4"})
    process = await start_inject(emu, "/dev/vdb", "job-4")
    try:

        async def hung() -> bool:
            return any(c["status"] == "hang" for c in await control.calls(api="inject"))

        await wait_until(hung, timeout=15, what="the injection to reach its fault")
        with pytest.raises(TimeoutError):  # the caller's own timeout is what ends it
            await asyncio.wait_for(process.wait(), timeout=0.5)
        assert process.returncode is None
    finally:
        process.kill()
        await process.wait()
