"""The outbox relay against the real MariaDB and RabbitMQ, in a database of its own (the
session's `serve` process leads the relay of the shared test database)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db import raw
from adapters.db.outbox import OutboxEvent, OutboxStore, insert_event, outbox_row
from adapters.db.tables import outbox
from publishers.relay import OutboxRelay, to_message, to_properties
from schemas.events import JobAccepted, LogRecorded

from .crash.support import database_of_its_own
from .helpers import holds, wait_until, watched_exchange

EVENTS = 120
LINGER = 1.0


@pytest.fixture(scope="module")
async def relay_db(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with database_of_its_own(database_url, "relay") as engine:
        yield engine


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
        exchange, queue = await watched_exchange(channel, "relay-test")
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


def _accepted(job_id: uuid.UUID) -> JobAccepted:
    return JobAccepted(event_id=uuid.uuid4(), job_id=job_id, job_type="test-failover", vm_id="vm-relay", sequence=1,
                       correlation_id=job_id, causation_id=job_id, occurred_at=datetime.now(UTC), vm_name="relay",
                       requested_by="tests", steps=[{"name": "pre-failover-validation", "order": 1}])


def _line(job_id: uuid.UUID, sequence: int) -> LogRecorded:
    return LogRecorded(event_id=uuid.uuid4(), job_id=job_id, job_type="test-failover", vm_id="vm-relay",
                       causation_id=job_id, sequence=sequence, correlation_id=job_id,
                       occurred_at=datetime.now(UTC), level="INFO", message=f"line {sequence}")


async def _received(queue: aio_pika.abc.AbstractQueue, deadline: float = 10.0) -> tuple[str, int]:
    """The next message on `queue` as (event type, sequence), waiting for it up to `deadline`."""
    end = asyncio.get_running_loop().time() + deadline
    while True:
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            return str(message.type), int(json.loads(message.body)["sequence"])
        assert asyncio.get_running_loop().time() < end, "no message arrived"
        await asyncio.sleep(0.02)


async def test_publish_now_sends_a_first_event_at_once_and_the_relay_does_not_send_it_again(
        relay_db: AsyncEngine, amqp_url: str) -> None:
    """A job's JobAccepted goes out as soon as it is committed, without the relay's turn (its
    loop is not even running here); the relay then marks it sent with its next batch instead
    of publishing it a second time, and publishes the job's later events after it."""
    job_id, first = await _first_event(relay_db)
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        exchange, queue = await _exchange_and_queue(connection)
        relay = _relay(relay_db, exchange)
        assert await relay.publish_now([first]) is True
        assert await _received(queue) == ("JobAccepted", 1)
        assert await _unsent(relay_db) == 1  # sent, marked with the relay's next batch

        async with raw.transaction(relay_db) as tx:
            await insert_event(tx, _line(job_id, 2))
        assert await relay.publish_once() == 2  # one published, one marked
        assert await _unsent(relay_db) == 0
        assert await _received(queue) == ("LogRecorded", 2)
        assert await queue.get(fail=False) is None, "the relay published the first event a second time"


async def test_a_first_event_that_could_not_be_sent_at_once_goes_with_the_relay(
        relay_db: AsyncEngine, amqp_url: str) -> None:
    """The broker returns the publish (nothing bound yet): publish_now says so, and the event,
    committed, goes out with the relay's next batch."""
    _, first = await _first_event(relay_db)
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        exchange, queue = await _exchange_and_queue(connection, bind=False)
        relay = _relay(relay_db, exchange, confirm_timeout=5)
        assert await relay.publish_now([first]) is False
        assert await _unsent(relay_db) == 1
        await queue.bind(exchange, routing_key="#")
        assert await relay.publish_once() == 1
        assert await _received(queue) == ("JobAccepted", 1)
        assert await _unsent(relay_db) == 0


async def _first_event(db: AsyncEngine) -> tuple[uuid.UUID, OutboxEvent]:
    """An empty outbox, then a new job's JobAccepted committed to it."""
    job_id = uuid.uuid4()
    async with db.begin() as conn:
        await conn.execute(outbox.delete())
    async with raw.transaction(db) as tx:
        return job_id, await insert_event(tx, _accepted(job_id))


def _relay(db: AsyncEngine, exchange: aio_pika.abc.AbstractExchange, **kwargs: float) -> OutboxRelay:
    return OutboxRelay(OutboxStore(db, f"relay-test-{uuid.uuid4().hex[:6]}"), exchange, batch=50,
                       poll_seconds=30, lease_seconds=10, **kwargs)


async def _exchange_and_queue(connection: aio_pika.abc.AbstractRobustConnection, *, bind: bool = True) -> tuple[
        aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractQueue]:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.declare_exchange(f"relay-test-{uuid.uuid4().hex[:8]}", aio_pika.ExchangeType.TOPIC,
                                              auto_delete=True)
    queue = await channel.declare_queue(exclusive=True)
    if bind:
        await queue.bind(exchange, routing_key="#")
    return exchange, queue


