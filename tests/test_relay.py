"""The outbox relay against the real MariaDB and RabbitMQ, in a database of its own (the
session's `serve` process leads the relay of the shared test database)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.engine import make_engine
from adapters.db.outbox import OutboxStore
from adapters.db.store import outbox_row
from adapters.db.tables import outbox
from publishers.relay import OutboxRelay
from schemas.events import LogRecorded

from .crash.support import derived_database, fresh_database

EVENTS = 120


@pytest.fixture(scope="module")
async def relay_db(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(await fresh_database(derived_database(database_url, "relay")), pool_size=4)
    yield engine
    await engine.dispose()


async def _unsent(db: AsyncEngine) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(outbox)
                                       .where(outbox.c.published_at.is_(None)))).scalar_one())


async def test_flush_publishes_everything_even_while_the_loop_renews_its_lease(
        relay_db: AsyncEngine, amqp_url: str) -> None:
    """SIGTERM's flush must not trust `is_leader`: the run loop clears it while it asks the
    database for the lease, and a flush that read it then returned at once, leaving the last
    events in the outbox (seen in CI: 'the outbox was not flushed' after a drain)."""
    job_id = uuid.uuid4()
    events = [LogRecorded(event_id=uuid.uuid4(), job_id=job_id, job_type="test-failover", vm_id="vm-relay", causation_id=job_id,
                          sequence=i, correlation_id=job_id, occurred_at=datetime.now(UTC), level="INFO",
                          message=f"line {i}") for i in range(1, EVENTS + 1)]
    async with relay_db.begin() as conn:
        await conn.execute(outbox.insert(), [outbox_row(e) for e in events])
    assert await _unsent(relay_db) == EVENTS

    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(f"relay-test-{uuid.uuid4().hex[:8]}", aio_pika.ExchangeType.TOPIC,
                                                  auto_delete=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="#")
        relay = OutboxRelay(OutboxStore(relay_db, f"relay-test-{uuid.uuid4().hex[:6]}"), exchange,
                            batch=50, poll_seconds=30, lease_seconds=10)
        task = asyncio.create_task(relay.run())
        await asyncio.sleep(0)  # the loop is now inside its first lease check: is_leader is False
        assert relay.is_leader is False
        flushed = await relay.flush(10)
        await asyncio.wait_for(task, 5)

        assert flushed, "flush said events were left behind"
        assert await _unsent(relay_db) == 0
        got: list[int] = []
        async with queue.iterator() as it:
            async for message in it:
                await message.ack()
                got.append(LogRecorded.model_validate_json(message.body).sequence)
                if len(set(got)) == EVENTS:
                    break
        assert sorted(set(got)) == list(range(1, EVENTS + 1))
