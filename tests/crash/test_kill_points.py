"""kill -9 of `serve` at every step boundary and in the middle of every step (guarantee 3).

Three scenarios, each in its own cell (database, vhost, emulators), run side by side:
a Windows test failover, the rollback of a failover whose VM cannot start, and the cleanup
of a completed test failover. For every kill point a new job runs under one `serve` process;
when the point is reached the process is killed with SIGKILL and a new one (another lease
owner) is started; the job must end exactly as the uninterrupted baseline run of the scenario
did, with one VM, one snapshot per volume and one attach per volume in the emulated world,
and with read models equal to the fold of its events.

Kill points come from three sources:
- events: the moment the test sees the event (StepStarted / StepCompleted of each step, ...);
- calls: synchronously when the emulator records the request (the outside system accepted
  it and carries it out, but its answer dies with the process: the ledger has no id yet);
- in flight: once the ledger holds the CloudStack job id / daemon operation id, while that
  job or operation is still running in the emulator (the emulators' latency makes the window).
Some call points run with a latency longer than a takeover, so the new owner finds the
snapshot still being created or the VM still starting.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters.db.tables import resource_ledger
from failover.seed import SeededVm, seed_vm
from schemas.commands import CleanupRequested, FailoverRequested
from schemas.common import CLEANUP_STEPS, FAILOVER_STEPS
from statemachine.naming import sanitize_vm_name, test_vm_name

from .support import (
    CallTrigger,
    Cell,
    exactly_once_problems,
    job_rows,
    projected_all,
    projection_problems,
    reap,
    shape,
    sigkill,
    stream_problems,
)

LATENCY = 0.3  # CloudStack async jobs and Volume Daemon operations: the in-flight window
LONG = 4.0  # longer than a takeover (lease 2.5 s): the new owner finds the job still running
JOB_TIMEOUT = 90.0


@dataclass(frozen=True)
class KillPoint:
    name: str
    event: tuple[str, str | None] | None = None
    call: tuple[str, str, int] | None = None
    inflight: tuple[str, str] | None = None  # (ledger key, column)
    latency: float = LATENCY


def _boundaries(steps: tuple[str, ...] | list[str], first: str | None = "JobAccepted") -> list[KillPoint]:
    out = [KillPoint(f"after {first}", event=(first, None))] if first else []
    for s in steps:
        out.append(KillPoint(f"StepStarted {s}", event=("StepStarted", s)))
        out.append(KillPoint(f"StepCompleted {s}", event=("StepCompleted", s)))
    return out


FAILOVER_POINTS = [
    *_boundaries(FAILOVER_STEPS),
    KillPoint("validation: volume lookup answered lost", call=("volume-daemon", "get-volume", 1)),
    KillPoint("snapshot 1 requested, answer lost", call=("cloudstack", "createSnapshot", 1)),
    KillPoint("snapshot 2 requested, answer lost", call=("cloudstack", "createSnapshot", 2)),
    KillPoint("snapshot 1 requested, answer lost, still Creating at takeover",
              call=("cloudstack", "createSnapshot", 1), latency=LONG),
    KillPoint("snapshot 1 job in flight", inflight=("snapshot:{v0}", "cs_job_id")),
    KillPoint("driver injection running", call=("inject", "inject", 1)),
    KillPoint("deploy requested, answer lost", call=("cloudstack", "deployVirtualMachine", 1)),
    KillPoint("deploy job in flight", inflight=("vm", "cs_job_id")),
    KillPoint("template ROOT detach requested, answer lost", call=("volume-daemon", "detach", 1)),
    KillPoint("template ROOT deletion, answer lost", call=("cloudstack", "deleteVolume", 1)),
    KillPoint("replica detach from the appliance, answer lost", call=("volume-daemon", "detach", 2)),
    KillPoint("root attach requested, answer lost", call=("volume-daemon", "attach-root", 1)),
    KillPoint("root attach in flight", inflight=("attach:{v0}", "operation_id")),
    KillPoint("data disk attach requested, answer lost", call=("volume-daemon", "attach", 1)),
    KillPoint("start requested, answer lost", call=("cloudstack", "startVirtualMachine", 1)),
    KillPoint("start requested, answer lost, still Starting at takeover",
              call=("cloudstack", "startVirtualMachine", 1), latency=LONG),
    KillPoint("start job in flight", inflight=("start:vm", "cs_job_id")),
]

ROLLBACK_POINTS = [
    KillPoint("after StepFailed vm-startup-validation", event=("StepFailed", "vm-startup-validation")),
    KillPoint("after RollbackStarted", event=("RollbackStarted", None)),
    KillPoint("undo: detach from the VM, answer lost", call=("volume-daemon", "detach", 4)),
    KillPoint("undo: destroy requested, answer lost", call=("cloudstack", "destroyVirtualMachine", 1)),
    KillPoint("undo: destroy in flight", inflight=("undo:destroy", "cs_job_id")),
    KillPoint("undo: revert requested, answer lost", call=("cloudstack", "revertSnapshot", 1)),
    KillPoint("undo: revert in flight", inflight=("undo:revert:{v0}", "cs_job_id")),
    KillPoint("undo: re-attach to the appliance, answer lost", call=("volume-daemon", "attach", 2)),
    KillPoint("undo: snapshot deletion, answer lost", call=("cloudstack", "deleteSnapshot", 1)),
    KillPoint("after RollbackCompleted", event=("RollbackCompleted", None)),
]

CLEANUP_POINTS = [
    *_boundaries(CLEANUP_STEPS),
    KillPoint("power-off requested, answer lost", call=("cloudstack", "stopVirtualMachine", 1)),
    KillPoint("power-off job in flight", inflight=("undo:stop", "cs_job_id")),
    KillPoint("detach requested, answer lost", call=("volume-daemon", "detach", 1)),
    KillPoint("destroy requested, answer lost", call=("cloudstack", "destroyVirtualMachine", 1)),
    KillPoint("destroy job in flight", inflight=("undo:destroy", "cs_job_id")),
    KillPoint("revert requested, answer lost", call=("cloudstack", "revertSnapshot", 1)),
    KillPoint("revert job in flight", inflight=("undo:revert:{v0}", "cs_job_id")),
    KillPoint("re-attach requested, answer lost", call=("volume-daemon", "attach", 1)),
    KillPoint("snapshot deletion requested, answer lost", call=("cloudstack", "deleteSnapshot", 1)),
]


@dataclass
class Outcome:
    scenario: str
    point: str
    problems: list[str] = field(default_factory=list)
    killed: bool = False
    takeover: float | None = None  # kill -> first event of the job from the new process
    note: str = ""


# --------------------------------------------------------------------------- helpers


def _tags(content: str | None) -> list[str]:
    """A volume's write history by kind (replica, virtio, boot), repeats collapsed: a write
    done twice after a crash (the idempotent injection) looks like one."""
    out: list[str] = []
    for part in (content or "").split("|"):
        kind = part.split(":")[0]
        if not out or out[-1] != kind:
            out.append(kind)
    return out


def _world_view(cell: Cell, vm: SeededVm) -> dict[str, Any]:
    world = cell.emu.world  # type: ignore[union-attr]
    vols = [world.volumes[v] for v in vm.volume_ids]
    return {
        "holders": [v.vm_id for v in vols],
        "devices": [v.device_id for v in vols],
        "content": [v.content for v in vols],
        "destroyed": [v.destroyed for v in vols],
        "live_snapshots": sorted(s.id for s in world.snapshots.values()
                                 if s.volume_id in vm.volume_ids and not s.destroyed),
    }


def _restored_problems(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{k}: {after[k]} != before {before[k]}" for k in before if after[k] != before[k]]


class Scenario:
    """One scenario's cell, its current `serve`, and the run of its kill points."""

    name: str
    points: list[KillPoint]

    def __init__(self, cell: Cell, points: list[KillPoint] | None = None) -> None:
        self.cell = cell
        if points is not None:
            self.points = points
        self.trigger = CallTrigger(cell.emu.world)  # type: ignore[union-attr]
        self.serve: Any = None
        self.baseline: dict[str, Any] = {}
        self.outcomes: list[Outcome] = []

    async def ensure_serve(self) -> None:
        if self.serve is None or self.serve.proc.returncode is not None:
            self.serve = await self.cell.start_serve()

    async def seed(self, name: str) -> SeededVm:
        return await seed_vm(self.cell.db, self.cell.control, self.cell.emu.appliance_vm_id,  # type: ignore[union-attr,arg-type]
                             vm_name=name, test_network_id=self.cell.emu.test_network_id, disks=2)  # type: ignore[union-attr]

    async def set_latency(self, seconds: float) -> None:
        await self.cell.control.set_latency(async_job_seconds=seconds, operation_seconds=seconds)  # type: ignore[union-attr]

    # the job of one kill point: prepared (seeded), started, then checked
    async def prepare(self, index: int) -> Any:
        raise NotImplementedError

    async def start(self, prepared: Any) -> str:
        raise NotImplementedError

    async def check(self, prepared: Any, job_id: str) -> list[str]:
        raise NotImplementedError

    async def run_baseline(self) -> None:
        await self.ensure_serve()
        await self.set_latency(LATENCY)
        prepared = await self.prepare(-1)
        began = time.monotonic()
        job_id = await self.start(prepared)
        await self.cell.log.wait_ended([job_id], JOB_TIMEOUT)  # type: ignore[union-attr]
        self.baseline = {"shape": shape(self.cell.log.stream(job_id)),  # type: ignore[union-attr]
                         "end": self.cell.log.ended(job_id), "seconds": time.monotonic() - began}  # type: ignore[union-attr]
        problems = await self.check(prepared, job_id)
        assert not problems, f"{self.name}: the uninterrupted run is wrong: {problems}"

    async def kill_at(self, point: KillPoint, job_id: str, prepared: Any, since_seq: int) -> float | None:
        """Wait for the kill point (the job was started just before); kill -9; the time."""
        log, serve = self.cell.log, self.serve
        assert log is not None
        if point.event is not None:
            type_, step = point.event
            await log.wait(lambda: log.has(job_id, type_, step) or log.ended(job_id), JOB_TIMEOUT,
                           f"{point.name} of job {job_id}")
            if log.has(job_id, type_, step) is None:
                return None
            return sigkill(serve)
        if point.call is not None:
            fired = prepared["fired"]
            await log.wait(lambda: fired or log.ended(job_id), JOB_TIMEOUT, f"{point.name} of job {job_id}")
            return fired[0] if fired else None
        assert point.inflight is not None
        key, column = point.inflight
        key = key.format(v0=prepared["vm"].volume_ids[0])
        world = self.cell.emu.world  # type: ignore[union-attr]
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline and not log.ended(job_id):
            async with self.cell.db.connect() as conn:  # type: ignore[union-attr]
                value = (await conn.execute(select(getattr(resource_ledger.c, column)).where(
                    resource_ledger.c.job_id == job_id, resource_ledger.c.resource_key == key))).scalar()
            if value:
                running = (world.jobs[value].status == 0 if column == "cs_job_id"
                           else world.operations[value].status in ("pending", "executing"))
                when = sigkill(serve)
                prepared["note"] = "in flight at the kill" if running else "ALREADY FINISHED at the kill"
                return when
            await asyncio.sleep(0.01)
        return None

    async def run_point(self, point: KillPoint, index: int) -> Outcome:
        out = Outcome(self.name, point.name)
        log = self.cell.log
        assert log is not None
        try:
            await self.ensure_serve()
            await self.set_latency(point.latency)
            prepared = await self.prepare(index)
            prepared["fired"] = []
            if point.call is not None:
                api, command, nth = point.call
                serve = self.serve

                def fire(entry: dict[str, Any], serve: Any = serve, fired: list[float] = prepared["fired"]) -> None:
                    fired.append(sigkill(serve))

                self.trigger.arm(api, command, nth, fire)
            since = len(self.cell.emu.world.calls.entries)  # type: ignore[union-attr]
            job_id = await self.start(prepared)
            killed_at = await self.kill_at(point, job_id, prepared, since)
            self.trigger.disarm()
            out.note = prepared.get("note", "")
            if killed_at is None:
                out.problems.append("the kill point was never reached (the job ended first)")
            else:
                out.killed = True
                await reap(self.serve)
                self.serve = await self.cell.start_serve()
            await log.wait_ended([job_id], JOB_TIMEOUT)
            if killed_at is not None:
                after = [s for s in log.by_job[job_id] if s.event.occurred_at.timestamp() > killed_at]
                if after:
                    out.takeover = min(s.arrived for s in after) - killed_at
                else:
                    out.note = (out.note + "; job had ended before the kill").strip("; ")
            out.problems += stream_problems(log, job_id)
            got = shape(log.stream(job_id))
            if got != self.baseline["shape"]:
                out.problems.append(f"events differ from the uninterrupted run: {got} != {self.baseline['shape']}")
            end, want = log.ended(job_id), self.baseline["end"]
            if end is None or end.type != want.type or getattr(end, "rolled_back", None) != getattr(
                    want, "rolled_back", None):
                out.problems.append(f"ended with {end} instead of {want.type}")
            out.problems += await self.check(prepared, job_id)
        except AssertionError as exc:
            out.problems.append(str(exc))
        finally:
            self.trigger.disarm()
        return out

    async def run(self) -> list[Outcome]:
        await self.run_baseline()
        for i, point in enumerate(self.points):
            self.outcomes.append(await self.run_point(point, i))
        return self.outcomes


