"""`FAILOVER_INTAKE_PROCESS=true`: commands taken, recorded and answered by a child process of
`serve` (failover/intake.py), the jobs run by `serve` itself.

What must hold as in one process: each job's `JobAccepted` is the first of its events on the bus
and is published once; a refused command gets its `JobRejected`; every job runs once to its
end; the outbox is left empty and no job leased; the commands metric is on serve's /metrics; and
SIGTERM stops both processes cleanly (and the same of the intake in a thread of serve's,
`FAILOVER_INTAKE_THREAD=true`, with no second process). When the child is killed mid-stream, serve starts another,
and every command published (before, during and after) still ends in exactly one job; when serve
is killed, the child stops by itself.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from failover.seed import seed_vm
from schemas.commands import FailoverRequested
from statemachine.naming import sanitize_vm_name, test_vm_name

from ..helpers import ServeProcess, metric, wait_until
from .support import (
    Cell,
    derived_database,
    exactly_once_problems,
    job_rows,
    outbox_unsent,
    shape,
    stream_problems,
)
from .test_side_by_side import linux_failover_shape, open_cell


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _intake_pid(serve_pid: int) -> int | None:
    """serve's child running `failover.intake` (the injection script's children come and go)."""
    for child in _children(serve_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"failover.intake" in f.read():
                    return child
        except FileNotFoundError:
            continue
    return None


async def _cell(name: str, database_url: str, amqp_url: str, tmp: Path, *, where: str = "PROCESS",
                **env: str) -> Cell:
    return await open_cell(name, derived_database(database_url, name), amqp_url, tmp,
                           **{f"FAILOVER_INTAKE_{where}": "true", **env})


async def _serving(cell: Cell, jobs: int, *, thread: bool = False) -> tuple[ServeProcess, int, list[Any], list[str]]:
    """serve started (with its intake process, or thread), `jobs` VMs to fail over and their
    job ids; the intake process's pid (serve's own with a thread)."""
    assert cell.control and cell.emu and cell.db
    serve = await cell.start_serve()
    assert serve.proc is not None
    intake = _intake_pid(serve.proc.pid)
    if thread:
        assert intake is None, "FAILOVER_INTAKE_THREAD=true started an intake process"
        said = [line for line in serve.log_path.read_text().splitlines() if "intake consuming commands" in line]
        assert len(said) == 1 and "a thread" in said[0], said  # (Python does not name its threads in /proc)
        intake = serve.proc.pid
    assert intake is not None, "serve started no intake process"
    vms = [await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name=f"{cell.name} {i}",
                         os_type="ubuntu64Guest", disks=2) for i in range(jobs)]
    return serve, intake, vms, [str(uuid.uuid4()) for _ in vms]


def _problems(cell: Cell, vms: list[Any], ids: list[str], *, once: bool) -> list[str]:
    assert cell.log and cell.emu
    problems: list[str] = []
    want = linux_failover_shape()
    for vm, job_id in zip(vms, ids, strict=True):
        problems += [f"job {job_id}: {p}" for p in stream_problems(cell.log, job_id)]
        arrived = cell.log.by_job[job_id]
        if not arrived or arrived[0].event.type != "JobAccepted":
            problems.append(f"job {job_id}: first on the bus {arrived[0].event.type if arrived else None}")
        if shape(cell.log.stream(job_id)) != want:
            problems.append(f"job {job_id}: events {shape(cell.log.stream(job_id))}")
        if once:
            twice = [k for k, n in Counter(s.event.sequence for s in arrived).items() if n > 1]
            if twice:
                problems.append(f"job {job_id}: events published twice, sequences {twice}")
        name = test_vm_name(sanitize_vm_name(vm.vm_name), job_id)
        problems += [f"job {job_id}: {p}" for p in exactly_once_problems(
            cell.emu.world, name, vm.volume_ids, f"test-failover-{job_id[:8]}")]
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("where", ["PROCESS", "THREAD"])
async def test_intake_process_answers_and_hands_jobs_over(database_url: str, amqp_url: str,
                                                          tmp_path: Path, where: str) -> None:
    """(and the same of the intake in a thread of serve's, FAILOVER_INTAKE_THREAD)"""
    # a long lease: a job serve could only claim once the intake's lease on it ran out would
    # start 30 s late (it must be handed over at once)
    cell = await _cell(f"intake{where[0].lower()}", database_url, amqp_url, tmp_path, where=where,
                       FAILOVER_LEASE_SECONDS="30")
    try:
        assert cell.control and cell.emu and cell.log and cell.db and cell.bus
        serve, intake, vms, ids = await _serving(cell, 12, thread=where == "THREAD")
        for vm, job_id in zip(vms, ids, strict=True):
            await cell.bus.publish(FailoverRequested(request_id=uuid.UUID(job_id), vm_id=vm.vm_id,
                                                     failover_type="test", requested_by="intake-tests"))
        unknown = str(uuid.uuid4())
        await cell.bus.publish(FailoverRequested(request_id=uuid.UUID(unknown), vm_id="no-such-vm",
                                                 failover_type="test", requested_by="intake-tests"))
        await cell.log.wait_ended(ids, 120)
        rejected = await cell.log.wait(lambda: cell.log.has(unknown, "JobRejected"), 30, "the JobRejected")  # type: ignore[union-attr]
        assert rejected.event.reason == "not_found"

        problems = _problems(cell, vms, ids, once=True)
        for job_id in ids:
            accepted, started = cell.log.has(job_id, "JobAccepted"), cell.log.has(job_id, "StepStarted")
            if accepted and started and started.arrived - accepted.arrived > 15:
                problems.append(f"job {job_id} started {started.arrived - accepted.arrived:.1f} s after its "
                                "JobAccepted: not handed over by the intake, claimed when its lease ran out")
        await wait_until(lambda: _zero(outbox_unsent(cell.db)), 20, "the outbox to be marked sent")  # type: ignore[arg-type]
        rows = await job_rows(cell.db, ids)
        problems += [f"job {j}: {rows[j].status}, leased by {rows[j].lease_owner}" for j in ids
                     if rows[j].status != "completed" or rows[j].lease_owner is not None]
        assert not problems, "\n".join(problems[:40])
        # counted by the child, on serve's own /metrics
        assert await metric(serve, "failover_commands_total",
                            {"type": "FailoverRequested", "outcome": "accepted"}) == len(ids)
        assert await metric(serve, "failover_commands_total", {"outcome": "rejected_not_found"}) == 1

        assert await serve.stop() == 0
        if where == "PROCESS":
            assert not os.path.exists(f"/proc/{intake}") or _zombie(intake), "the intake process outlived serve"
        else:  # the thread stopped when asked, with the deliveries it had
            assert "did not stop in time" not in serve.log_path.read_text()
    finally:
        await cell.close()


@pytest.mark.slow
async def test_intake_process_killed_is_started_again(database_url: str, amqp_url: str, tmp_path: Path) -> None:
    cell = await _cell("intakekill", database_url, amqp_url, tmp_path)
    try:
        assert cell.control and cell.emu and cell.log and cell.db and cell.bus
        serve, first, vms, ids = await _serving(cell, 30)

        async def publish(part: range) -> None:
            for i in part:
                await cell.bus.publish(FailoverRequested(  # type: ignore[union-attr]
                    request_id=uuid.UUID(ids[i]), vm_id=vms[i].vm_id, failover_type="test",
                    requested_by="intake-tests"))

        await publish(range(0, 20))
        log = cell.log
        await log.wait(lambda: sum(bool(log.has(j, "JobAccepted")) for j in ids[:20]) >= 5, 60,
                       "the first jobs to be accepted")
        os.kill(first, signal.SIGKILL)  # in the middle of the stream of commands
        await publish(range(20, 30))  # while no intake process runs: they wait in the queue
        await wait_until(lambda: _restarted(serve.proc.pid, first), 30, "a new intake process")  # type: ignore[union-attr]
        await log.wait_ended(ids, 180)

        problems = _problems(cell, vms, ids, once=False)  # (a command being recorded may go twice)
        await wait_until(lambda: _zero(outbox_unsent(cell.db)), 20, "the outbox to be marked sent")  # type: ignore[arg-type]
        rows = await job_rows(cell.db, ids)
        problems += [f"job {j}: {rows[j].status}, leased by {rows[j].lease_owner}" for j in ids
                     if rows[j].status != "completed" or rows[j].lease_owner is not None]
        assert not problems, "\n".join(problems[:40])
        assert "the intake process exited" in serve.log_tail(400)
        assert await metric(serve, "failover_intake_process_restarts_total") == 1
        # serve killed outright: its intake process sees its stdin close and stops too
        second = _intake_pid(serve.proc.pid)  # type: ignore[union-attr]
        assert second is not None
        await serve.kill()
        await wait_until(lambda: _gone(second), 20, "the orphaned intake process to stop")
    finally:
        await cell.close()


async def _zero(count: object) -> bool:
    return await count == 0  # type: ignore[misc]


async def _restarted(serve_pid: int, old: int) -> bool:
    now = _intake_pid(serve_pid)
    return now is not None and now != old


async def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True
