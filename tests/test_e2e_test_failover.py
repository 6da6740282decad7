"""End to end, as a user runs it: a `failoverctl serve` process, the real RabbitMQ and MariaDB,
the emulated CloudStack and Volume Daemon; the test publishes commands like any client and
checks the events, the tables and the emulated world."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select

from adapters.db.tables import outbox, vm_replication_contexts
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import seed_vm
from schemas.commands import FailoverRequested
from schemas.common import FAILOVER_STEPS
from schemas.events import Event

from .helpers import ServeProcess, failover, failover_row, metric, projected, wait_until


def _types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


def _world_vms(world: dict[str, Any]) -> list[dict[str, Any]]:
    vms = world["vms"]
    return list(vms.values()) if isinstance(vms, dict) else list(vms)


def _world_volumes(world: dict[str, Any]) -> dict[str, dict[str, Any]]:
    vols = world["volumes"]
    items = vols.values() if isinstance(vols, dict) else vols
    return {v["id"]: v for v in items}


def _snapshots(world: dict[str, Any]) -> list[dict[str, Any]]:
    snaps = world["snapshots"]
    return list(snaps.values()) if isinstance(snaps, dict) else list(snaps)


def check_stream(events: list[Event], job_id: str) -> None:
    """The contract's stream rules: one job, sequence 1..n, percent never down, one end."""
    assert {str(e.job_id) for e in events} == {job_id}
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    percents = [e.percent_complete for e in events if hasattr(e, "percent_complete")]
    assert percents == sorted(percents)
    assert sum(e.type in ("JobCompleted", "JobFailed", "JobCancelled") for e in events) == 1
    assert events[-1].type in ("JobCompleted", "JobFailed", "JobCancelled")


async def test_windows_test_failover_end_to_end(serve: ServeProcess, bus: BusClient, db: Any,
                                                control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, test_network_id=emulators.test_network_id)
    calls_before = len(await control.calls())
    job_id = uuid.uuid4()
    events = await failover(bus, vm.vm_id, request_id=job_id)
    check_stream(events, str(job_id))
    assert events[0].type == "JobAccepted"
    assert events[-1].type == "JobCompleted", events[-1]
    steps = [(e.type, e.step) for e in events if e.type in ("StepStarted", "StepCompleted")]
    assert steps == [(t, s) for s in FAILOVER_STEPS for t in ("StepStarted", "StepCompleted")]
    assert [e.percent_complete for e in events if e.type == "StepCompleted"][-1] == 100
    done = events[-1].model_dump(mode="json")
    vm_id = done["outputs"]["destination_vm_id"]
    snaps = {s["volume_id"]: s["snapshot_id"] for s in done["outputs"]["snapshots"]}
    assert set(snaps) == set(vm.volume_ids)
    # the injection's output lines became LogRecorded events of its step
    inject_logs = [e for e in events if e.type == "LogRecorded" and e.step == "virtio-driver-injection"]
    assert len(inject_logs) >= 3

    # the world: one new Running VM, root replica at device 0, the other as a data disk
    world = await control.state()
    new_vms = [v for v in _world_vms(world) if v["id"] == vm_id]
    assert len(new_vms) == 1 and new_vms[0]["state"] == "Running"
    assert new_vms[0]["name"].endswith("-test-" + str(job_id)[:8])
    assert new_vms[0]["cpunumber"] == 4 and new_vms[0]["memory"] == 8192
    assert [n["networkid"] for n in new_vms[0]["nic"]] == [emulators.test_network_id]
    volumes = _world_volumes(world)
    attached = sorted((v["deviceid"], v["id"]) for v in volumes.values()
                      if v.get("virtualmachineid") == vm_id and not v.get("destroyed"))
    assert attached == [(0, vm.volume_ids[0]), (1, vm.volume_ids[1])]
    assert volumes[vm.volume_ids[0]]["type"] == "ROOT"
    snapshots = [s for s in _snapshots(world) if s["volumeid"] in vm.volume_ids]
    assert len(snapshots) == 2 and {s["state"] for s in snapshots} == {"BackedUp"}
    assert {s["id"] for s in snapshots} == set(snaps.values())
    calls = (await control.calls())[calls_before:]
    deploys = [c for c in calls if c["command"] == "deployVirtualMachine"]
    assert len(deploys) == 1
    # the template's own root disk was given up and deleted
    assert len([c for c in calls if c["command"] == "deleteVolume"]) == 1
    injects = [c for c in calls if c["api"] == "inject"]
    assert len(injects) == 1
    assert injects[0]["params"]["job_id"] == str(job_id)
    assert injects[0]["params"]["device_path"].startswith("/dev/vd")

    # the tables
    row = await failover_row(db, str(job_id))
    assert row.status == "completed" and row.job_type == "test"
    assert row.destination_vm_id == vm_id
    assert row.ossea_snapshot_id == snaps[vm.volume_ids[0]]
    views = await projected(db, str(job_id))
    assert views["tracking"].status == "completed" and views["tracking"].percent_complete == 100
    assert [(s.step_name, s.step_order, s.status) for s in views["steps"]] == [
        (name, i + 1, "completed") for i, name in enumerate(FAILOVER_STEPS)]
    assert len(views["logs"]) == len([e for e in events if e.type == "LogRecorded"])
    assert {log.correlation_id for log in views["logs"]} == {str(job_id)}
    async with db.connect() as conn:
        status = (await conn.execute(select(vm_replication_contexts.c.current_status).where(
            vm_replication_contexts.c.vmware_vm_id == vm.vm_id))).scalar_one()
    assert status == "failed_over_test"


