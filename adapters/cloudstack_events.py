"""CloudStack's event bus as hints: a wait on an async job ends when CloudStack says the job is
done, not at the next poll round.

CloudStack, with its RabbitMQ event bus configured (`RabbitMQEventBus`; its `exchange` is
commonly `cloudstack-events`), publishes every async job's end to a durable topic exchange,
routing key `management-server.AsyncJobEvent.complete.<instance type>.<instance uuid>`, body the
JSON of the job's description with its `jobId` (emulators/events.py has the whole format). This
listener binds a queue of its own (named after its serve, gone a minute after it) to those keys and tells
the CloudStack adapter each `jobId`; the adapter's poller then asks about that job at once
(adapters/poller.py, `poke`).

The events are hints and nothing more: the job's result is still read from CloudStack
(`queryAsyncJobResult`), and the poll rounds go on for every wait, so an event lost, late or
never sent (the bus not configured, the broker down, another management server's) costs a
round's delay, never a wrong result. An event for a job nobody here waits on (other accounts'
jobs share the exchange) is dropped at the cost of reading its `jobId`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

log = logging.getLogger("failover.adapters")

COMPLETE = "management-server.AsyncJobEvent.complete.*.*"
MAX_BODY = 4 * 1024 * 1024  # a job's description carries its result: a large one is read no further
# the listener's queue: gone a minute after its serve (nobody consuming), and never longer than
# this many events (the oldest dropped: every account's jobs go through the exchange)
QUEUE_EXPIRES_MS = 60_000
QUEUE_MAX_EVENTS = 10_000


class CloudStackEvents:
    """Tells `job_done(job_id)` of each async job CloudStack's event bus says is complete."""

    def __init__(self, exchange: str, job_done: Callable[[str], None], *, queue: str,
                 seen: Callable[[str], None] = lambda outcome: None, prefetch: int = 256) -> None:
        self.exchange = exchange
        self.queue_name = queue  # one per serve process (its owner id in it)
        self._job_done = job_done
        self._seen = seen  # (failover_cloudstack_job_events_total: "read" or "unreadable")
        self._prefetch = prefetch
        # held here: a robust connection keeps its channels only weakly, and restores after a
        # reconnect what is still alive (the channel, the queue, its binding and its consumer)
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._queue: aio_pika.abc.AbstractRobustQueue | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            # as CloudStack declares it: a durable topic exchange (declaring it first is the same)
            exchange = await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            # named, not exclusive: declared again as it is after a reconnect, even while the
            # broker still holds the old connection; gone a minute after nobody consumes it
            queue = await channel.declare_queue(self.queue_name, durable=False, arguments={
                "x-expires": QUEUE_EXPIRES_MS, "x-max-length": QUEUE_MAX_EVENTS, "x-overflow": "drop-head"})
            await queue.bind(exchange, routing_key=COMPLETE)
            await queue.consume(self._on_message)  # acked: at most `prefetch` unread in this process
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        self._channel, self._queue = channel, queue
        log.info("listening for CloudStack's async job events", extra={"fields": {"exchange": self.exchange}})

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()  # (a hint: handled or not, it is not asked for again)
        job_id = None
        if len(message.body) <= MAX_BODY:
            try:
                job_id = json.loads(message.body).get("jobId")
            except (ValueError, AttributeError):
                job_id = None
        if not isinstance(job_id, str) or not job_id:
            self._seen("unreadable")
            log.debug("an event on %s without a readable jobId (routing key %s); ignored", self.exchange,
                      message.routing_key)
            return
        self._seen("read")
        self._job_done(job_id)