class FailoverScenario(Scenario):
    name = "test-failover"
    points = FAILOVER_POINTS

    async def prepare(self, index: int) -> Any:
        vm = await self.seed(f"kill tf {index}")
        return {"vm": vm, "before": _world_view(self.cell, vm)}

    async def start(self, prepared: Any) -> str:
        job_id = uuid.uuid4()
        prepared["job_id"] = str(job_id)
        await self.cell.bus.publish(FailoverRequested(  # type: ignore[union-attr]
            request_id=job_id, vm_id=prepared["vm"].vm_id, failover_type="test", requested_by="crash-tests"))
        return str(job_id)

    async def check(self, prepared: Any, job_id: str) -> list[str]:
        vm: SeededVm = prepared["vm"]
        world = self.cell.emu.world  # type: ignore[union-attr]
        name = test_vm_name(sanitize_vm_name(vm.vm_name), job_id)
        problems = exactly_once_problems(world, name, vm.volume_ids, f"test-failover-{job_id[:8]}")
        vms = [v for v in world.vms.values() if v.name.lower() == name.lower()]
        if vms and (vms[0].state != "Running" or vms[0].destroyed):
            problems.append(f"the VM is {vms[0].state}")
        if vms:
            vols = [world.volumes[v] for v in vm.volume_ids]
            if [(v.vm_id, v.device_id) for v in vols] != [(vms[0].id, 0), (vms[0].id, 1)]:
                problems.append(f"volumes are at {[(v.vm_id, v.device_id) for v in vols]}")
            tags = [_tags(v.content) for v in vols]
            if tags != [["replica", "virtio", "boot"], ["replica", "boot"]]:
                problems.append(f"volume contents {tags}")
        row = (await job_rows(self.cell.db, [job_id]))[job_id]  # type: ignore[arg-type]
        if row.status != "completed" or row.lease_owner is not None:
            problems.append(f"failover_jobs: {row.status}, lease {row.lease_owner}")
        await projected_all(self.cell.db, self.cell.log, [job_id], 30)  # type: ignore[arg-type]
        problems += await projection_problems(self.cell.db, self.cell.log, [job_id])  # type: ignore[arg-type]
        return problems


