"""Recording a command against the real MariaDB: one transaction makes the command's row and a
new job with its `JobAccepted`, or a `JobRejected`, or nothing (a duplicate). A
FailoverRequested goes in two round trips where the server takes scripts (adapters/db/commands.py,
`_failover_quick`), statement by statement elsewhere: each test runs the three ways of
`SQL_WAYS`, and each way must leave the same rows."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.commands import CommandRecorder
from adapters.db.engine import utcnow
from adapters.db.tables import failover_jobs, job_commands, outbox, vm_replication_contexts
from schemas.commands import FailoverRequested
from schemas.common import STEPS_BY_JOB_TYPE
from schemas.parsing import parse_event
from tests.crash.support import SQL_WAYS, database_of_its_own, engine_speaking

OWNER = "recorder-test"
LEASE = 30.0


@pytest.fixture(scope="module")
async def recorder_db(database_url: str) -> AsyncIterator[str]:
    async with database_of_its_own(database_url, "recorder") as engine:
        yield engine.url.render_as_string(hide_password=False)


@pytest.fixture(params=SQL_WAYS)
async def db(request: pytest.FixtureRequest, recorder_db: str) -> AsyncIterator[AsyncEngine]:
    async with engine_speaking(request.param, recorder_db) as engine:
        yield engine


@pytest.fixture
def woken() -> list[int]:
    return []


@pytest.fixture
def recorder(db: AsyncEngine, woken: list[int]) -> CommandRecorder:
    rec = CommandRecorder(db, OWNER, LEASE)
    rec.on_outbox = lambda: woken.append(1)
    return rec


async def _a_vm(db: AsyncEngine, name: str = "web-01 'quoted' \\ name") -> str:
    vm_id = "4205" + uuid.uuid4().hex[4:8] + "-" + str(uuid.uuid4())[9:]
    now = utcnow()
    async with db.begin() as conn:
        await conn.execute(vm_replication_contexts.insert().values(
            context_id=f"ctx-{uuid.uuid4().hex[:12]}", vm_name=name, vmware_vm_id=vm_id,
            current_status="ready_for_failover", created_at=now, updated_at=now))
    return vm_id


def _failover(vm_id: str, **kw: Any) -> FailoverRequested:
    return FailoverRequested(request_id=kw.pop("request_id", uuid.uuid4()), vm_id=vm_id,
                             failover_type=kw.pop("failover_type", "test"), requested_by="recorder-tests", **kw)


async def _rows(db: AsyncEngine, request_id: uuid.UUID) -> tuple[Any, list[Any], list[Any]]:
    """The command's row, the jobs and the outbox rows of its id."""
    rid = str(request_id)
    async with db.connect() as conn:
        command = (await conn.execute(select(job_commands).where(job_commands.c.request_id == rid))).first()
        jobs = (await conn.execute(select(failover_jobs).where(failover_jobs.c.job_id == rid))).all()
        events = (await conn.execute(select(outbox).where(outbox.c.job_id == rid).order_by(outbox.c.id))).all()
    return command, list(jobs), list(events)


async def _rejection(db: AsyncEngine, request_id: uuid.UUID, outcome: str, detail: str | None) -> tuple[Any, Any]:
    """A rejected command's rows: its outcome and detail recorded, no job, one outbox row;
    that row and the event in it."""
    command, jobs, events = await _rows(db, request_id)
    assert (command.outcome, command.job_id, command.detail) == (outcome, None, detail)
    assert jobs == []
    [row] = events
    return row, parse_event(row.body.encode())


async def test_a_new_job_with_its_job_accepted(db: AsyncEngine, recorder: CommandRecorder,
                                               woken: list[int]) -> None:
    name = "web-01 'quoted' \\ name"
    vm_id = await _a_vm(db, name)
    # a JobRejected first: the outbox's ids run ahead of failover_jobs' (both AUTO_INCREMENT),
    # so reading the wrong table's LAST_INSERT_ID() shows below
    assert (await recorder.record(_failover("4205dead-0000-0000-0000-00000000beef"))).outcome == "rejected_not_found"
    cmd = _failover(vm_id, options={"driver_injection": "never"})
    before = utcnow()
    decision = await recorder.record(cmd)

    assert (decision.outcome, decision.job_id, decision.detail) == ("accepted", str(cmd.request_id), None)
    command, jobs, events = await _rows(db, cmd.request_id)
    assert (command.command_type, command.outcome, command.job_id, command.detail) == (
        "FailoverRequested", "accepted", str(cmd.request_id), None)
    [job] = jobs
    assert (job.request_id, job.vm_id, job.job_type, job.status, job.source_vm_name, job.correlation_id,
            job.requested_by, job.options, job.plan, job.last_sequence, job.active_vm_id, job.lease_owner) == (
        str(cmd.request_id), vm_id, "test", "pending", name, str(cmd.request_id), "recorder-tests",
        {"driver_injection": "never"}, None, 1, vm_id, OWNER)
    # the recorder's own lease: the runner starts the job without claiming it
    assert before + timedelta(seconds=LEASE - 5) < job.lease_expires_at < utcnow() + timedelta(seconds=LEASE + 5)

    # the event handed back for publishing at once is the row in the outbox, id and all
    [row] = events
    [event] = decision.events
    assert (event.id, event.event_id, event.job_id, event.event_type, event.correlation_id, event.body) == (
        row.id, row.event_id, row.job_id, "JobAccepted", row.correlation_id, row.body)
    assert job.id != row.id  # (the check above can tell the two tables' ids apart)
    assert (row.sequence, row.published_at) == (1, None)
    accepted = parse_event(row.body.encode())
    assert (accepted.type, accepted.sequence, accepted.vm_id, accepted.vm_name) == ("JobAccepted", 1, vm_id, name)
    assert [(s.name, s.order) for s in accepted.steps] == [
        (name, i + 1) for i, name in enumerate(STEPS_BY_JOB_TYPE["test-failover"])]
    assert woken == [1, 1]  # the relay is told of each


