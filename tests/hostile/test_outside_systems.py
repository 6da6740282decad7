"""Hostile data from the platform tables and broken answers from the outside systems, end to
end (a `serve` process, the real RabbitMQ and MariaDB, the emulated CloudStack and Volume
Daemon): a VM name reaches CloudStack only sanitised, odd ids are data, disks that point to no
volume fail the validation, and a malformed, truncated or wrong-shape answer fails the step
with MALFORMED_RESPONSE and rolls back, while the service goes on serving."""

from __future__ import annotations

import unicodedata
import uuid
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select, update

from adapters.db.tables import ossea_volumes, vm_disks
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import seed_vm
from statemachine.naming import VALID_VM_NAME
from statemachine.steps.failover import valid_device_path
from tests.helpers import ServeProcess, failover
from tests.world import assert_restored, view

WINDOWS = "windows2019srvNext_64Guest"
LINUX = "ubuntu64Guest"

NAMES = [
    ("Сервер БД №1 🚀", WINDOWS),
    ("数据库服务器", LINUX),
    ("web01; rm -rf / #", LINUX),
    ('name ~with~ "quotes" and \'single\'', WINDOWS),
    ("line1\nline2\ttab\x00nul", LINUX),
    ("\u202eevil\u200b zero-width", LINUX),
    ("../../etc/passwd", LINUX),
    ("-123 starts with a digit-", LINUX),
    ("Ü" * 191, LINUX),
    ("Ⅻ Ｆｕｌｌｗｉｄｔｈ ﬁ café", WINDOWS),  # noqa: RUF001 - full-width on purpose
]


async def _last_call(control: EmulatorControl) -> int:
    calls = await control.calls()
    return int(calls[-1]["seq"]) if calls else 0


def _display_ok(display: str) -> None:
    assert display and len(display) <= 250
    assert "~" not in display
    assert all(unicodedata.category(c) not in ("Cc", "Cf", "Cs") for c in display), repr(display)
    assert all(ord(c) <= 0xFFFF for c in display), repr(display)  # CloudStack's columns are utf8mb3
    assert display == display.strip()


@pytest.mark.parametrize(("name", "os_type"), NAMES, ids=[f"name{i}" for i in range(len(NAMES))])
async def test_a_vm_name_reaches_cloudstack_only_sanitised(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        name: str, os_type: str) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name=name, os_type=os_type)
    since = await _last_call(control)
    job_id = uuid.uuid4()
    events = await failover(bus, vm.vm_id, request_id=job_id)
    assert events[-1].type == "JobCompleted", [(e.type, getattr(e, "error", None)) for e in events]
    assert events[0].vm_name == name  # the events keep the original name
    deploys = await control.calls(command="deployVirtualMachine", since=since)
    assert len(deploys) == 1
    params = deploys[0]["params"]
    cs_name = params["name"]
    assert VALID_VM_NAME.fullmatch(cs_name) and cs_name.isascii() and len(cs_name) <= 63, cs_name
    assert cs_name.endswith("-test-" + str(job_id)[:8])
    _display_ok(params["displayname"])
    injects = await control.calls(api="inject", since=since)
    if os_type == WINDOWS:
        assert [c["params"]["job_id"] for c in injects] == [str(job_id)]
        assert valid_device_path(injects[0]["params"]["device_path"])
    else:
        assert injects == []


HOSTILE_VM_IDS = ["vm'; DROP TABLE failover_jobs; --", 'vm" OR "1"="1', "../../../../etc/passwd",
                  "vm;$(reboot);`id`|x&y", "vm/\\..\\%2e%2e%2f", "ѵм-ïđ-✓"]


@pytest.mark.parametrize("vm_id", HOSTILE_VM_IDS, ids=[f"id{i}" for i in range(len(HOSTILE_VM_IDS))])
async def test_a_hostile_vm_id_fails_over_like_any_other(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        vm_id: str) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="hostile id", os_type=WINDOWS,
                       vm_id=vm_id + "-" + uuid.uuid4().hex[:6])
    events = await failover(bus, vm.vm_id)
    assert events[-1].type == "JobCompleted"
    assert {e.vm_id for e in events} == {vm.vm_id}


async def _point_disk_at(db: Any, volume_id: str, new_volume_id: str) -> None:
    async with db.begin() as conn:
        await conn.execute(update(ossea_volumes).where(ossea_volumes.c.volume_id == volume_id)
                           .values(volume_id=new_volume_id))


