"""The device path handed to the driver-injection script (which runs as root) must be a whole
disk under /dev of the expected form; anything else the Volume Daemon answers fails the step
before the script runs, and the failover rolls back. The Volume Daemon emulator only ever
answers well-formed paths, so this runs the state machine over the fakes (tests/fakes.py) with
a daemon that answers an odd path for the root volume. And the script is run with an argument
list, never through a shell."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from transitions.extensions.asyncio import AsyncMachine

from adapters.injection import InjectionScript
from failover.settings import Settings
from statemachine.context import Ports
from statemachine.engine import drive
from statemachine.machine import build_machine
from statemachine.ports import DaemonVolume
from statemachine.steps.failover import valid_device_path
from tests.fakes import FakeVolumeDaemon, FakeWorld, Harness
from tests.unit.helpers import assert_restored, assert_stream_ok, last, of_type


class OddPathDaemon(FakeVolumeDaemon):
    """A Volume Daemon that reports `path` as the device path of every attached volume."""

    def __init__(self, world: FakeWorld, path: str | None) -> None:
        super().__init__(world)
        self.path = path

    async def get_volume(self, volume_id: str) -> DaemonVolume:
        volume = await super().get_volume(volume_id)
        return replace(volume, device_path=self.path) if volume.vm_id else volume


@pytest.fixture(scope="module")
def machine() -> AsyncMachine:
    return build_machine()


def harness(path: str | None) -> Harness:
    h = Harness()
    h.volumes = OddPathDaemon(h.world, path)
    h.ports = Ports(h.cloudstack, h.volumes, h.injection, h.platform, h.store)
    return h


BAD_PATHS = [
    "/dev/null", "/dev/mem", "/dev/kmem", "/dev/tty1", "/dev/console", "/dev/zero",
    "/dev/vdb\n", "/dev/vdb\x00", "/dev/vdb ", " /dev/vdb", "/dev/vdb; rm -rf /", "/dev/vdb && reboot",
    "$(reboot)", "`id`", "--help", "-o/dev/vdb", "vdb", "dev/vdb", "../../dev/vdb", "/dev/../etc/shadow",
    "/dev/sda/../../etc/shadow", "/dev/disk/by-id/../../mem", "/dev/disk/by-id/.", "/dev/vdb1",
    "/dev/mapper/root", "/etc/passwd", "/dev/vd\u0431", "/dev/v\u0251b", "/DEV/VDB", "/dev/" + "a" * 300,
]


@pytest.mark.parametrize("path", BAD_PATHS, ids=repr)
async def test_an_odd_device_path_fails_the_step_without_running_the_script(
        machine: AsyncMachine, path: str) -> None:
    assert not valid_device_path(path)
    h = harness(path)
    vm = h.seed_vm("WIN-DB01", os_type="Windows Server 2019", disks=2)
    before = h.world.observable()
    ctx = h.new_job(vm, "test-failover")

    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    failed = of_type(events, "StepFailed")
    assert [(e.step, e.error.code) for e in failed] == [("virtio-driver-injection", "DEVICE_PATH_INVALID")]
    assert "not run" in failed[0].error.message
    assert h.injection.calls == []  # the script never saw it
    assert last(events, "JobFailed").rolled_back is True
    assert_restored(h, before, vm)


@pytest.mark.parametrize("path", [None, ""], ids=["none", "empty"])
async def test_no_device_path_fails_the_step(machine: AsyncMachine, path: str | None) -> None:
    h = harness(path)
    vm = h.seed_vm("WIN-DB02", os_type="Windows Server 2019", disks=1)
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    failed = of_type(h.events(ctx.row.job_id), "StepFailed")
    assert [e.error.code for e in failed] == ["DEVICE_PATH_UNKNOWN"]
    assert h.injection.calls == []


@pytest.mark.parametrize("path", ["/dev/vdb", "/dev/sdc", "/dev/xvdd", "/dev/hdb", "/dev/nvme1n1", "/dev/vdaa",
                                  "/dev/disk/by-id/virtio-3f1c2a", "/dev/disk/by-path/pci-0000:00:05.0"])
def test_the_expected_forms_pass(path: str) -> None:
    assert valid_device_path(path)


async def test_a_well_formed_path_is_handed_to_the_script(machine: AsyncMachine) -> None:
    """The control: with the daemon's real answer the injection runs, with exactly that path."""
    h = Harness()
    vm = h.seed_vm("WIN-DB03", os_type="Windows Server 2019", disks=2)
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    assert [path for path, _ in h.injection.calls] == ["/dev/vdb"]
    assert all(valid_device_path(path) for path, _ in h.injection.calls)


# --------------------------------------------------------------------------- no shell


SHOW_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


async def test_the_script_gets_an_argument_list_never_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    hostile = [f"/dev/vdb; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", f"x && touch {marker}",
               f"x | touch {marker}", "x\ny", "'quoted' \"double\"", "*"]
    for value in hostile:
        lines.clear()
        await InjectionScript([sys.executable, "-c", SHOW_ARGV], timeout=20).inject(value, "job ; id", on_line)
        assert json.loads(lines[0]) == [value, "job ; id"]
    assert not marker.exists()


def test_the_configured_command_is_split_into_arguments_not_run_by_a_shell(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in {"FAILOVER_CLOUDSTACK_URL": "https://cloud.example.com/client/api",
                       "FAILOVER_CLOUDSTACK_API_KEY": "k", "FAILOVER_CLOUDSTACK_SECRET_KEY": "s",
                       "FAILOVER_ZONE": "zone1", "FAILOVER_TEMPLATE_ID": "t", "FAILOVER_SERVICE_OFFERING_ID": "o",
                       "FAILOVER_NETWORK_ID": "n", "FAILOVER_APPLIANCE_VM_ID": "a"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no .env
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FAILOVER_VIRTIO_INJECT_COMMAND",
                       f"sudo /opt/migratekit/bin/inject.sh --log '/var/log/a b.log' ; touch {marker}")
    settings = Settings()
    assert settings.inject_argv == ["sudo", "/opt/migratekit/bin/inject.sh", "--log", "/var/log/a b.log", ";",
                                    "touch", str(marker)]