class Rollback(FailoverScenario):
    """The VM cannot start (startVirtualMachine refused): the failover rolls back."""

    name = "rollback"
    points = ROLLBACK_POINTS

    async def run(self) -> list[Outcome]:
        await self.cell.control.add_fault(api="cloudstack", command="startVirtualMachine", kind="refuse",  # type: ignore[union-attr]
                                          times=0)
        return await super().run()

    async def check(self, prepared: Any, job_id: str) -> list[str]:
        vm: SeededVm = prepared["vm"]
        world = self.cell.emu.world  # type: ignore[union-attr]
        name = test_vm_name(sanitize_vm_name(vm.vm_name), job_id)
        problems = [p for p in exactly_once_problems(world, name, vm.volume_ids, f"test-failover-{job_id[:8]}")]
        vms = [v for v in world.vms.values() if v.name.lower() == name.lower()]
        if any(not v.destroyed for v in vms):
            problems.append("the test VM was not destroyed")
        problems += _restored_problems(prepared["before"], _world_view(self.cell, vm))
        row = (await job_rows(self.cell.db, [job_id]))[job_id]  # type: ignore[arg-type]
        if row.status != "failed" or not row.rolled_back or row.lease_owner is not None or row.active_vm_id:
            problems.append(f"failover_jobs: {row.status} rolled_back={row.rolled_back}")
        await projected_all(self.cell.db, self.cell.log, [job_id], 30)  # type: ignore[arg-type]
        problems += await projection_problems(self.cell.db, self.cell.log, [job_id])  # type: ignore[arg-type]
        return problems