@pytest.mark.parametrize("how", ["no-ossea-row", "unknown-volume", "hostile-volume-id"])
async def test_disks_that_point_to_no_volume_fail_the_validation(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        how: str) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name=f"broken disks {how}", os_type=LINUX,
                       missing_volume_row=how == "no-ossea-row")
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    if how == "unknown-volume":
        await _point_disk_at(db, vm.volume_ids[1], str(uuid.uuid4()))
    elif how == "hostile-volume-id":
        await _point_disk_at(db, vm.volume_ids[1], "../operations/../volumes/" + vm.volume_ids[0] + "?x=1#")
    since = await _last_call(control)
    events = await failover(bus, vm.vm_id)
    failed = [e for e in events if e.type == "StepFailed"]
    expected = {"no-ossea-row": "VOLUME_NOT_FOUND"}.get(how, "VOLUME_DAEMON_NOT_FOUND")
    assert [(e.step, e.error.code) for e in failed] == [("pre-failover-validation", expected)], failed
    assert events[-1].type == "JobFailed" and events[-1].rolled_back is True
    # nothing was done to CloudStack; the odd id went out URL-encoded, as one path segment
    calls = await control.calls(since=since)
    assert not [c for c in calls if c["api"] == "cloudstack"]
    assert all(c["command"] == "get-volume" for c in calls)
    if how == "hostile-volume-id":
        assert calls[-1]["params"]["volume_id"].startswith("../operations/")
    assert await view(control, vm.volume_ids, emulators.appliance_vm_id) == before
    async with db.connect() as conn:  # the platform's rows were only read
        units = (await conn.execute(select(vm_disks.c.unit_number).where(
            vm_disks.c.job_id == vm.replication_job_id))).scalars().all()
    assert sorted(units) == [0, 1]


# (api, command, variant, nth, the step that must fail)
MALFORMED = [
    # (a first run lists no snapshot: it creates, and the finished job's result holds it)
    ("cloudstack", "queryAsyncJobResult", "wrong_shape", 1, "cloudstack-snapshot"),
    ("cloudstack", "createSnapshot", "truncated", 1, "cloudstack-snapshot"),
    ("cloudstack", "createSnapshot", "wrong_shape", 2, "cloudstack-snapshot"),
    ("cloudstack", "queryAsyncJobResult", "truncated", 1, "cloudstack-snapshot"),
    # (the first look-up is vm-creation's: no VM of the job's name may exist before it deploys)
    ("cloudstack", "listVirtualMachines", "wrong_shape", 1, "vm-creation"),
    ("cloudstack", "listVirtualMachines", "wrong_shape", 2, "vm-startup-validation"),
    ("cloudstack", "deployVirtualMachine", "truncated", 1, "vm-creation"),
    ("cloudstack", "deployVirtualMachine", "wrong_shape", 1, "vm-creation"),
    ("cloudstack", "listVolumes", "wrong_shape", 1, "volume-attachment"),
    ("cloudstack", "startVirtualMachine", "truncated", 1, "vm-startup-validation"),
    ("volume-daemon", "get-volume", "wrong_shape", 1, "pre-failover-validation"),
    ("volume-daemon", "get-volume", "truncated", 2, "pre-failover-validation"),
    ("volume-daemon", "detach", "truncated", 1, "volume-attachment"),
    ("volume-daemon", "get-operation", "wrong_shape", 1, "volume-attachment"),
    ("volume-daemon", "attach-root", "truncated", 1, "volume-attachment"),
    ("volume-daemon", "attach", "wrong_shape", 1, "volume-attachment"),
]


@pytest.mark.parametrize(("api", "command", "variant", "nth", "step"), MALFORMED,
                         ids=[f"{m[1]}-{m[2]}-{m[3]}" for m in MALFORMED])
async def test_a_malformed_answer_fails_the_step_and_rolls_back(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        api: str, command: str, variant: str, nth: int, step: str) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name=f"malformed {command}", os_type=LINUX)
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    await control.add_fault(api=api, command=command, kind="malformed", variant=variant, nth=nth)
    events = await failover(bus, vm.vm_id)
    failed = [e for e in events if e.type == "StepFailed"]
    assert [(e.step, e.error.code) for e in failed] == [(step, "MALFORMED_RESPONSE")], failed
    assert "malformed response" in failed[0].error.message
    assert failed[0].attempts == 1  # a broken answer is not retried blindly
    assert events[-1].type == "JobFailed" and events[-1].rolled_back is True, events[-3:]
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
    fault = next(f for f in await control.faults() if f["command"] == command)
    assert fault["fired"] == 1
    async with aiohttp.ClientSession() as http, http.get(serve.metrics_url + "/readyz") as resp:
        assert resp.status == 200
    assert serve.proc is not None and serve.proc.returncode is None
