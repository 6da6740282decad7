"""The broker restarts, the database goes away for 15 seconds: nothing is lost, nothing is
duplicated, and /readyz says "not ready" while either is unreachable (guarantees 2, 3, 6).

These tests stop and start servers, so they use their OWN private MariaDB and RabbitMQ
(tests/crash/servers.py), never the machine's shared ones. Two `serve` processes run the jobs;
the test's event log is a durable queue bound to `#` on a robust connection, so it too
survives the broker's restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from sqlalchemy import func, select

from adapters.bus import DEAD_QUEUE
from adapters.db.tables import failover_jobs, job_commands, resource_ledger
from failover.client import BusClient
from failover.seed import SeededVm, seed_vm
from schemas.commands import FailoverRequested
from statemachine.naming import sanitize_vm_name, test_vm_name

from ..helpers import ServeProcess, wait_until
from .servers import PrivateMariaDB, PrivateRabbitMQ
from .support import (
    Cell,
    drive_intervals,
    exactly_once_problems,
    job_rows,
    outbox_unsent,
    overlaps,
    projected_all,
    projection_problems,
    shape,
    stream_problems,
)
from .test_side_by_side import linux_failover_shape

JOBS = 50
OUTAGE_SECONDS = 15.0


async def readiness(serve: ServeProcess) -> tuple[int, dict[str, Any]]:
    try:
        async with aiohttp.ClientSession() as http, http.get(
                serve.metrics_url + "/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return resp.status, await resp.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0, {}


async def wait_ready(serves: list[ServeProcess], ready: bool, check: str, timeout: float) -> None:
    """Until every process's /readyz answers 200 (ready) or 503 naming `check` false."""
    async def state() -> bool:
        for s in serves:
            status, body = await readiness(s)
            if ready and status != 200:
                return False
            if not ready and (status != 503 or body.get("checks", {}).get(check) is not False):
                return False
        return True

    await wait_until(state, timeout, f"/readyz to say {'ready' if ready else check + ' not ready'}", interval=0.2)


async def publish(amqp_url: str, vms: list[SeededVm], ids: list[str]) -> None:
    async with BusClient.connect(amqp_url) as bus:
        for vm, job_id in zip(vms, ids, strict=True):
            await bus.publish(FailoverRequested(request_id=uuid.UUID(job_id), vm_id=vm.vm_id,
                                                failover_type="test", requested_by="crash-tests"))


async def check_all(cell: Cell, vms: list[SeededVm], ids: list[str], killed: dict[str, float]) -> list[str]:
    """Every job completed once, its stream whole, the world touched once per resource, the
    read models equal to the fold, nothing left unsent, no command dead-lettered or recorded
    twice, and no job acted on by two processes at once."""
    assert cell.log and cell.db and cell.emu
    problems: list[str] = []
    want = linux_failover_shape()
    for vm, job_id in zip(vms, ids, strict=True):
        problems += [f"job {job_id}: {p}" for p in stream_problems(cell.log, job_id)]
        if shape(cell.log.stream(job_id)) != want:
            problems.append(f"job {job_id}: events {shape(cell.log.stream(job_id))}")
        name = test_vm_name(sanitize_vm_name(vm.vm_name), job_id)
        problems += [f"job {job_id}: {p}" for p in exactly_once_problems(
            cell.emu.world, name, vm.volume_ids, f"test-failover-{job_id[:8]}")]
    await projected_all(cell.db, cell.log, ids, 120)
    problems += await projection_problems(cell.db, cell.log, ids)
    rows = await job_rows(cell.db, ids)
    if any(rows[j].status != "completed" or rows[j].lease_owner is not None for j in ids):
        problems.append("failover_jobs rows not completed or still leased")
    if await outbox_unsent(cell.db):
        problems.append("events left unsent in the outbox")
    async with cell.db.connect() as conn:
        recorded = (await conn.execute(select(func.count()).select_from(job_commands)
                                       .where(job_commands.c.request_id.in_(ids)))).scalar_one()
        jobs = (await conn.execute(select(func.count()).select_from(failover_jobs))).scalar_one()
    if recorded != len(ids) or jobs != len(ids):
        problems.append(f"{recorded} commands recorded, {jobs} jobs, for {len(ids)} requests")
    connection = await aio_pika.connect(cell.amqp_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
        if dead.declaration_result.message_count:
            problems.append(f"{dead.declaration_result.message_count} deliveries dead-lettered")
    problems += overlaps(drive_intervals(cell.logs, killed, time.time()))
    return problems


async def _cell(name: str, db: PrivateMariaDB, broker: PrivateRabbitMQ, tmp: Path) -> Cell:
    await asyncio.to_thread(broker.add_vhost, name)
    return await Cell(name=name, db_url=db.url(f"failover_{name}"), amqp_url=broker.url(name), tmp=tmp,
                      env_extra={"FAILOVER_LEASE_SECONDS": "5"}).open()


@pytest.mark.slow
async def test_rabbitmq_restart_during_50_jobs(private_mariadb: PrivateMariaDB, private_rabbitmq: PrivateRabbitMQ,
                                               tmp_path: Path) -> None:
    cell = await _cell("mq", private_mariadb, private_rabbitmq, tmp_path)
    try:
        assert cell.control and cell.emu and cell.log and cell.db
        await cell.control.set_latency(async_job_seconds=0.5, operation_seconds=0.5)
        serves = [cell.serve(), cell.serve()]
        await asyncio.gather(*(s.start(timeout=60) for s in serves))
        vms = [await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name=f"mq {i}",
                             os_type="ubuntu64Guest", disks=2) for i in range(JOBS)]
        ids = [str(uuid.uuid4()) for _ in vms]
        half = JOBS // 2
        await publish(cell.amqp_url, vms[:half], ids[:half])
        # the broker goes while the jobs are mid-way
        await wait_until(lambda: _async(mid_way(cell, ids[:half])), 120, "the jobs to be mid-way", interval=0.01)
        in_flight = sum(1 for j in ids[:half] if not cell.log.ended(j))
        began = time.monotonic()
        await private_rabbitmq.stop()
        await wait_ready(serves, False, "broker", 30)
        # the jobs go on meanwhile (their state and events are committed to MariaDB)
        async with cell.db.connect() as conn:
            before = (await conn.execute(select(func.count()).select_from(failover_jobs)
                                         .where(failover_jobs.c.ended.is_(True)))).scalar_one()
        await private_rabbitmq.start()
        down = time.monotonic() - began
        await wait_ready(serves, True, "broker", 90)
        await publish(cell.amqp_url, vms[half:], ids[half:])  # and new commands are taken again
        await cell.log.wait_ended(ids, 240)
        problems = await check_all(cell, vms, ids, {})
        print(f"\nRabbitMQ restarted during {JOBS} jobs: down {down:.1f} s; {in_flight} jobs were running "
              f"when it stopped, {before} had ended when it came back; all {JOBS} completed once; {len(cell.log.seen)} deliveries "
              f"({len(cell.log.seen) - sum(len(cell.log.stream(j)) for j in ids)} duplicates) folded")
        assert not problems, "\n".join(problems[:40])
    finally:
        await cell.close()