async def test_the_same_command_again_is_a_duplicate_and_writes_nothing(
        db: AsyncEngine, recorder: CommandRecorder, woken: list[int]) -> None:
    vm_id = await _a_vm(db)
    cmd = _failover(vm_id)
    assert (await recorder.record(cmd)).outcome == "accepted"
    first = await _rows(db, cmd.request_id)

    again = await recorder.record(cmd)

    assert (again.outcome, again.job_id, again.events) == ("duplicate", None, ())
    assert await _rows(db, cmd.request_id) == first
    assert woken == [1]  # a duplicate wrote nothing for the relay


async def test_an_unknown_vm_is_rejected_not_found(db: AsyncEngine, recorder: CommandRecorder,
                                                   woken: list[int]) -> None:
    cmd = _failover("4205dead-0000-0000-0000-000000000000")
    decision = await recorder.record(cmd)

    assert (decision.outcome, decision.job_id) == ("rejected_not_found", None)
    assert decision.detail is not None and "is not in vm_replication_contexts" in decision.detail
    row, rejected = await _rejection(db, cmd.request_id, "rejected_not_found", decision.detail)
    assert (rejected.type, rejected.reason, rejected.detail, rejected.sequence) == (
        "JobRejected", "not_found", decision.detail, 1)
    assert [e.id for e in decision.events] == [row.id]
    assert woken == [1]


async def test_a_vm_held_by_another_job_is_rejected_naming_it(db: AsyncEngine, recorder: CommandRecorder,
                                                              woken: list[int]) -> None:
    vm_id = await _a_vm(db)
    first = _failover(vm_id)
    assert (await recorder.record(first)).outcome == "accepted"
    async with db.connect() as conn:
        jobs_before = (await conn.execute(select(func.count()).select_from(failover_jobs))).scalar_one()

    second = _failover(vm_id, failover_type="live")
    decision = await recorder.record(second)

    assert (decision.outcome, decision.job_id) == ("rejected_conflict", None)
    assert decision.detail == (f"VM {vm_id!r} is held by test failover job {first.request_id} (pending): "
                               "wait for it to end, or cancel it")
    row, rejected = await _rejection(db, second.request_id, "rejected_conflict", decision.detail)
    assert (rejected.type, rejected.reason, rejected.job_type, rejected.vm_id) == (
        "JobRejected", "conflict", "live-failover", vm_id)
    assert [e.id for e in decision.events] == [row.id]
    async with db.connect() as conn:  # nothing of the refused job stayed
        assert (await conn.execute(select(func.count()).select_from(failover_jobs))).scalar_one() == jobs_before
    assert woken == [1, 1]


async def test_many_at_once_each_once(db: AsyncEngine, recorder: CommandRecorder, woken: list[int]) -> None:
    """Twenty commands for ten VMs, each sent twice, all at once: one job per VM, every other
    command rejected or a duplicate, and every JobAccepted's outbox id its own row's."""
    vms = [await _a_vm(db, f"vm-{i}") for i in range(10)]
    cmds = [_failover(vm) for vm in vms for _ in range(2)]
    decisions = await asyncio.gather(*(recorder.record(c) for c in [*cmds, *cmds]))

    by_vm: dict[str, list[str]] = {}
    for cmd, d in zip([*cmds, *cmds], decisions, strict=True):
        by_vm.setdefault(cmd.vm_id, []).append(d.outcome)
    for vm in vms:
        outcomes = sorted(by_vm[vm])
        assert outcomes.count("accepted") == 1, outcomes
        assert outcomes.count("duplicate") == 2, outcomes
        assert outcomes.count("rejected_conflict") == 1, outcomes
    assert len(woken) == 20  # every decision but the 20 duplicates wrote an event
    async with db.connect() as conn:
        for cmd in cmds:
            command = (await conn.execute(select(job_commands).where(
                job_commands.c.request_id == str(cmd.request_id)))).one()
            assert command.outcome in ("accepted", "rejected_conflict"), command.outcome
        for d in decisions:
            for e in d.events:
                row = (await conn.execute(select(outbox.c.event_id, outbox.c.body).where(outbox.c.id == e.id))).one()
                assert (row.event_id, json.loads(row.body)["event_id"]) == (e.event_id, e.event_id)
