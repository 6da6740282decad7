"""InjectionScript running the project's injection stand-in (`python -m emulators.inject`) as
a real subprocess: output streamed line by line, failures, the timeout kill, and no shell."""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import sys
import time
import uuid
from pathlib import Path

import pytest

from adapters.injection import InjectionFailed, InjectionScript
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle

from ..helpers import processes_with
from .helpers import Observed, wait_until, world_item


def argv(emu: EmulatorHandle) -> list[str]:
    return [sys.executable, "-m", "emulators.inject", "--control-url", emu.control_url]


class Lines:
    """The `on_line` callback: every line, and the pids of the running stand-in when each came."""

    def __init__(self, job_id: str | None = None) -> None:
        self.lines: list[str] = []
        self.job_id = job_id
        self.pids: set[int] = set()

    async def __call__(self, line: str) -> None:
        assert isinstance(line, str) and line == line.rstrip()
        self.lines.append(line)
        if self.job_id:
            self.pids |= processes_with(self.job_id)


def alive(pid: int) -> bool:
    """Whether a process is still there and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def created(path: Path) -> bool:
    return path.exists()


def remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def test_success_streams_every_line_and_writes_once(emu: EmulatorHandle,
                                                          control: EmulatorControl) -> None:
    root = await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id, content="win")
    job_id = str(uuid.uuid4())
    lines = Lines()
    await InjectionScript(argv(emu), timeout=20).inject("/dev/vdb", job_id, lines)

    assert lines.lines[0].endswith("Setting up the source: -i disk /dev/vdb")
    assert "Injecting virtio-win drivers..." in lines.lines
    assert any(line.startswith("virtio-win: installed") for line in lines.lines)
    assert lines.lines[-1].endswith("Finishing off")
    assert len(lines.lines) == 10 and all(lines.lines)

    [call] = await control.calls(api="inject")
    assert call["params"] == {"device_path": "/dev/vdb", "job_id": job_id}
    assert call["status"] == "ok"
    assert (await world_item(control, "volumes", root["id"]))["content"] == f"win|virtio:{job_id}"


async def test_exit_nonzero_fails_with_the_output_tail(emu: EmulatorHandle,
                                                       control: EmulatorControl) -> None:
    root = await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id, content="win")
    await control.add_fault("inject", "exit_nonzero")
    lines = Lines()
    with pytest.raises(InjectionFailed) as caught:
        await InjectionScript(argv(emu), timeout=20).inject("/dev/vdb", "job-fail", lines)
    error = caught.value
    assert error.code == "DRIVER_INJECTION_FAILED" and not error.transient
    assert "status 1" in error.message
    # stderr is part of the output: the error line reaches both the callback and the message
    assert "injected fault: virtio driver injection failed" in error.message
    assert "Injecting virtio-win drivers..." in error.message
    assert any("injected fault" in line for line in lines.lines)
    assert (await world_item(control, "volumes", root["id"]))["content"] == "win"


async def test_no_such_device_fails(emu: EmulatorHandle, control: EmulatorControl) -> None:
    with pytest.raises(InjectionFailed) as caught:
        await InjectionScript(argv(emu), timeout=20).inject("/dev/vdz", "job-x", Lines())
    assert caught.value.code == "DRIVER_INJECTION_FAILED"
    assert "/dev/vdz" in caught.value.message


async def test_hang_is_killed_at_the_timeout(emu: EmulatorHandle, control: EmulatorControl) -> None:
    await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id)
    await control.add_fault("inject", "hang")
    job_id = f"hang-{uuid.uuid4()}"
    lines = Lines(job_id)
    began = time.monotonic()
    with pytest.raises(InjectionFailed) as caught:
        await InjectionScript(argv(emu), timeout=1.0).inject("/dev/vdb", job_id, lines)
    elapsed = time.monotonic() - began
    assert caught.value.code == "DRIVER_INJECTION_TIMEOUT"
    assert 1.0 <= elapsed < 4
    # the lines came while the process ran (streamed, not collected at exit) ...
    assert "Injecting virtio-win drivers..." in lines.lines
    assert "Injecting virtio-win drivers..." in caught.value.message
    assert lines.pids, "the stand-in was not seen running while it printed"
    # ... and it is gone now: killed and reaped, not left behind
    assert processes_with(job_id) == set()
    assert not any(alive(pid) for pid in lines.pids)


async def test_cancelled_injection_kills_the_process(emu: EmulatorHandle,
                                                     control: EmulatorControl) -> None:
    await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id)
    await control.add_fault("inject", "hang")
    job_id = f"cancel-{uuid.uuid4()}"
    lines = Lines(job_id)
    task = asyncio.create_task(InjectionScript(argv(emu), timeout=60).inject("/dev/vdb", job_id, lines))
    await wait_until(lambda: "Injecting virtio-win drivers..." in lines.lines, 10, "the injection")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: not processes_with(job_id), 5, "the killed stand-in to exit")


async def test_missing_command_is_not_run(emu: EmulatorHandle, control: EmulatorControl) -> None:
    script = InjectionScript(["/nonexistent/inject-virtio-drivers.sh"], timeout=5)
    with pytest.raises(InjectionFailed) as caught:
        await script.inject("/dev/vdb", "job-1", Lines())
    assert caught.value.code == "DRIVER_INJECTION_NOT_RUN"
    assert "/nonexistent/inject-virtio-drivers.sh" in caught.value.message
    assert "FAILOVER_VIRTIO_INJECT_COMMAND" in caught.value.message
    assert await control.calls(api="inject") == []


async def test_not_executable_command_is_not_run(tmp_path: Path) -> None:
    script_path = tmp_path / "inject.sh"
    script_path.write_text("#!/bin/sh\nexit 0\n")
    script_path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    if os.access(script_path, os.X_OK):  # root may execute anything with an x bit; none here
        pytest.skip("this user can execute a file without an x bit")
    with pytest.raises(InjectionFailed) as caught:
        await InjectionScript([str(script_path)], timeout=5).inject("/dev/vdb", "job-1", Lines())
    assert caught.value.code == "DRIVER_INJECTION_NOT_RUN"


@pytest.mark.parametrize("template", [
    "/dev/vdb; touch {marker}",
    "/dev/vdb && touch {marker}",
    "$(touch {marker})",
    "`touch {marker}`",
    "/dev/vdb | touch {marker}",
])
async def test_shell_metacharacters_are_one_argument(emu: EmulatorHandle, control: EmulatorControl,
                                                     template: str) -> None:
    await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id, content="win")
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    device = template.format(marker=marker)
    job_id = "job; touch " + str(marker) + "-job"
    try:
        with pytest.raises(InjectionFailed) as caught:
            await InjectionScript(argv(emu), timeout=20).inject(device, job_id, Lines())
        # the stand-in got the whole string as its device path: no such device
        assert caught.value.code == "DRIVER_INJECTION_FAILED"
        [call] = await control.calls(api="inject")
        assert call["params"] == {"device_path": device, "job_id": job_id}
        assert not created(marker) and not created(Path(f"{marker}-job"))
    finally:
        remove(marker, Path(f"{marker}-job"))


async def test_observe_is_called_per_run(emu: EmulatorHandle, control: EmulatorControl) -> None:
    await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id)
    observed = Observed()
    script = InjectionScript(argv(emu), timeout=20, observe=observed)
    await script.inject("/dev/vdb", "job-ok", Lines())
    with pytest.raises(InjectionFailed):
        await script.inject("/dev/vdz", "job-bad", Lines())
    with pytest.raises(InjectionFailed):
        await InjectionScript(["/nonexistent/cmd"], timeout=5, observe=observed).inject(
            "/dev/vdb", "job-none", Lines())
    assert [c[:3] for c in observed.calls] == [
        ("injection", "inject", "ok"), ("injection", "inject", "error"), ("injection", "inject", "error")]
    assert all(isinstance(c[3], float) and 0 <= c[3] < 20 for c in observed.calls)


# ------------------------------------------------- other programs' output (real subprocesses)

def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_a_line_longer_than_the_stream_limit_is_not_a_crash() -> None:
    # 200 KiB without a newline (a progress bar redrawn with \r), then a normal line
    code = "import sys; sys.stdout.write('#' * 200_000 + '\\r'); print(); print('done')"
    lines = Lines()
    await InjectionScript(python(code), timeout=20).inject("/dev/vdb", "job-1", lines)
    assert lines.lines[-1] == "done"
    assert all(set(line[:100]) == {"#"} for line in lines.lines[:-1])
    # every line handed over stays small enough for an event and a TEXT column
    assert all(len(line) < 2100 for line in lines.lines)


async def test_huge_output_keeps_the_error_message_bounded() -> None:
    code = "import sys\nfor i in range(50): print(str(i) * 100_000)\nsys.exit(2)"
    with pytest.raises(InjectionFailed) as caught:
        await InjectionScript(python(code), timeout=20).inject("/dev/vdb", "job-1", Lines())
    assert caught.value.code == "DRIVER_INJECTION_FAILED" and "status 2" in caught.value.message
    assert len(caught.value.message) < 10_000
    assert "494949" in caught.value.message  # the very end of the output is kept


async def test_undecodable_and_unterminated_output(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.buffer.write(b'caf\\xe9 ok\\n\\nlast words'); sys.exit(3)"
    lines = Lines()
    with pytest.raises(InjectionFailed) as caught:
        await InjectionScript(python(code), timeout=20).inject("/dev/vdb", "job-1", lines)
    assert lines.lines == ["caf\ufffd ok", "last words"]  # blank lines skipped, no newline needed
    assert caught.value.code == "DRIVER_INJECTION_FAILED" and "status 3" in caught.value.message
    assert "last words" in caught.value.message


async def test_device_path_and_job_id_are_the_last_two_arguments() -> None:
    code = "import sys; print(repr(sys.argv[1:]))"
    lines = Lines()
    await InjectionScript([*python(code), "--fixed", "two words"], timeout=20).inject(
        "/dev/vdb; echo x", "job 1", lines)
    assert lines.lines == [repr(["--fixed", "two words", "/dev/vdb; echo x", "job 1"])]


def _hold(script: InjectionScript, device: str) -> int:
    """Lock `device` as another run of the command would: the open, locked file."""
    script.lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(script.lock_dir / f"{device.strip('/').replace('/', '_')}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


async def test_a_run_waits_while_another_holds_its_device_and_says_so(
        emu: EmulatorHandle, control: EmulatorControl, tmp_path: Path) -> None:
    await control.create_volume("win-root", 40, vm_id=emu.appliance_vm_id, content="win")
    await control.create_volume("other-root", 40, vm_id=emu.appliance_vm_id, content="other")
    script = InjectionScript(argv(emu), timeout=20, lock_dir=str(tmp_path / "locks"))
    held = _hold(script, "/dev/vdb")
    lines = Lines()
    task = asyncio.create_task(script.inject("/dev/vdb", str(uuid.uuid4()), lines))
    try:
        await wait_until(lambda: any(line.startswith("waiting for an earlier run") for line in lines.lines), 10,
                         "the run to wait")
        assert await control.calls(api="inject") == []  # not run while the device is held
        # another device is not held up by it
        await asyncio.wait_for(script.inject("/dev/vdc", str(uuid.uuid4()), Lines()), 20)
        assert [c["params"]["device_path"] for c in await control.calls(api="inject")] == ["/dev/vdc"]
    finally:
        os.close(held)  # the other run ends
    await asyncio.wait_for(task, 20)
    assert len(await control.calls(api="inject")) == 2 and lines.lines[-1].endswith("Finishing off")


async def test_a_device_held_past_the_timeout_fails_busy_naming_the_lock(
        emu: EmulatorHandle, control: EmulatorControl, tmp_path: Path) -> None:
    script = InjectionScript(argv(emu), timeout=0.5, lock_dir=str(tmp_path / "locks"))
    held = _hold(script, "/dev/vdb")
    try:
        with pytest.raises(InjectionFailed) as caught:
            await script.inject("/dev/vdb", "job-busy", Lines())
    finally:
        os.close(held)
    assert caught.value.code == "DRIVER_INJECTION_BUSY" and not caught.value.transient
    assert str(script.lock_dir / "dev_vdb.lock") in caught.value.message and "fuser" in caught.value.message
    assert await control.calls(api="inject") == []


async def test_a_timed_out_run_is_asked_to_end_and_holds_the_device_until_it_has(tmp_path: Path) -> None:
    """At the timeout the command gets SIGTERM (what sudo passes on), not SIGKILL, and `flock`
    (which SIGTERM would kill at once) keeps the device's lock while the command finishes: the
    rollback that follows never finds the device free under a command still writing."""
    stopping, marker = tmp_path / "stopping", tmp_path / "ended"
    code = ("import os, signal, sys, time\n"
            "os.closerange(3, 4096)  # as sudo does: the lock's descriptor is not the command's\n"
            "def end(*_):\n"
            f"    open({str(stopping)!r}, 'w').write('yes')\n"
            "    time.sleep(1.5)  # finishing its write\n"
            f"    open({str(marker)!r}, 'w').write('clean')\n"
            "    sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, end)\n"
            "print('writing', flush=True)\n"
            "time.sleep(60)\n")
    script = InjectionScript(python(code), timeout=1.0, lock_dir=str(tmp_path / "locks"))
    task = asyncio.create_task(script.inject("/dev/vdb", "job-term", Lines()))
    await wait_until(lambda: stopping.exists(), 10, "the command to be asked to end")
    probe = os.open(script.lock_file("/dev/vdb"), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # still held while the command finishes
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InjectionFailed) as caught:
            await task
        assert caught.value.code == "DRIVER_INJECTION_TIMEOUT"
        assert marker.read_text() == "clean"  # it had ended, cleanly, when the step was told
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and the device is free now
    finally:
        os.close(probe)
