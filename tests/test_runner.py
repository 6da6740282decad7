"""The hand-over from the command consumer to the job runner, against the real MariaDB and
RabbitMQ, in a database of its own (the session's `serve` process claims the shared one's jobs)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, cast

import aio_pika
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.commands import CommandRecorder
from adapters.db.engine import utcnow
from adapters.db.outbox import OutboxEvent, OutboxStore
from adapters.db.store import JobStore, Renewal
from adapters.db.tables import failover_jobs, outbox, vm_replication_contexts
from consumers.commands import CommandConsumer
from failover import service
from failover.runner import JobRunner
from publishers.relay import OutboxRelay
from schemas.commands import FailoverRequested, RollbackRequested
from statemachine.context import EngineConfig, JobContext
from statemachine.machine import build_machine
from statemachine.ports import JobRow

from .crash.support import database_of_its_own
from .helpers import holds, wait_until, watched_exchange

LEASE = 30.0


@pytest.fixture(scope="module")
async def runner_db(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with database_of_its_own(database_url, "runner") as engine:
        yield engine


async def _a_vm(db: AsyncEngine) -> str:
    vm_id = f"4205{uuid.uuid4().hex[:4]}-{uuid.uuid4()}"[:36]
    now = utcnow()
    async with db.begin() as conn:
        await conn.execute(vm_replication_contexts.insert().values(
            context_id=f"ctx-{vm_id[:20]}", vm_name="runner-test", vmware_vm_id=vm_id,
            current_status="ready_for_failover", os_type="rhel8_64Guest", created_at=now, updated_at=now))
    return vm_id


@contextlib.asynccontextmanager
async def _consuming(db: AsyncEngine, amqp_url: str, runner: JobRunner,
                     publish_first: Callable[[Sequence[OutboxEvent]], Awaitable[bool]],
                     outcomes: list[str]) -> AsyncIterator[tuple[Any, Any, CommandConsumer]]:
    """serve's command consumer, as serve wires it to `runner`, on a queue of its own: its
    channel, its queue, itself (started; the caller stops it)."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        consumer = CommandConsumer(queue, channel.default_exchange, CommandRecorder(db, runner.owner, LEASE),
                                   max_bytes=65536, on_accepted=runner.adopt, count=lambda t, o: outcomes.append(o),
                                   publish_first=publish_first, hold=runner.hold, unhold=runner.unhold)
        await consumer.start()
        yield channel, queue, consumer


async def test_a_job_starts_only_after_its_first_event_is_confirmed(runner_db: AsyncEngine, amqp_url: str) -> None:
    """The recorder gives this process the new job's lease as it commits; the runner's claim,
    which also takes jobs this process owns but does not run, must pass it by while its
    `JobAccepted` is still on its way to the broker, or the job's `StepStarted` could leave
    before it (a broker slow to confirm, a channel being reopened)."""
    owner = f"runner-test-{uuid.uuid4().hex[:6]}"
    store = JobStore(runner_db, owner, lease_seconds=LEASE)
    config = EngineConfig(zone="z", template_id="t", service_offering_id="s", disk_offering_id=None,
                          default_network_id="n", appliance_vm_id="a")

    started: list[str] = []
    contexts: list[JobContext] = []

    def make_context(row: JobRow) -> JobContext:  # the runner starts a job here
        started.append(row.job_id)
        # this test is about when a job starts, not what it does: it stops at once, as if drained
        contexts.append(JobContext(row=row, ports=cast(Any, None), config=config, draining=True))
        return contexts[-1]

    runner = JobRunner(store, build_machine(), make_context, capacity=10, lease_seconds=LEASE, claim_interval=0.1)

    confirm = asyncio.Event()
    first: list[str] = []
    outcomes: list[str] = []

    async def publish_first(events: Sequence[OutboxEvent]) -> bool:  # the relay, its broker slow to confirm
        first.extend(e.event_type for e in events)
        await confirm.wait()
        return True

    request_id = uuid.uuid4()
    async with _consuming(runner_db, amqp_url, runner, publish_first, outcomes) as (channel, queue, consumer):
        try:
            command = FailoverRequested(request_id=request_id, vm_id=await _a_vm(runner_db), failover_type="test")
            await channel.default_exchange.publish(
                aio_pika.Message(command.model_dump_json().encode(), content_type="application/json"),
                routing_key=queue.name)
            await wait_until(holds(lambda: first == ["JobAccepted"]), 10,
                             "the consumer to record the job and begin publishing its JobAccepted", interval=0.01)
            async with runner_db.connect() as conn:  # recorded, leased to this process, not running here
                row = (await conn.execute(select(failover_jobs.c.lease_owner, failover_jobs.c.status)
                                          .where(failover_jobs.c.job_id == str(request_id)))).one()
            assert (row.lease_owner, row.status) == (owner, "pending")

            await runner._fill()  # a claim while the JobAccepted is unconfirmed
            assert started == [], "the job started before its JobAccepted was confirmed"

            # the client retries: a second delivery of the request, a duplicate, is done at once;
            # the first still holds the job
            await channel.default_exchange.publish(
                aio_pika.Message(command.model_dump_json().encode(), content_type="application/json"),
                routing_key=queue.name)
            await wait_until(holds(lambda: outcomes == ["duplicate"]), 10,
                             "the second delivery to be found a duplicate", interval=0.01)
            await runner._fill()
            assert started == [], "a duplicate delivery released the hold of the first"

            confirm.set()
            end = time.monotonic() + 10
            while not started:  # adopted once confirmed and acked
                assert time.monotonic() < end, "the job was not started after its JobAccepted was confirmed"
                await runner._fill()
                await asyncio.sleep(0.01)
            assert started == [str(request_id)] and outcomes == ["duplicate", "accepted"]
            assert contexts[0].taken_over is False  # started as its recorder's, not claimed
        finally:
            await asyncio.gather(*runner.running.values(), return_exceptions=True)
            await consumer.stop()