class Cleanup(Scenario):
    """Cleanup of a completed test failover (the failovers are made beforehand, uninterrupted)."""

    name = "cleanup"
    points = CLEANUP_POINTS

    async def run(self) -> list[Outcome]:
        # one completed test failover per kill point (+ the baseline's), made side by side
        await self.ensure_serve()
        await self.set_latency(0)
        self.parents: list[dict[str, Any]] = []
        for i in range(len(self.points) + 1):
            vm = await self.seed(f"kill cl {i}")
            self.parents.append({"vm": vm, "before": _world_view(self.cell, vm), "job_id": str(uuid.uuid4())})
        for p in self.parents:
            await self.cell.bus.publish(FailoverRequested(  # type: ignore[union-attr]
                request_id=uuid.UUID(p["job_id"]), vm_id=p["vm"].vm_id, failover_type="test",
                requested_by="crash-tests"))
        await self.cell.log.wait_ended([p["job_id"] for p in self.parents], 180)  # type: ignore[union-attr]
        for p in self.parents:
            assert self.cell.log.ended(p["job_id"]).type == "JobCompleted"  # type: ignore[union-attr]
        return await super().run()

    async def prepare(self, index: int) -> Any:
        parent = self.parents[index + 1]
        world = self.cell.emu.world  # type: ignore[union-attr]
        parent["ops_before"] = set(world.operations)
        parent["calls_before"] = len(world.calls.entries)
        return parent

    async def start(self, prepared: Any) -> str:
        job_id = uuid.uuid4()
        await self.cell.bus.publish(CleanupRequested(  # type: ignore[union-attr]
            request_id=job_id, failover_job_id=uuid.UUID(prepared["job_id"]), requested_by="crash-tests"))
        return str(job_id)

    async def check(self, prepared: Any, job_id: str) -> list[str]:
        vm: SeededVm = prepared["vm"]
        parent = prepared["job_id"]
        world = self.cell.emu.world  # type: ignore[union-attr]
        name = test_vm_name(sanitize_vm_name(vm.vm_name), parent)
        problems = exactly_once_problems(world, name, vm.volume_ids, f"test-failover-{parent[:8]}")
        vms = [v for v in world.vms.values() if v.name.lower() == name.lower()]
        if any(not v.destroyed for v in vms):
            problems.append("the test VM was not destroyed")
        problems += _restored_problems(prepared["before"], _world_view(self.cell, vm))
        # the cleanup's own moves, once each: every replica re-attached to the appliance once
        for v in vm.volume_ids:
            ops = [op for op_id, op in world.operations.items() if op_id not in prepared["ops_before"]
                   and op.volume_id == v and op.type == "attach" and op.status == "completed"]
            if len(ops) != 1:
                problems.append(f"volume {v} was re-attached {len(ops)} times")
        destroys = [c for c in world.calls.entries[prepared["calls_before"]:]
                    if c["command"] == "destroyVirtualMachine" and c["status"] == 200]
        if len(destroys) != 1:
            problems.append(f"{len(destroys)} accepted destroyVirtualMachine calls")
        rows = await job_rows(self.cell.db, [job_id, parent])  # type: ignore[arg-type]
        if rows[job_id].status != "completed" or rows[parent].status != "cleaned_up":
            problems.append(f"failover_jobs: cleanup {rows[job_id].status}, failover {rows[parent].status}")
        await projected_all(self.cell.db, self.cell.log, [job_id], 30)  # type: ignore[arg-type]
        problems += await projection_problems(self.cell.db, self.cell.log, [job_id])  # type: ignore[arg-type]
        return problems


