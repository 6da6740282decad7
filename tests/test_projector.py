"""The projector against the real MariaDB and RabbitMQ, on a queue and a database of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.outbox import OutboxEvent
from adapters.db.projections import Projections
from adapters.db.tables import projected_events
from consumers.projector import Projector
from publishers.relay import to_message
from schemas.events import Event, JobAccepted, LogRecorded

from .crash.support import database_of_its_own
from .helpers import holds, wait_until

EVENTS = 120


@pytest.fixture(scope="module")
async def projector_db(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with database_of_its_own(database_url, "projector") as engine:
        yield engine


def _events(job_id: uuid.UUID) -> list[Event]:
    common = {"job_id": job_id, "job_type": "test-failover", "vm_id": "vm-projector", "correlation_id": job_id,
              "causation_id": job_id}
    first: Event = JobAccepted(event_id=uuid.uuid4(), sequence=1, occurred_at=datetime.now(UTC), vm_name="p",
                               requested_by="tests", steps=[{"name": "pre-failover-validation", "order": 1}],
                               **common)
    return [first] + [LogRecorded(event_id=uuid.uuid4(), sequence=i, occurred_at=datetime.now(UTC), level="INFO",
                                  message=f"line {i}", **common) for i in range(2, EVENTS + 1)]


async def _exchange_and_queue(connection: aio_pika.abc.AbstractRobustConnection, name: str) -> tuple[
        aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractExchange]:
    """A channel, and a topic exchange `name` feeding a durable queue `name` (deleted by the test)."""
    setup = await connection.channel(publisher_confirms=True)
    exchange = await setup.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=True)
    queue = await setup.declare_queue(name, auto_delete=False)
    await queue.bind(exchange, routing_key="#")
    return setup, exchange


async def _publish(exchange: aio_pika.abc.AbstractExchange, e: Event) -> None:
    """`e` as the relay publishes it."""
    await exchange.publish(to_message(OutboxEvent(0, str(e.event_id), str(e.job_id), e.type, str(e.correlation_id),
                                                  e.model_dump_json(), 0.0)), routing_key=f"job.{e.job_id}.{e.type}")


async def _projected(db: AsyncEngine, job_id: uuid.UUID) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(projected_events)
                                       .where(projected_events.c.job_id == str(job_id)))).scalar_one())


async def test_every_delivery_is_acked_once_its_batch_is_applied(projector_db: AsyncEngine, amqp_url: str) -> None:
    """Batches are acked with one `multiple` ack each: after the events are projected and the
    projector's channel is closed, nothing is left in the queue to be delivered again (an
    unacked delivery would go back to it), and every event was applied once."""
    job_id = uuid.uuid4()
    name = f"projector-test-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        setup, exchange = await _exchange_and_queue(connection, name)
        try:
            for e in _events(job_id):  # queued before the projector starts: full batches
                await _publish(exchange, e)
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=50)
            handled: list[int] = []  # told after a batch is applied and acked
            projector = Projector(await channel.get_queue(name), Projections(projector_db), batch=50,
                                  observe=lambda applied, dupes, lags: handled.append(applied + dupes))
            await projector.start()
            deadline = asyncio.get_running_loop().time() + 30
            while sum(handled) < EVENTS:
                assert asyncio.get_running_loop().time() < deadline, "the events were not handled in 30 s"
                await asyncio.sleep(0.05)
            assert len(handled) < EVENTS, f"no batching: {handled}"
            await projector.stop()
            await channel.close()  # an unacked delivery goes back to the queue now
            left = await setup.declare_queue(name, passive=True)
            assert left.declaration_result.message_count == 0
            assert await _projected(projector_db, job_id) == EVENTS
        finally:
            await setup.queue_delete(name)


LINGER = 1.0


async def test_a_trickle_of_deliveries_is_applied_in_one_batch(projector_db: AsyncEngine, amqp_url: str) -> None:
    """After a batch that was not full, the next one waits `linger` for more deliveries: two
    events arriving a moment apart are applied in one transaction, not one each."""
    job_id = uuid.uuid4()
    name = f"projector-test-{uuid.uuid4().hex[:8]}"
    events = _events(job_id)[:3]
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        setup, exchange = await _exchange_and_queue(connection, name)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=50)
            handled: list[int] = []
            projector = Projector(await channel.get_queue(name), Projections(projector_db), batch=50, linger=LINGER,
                                  observe=lambda applied, dupes, lags: handled.append(applied + dupes))
            await projector.start()
            await _publish(exchange, events[0])
            await wait_until(holds(lambda: sum(handled) >= 1), 10, "the first event to be applied")
            await _publish(exchange, events[1])
            await asyncio.sleep(0.1)  # the trickle: the next event a moment later
            await _publish(exchange, events[2])
            await wait_until(holds(lambda: sum(handled) >= 3), 10, "the other two to be applied")
            assert handled == [1, 2], f"not gathered into one batch: {handled}"
            await projector.stop()
            assert await _projected(projector_db, job_id) == 3
        finally:
            await setup.queue_delete(name)
