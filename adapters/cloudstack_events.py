"""CloudStack's event bus as hints: a wait on an async job ends when CloudStack says the job is
done, not at the next poll round.

CloudStack, with its RabbitMQ event bus configured (`RabbitMQEventBus`; its `exchange` is
commonly `cloudstack-events`), publishes every async job's end to a durable topic exchange,
routing key `management-server.AsyncJobEvent.complete.<instance type>.<instance uuid>`, body the
JSON of the job's description with its `jobId` (emulators/events.py has the whole format). This
listener binds a queue of its own (exclusive, gone with the connection) to those keys and tells
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


class CloudStackEvents:
    """Tells `job_done(job_id)` of each async job CloudStack's event bus says is complete."""

    def __init__(self, exchange: str, job_done: Callable[[str], None], *,
                 seen: Callable[[str], None] = lambda outcome: None, prefetch: int = 512) -> None:
        self.exchange = exchange
        self._job_done = job_done
        self._seen = seen  # (failover_cloudstack_job_events_total: "read" or "unreadable")
        self._prefetch = prefetch

    async def start(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            # as CloudStack declares it: a durable topic exchange (declaring it first is the same)
            exchange = await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=COMPLETE)
            await queue.consume(self._on_message, no_ack=True)  # hints: a lost one costs a poll round
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        log.info("listening for CloudStack's async job events", extra={"fields": {"exchange": self.exchange}})

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
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
