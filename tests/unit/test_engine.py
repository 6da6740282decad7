"""The job engine end to end on in-memory fakes: happy paths, events, naming, options,
validation failures, many jobs on one machine, and the diagram."""

from __future__ import annotations

import asyncio
import re

import pytest
from transitions.extensions.asyncio import AsyncMachine

from schemas.common import FAILOVER_STEPS
from statemachine.engine import drive
from statemachine.machine import STATES, mermaid
from statemachine.naming import sanitize_vm_name
from tests.fakes import Harness, device_path_for

from .helpers import assert_failed_over, assert_restored, assert_stream_ok, last, of_type

# --------------------------------------------------------------------------- a Windows test failover


async def test_a_fresh_job_looks_nothing_up_that_it_never_created(h: Harness, machine: AsyncMachine) -> None:
    """With no ledger entry, nothing was ever created under a resource's name (the intent is
    recorded before the create call), so a job's first run creates without listing by name
    first, and takes the snapshot and the VM from the finished jobs' results instead of
    listing them again. (A resumed step still looks first: tests/unit/test_resume.py.) The one
    look-up by name before the deploy is the check that no VM of that name exists yet, which no
    job made (tests/test_e2e_lifecycle.py, a VM of another's name)."""
    vm = h.seed_vm("WIN-FRESH", os_type="Windows Server 2019", disks=2)
    assert await drive(machine, h.new_job(vm, "test-failover")) == "completed"
    calls = h.cloudstack.calls
    first_create = next(i for i, (op, _) in enumerate(calls) if op == "createSnapshot")
    deploy = next(i for i, (op, _) in enumerate(calls) if op == "deployVirtualMachine")
    assert not [c for c in calls[:first_create] if c[0] == "listSnapshots"]
    assert [c for c in calls[:deploy] if c[0] == "listVirtualMachines" and "name" in c[1]] == [
        ("listVirtualMachines", {"name": calls[deploy][1]["name"]})]
    assert h.cloudstack.count("listSnapshots") == 0
    assert h.cloudstack.count("createSnapshot") == 2
    # an attach's operation names the device: no look-up of the volume after it (the job's
    # last daemon calls are its last attach and that operation's wait)
    ops = [op for op, _ in h.volumes.calls]
    assert ops[-2:] == ["attach", "get-operation"], ops


