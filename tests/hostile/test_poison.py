"""A delivery the service cannot handle however often it tries (here: the database refuses
every write, its schema missing) must not loop: it is retried up to the queue's delivery limit,
then dead-lettered by the consumer itself with the error in `x-failover-reason`, and the
consumer goes on with the next delivery. Real RabbitMQ, a real (empty) MariaDB database, the
real consumer and recorder, in a vhost of their own."""

from __future__ import annotations

import json

import pytest

from adapters import bus
from adapters.db.commands import CommandRecorder
from adapters.db.engine import make_engine
from consumers.commands import CommandConsumer

from .helpers import Watcher, command, private_stack, publish_raw, rabbitmqctl_available, wait_until

pytestmark = pytest.mark.skipif(not rabbitmqctl_available(), reason="needs rabbitmqctl for a private vhost")


async def test_a_delivery_that_keeps_failing_is_dead_lettered_once_with_the_error(
        database_url: str, amqp_url: str) -> None:
    async with private_stack(database_url, amqp_url, "poison", migrate=False) as stack:
        connection = await bus.connect(stack.amqp_url, name="poison-test")
        engine = make_engine(stack.database_url, pool_size=2)
        watcher: Watcher | None = None
        try:
            topology = await bus.declare(connection)
            channel = await connection.channel(publisher_confirms=True)
            queue = await bus.declare_work_queue(channel, bus.COMMANDS_QUEUE, bus.COMMANDS_EXCHANGE,
                                                 delivery_limit=3, prefetch=8)
            counted: list[tuple[str, str]] = []
            accepted: list[str] = []
            consumer = CommandConsumer(queue, topology.dlx, CommandRecorder(engine, "poison-test", 5.0),
                                       max_bytes=256 * 1024, on_accepted=lambda job_id, first: accepted.append(job_id),
                                       count=lambda t, o: counted.append((t, o)), db_outage_seconds=5)
            await consumer.start()
            watcher = await Watcher.start(stack.amqp_url)
            good = command()
            invalid = command(failover_type="tset")
            ids = [await publish_raw(watcher.channel, json.dumps(body).encode()) for body in (good, invalid)]
            for message_id in ids:
                letter = await watcher.dead_letter(message_id, timeout=30)
                assert "could not be handled in 3 deliveries" in letter.reason, letter.reason
                assert "ProgrammingError" in letter.reason or "doesn't exist" in letter.reason, letter.reason
                assert letter.reason.isascii() and len(letter.reason) <= 500
                assert "x-first-death-reason" not in letter.headers  # the consumer's, not the broker's
            # the consumer is still consuming: the next delivery gets its own answer
            unreadable = await publish_raw(watcher.channel, b"\x00garbage")
            letter = await watcher.dead_letter(unreadable)
            assert "not JSON" in letter.reason or "not UTF-8" in letter.reason

            async def drained() -> bool:
                declared = await channel.declare_queue(bus.COMMANDS_QUEUE, passive=True)
                return declared.declaration_result.message_count == 0

            await wait_until(drained, 10, "the command queue to be empty")
            assert all(len(copies) == 1 for copies in watcher.dead.values())
            assert set(watcher.dead) == {*ids, unreadable}
            assert counted == [("unknown", "dead_lettered")] * 3 and accepted == []
            await consumer.stop()
        finally:
            if watcher is not None:
                await watcher.close()
            await connection.close()
            await engine.dispose()