async def test_a_live_failover_starts_before_the_test_failovers_waiting_for_room(
        runner_db: AsyncEngine, amqp_url: str) -> None:
    """A disaster during a DR test: this process's room is taken, a wave's test failovers wait
    for it, and a live failover asked for after them starts first, through serve's consumer as
    it hands jobs over (and through the claim of jobs not handed over: nobody's, oldest first
    otherwise)."""
    owner = f"live-first-{uuid.uuid4().hex[:6]}"
    config = EngineConfig(zone="z", template_id="t", service_offering_id="s", disk_offering_id=None,
                          default_network_id="n", appliance_vm_id="a")
    started: list[str] = []

    def make_context(row: JobRow) -> JobContext:  # it stops at once (as if drained): its room is free again
        started.append(row.job_id)
        return JobContext(row=row, ports=cast(Any, None), config=config, draining=True)

    runner = JobRunner(JobStore(runner_db, owner, lease_seconds=LEASE), build_machine(), make_context,
                       capacity=1, lease_seconds=LEASE, claim_interval=60)

    async def publish_first(events: Sequence[OutboxEvent]) -> bool:
        return True

    outcomes: list[str] = []
    async with _consuming(runner_db, amqp_url, runner, publish_first, outcomes) as (channel, queue, consumer):
        kinds = ["test", "test", "live", "test"]
        commands = [FailoverRequested(request_id=uuid.uuid4(), vm_id=await _a_vm(runner_db), failover_type=kind)
                    for kind in kinds]
        try:
            for n, command in enumerate(commands, 1):  # one at a time: in this order
                await channel.default_exchange.publish(
                    aio_pika.Message(command.model_dump_json().encode(), content_type="application/json"),
                    routing_key=queue.name)
                await wait_until(holds(lambda n=n: len(outcomes) == n), 10, "the command to be recorded")
            assert outcomes == ["accepted"] * 4 and runner.waiting == 4
            service.set_waiting_gauges(runner)  # (what serve's /metrics shows: one live failover waits)
            assert [REGISTRY.get_sample_value("failover_jobs_waiting", {"priority": p}) for p in ("live", "other")] \
                == [1.0, 3.0]
            end = time.monotonic() + 10
            while len(started) < 4:  # one at a time: the room is one job
                assert time.monotonic() < end, f"only {started} started"
                await runner._fill()
                await asyncio.gather(*runner.running.values(), return_exceptions=True)
                await asyncio.sleep(0)
            ids = [str(c.request_id) for c in commands]
            assert started == [ids[2], ids[0], ids[1], ids[3]]  # the live one first, the others in turn
        finally:
            await asyncio.gather(*runner.running.values(), return_exceptions=True)
            await consumer.stop()
            for command in commands:
                await _end(runner_db, str(command.request_id))

    # jobs nobody handed over (recorded by a process that died): the claim takes the live first
    claims = JobStore(runner_db, f"claims-{uuid.uuid4().hex[:6]}", lease_seconds=LEASE)
    orphans = [str(uuid.uuid4()) for _ in range(3)]
    now = utcnow()
    async with runner_db.begin() as conn:
        for job_id, kind in zip(orphans, ["test", "test", "live"], strict=True):
            await conn.execute(failover_jobs.insert().values(
                job_id=job_id, request_id=job_id, correlation_id=job_id, vm_id=await _a_vm(runner_db), job_type=kind,
                source_vm_name="runner-test", options={}, status="pending", created_at=now, updated_at=now))
    try:
        taken = await claims.claim(1, LEASE)
        assert [row.job_id for row in taken] == [orphans[2]]
        taken = await claims.claim(50, LEASE, running=[orphans[2]])  # (and any other test's left claimable)
        assert {orphans[0], orphans[1]} <= {row.job_id for row in taken}
    finally:
        for job_id in orphans:
            await _end(runner_db, job_id)


