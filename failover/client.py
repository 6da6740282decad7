"""A client of the service, as any other program would be: commands go to the bus, events come
from the bus, reads go to the read models. Used by `failoverctl`, the demo and the tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from pydantic import BaseModel

from adapters.bus import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from schemas.errors import InvalidEvent
from schemas.events import Event
from schemas.parsing import parse_event

TERMINAL = {"JobCompleted", "JobFailed", "JobCancelled", "JobRejected"}


class BusClient:
    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[BusClient]:
        connection = await aio_pika.connect(url, client_properties={"connection_name": "failoverctl"})
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            # declared as the service declares it, so a client may publish first
            await channel.declare_exchange(COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            yield cls(connection, channel)
        finally:
            await connection.close()

    async def publish(self, command: BaseModel) -> None:
        """Publish a command (persistent, confirmed; routing key = its type)."""
        data: dict[str, Any] = command.model_dump(mode="json")
        await self.publish_raw(command.model_dump_json().encode(), routing_key=data["type"],
                               correlation_id=str(data["request_id"]), message_type=data["type"])

    async def publish_raw(self, body: bytes, *, routing_key: str, correlation_id: str | None = None,
                          message_type: str | None = None) -> None:
        exchange = await self.channel.get_exchange(COMMANDS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(body=body, content_type="application/json", type=message_type,
                             message_id=str(uuid.uuid4()), correlation_id=correlation_id,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT, timestamp=datetime.now(UTC)),
            routing_key=routing_key, mandatory=True)

    async def bind(self, pattern: str) -> AbstractQueue:
        """A private queue on `failover.events` (bind before publishing to miss nothing)."""
        queue = await self.private_queue()
        await queue.bind(EVENTS_EXCHANGE, routing_key=pattern)
        return queue

    async def private_queue(self) -> AbstractQueue:
        """A queue of this connection's own, bound to nothing yet (gone with the connection)."""
        return await self.channel.declare_queue(exclusive=True, auto_delete=True)

    async def events(self, queue: AbstractQueue, *, until_terminal: bool = True,
                     timeout: float | None = None, after: dict[str, int] | None = None) -> AsyncGenerator[Event, None]:
        """Events in `sequence` order per job, without duplicates, until a job's last event.

        A job's stream starts after `after[job_id]` when given, else at the first event seen
        (a client that bound before publishing sees sequence 1 first; one that joins a running
        job, or a rollback retry's continuation, starts where it joined)."""
        seen: dict[str, int] = dict(after or {})
        held: dict[str, dict[int, Event]] = {}
        async with queue.iterator(timeout=timeout) as it:
            async for message in it:
                async with message.process():
                    try:
                        event = parse_event(message.body)
                    except InvalidEvent:
                        continue
                key = str(event.job_id)
                seen.setdefault(key, event.sequence - 1)
                nxt = seen[key] + 1
                if event.sequence < nxt:
                    continue
                held.setdefault(key, {})[event.sequence] = event
                while nxt in held[key]:
                    ready = held[key].pop(nxt)
                    seen[key] = nxt
                    nxt += 1
                    yield ready
                    if until_terminal and ready.type in TERMINAL and not held[key]:
                        return


async def wait_for(queue: AbstractQueue, client: BusClient, *, timeout: float) -> list[Event]:
    """All events of a job until its last one (raises TimeoutError after `timeout`)."""
    out: list[Event] = []

    async def collect() -> None:
        async for event in client.events(queue):
            out.append(event)

    await asyncio.wait_for(collect(), timeout)
    return out