@pytest.mark.slow
async def test_mariadb_gone_for_15_seconds(private_mariadb: PrivateMariaDB, private_rabbitmq: PrivateRabbitMQ,
                                           tmp_path: Path) -> None:
    cell = await _cell("db", private_mariadb, private_rabbitmq, tmp_path)
    try:
        assert cell.control and cell.emu and cell.log and cell.db
        await cell.control.set_latency(async_job_seconds=0.5, operation_seconds=0.5)
        serves = [cell.serve(), cell.serve()]
        await asyncio.gather(*(s.start(timeout=60) for s in serves))
        vms = [await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name=f"db {i}",
                             os_type="ubuntu64Guest", disks=2) for i in range(JOBS)]
        ids = [str(uuid.uuid4()) for _ in vms]
        early = JOBS - 10
        await publish(cell.amqp_url, vms[:early], ids[:early])
        await wait_until(lambda: _async(mid_way(cell, ids[:early])), 120, "the jobs to be mid-way", interval=0.01)
        in_flight = sum(1 for j in ids[:early] if not cell.log.ended(j))
        # some jobs wait on CloudStack jobs that outlast the outage: they make no commit that
        # could fail, only their lease runs out, so the runner must stop them in time
        # (the CloudStack jobs made before the latency changed are short ones: taken after it,
        # or a short one still pending counts as long and the outage finds nobody waiting)
        await cell.control.set_latency(async_job_seconds=OUTAGE_SECONDS + 5)
        older = set(cell.emu.world.jobs)
        await wait_until(lambda: _waiting(cell, older, 3), 30,
                         "jobs to wait on long CloudStack jobs (their ids recorded)")
        await cell.control.set_latency(async_job_seconds=0.5)
        await cell.db.dispose()  # the test's own pool: its connections die with the server
        began = time.monotonic()
        await private_mariadb.stop()
        await wait_ready(serves, False, "database", 30)
        # commands keep coming while the database is away: the consumer waits (bounded) to
        # record them, and does not lose or bounce them
        await publish(cell.amqp_url, vms[early:], ids[early:])
        remaining = OUTAGE_SECONDS - (time.monotonic() - began)
        if remaining > 0:  # the outage lasts its 15 s, whatever the checks above took
            await wait_until(lambda: _after(began + OUTAGE_SECONDS), remaining + 1, "the outage's end")
        status, body = await readiness(serves[0])
        assert status == 503 and body["checks"]["database"] is False, body
        await private_mariadb.start()
        down = time.monotonic() - began
        await wait_ready(serves, True, "database", 60)
        await cell.log.wait_ended(ids, 240)
        logs = "".join(p.read_text() for p in cell.logs.values())
        stopped = logs.count('"drive": "stop"')
        crashed = logs.count("stopped: the database is unreachable") + logs.count("crashed in the engine")
        problems = await check_all(cell, vms, ids, {})
        if not stopped or not crashed:
            problems.append(f"{stopped} runs stopped for their lease, {crashed} by a failed commit: the outage "
                            "should have caused both")
        print(f"\nMariaDB away for {down:.1f} s during {JOBS} jobs ({in_flight} running when it stopped, "
              f"{JOBS - early} commands published meanwhile): all completed once; {stopped} job runs stopped "
              f"because their lease could not be renewed, {crashed} stopped by a failed commit, all resumed")
        assert not problems, "\n".join(problems[:40])
    finally:
        await cell.close()