async def test_the_recorder_puts_live_failovers_first_new_or_their_rollback_retried(runner_db: AsyncEngine) -> None:
    """Which accepted jobs the runner starts first is the recorder's word: a new live failover,
    and the retry of a live failover's rollback (its source VM may still be down), not a test
    failover's, and not a cleanup."""
    recorder = CommandRecorder(runner_db, f"first-{uuid.uuid4().hex[:6]}", LEASE)
    decisions = {kind: await recorder.record(FailoverRequested(
        request_id=uuid.uuid4(), vm_id=await _a_vm(runner_db), failover_type=kind)) for kind in ("test", "live")}
    assert {kind: (d.outcome, d.first) for kind, d in decisions.items()} == {
        "test": ("accepted", False), "live": ("accepted", True)}
    failed = {}
    now = utcnow()
    async with runner_db.begin() as conn:
        for kind in ("test", "live"):  # a failover whose rollback did not complete
            job_id = failed[kind] = str(uuid.uuid4())
            await conn.execute(failover_jobs.insert().values(
                job_id=job_id, request_id=job_id, correlation_id=job_id, vm_id=await _a_vm(runner_db), job_type=kind,
                source_vm_name="runner-test", options={}, status="failed", ended=True, rolled_back=False,
                failed_step="vm-creation", error_code="E", created_at=now, updated_at=now))
    try:
        retried = {kind: await recorder.record(RollbackRequested(request_id=uuid.uuid4(), job_id=uuid.UUID(job_id)))
                   for kind, job_id in failed.items()}
        assert {kind: (d.outcome, d.first) for kind, d in retried.items()} == {
            "test": ("accepted", False), "live": ("accepted", True)}
    finally:
        for job_id in [*failed.values(), *(str(d.job_id) for d in decisions.values())]:
            await _end(runner_db, job_id)


async def _running_job(db: AsyncEngine, owner: str, lease: float) -> tuple[JobRunner, str, asyncio.Task[None]]:
    """A runner of `owner` with one job running (as far as its leases go) whose lease is due."""
    job_id = str(uuid.uuid4())
    vm_id = await _a_vm(db)
    now = utcnow()
    async with db.begin() as conn:
        await conn.execute(failover_jobs.insert().values(
            job_id=job_id, request_id=job_id, correlation_id=job_id, vm_id=vm_id, job_type="test",
            source_vm_name="runner-test", options={}, status="cloudstack-snapshot", created_at=now, updated_at=now,
            lease_owner=owner, lease_expires_at=func.date_add(func.now(6), text("INTERVAL 1 SECOND"))))
    runner = JobRunner(JobStore(db, owner, lease_seconds=lease), build_machine(), lambda row: cast(Any, None),
                       capacity=1, lease_seconds=lease, claim_interval=60)
    async def drive() -> None:  # the job's drive, waiting on the outside world
        await asyncio.Event().wait()

    task = asyncio.create_task(drive())
    runner.running[job_id] = task
    runner._valid_until[job_id] = time.monotonic() + 1.0
    return runner, job_id, task


async def _lease_expiry(db: AsyncEngine, job_id: str) -> Any:
    async with db.connect() as conn:
        return (await conn.execute(select(failover_jobs.c.lease_expires_at)
                                   .where(failover_jobs.c.job_id == job_id))).scalar_one()


async def _lease_left(db: AsyncEngine, job_id: str) -> float:
    async with db.connect() as conn:
        return float((await conn.execute(select(
            func.timestampdiff(text("MICROSECOND"), func.now(6), failover_jobs.c.lease_expires_at))
            .where(failover_jobs.c.job_id == job_id))).scalar_one()) / 1e6