async def test_linux_vm_skips_driver_injection(serve: ServeProcess, bus: BusClient, db: Any,
                                               control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="pg-primary 01", os_type="ubuntu64Guest",
                       disks=3)
    calls_before = len(await control.calls())
    job_id = uuid.uuid4()
    events = await failover(bus, vm.vm_id, request_id=job_id)
    check_stream(events, str(job_id))
    assert events[-1].type == "JobCompleted"
    skipped = [e for e in events if e.type == "StepSkipped"]
    assert [e.step for e in skipped] == ["virtio-driver-injection"]
    calls = (await control.calls())[calls_before:]
    assert not [c for c in calls if c["api"] == "inject"]
    # no test mapping: the VM gets FAILOVER_NETWORK_ID; three disks in unit order
    world = await control.state()
    vm_id = events[-1].model_dump()["outputs"]["destination_vm_id"]
    new_vm = next(v for v in _world_vms(world) if v["id"] == vm_id)
    assert [n["networkid"] for n in new_vm["nic"]] == [emulators.network_id]
    attached = sorted((v["deviceid"], v["id"]) for v in _world_volumes(world).values()
                      if v.get("virtualmachineid") == vm_id and not v.get("destroyed"))
    assert [a[1] for a in attached] == vm.volume_ids
    views = await projected(db, str(job_id))
    assert [s.status for s in views["steps"]] == ["completed", "completed", "skipped", "completed",
                                                  "completed", "completed"]


async def test_driver_injection_option_overrides_os_type(serve: ServeProcess, bus: BusClient, db: Any,
                                                         control: EmulatorControl,
                                                         emulators: EmulatorHandle) -> None:
    linux = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="linux-forced", os_type="rhel8_64Guest")
    events = await failover(bus, linux.vm_id, driver_injection="always")
    assert events[-1].type == "JobCompleted"
    assert "virtio-driver-injection" in [e.step for e in events if e.type == "StepCompleted"]
    windows = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="win-no-inject")
    events = await failover(bus, windows.vm_id, driver_injection="never")
    assert events[-1].type == "JobCompleted"
    assert [e.step for e in events if e.type == "StepSkipped"] == ["virtio-driver-injection"]


async def test_validation_failures_have_their_own_codes(serve: ServeProcess, bus: BusClient, db: Any,
                                                        control: EmulatorControl,
                                                        emulators: EmulatorHandle) -> None:
    running = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="still-syncing",
                            replication_status="replicating")
    events = await failover(bus, running.vm_id)
    check_stream(events, str(events[0].job_id))
    failed = [e for e in events if e.type == "StepFailed"]
    assert [(e.step, e.error.code) for e in failed] == [("pre-failover-validation", "REPLICATION_NOT_COMPLETED")]
    assert events[-1].type == "JobFailed" and events[-1].rolled_back is True
    assert "wait for it to finish" in failed[0].error.message

    broken = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="broken-disks", missing_volume_row=True)
    events = await failover(bus, broken.vm_id)
    failed = [e for e in events if e.type == "StepFailed"]
    assert [e.error.code for e in failed] == ["VOLUME_NOT_FOUND"]
    # a failed validation blocks nothing: the VM can be failed over once fixed
    row = await failover_row(db, str(events[0].job_id))
    assert row.status == "failed" and row.active_vm_id is None


async def test_unknown_vm_and_conflicts_are_rejected(serve: ServeProcess, bus: BusClient, db: Any,
                                                     control: EmulatorControl, emulators: EmulatorHandle) -> None:
    rid = uuid.uuid4()
    events = await failover(bus, "no-such-vm'; DROP TABLE failover_jobs; --", request_id=rid)
    assert _types(events) == ["JobRejected"]
    assert events[0].reason == "not_found" and events[0].sequence == 1 and str(events[0].job_id) == str(rid)
    assert await failover_row(db, str(rid)) is None

    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="conflicted")
    first = await failover(bus, vm.vm_id)
    assert first[-1].type == "JobCompleted"
    # a completed test failover that is not cleaned up blocks the next one
    events = await failover(bus, vm.vm_id)
    assert _types(events) == ["JobRejected"]
    assert events[0].reason == "conflict"
    assert str(first[0].job_id) in events[0].detail and "CleanupRequested" in events[0].detail


async def test_a_repeated_request_starts_nothing_new(serve: ServeProcess, bus: BusClient, db: Any,
                                                     control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="idempotent")
    rid = uuid.uuid4()
    events = await failover(bus, vm.vm_id, request_id=rid)
    assert events[-1].type == "JobCompleted"
    deploys_before = len(await control.calls(command="deployVirtualMachine"))
    duplicates_before = await metric(serve, "failover_commands_total",
                                     {"type": "FailoverRequested", "outcome": "duplicate"})
    again = FailoverRequested(request_id=rid, vm_id=vm.vm_id, failover_type="test")
    for _ in range(3):
        await bus.publish(again)

    async def all_seen() -> bool:
        seen = await metric(serve, "failover_commands_total", {"type": "FailoverRequested", "outcome": "duplicate"})
        return seen >= duplicates_before + 3

    await wait_until(all_seen, 20, "the three repeats to be recorded as duplicates")
    async with db.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(outbox).where(
            outbox.c.job_id == str(rid)))).scalar_one()
    assert count == len(events)
    assert len(await control.calls(command="deployVirtualMachine")) == deploys_before
