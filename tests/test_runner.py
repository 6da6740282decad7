"""The hand-over from the command consumer to the job runner, against the real MariaDB and
RabbitMQ, in a database of its own (the session's `serve` process claims the shared one's jobs)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import aio_pika
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.commands import CommandRecorder
from adapters.db.engine import utcnow
from adapters.db.outbox import OutboxEvent
from adapters.db.store import JobStore
from adapters.db.tables import failover_jobs, vm_replication_contexts
from consumers.commands import CommandConsumer
from failover.runner import JobRunner
from schemas.commands import FailoverRequested
from statemachine.context import EngineConfig, JobContext
from statemachine.machine import build_machine
from statemachine.ports import JobRow

from .crash.support import database_of_its_own
from .helpers import holds, wait_until

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
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        consumer = CommandConsumer(queue, channel.default_exchange, CommandRecorder(runner_db, owner, LEASE),
                                   max_bytes=65536, on_accepted=runner.adopt, count=lambda t, o: outcomes.append(o),
                                   publish_first=publish_first, hold=runner.hold, unhold=runner.unhold)
        await consumer.start()
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