@contextlib.asynccontextmanager
async def _due_and_locked(db: AsyncEngine, owner: str, lease: float,
                          release: asyncio.Event) -> AsyncIterator[tuple[JobRunner, str]]:
    """A running job whose lease is due, its row held by another transaction (a long commit, an
    operator's session) until `release` is set."""
    runner, job_id, task = await _running_job(db, owner, lease)
    locked = asyncio.Event()

    async def hold() -> None:
        async with db.connect() as conn:
            await conn.begin()
            await conn.execute(select(failover_jobs.c.id).where(failover_jobs.c.job_id == job_id).with_for_update())
            locked.set()
            await release.wait()
            await conn.rollback()

    holder = asyncio.create_task(hold())
    try:
        await locked.wait()
        yield runner, job_id
    finally:
        release.set()
        await holder
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _end(db, job_id)


async def _end(db: AsyncEngine, job_id: str) -> None:
    """The job ends: no later claim in this module's database takes it."""
    async with db.begin() as conn:
        await conn.execute(failover_jobs.update().where(failover_jobs.c.job_id == job_id)
                           .values(ended=True, status="completed", lease_owner=None, lease_expires_at=None))


async def test_every_renewal_round_names_a_job_renewed_at_the_last_one(runner_db: AsyncEngine) -> None:
    """Rounds come at a fixed rate, so a job renewed at one round (a little after its start)
    must still count as due at the next, however late that one wakes within the allowance:
    counted from each round's wake-up, it was due only when that round woke later than the
    last, every other round as a rule, and met a failed round with too little of its lease
    left."""
    lease = 3.0
    runner, job_id, task = await _running_job(runner_db, "renewal-rounds", lease)
    renew, renew_due = runner.store.renew, runner.renew_due
    asked: list[list[str]] = []  # each round's, the jobs it asked about

    async def a_round(interval: float, scheduled: float | None = None) -> None:
        asked.append([])
        await renew_due(interval, scheduled)

    async def recorded(ids: Collection[str], seconds: float) -> Renewal:
        asked[-1].extend(ids)
        return await renew(ids, seconds)

    runner.renew_due = a_round  # type: ignore[method-assign]
    runner.store.renew = recorded  # type: ignore[method-assign,assignment]
    rounds = asyncio.create_task(runner._renewals())
    try:
        await wait_until(holds(lambda: len(asked) >= 7), 20, "seven renewal rounds")
        assert all(job_id in ids for ids in asked[:6]), asked
        assert await _lease_left(runner_db, job_id) > lease / 3
    finally:
        rounds.cancel()
        task.cancel()
        await asyncio.gather(rounds, task, return_exceptions=True)
        await _end(runner_db, job_id)


async def test_a_renewal_asks_again_within_its_round_about_a_job_whose_row_was_locked(runner_db: AsyncEngine) -> None:
    """A renewal passes a locked row by (`SKIP LOCKED`: its own commit, as a rule, renews it).
    When nothing did, it asks again within the round rather than a round later: two rounds
    passed by in a row would have stopped a healthy job."""
    lease = 3.0
    release = asyncio.Event()
    async with _due_and_locked(runner_db, "renewal-retry", lease, release) as (runner, job_id):
        renew = runner.store.renew

        found: list[Renewal] = []

        async def renew_then_release(ids: Collection[str], seconds: float) -> Renewal:  # freed after the 1st try
            found.append(await renew(ids, seconds))
            release.set()
            return found[-1]

        runner.store.renew = renew_then_release  # type: ignore[method-assign,assignment]
        await runner.renew_due(interval=lease / 3)
        assert found[0] == (set(), {}, {job_id}), found  # passed by, locked
        assert await _lease_left(runner_db, job_id) > lease - 1  # renewed once the row was free
        assert runner._valid_until[job_id] - time.monotonic() > lease - 1


