"""RabbitMQ: the connection and the contract's topology, declared idempotently at start-up.

Commands land in a quorum queue with a dead-letter exchange and a delivery limit, so a message
that keeps failing ends in `failover.dead` instead of looping. Events leave through a channel
with publisher confirms and `on_return_raises`, so an unroutable or unconfirmed publish is an
error, never a silent loss.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url

from adapters import amqp_decoding

COMMANDS_EXCHANGE = "failover.commands"
EVENTS_EXCHANGE = "failover.events"
DLX_EXCHANGE = "failover.dlx"
DEAD_QUEUE = "failover.dead"
COMMANDS_QUEUE = "failover.commands"
PROJECTOR_QUEUE = "failover.projector"
REASON_HEADER = "x-failover-reason"


# aiormq queues a connection's outgoing frames in a queue of 10, and a publisher holds its
# channel's lock while it waits for room there: a batch of publishes then leaves one message
# per event-loop turn, which in a process busy with many jobs is tens of milliseconds each (the
# outbox relay fell 15-30 s behind under load). With room for a whole relay batch (at most
# FAILOVER_OUTBOX_BATCH events, three frames each) it leaves in a few turns. Bounded memory:
# nothing else publishes in bulk.
FRAME_BUFFER_SIZE = 4096
aiormq.Connection.FRAME_BUFFER_SIZE = max(aiormq.Connection.FRAME_BUFFER_SIZE, FRAME_BUFFER_SIZE)


async def connect(url: str, *, ca_file: str | None = None, name: str = "failover") -> AbstractRobustConnection:
    """A robust connection (it reconnects and restores its channels, queues and consumers)."""
    amqp_decoding.install()  # a hostile header must not take the connection down (see there)
    ssl_context = ssl.create_default_context(cafile=ca_file) if url.startswith("amqps://") else None
    # connect_robust, but a first connect that fails closes what it opened: aio-pika's drops it
    # unclosed, and its finalizer then schedules a close, or leaves a coroutine never awaited
    connection = aio_pika.RobustConnection(make_url(url), client_properties={"connection_name": name},
                                           ssl_context=ssl_context)
    try:
        await connection.connect()
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return connection


@dataclass
class Topology:
    """References to what was declared. Kept by the caller: robust objects are restored on
    reconnect only while someone holds them."""

    channel: AbstractRobustChannel
    commands: AbstractExchange
    events: AbstractExchange
    dlx: AbstractExchange
    dead: AbstractQueue


async def declare(connection: AbstractRobustConnection) -> Topology:
    """Declare the exchanges and the dead-letter queue; returns a confirming channel."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    commands = await channel.declare_exchange(COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(DLX_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    await dead.bind(dlx, routing_key="#")
    return Topology(channel=channel, commands=commands, events=events, dlx=dlx, dead=dead)


async def declare_work_queue(channel: AbstractRobustChannel, name: str, exchange: str, *,
                             delivery_limit: int, prefetch: int) -> AbstractQueue:
    """A durable quorum queue bound with `#`, dead-lettering to `failover.dlx`."""
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(name, durable=True, arguments={
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DLX_EXCHANGE,
        "x-delivery-limit": delivery_limit,
    })
    await queue.bind(exchange, routing_key="#")
    return queue