def mid_way(cell: Cell, ids: list[str]) -> bool:
    """Half the jobs have asked for their VM, none has started it yet (so none has ended).
    Read from the emulators' call log, which has no delay (the events reach the test later)."""
    assert cell.emu is not None
    calls = cell.emu.world.calls.entries
    deploys = sum(1 for c in calls if c["command"] == "deployVirtualMachine")
    if any(c["command"] == "startVirtualMachine" for c in calls):
        raise AssertionError("a job started its VM before the fault: raise the emulators' latency")
    return deploys >= len(ids) // 2


async def _async(value: bool) -> bool:
    return value


async def _waiting(cell: Cell, older: set[str], n: int) -> bool:
    """`n` jobs wait on (long) CloudStack jobs started since `older`, still running, their job
    ids in the ledger (so they have nothing left to commit until those jobs end)."""
    assert cell.emu is not None and cell.db is not None
    pending = [job_id for job_id, job in cell.emu.world.jobs.items() if job.status == 0 and job_id not in older]
    if len(pending) < n:
        return False
    async with cell.db.connect() as conn:
        recorded = (await conn.execute(select(func.count()).select_from(resource_ledger)
                                       .where(resource_ledger.c.cs_job_id.in_(pending)))).scalar_one()
    return recorded >= n


async def _after(moment: float) -> bool:
    return time.monotonic() >= moment


@pytest.mark.slow
async def test_both_away_with_production_leases(private_mariadb: PrivateMariaDB, private_rabbitmq: PrivateRabbitMQ,
                                               tmp_path: Path) -> None:
    """MariaDB goes away while jobs run and the consumer holds new commands waiting to record
    them; RabbitMQ restarts meanwhile (aio-pika cancels the held handlers with the old channel,
    the broker delivers the commands again). With the default 30 s lease: once the database is
    back, every command is recorded once and every job, including those whose commit failed
    in the outage, runs on at once, not only when its lease has run out."""
    cell = await _cell("held", private_mariadb, private_rabbitmq, tmp_path)
    n = 10
    try:
        assert cell.control and cell.emu and cell.log and cell.db
        await cell.control.set_latency(async_job_seconds=0.5, operation_seconds=0.5)
        serve = await cell.start_serve(FAILOVER_LEASE_SECONDS="30")
        vms = [await seed_vm(cell.db, cell.control, cell.emu.appliance_vm_id, vm_name=f"held {i}",
                             os_type="ubuntu64Guest", disks=2) for i in range(2 * n)]
        ids = [str(uuid.uuid4()) for _ in vms]
        await publish(cell.amqp_url, vms[:n], ids[:n])
        await wait_until(lambda: _async(mid_way(cell, ids[:n])), 120, "the jobs to be mid-way", interval=0.01)
        await cell.db.dispose()
        await private_mariadb.stop()
        await wait_ready([serve], False, "database", 30)
        await publish(cell.amqp_url, vms[n:], ids[n:])  # taken by the consumer, which waits for the database
        await wait_until(lambda: _held(private_rabbitmq, "held", n), 30, "the consumer to hold the new commands")
        await private_rabbitmq.stop()
        await private_rabbitmq.start()
        await wait_until(lambda: _broker_back(serve), 60, "the service to reconnect")
        began = time.monotonic()
        await private_mariadb.start()
        await cell.log.wait_ended(ids, 120)
        took = time.monotonic() - began
        problems = await check_all(cell, vms, ids, {})
        if took > 15:
            problems.append(f"the jobs took {took:.0f} s after the database came back: they waited for "
                            "their lease (30 s) instead of going on at once")
        print(f"\n{n} jobs running and {n} commands held across a database outage and a broker restart "
              f"(30 s leases): all recorded once, completed {took:.1f} s after the database came back")
        assert not problems, "\n".join(problems[:40])
    finally:
        await cell.close()


async def _held(broker: PrivateRabbitMQ, vhost: str, n: int) -> bool:
    """The command queue's deliveries are all with the consumer, unacked."""
    done = await asyncio.to_thread(broker.ctl_run, "list_queues", "-p", vhost, "name",
                                   "messages_unacknowledged", "--no-table-headers", "--quiet")
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "failover.commands":
            return int(parts[1]) >= n
    return False


async def _broker_back(serve: ServeProcess) -> bool:
    _, body = await readiness(serve)
    return body.get("checks", {}).get("broker") is True