async def test_a_row_locked_for_half_a_round_is_named_in_a_warning(
        runner_db: AsyncEngine, caplog: pytest.LogCaptureFixture) -> None:
    lease = 1.5
    async with _due_and_locked(runner_db, "renewal-locked", lease, asyncio.Event()) as (runner, job_id):
        before = (await _lease_expiry(runner_db, job_id), runner._valid_until[job_id])
        with caplog.at_level("WARNING", logger="failover.runner"):
            await runner.renew_due(interval=lease / 3)
        warned = [r.getMessage() for r in caplog.records if job_id in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith(f"the lease of job {job_id} was not renewed: its row "
                                                         "stayed locked for "), warned
        assert warned[0].endswith("(a long transaction on failover_jobs?); the next round, in under 0.5 s, "
                                  "asks again"), warned
        # not renewed: the row was never free
        assert (await _lease_expiry(runner_db, job_id), runner._valid_until[job_id]) == before


async def test_a_stopped_job_whose_step_swallowed_the_cancel_is_cancelled_again(
        runner_db: AsyncEngine, caplog: pytest.LogCaptureFixture) -> None:
    """A job stays in `running` until its task ends, and this process's claims pass it by
    meanwhile: one that goes on after its stop (a step that caught the cancel) would never be
    taken up again here. The enforcer cancels it again a margin later."""
    lease = 1.5
    runner, job_id, task = await _running_job(runner_db, "recancel", lease)
    task.cancel()  # the stand-in drive from _running_job, replaced by a stubborn one
    await asyncio.gather(task, return_exceptions=True)
    swallowed = asyncio.Event()

    async def stubborn() -> None:  # swallows the stop's cancel and the first one again
        for _ in range(2):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed.set()
        await asyncio.Event().wait()

    runner.running[job_id] = asyncio.create_task(stubborn())
    enforcer = asyncio.create_task(runner._enforce_loop())
    try:
        with caplog.at_level("WARNING", logger="failover.runner"):
            await asyncio.sleep(0)  # the stubborn drive starts
            runner._stop_job(job_id, "its lease was released")
            await wait_until(holds(lambda: swallowed.is_set()), 5, "the first cancel to be swallowed")
            await wait_until(holds(lambda: runner.running[job_id].done()), 5, "the job to be cancelled again")
        # warned once for the stop, however many times it is cancelled again
        assert sum(f"job {job_id} is still running" in r.getMessage() for r in caplog.records) == 1
    finally:
        enforcer.cancel()
        runner.running[job_id].cancel()
        await asyncio.gather(enforcer, runner.running[job_id], return_exceptions=True)
        await _end(runner_db, job_id)


async def test_a_new_jobs_first_event_is_published_once_when_a_relay_round_reads_it_first(
        runner_db: AsyncEngine, amqp_url: str) -> None:
    """serve's command consumer publishes a new job's JobAccepted itself, right after the
    record's commit. A relay round whose read of the outbox returns in between (here: forced,
    a round run as the record returns) must pass that job by: it published the event a second
    time (seen in CI as one JobAccepted too many in the metrics)."""
    owner = f"first-once-{uuid.uuid4().hex[:6]}"
    runner = JobRunner(JobStore(runner_db, owner, lease_seconds=LEASE), build_machine(), lambda row: cast(Any, None),
                       capacity=10, lease_seconds=LEASE, claim_interval=60)
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        events, seen = await watched_exchange(channel, "first-once")
        relay = OutboxRelay(OutboxStore(runner_db, owner), events, batch=50, poll_seconds=30, lease_seconds=10)
        recorder = CommandRecorder(runner_db, owner, LEASE)
        record = recorder.record

        async def record_then_a_relay_round(command: Any) -> Any:
            decision = await record(command)
            await relay.publish_once()  # the round that reads the outbox before publish_now runs
            return decision

        recorder.record = record_then_a_relay_round  # type: ignore[method-assign,assignment]
        commands = await channel.declare_queue(exclusive=True)
        outcomes: list[str] = []
        consumer = CommandConsumer(commands, channel.default_exchange, recorder, max_bytes=65536,
                                   on_accepted=lambda job_id, first: None, count=lambda t, o: outcomes.append(o),
                                   publish_first=relay.publish_now,
                                   hold=functools.partial(service._hold, runner, relay),
                                   unhold=functools.partial(service._unhold, runner, relay))
        await consumer.start()
        try:
            request_id = uuid.uuid4()
            command = FailoverRequested(request_id=request_id, vm_id=await _a_vm(runner_db), failover_type="test")
            await channel.default_exchange.publish(
                aio_pika.Message(command.model_dump_json().encode(), content_type="application/json"),
                routing_key=commands.name)
            await wait_until(holds(lambda: outcomes == ["accepted"]), 10, "the command to be recorded and acked")
            await relay.publish_once()  # marks what publish_now sent; nothing of the job is left to publish
            assert await _all_published(runner_db, str(request_id))
            published: list[str] = []
            while (message := await seen.get(fail=False)) is not None:  # (earlier tests' unsent events too)
                await message.ack()
                body = json.loads(message.body)
                if body["job_id"] == str(request_id):
                    published.append(body["type"])
            assert published == ["JobAccepted"]
        finally:
            await consumer.stop()


async def _all_published(db: AsyncEngine, job_id: str) -> bool:
    async with db.connect() as conn:
        rows = (await conn.execute(select(outbox.c.published_at).where(outbox.c.job_id == job_id))).all()
    return bool(rows) and all(r.published_at is not None for r in rows)