async def _cell(name: str, database_url: str, amqp_url: str, tmp: Path) -> Cell:
    from .support import derived_database, derived_vhost

    db = derived_database(database_url, name)
    vhost = await asyncio.to_thread(derived_vhost, amqp_url, name)
    return await Cell(name=name, db_url=db, amqp_url=vhost, tmp=tmp).open()


@pytest.mark.slow
async def test_kill_minus_9_at_every_point(database_url: str, amqp_url: str,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    began = time.monotonic()
    cells = await asyncio.gather(*(_cell(n, database_url, amqp_url, tmp_path_factory.mktemp(f"kill-{n}"))
                                   for n in ("kf1", "kf2", "kr", "kc")))
    try:
        # four cells side by side (the failover's points split in two): the machine has room
        half = (len(FAILOVER_POINTS) + 1) // 2
        scenarios = [FailoverScenario(cells[0], FAILOVER_POINTS[:half]),
                     FailoverScenario(cells[1], FAILOVER_POINTS[half:]), Rollback(cells[2]), Cleanup(cells[3])]
        results = await asyncio.gather(*(s.run() for s in scenarios), return_exceptions=True)
    finally:
        await asyncio.gather(*(c.close() for c in cells), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    outcomes = [o for r in results if not isinstance(r, BaseException) for o in r]
    takeovers = [o.takeover for o in outcomes if o.takeover is not None]
    lines = ["", f"kill -9 matrix ({time.monotonic() - began:.0f} s):"]
    for s in scenarios:
        if s.baseline:
            lines.append(f"  {s.name}: uninterrupted run {s.baseline['seconds']:.1f} s")
    for o in outcomes:
        status = "PASS" if not o.problems else "FAIL"
        took = f"{o.takeover:5.2f} s" if o.takeover is not None else "   -   "
        lines.append(f"  {status} {o.scenario:13} {o.point:62} takeover {took} {o.note}")
        lines += [f"        - {p}" for p in o.problems]
    passed = sum(1 for o in outcomes if not o.problems)
    lines.append(f"kill points: {len(outcomes)}, passed: {passed}, failed: {len(outcomes) - passed}")
    if takeovers:
        lines.append(f"takeover after kill -9 (kill -> next event of the job from the new process): "
                     f"median {statistics.median(takeovers):.2f} s, max {max(takeovers):.2f} s, "
                     f"min {min(takeovers):.2f} s over {len(takeovers)} kills")
    print("\n".join(lines))
    assert not errors, errors
    assert outcomes and passed == len(outcomes), "\n".join(lines)