async def test_a_relay_that_does_not_lead_marks_what_it_published_at_once_when_it_drains(
        relay_db: AsyncEngine, amqp_url: str) -> None:
    """Two processes: the other leads the relay. This one records a command and publishes its
    JobAccepted at once, then drains: it marks that event sent itself, or the leader (which
    skips only its own direct publishes) would publish it a second time."""
    _, first = await _first_event(relay_db)
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        exchange, queue = await _exchange_and_queue(connection)
        leader = _relay(relay_db, exchange)
        assert await leader._leader() is True
        follower = _relay(relay_db, exchange)
        assert await follower._leader() is False
        assert await follower.publish_now([first]) is True
        assert await _received(queue) == ("JobAccepted", 1)

        assert await follower.flush(5) is True
        assert await _unsent(relay_db) == 0, "the event sent at once was left for the leader to send again"
        assert await leader.publish_once() == 0
        assert await queue.get(fail=False) is None
        await leader.flush(5)


async def test_events_committed_within_the_linger_go_in_one_round(relay_db: AsyncEngine, amqp_url: str) -> None:
    """At a trickle each commit woke a round of its own (a read, a publish, a marking
    transaction); a round woken by a commit first waits `linger` for the commits of the same
    moment: two events committed a moment apart are published and marked together (one
    `published_at`)."""
    job_id = uuid.uuid4()
    async with relay_db.begin() as conn:
        await conn.execute(outbox.delete())
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        exchange, queue = await _exchange_and_queue(connection)
        relay = _relay(relay_db, exchange, linger=LINGER)
        task = asyncio.create_task(relay.run())
        try:
            await wait_until(holds(lambda: relay.is_leader), 10, "the relay to lead")
            for sequence in (1, 2):
                if sequence == 2:
                    await asyncio.sleep(0.1)  # the trickle: the next commit a moment later
                async with raw.transaction(relay_db) as tx:
                    await insert_event(tx, _line(job_id, sequence))
                relay.wake()  # as the job store does after each commit
            assert [await _received(queue) for _ in range(2)] == [("LogRecorded", 1), ("LogRecorded", 2)]
            await wait_until(lambda: _unsent_is(relay_db, 0), 10, "both to be marked sent")
            async with relay_db.connect() as conn:
                marked = (await conn.execute(select(outbox.c.published_at).where(
                    outbox.c.job_id == str(job_id)))).scalars().all()
            assert len(marked) == 2 and marked[0] == marked[1], f"published in more than one round: {marked}"
        finally:
            await relay.flush(5)
            await asyncio.wait_for(task, 5)


async def _unsent_is(db: AsyncEngine, count: int) -> bool:
    return await _unsent(db) == count


async def test_events_carry_the_contracts_amqp_properties(relay_db: AsyncEngine, amqp_url: str) -> None:
    """Whether published at once or by the relay's round, an event arrives as CONTRACT.md says:
    its body as committed, `content_type=application/json`, `type` the event type,
    `message_id` the event id, its `correlation_id`, persistent, stamped with its commit time,
    routed as `job.<job_id>.<type>`."""
    job_id, first = await _first_event(relay_db)
    async with raw.transaction(relay_db) as tx:
        second = await insert_event(tx, _line(job_id, 2))
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        exchange, queue = await _exchange_and_queue(connection)
        relay = _relay(relay_db, exchange)
        assert await relay.publish_now([first]) is True
        assert await relay.publish_once() == 2
        for sent in (first, second):
            end = asyncio.get_running_loop().time() + 10
            while (message := await queue.get(fail=False)) is None:
                assert asyncio.get_running_loop().time() < end, f"{sent.event_type} did not arrive"
                await asyncio.sleep(0.02)
            await message.ack()
            assert (message.body.decode(), message.content_type, message.type, message.message_id,
                    message.correlation_id, message.delivery_mode, message.routing_key) == (
                sent.body, "application/json", sent.event_type, sent.event_id, sent.correlation_id,
                aio_pika.DeliveryMode.PERSISTENT, f"job.{job_id}.{sent.event_type}")
            assert (message.priority, message.headers) == (0, {})
            assert message.timestamp is not None
            assert abs(message.timestamp.timestamp() - sent.created_at_epoch) < 1  # AMQP keeps seconds


def test_the_relays_properties_are_the_bytes_aio_pika_would_send() -> None:
    """The relay builds an event's AMQP properties itself (`to_properties`); marshalled, they are
    what aio-pika's Message for the same event (`to_message`, as it was published before) gives."""
    event = OutboxEvent(7, str(uuid.uuid4()), str(uuid.uuid4()), "StepStarted", str(uuid.uuid4()),
                        '{"type":"StepStarted","note":"caf\u00e9"}', 1764979200.123456)
    assert to_properties(event).marshal() == to_message(event).properties.marshal()