async def test_windows_test_failover_completes(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("WIN-SQL01", os_type="Windows Server 2019", disks=3)
    root_path = h.world.device_path(h.world.volumes[vm.root_volume_id])
    ctx = h.new_job(vm, "test-failover")
    job_id = ctx.row.job_id

    assert await drive(machine, ctx) == "completed"

    events = h.events(job_id)
    assert_stream_ok(events)
    # the engine's own events start at 2: JobAccepted (1) is the command recorder's
    assert [e.type for e in events][:2] == ["JobAccepted", "StepStarted"]
    assert events[1].sequence == 2
    expected = [t for step in FAILOVER_STEPS for t in (("StepStarted", step), ("StepCompleted", step))]
    assert [(e.type, e.step) for e in events if e.type.startswith("Step")] == expected
    assert [e.type for e in events if e.type != "LogRecorded"] == (
        ["JobAccepted"] + [t for t, _ in expected] + ["JobCompleted"])
    # every log line sits inside its own step
    current = None
    for e in events:
        if e.type == "StepStarted":
            current = e.step
        elif e.type == "LogRecorded":
            assert e.step == current
        elif e.type in ("StepCompleted", "StepSkipped"):
            assert e.step == current
            current = None
    assert len(of_type(events, "LogRecorded")) >= 6
    # progress
    percents = [e.percent_complete for e in events if hasattr(e, "percent_complete")]
    assert percents == sorted(percents) and percents[-1] == 100 and percents[0] == 0
    starts = of_type(events, "StepStarted")
    assert [s.step_order for s in starts] == [1, 2, 3, 4, 5, 6]
    assert {s.total_steps for s in starts} == {6}
    # the common fields
    for e in events:
        assert str(e.job_id) == job_id and str(e.correlation_id) == job_id
        assert e.job_type == "test-failover" and e.vm_id == vm.vm_id
    assert len({e.event_id for e in events}) == len(events)

    done = last(events, "JobCompleted")
    outputs = done.failover_outputs()
    vm_cs_id = outputs.destination_vm_id
    assert sorted((s.volume_id, s.snapshot_id) for s in outputs.snapshots) == sorted(
        (s.volume_id, s.id) for s in h.world.live_snapshots())

    # the world
    assert_failed_over(h, vm, vm_cs_id)
    assert h.world.vms[vm_cs_id].name == done.outputs["vm_name"]
    assert h.world.vms[vm_cs_id].network_ids == [h.world.test_network_id]  # distinct, from the test mappings
    assert (h.world.vms[vm_cs_id].cpu_count, h.world.vms[vm_cs_id].memory_mb) == (4, 8192)
    assert h.injection.calls == [(root_path, job_id)]
    assert root_path == device_path_for(1)
    root = h.world.volumes[vm.root_volume_id]
    assert f"virtio:{job_id}" in root.content
    # the template's root disk was detached and deleted
    discarded = [v for v in h.world.volumes.values() if v.name.startswith("ROOT-")]
    assert len(discarded) == 1 and discarded[0].destroyed
    assert h.cloudstack.count("deleteVolume") == 1

    # the ledger and the row
    ledger = h.store.ledger_now(job_id)
    for v in vm.volume_ids:
        assert ledger[f"snapshot:{v}"].status == "done"
        assert ledger[f"detach:{v}"].status == "done"
        assert ledger[f"attach:{v}"].status == "done"
    assert ledger[f"attach:{vm.root_volume_id}"].action == "attach-root"
    assert ledger["vm"].status == "done" and ledger["vm"].resource_id == vm_cs_id
    assert ledger[f"write:{vm.root_volume_id}"].status == "done"
    assert ledger["start:vm"].status == "done"
    row = h.store.row(job_id)
    assert row.status == "completed" and row.last_sequence == events[-1].sequence
    cols = h.store.columns[job_id]
    assert cols["destination_vm_id"] == vm_cs_id
    assert cols["ossea_snapshot_id"] == ledger[f"snapshot:{vm.root_volume_id}"].resource_id
    assert cols["ended"] is True
    assert h.platform.contexts[vm.vm_id].current_status == "failed_over_test"


async def test_linux_vm_skips_injection(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("web-01", os_type="Ubuntu Linux (64-bit)", disks=2)
    ctx = h.new_job(vm, "test-failover")

    assert await drive(machine, ctx) == "completed"

    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    skipped = of_type(events, "StepSkipped")
    assert [s.step for s in skipped] == ["virtio-driver-injection"]
    assert skipped[0].step_order == 3 and skipped[0].percent_complete == 50 and skipped[0].reason
    assert "virtio-driver-injection" not in [e.step for e in of_type(events, "StepCompleted")]
    assert h.injection.calls == []
    assert f"write:{vm.root_volume_id}" not in h.store.ledger_now(ctx.row.job_id)
    assert_failed_over(h, vm, last(events, "JobCompleted").outputs["destination_vm_id"])


@pytest.mark.parametrize(
    ("os_type", "option", "injected"),
    [
        ("Windows Server 2022", "auto", True),
        ("microsoft WINDOWS 10", "auto", True),
        (None, "auto", False),
        ("CentOS 7", "always", True),
        ("Windows Server 2019", "never", False),
        ("Windows Server 2019", "always", True),
        ("Debian", "never", False),
    ],
)
async def test_driver_injection_option(
    h: Harness, machine: AsyncMachine, os_type: str | None, option: str, injected: bool
) -> None:
    vm = h.seed_vm("vm", os_type=os_type, disks=1)
    ctx = h.new_job(vm, "live-failover", options={"driver_injection": option})
    assert await drive(machine, ctx) == "completed"
    assert len(h.injection.calls) == (1 if injected else 0)
    kinds = {e.step: e.type for e in h.events(ctx.row.job_id) if e.type in ("StepCompleted", "StepSkipped")}
    assert kinds["virtio-driver-injection"] == ("StepCompleted" if injected else "StepSkipped")


# --------------------------------------------------------------------------- names, networks


async def test_live_failover_uses_the_sanitised_name(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("PhilB Test machine", os_type="Linux", disks=2)
    ctx = h.new_job(vm, "live-failover")
    assert await drive(machine, ctx) == "completed"
    done = last(h.events(ctx.row.job_id), "JobCompleted")
    created = h.world.vms[done.outputs["destination_vm_id"]]
    assert created.name == "philb-test-machine" == sanitize_vm_name(vm.vm_name)
    assert created.display_name == "PhilB Test machine"
    assert created.network_ids == [h.world.prod_network_id]
    assert h.platform.contexts[vm.vm_id].current_status == "failed_over_live"
    assert {e.job_type for e in h.events(ctx.row.job_id)} == {"live-failover"}


async def test_test_failover_name_has_the_test_suffix(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("123StartWithDigit", os_type="Linux", disks=1)
    ctx = h.new_job(vm, "test-failover", job_id="7d7e1f0e-3c55-4e8e-9d9a-0d5e7f1b2a10")
    assert await drive(machine, ctx) == "completed"
    done = last(h.events(ctx.row.job_id), "JobCompleted")
    name = h.world.vms[done.outputs["destination_vm_id"]].name
    assert name == "vm-123startwithdigit-test-7d7e1f0e"
    assert re.fullmatch(r"[a-z][a-z0-9-]*-test-[0-9a-f]{8}", name)


async def test_no_network_mapping_uses_the_default_network(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("nomap", os_type="Linux", disks=1, test_mappings=False)
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    vm_cs_id = last(h.events(ctx.row.job_id), "JobCompleted").outputs["destination_vm_id"]
    assert h.world.vms[vm_cs_id].network_ids == [h.world.default_network_id]


async def test_disk_offering_data_disk_is_removed(machine: AsyncMachine) -> None:
    h = Harness(disk_offering=True)
    vm = h.seed_vm("with-offering", os_type="Linux", disks=2)
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    vm_cs_id = last(h.events(ctx.row.job_id), "JobCompleted").outputs["destination_vm_id"]
    assert_failed_over(h, vm, vm_cs_id)
    made = [v for v in h.world.volumes.values() if v.name.startswith(("ROOT-", "DATA-"))]
    assert len(made) == 2 and all(v.destroyed for v in made)


async def test_volumes_attach_in_unit_order_not_table_order(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("units", os_type="Linux", unit_numbers=[3, 0, 7, 1])
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    vm_cs_id = last(h.events(ctx.row.job_id), "JobCompleted").outputs["destination_vm_id"]
    units = [int(h.world.volumes[v].name.rsplit("disk", 1)[1]) for v in vm.volume_ids]
    assert units == [0, 1, 3, 7]
    assert_failed_over(h, vm, vm_cs_id)


# --------------------------------------------------------------------------- validation failures


def _break_replication(h: Harness, vm) -> None:  # type: ignore[no-untyped-def]
    from statemachine.ports import ReplicationJob

    h.platform.replication_jobs[vm.vm_id].append(ReplicationJob("job-newest", "replicating"))


def _no_disks(h: Harness, vm) -> None:  # type: ignore[no-untyped-def]
    h.platform.disk_rows[vm.replication_job_id] = []


def _volume_row_missing(h: Harness, vm) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    rows = h.platform.disk_rows[vm.replication_job_id]
    rows[0] = replace(rows[0], ossea_volume_id=None, volume_id=None)


def _no_cpu_count(h: Harness, vm) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    h.platform.contexts[vm.vm_id] = replace(h.platform.contexts[vm.vm_id], cpu_count=None)


def _no_memory(h: Harness, vm) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    h.platform.contexts[vm.vm_id] = replace(h.platform.contexts[vm.vm_id], memory_mb=0)


def _volume_elsewhere(h: Harness, vm) -> None:  # type: ignore[no-untyped-def]
    other = h.world.add_vm("someone-else", "Stopped")
    volume = h.world.volumes[vm.volume_ids[1]]
    volume.vm_id, volume.device_id = other.id, 1


def _volume_detached(h: Harness, vm) -> None:  # type: ignore[no-untyped-def]
    volume = h.world.volumes[vm.volume_ids[0]]
    volume.vm_id = volume.device_id = None


@pytest.mark.parametrize(
    ("breakage", "code"),
    [
        (_break_replication, "REPLICATION_NOT_COMPLETED"),
        (_no_disks, "NO_DISKS"),
        (_volume_row_missing, "VOLUME_NOT_FOUND"),
        (_no_cpu_count, "VM_SIZE_UNKNOWN"),  # not deployed as 1 vCPU / 1 GiB unsaid
        (_no_memory, "VM_SIZE_UNKNOWN"),
        (_volume_elsewhere, "VOLUME_NOT_ON_APPLIANCE"),
        (_volume_detached, "VOLUME_NOT_ON_APPLIANCE"),
    ],
)
async def test_validation_failures(h: Harness, machine: AsyncMachine, breakage, code: str) -> None:  # type: ignore[no-untyped-def]
    vm = h.seed_vm("WIN-FAIL", disks=3)
    breakage(h, vm)
    before = h.world.observable()
    ctx = h.new_job(vm, "test-failover")

    assert await drive(machine, ctx) == "failed"

    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    failed = last(events, "StepFailed")
    assert (failed.step, failed.step_order, failed.error.code, failed.attempts) == (
        "pre-failover-validation", 1, code, 1)
    end = last(events, "JobFailed")
    assert end.failed_step == "pre-failover-validation" and end.error.code == code
    assert end.rolled_back is True
    assert [e.type for e in events if e.type != "LogRecorded"] == [
        "JobAccepted", "StepStarted", "StepFailed", "RollbackStarted", "RollbackCompleted", "JobFailed"]
    assert of_type(events, "RollbackStarted")[0].actions == []
    assert h.world.observable() == before
    assert h.cloudstack.calls == [] and h.injection.calls == []
    assert all(op == "get-volume" for op, _ in h.volumes.calls)
    assert h.platform.contexts[vm.vm_id].current_status == "ready_for_failover"
    row = h.store.row(ctx.row.job_id)
    assert (row.status, row.failed_step, row.error_code) == ("failed", "pre-failover-validation", code)


async def test_disks_sharing_the_lowest_unit_number_say_which_is_taken_as_the_root(
        h: Harness, machine: AsyncMachine) -> None:
    """Two controllers' first disks (scsi0:0, scsi1:0) both have unit_number 0: the one whose
    disk_id sorts first is the root, and the job's log says so and what to do if it is wrong."""
    vm = h.seed_vm("LNX-TWOCTRL", os_type="Linux", disks=2, unit_numbers=[0, 0])
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "completed"
    [warned] = [e for e in of_type(h.events(ctx.row.job_id), "LogRecorded")
                if e.level == "WARN" and "share the lowest unit_number" in e.message]
    assert warned.fields["root_disk_id"] == sorted(vm.disk_ids)[0]
    assert warned.fields["disk_ids"] == sorted(vm.disk_ids)


async def test_unknown_vm_fails_validation(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("gone", disks=1)
    del h.platform.contexts[vm.vm_id]
    ctx = h.new_job(vm, "test-failover")
    assert await drive(machine, ctx) == "failed"
    assert last(h.events(ctx.row.job_id), "JobFailed").error.code == "VM_NOT_FOUND"


# --------------------------------------------------------------------------- one machine, many jobs


async def test_many_jobs_on_one_machine(h: Harness, machine: AsyncMachine) -> None:
    vms = [h.seed_vm(f"vm-{i:02d}", os_type="Windows" if i % 2 else "Linux", disks=1 + i % 3) for i in range(50)]
    # a few of them are meant to fail, independently of the others
    broken = {7, 21, 33}
    for i in broken:
        h.platform.disk_rows[vms[i].replication_job_id] = []
    before_models = len(machine.models)
    ctxs = [h.new_job(vm, "test-failover" if i % 3 else "live-failover") for i, vm in enumerate(vms)]

    results = await asyncio.gather(*(drive(machine, ctx) for ctx in ctxs))

    assert len(machine.models) == before_models  # every model removed again
    # they really ran at once: every job had started before the first one ended
    order = [(str(e.job_id), e.type) for e in h.store.events]
    first_end = next(i for i, (_, t) in enumerate(order) if t in ("JobCompleted", "JobFailed"))
    started = {j for j, t in order[:first_end] if t == "StepStarted"}
    assert started == {ctx.row.job_id for ctx in ctxs}
    for i, (ctx, state) in enumerate(zip(ctxs, results, strict=True)):
        events = h.events(ctx.row.job_id)
        assert_stream_ok(events)
        if i in broken:
            assert state == "failed"
            assert last(events, "JobFailed").error.code == "NO_DISKS"
            continue
        assert state == "completed"
        assert_failed_over_among_many(h, vms[i], last(events, "JobCompleted").outputs["destination_vm_id"])
    assert len(h.injection.calls) == sum(1 for i in range(50) if i % 2 and i not in broken)
    # the appliance keeps only the broken VMs' volumes (and its own disk)
    on_appliance = {v.id for v in h.world.attached(h.world.appliance.id)}
    assert on_appliance - {v for i in broken for v in vms[i].volume_ids} == {
        v.id for v in h.world.attached(h.world.appliance.id) if v.type == "ROOT"}


def assert_failed_over_among_many(h: Harness, vm, vm_cs_id: str) -> None:  # type: ignore[no-untyped-def]
    attached = h.world.attached(vm_cs_id)
    assert h.world.vms[vm_cs_id].state == "Running"
    assert [v.id for v in attached] == vm.volume_ids
    assert [v.device_id for v in attached] == list(range(len(vm.volume_ids)))
    snaps = [s for s in h.world.live_snapshots() if s.volume_id in vm.volume_ids]
    assert sorted(s.volume_id for s in snaps) == sorted(vm.volume_ids)


async def test_jobs_of_a_finished_run_leave_no_model(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("one", os_type="Linux", disks=1)
    ctx = h.new_job(vm)
    await drive(machine, ctx)
    assert all(getattr(m, "ctx", None) is not ctx for m in machine.models)


# --------------------------------------------------------------------------- the diagram


def test_mermaid_mentions_every_state() -> None:
    text = mermaid()
    assert text.startswith("stateDiagram-v2")
    for state in STATES:
        assert re.search(rf"\b{re.escape(state.replace('-', '_'))}\b", text), state
    for line in text.splitlines()[1:]:
        assert re.fullmatch(r"    (\[\*\]|[a-z_]+) --> (\[\*\]|[a-z_]+)(: .+)?", line), line


async def test_a_cancel_before_start_rolls_back_nothing(h: Harness, machine: AsyncMachine) -> None:
    vm = h.seed_vm("early", disks=2)
    before = h.world.observable()
    ctx = h.new_job(vm)
    h.store.request_cancel(ctx.row.job_id)
    ctx.row.cancel_requested = True
    assert await drive(machine, ctx) == "cancelled"
    events = h.events(ctx.row.job_id)
    assert_stream_ok(events)
    assert [e.type for e in events] == ["JobAccepted", "RollbackStarted", "RollbackCompleted", "JobCancelled"]
    assert last(events, "JobCancelled").rolled_back is True
    assert_restored(h, before, vm)


@pytest.mark.parametrize("end", ["completed", "failed"])
async def test_a_finished_jobs_objects_are_freed_without_the_cycle_collector(h: Harness, machine: AsyncMachine,
                                                                             end: str) -> None:
    """A job's model leaves no reference cycle behind, whether it completed or failed and rolled
    back: the conveniences `add_model` bound to it (partials holding the model) are dropped when
    it ends, so the model, its context and all they held go with their last reference instead of
    waiting for a collection of Python's cycle collector, which stops every job and command
    while it runs (statemachine/machine.py `unbind`)."""
    import gc
    from functools import partial

    from statemachine.engine import JobModel

    from .test_rollback import Failure

    vm = h.seed_vm("GC-FREED", os_type="Windows Server 2019", disks=3)
    if end == "failed":
        Failure("attach", "volume-attachment", nth=2).program(h)
    ctx = h.new_job(vm, "test-failover")
    gc.collect()
    gc.disable()
    try:
        assert await drive(machine, ctx) == end
        # and none is kept alive by a live reference either (the machine's own lists, say)
        alive = [o for o in gc.get_objects() if isinstance(o, JobModel) and o.ctx is ctx]
        assert alive == [], "the finished job's model is still referenced"
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        models = [o for o in gc.garbage if isinstance(o, JobModel)]
        bound = [o for o in gc.garbage if isinstance(o, partial) and any(isinstance(a, JobModel) for a in o.args)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert models == [] and bound == [], f"{len(models)} job models and {len(bound)} partials left to the collector"


async def test_a_live_failover_warns_of_a_source_powered_on_and_of_no_production_networks(
        h: Harness, machine: AsyncMachine) -> None:
    """Both are the platform's to decide (the contract's fallback network; the platform's own
    final sync), so neither stops the failover, but each is said at WARN, saying what to do;
    a test failover of the same VM says neither."""
    vm = h.seed_vm("LNX-PROD", os_type="Linux", disks=1, prod_mappings=False, power_state="poweredOn")
    live = h.new_job(vm, "live-failover")
    assert await drive(machine, live) == "completed"
    warned = [e.message for e in of_type(h.events(live.row.job_id), "LogRecorded") if e.level == "WARN"]
    assert any("no production network mappings" in w and "FAILOVER_NETWORK_ID" in w for w in warned), warned
    assert any("is powered on" in w and "final replication" in w for w in warned), warned
    other = h.seed_vm("LNX-TEST", os_type="Linux", disks=1, prod_mappings=False, power_state="poweredOn")
    test = h.new_job(other, "test-failover")
    assert await drive(machine, test) == "completed"
    assert [e for e in of_type(h.events(test.row.job_id), "LogRecorded") if e.level == "WARN"] == []
