"""Helpers of the hostile-input tests: raw publishing, a watcher of everything the service says
on the bus (every event, every dead letter), and private stacks (vhost + database) for the
tests that need a `serve` process to themselves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from adapters import bus as topology
from adapters.db.migrate import upgrade
from schemas.errors import InvalidEvent
from schemas.events import Event
from schemas.parsing import parse_event

REASON = topology.REASON_HEADER


@dataclass
class DeadLetter:
    message_id: str | None
    headers: dict[str, Any]
    body: bytes
    routing_key: str | None

    @property
    def reason(self) -> str:
        value = self.headers.get(REASON)
        return value.decode() if isinstance(value, bytes) else str(value or "")


@dataclass
class Watcher:
    """Everything the service publishes in one vhost: every event (a queue bound to `#` on
    `failover.events`) and every dead letter (it consumes `failover.dead`, drained at start)."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    events: dict[str, dict[int, list[Event]]] = field(default_factory=dict)  # job -> seq -> copies
    raw_events: list[tuple[str, dict[str, Any], bytes]] = field(default_factory=list)  # key, headers, body
    unparsable_events: list[bytes] = field(default_factory=list)
    dead: dict[str, list[DeadLetter]] = field(default_factory=dict)  # message_id -> copies
    dead_without_id: list[DeadLetter] = field(default_factory=list)

    @classmethod
    async def start(cls, amqp_url: str) -> Watcher:
        connection = await aio_pika.connect_robust(amqp_url, client_properties={"connection_name": "hostile-watcher"})
        declared = await topology.declare(connection)  # idempotent, as the service declares it
        await declared.channel.close()
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        watcher = cls(connection, channel)
        events = await channel.declare_queue(exclusive=True, auto_delete=True)
        await events.bind(topology.EVENTS_EXCHANGE, routing_key="#")
        dead = await channel.declare_queue(topology.DEAD_QUEUE, durable=True,
                                           arguments={"x-queue-type": "quorum"})
        await dead.purge()  # leftovers of earlier runs are not ours to judge
        await events.consume(watcher._on_event)
        await dead.consume(watcher._on_dead)
        return watcher

    async def close(self) -> None:
        await self.connection.close()

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            self.raw_events.append((message.routing_key or "", dict(message.headers or {}), message.body))
            try:
                event = parse_event(message.body)
            except InvalidEvent:
                self.unparsable_events.append(message.body)
                return
            self.events.setdefault(str(event.job_id), {}).setdefault(event.sequence, []).append(event)

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            letter = DeadLetter(message.message_id, dict(message.headers or {}), message.body, message.routing_key)
            if message.message_id:
                self.dead.setdefault(message.message_id, []).append(letter)
            else:
                self.dead_without_id.append(letter)

    def stream(self, job_id: str | uuid.UUID) -> list[Event]:
        """A job's events in sequence order, one per sequence (the first copy)."""
        by_seq = self.events.get(str(job_id), {})
        return [copies[0] for _, copies in sorted(by_seq.items())]

    def first(self, job_id: str | uuid.UUID) -> Event | None:
        """The job's event of sequence 1, if seen."""
        copies = self.events.get(str(job_id), {}).get(1)
        return copies[0] if copies else None

    async def first_event(self, job_id: str | uuid.UUID, timeout: float = 20.0) -> Event:
        async def check() -> Event | None:
            return self.first(job_id)

        return await wait_until(check, timeout, f"an event of job {job_id}")

    async def until_ended(self, job_id: str | uuid.UUID, timeout: float = 60.0) -> list[Event]:
        """The job's stream once it has its last event (JobCompleted/Failed/Cancelled/Rejected)."""
        async def ended() -> list[Event] | None:
            events = self.stream(job_id)
            ok = [e.sequence for e in events] == list(range(1, len(events) + 1))
            if ok and events and events[-1].type in ("JobCompleted", "JobFailed", "JobCancelled", "JobRejected"):
                return events
            return None

        return await wait_until(ended, timeout, f"job {job_id} to end")

    async def dead_letter(self, message_id: str, timeout: float = 20.0) -> DeadLetter:
        async def found() -> DeadLetter | None:
            copies = self.dead.get(message_id)
            return copies[0] if copies else None

        return await wait_until(found, timeout, f"message {message_id} in failover.dead")

    async def outcome(self, message_id: str, job_id: str | uuid.UUID | None, timeout: float = 20.0
                      ) -> tuple[str, Any]:
        """("dead", DeadLetter) or ("event", the job's first Event): whichever shows first."""
        async def found() -> tuple[str, Any] | None:
            if self.dead.get(message_id):
                return "dead", self.dead[message_id][0]
            first = self.first(job_id) if job_id is not None else None
            return ("event", first) if first is not None else None

        return await wait_until(found, timeout, f"an answer to message {message_id}")


async def wait_until(check: Callable[[], Awaitable[Any]], timeout: float, what: str,
                     interval: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


async def publish_raw(channel: AbstractChannel, body: bytes, *, routing_key: str = "FailoverRequested",
                      message_id: str | None = None, headers: dict[str, Any] | None = None,
                      content_type: str | None = "application/json") -> str:
    """Publish bytes to `failover.commands` as a (possibly broken) client would; its message_id."""
    message_id = message_id or str(uuid.uuid4())
    exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
    await exchange.publish(
        aio_pika.Message(body=body, content_type=content_type, message_id=message_id, headers=headers or {},
                         delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=routing_key, mandatory=True)
    return message_id


def command(**fields: Any) -> dict[str, Any]:
    """A valid FailoverRequested as a dict (fresh request_id), with `fields` changed; a field
    set to `...` is left out."""
    body: dict[str, Any] = {
        "type": "FailoverRequested", "schema_version": 1, "request_id": str(uuid.uuid4()),
        "vm_id": "4205a841-0265-f4bd-39a6-39fd92196f53", "failover_type": "test",
        "requested_by": "hostile-tests", "options": {"driver_injection": "auto"},
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- private stacks


@dataclass
class Stack:
    """A vhost and a migrated database of one's own."""

    database_url: str
    amqp_url: str
    database: str
    vhost: str


def _vhost_url(amqp_url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(amqp_url)._replace(path="/" + vhost))


def rabbitmqctl_available() -> bool:
    return shutil.which("rabbitmqctl") is not None


def rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, check=check)


@contextlib.asynccontextmanager
async def private_stack(database_url: str, amqp_url: str, suffix: str, *, migrate: bool = True
                        ) -> AsyncIterator[Stack]:
    """A fresh database `<test db>_<suffix>` (migrated, unless told not to) and vhost
    `<test vhost>-<suffix>`, so a `serve` process there is the only one consuming its commands
    and claiming its jobs. Both are removed afterwards."""
    parts = urlsplit(amqp_url)
    vhost = f"{parts.path.lstrip('/') or 'failover-test'}-{suffix}"
    user = parts.username or "guest"
    await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost, check=False)
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    parsed = make_url(database_url)
    name = f"{parsed.database}_{suffix}"
    server = create_async_engine(parsed.set(database=""))
    async with server.begin() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        await conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    url = parsed.set(database=name).render_as_string(hide_password=False)
    if migrate:
        await asyncio.to_thread(upgrade, url)
    try:
        yield Stack(url, _vhost_url(amqp_url, vhost), name, vhost)
    finally:
        async with server.begin() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        await server.dispose()
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost, check=False)


async def serving(serve: Any, timeout: float = 30.0) -> None:
    """Wait until a `serve` process has declared everything and consumes (its "serving" log
    line): /readyz answers 200 a little earlier, before the command queue exists."""
    async def logged() -> bool:
        if serve.proc is not None and serve.proc.returncode is not None:
            raise AssertionError(f"serve exited with {serve.proc.returncode}: {serve.log_tail()}")
        try:
            return '"message": "serving"' in serve.log_path.read_text(errors="replace")
        except OSError:
            return False

    await wait_until(logged, timeout, "serve to log that it is serving", interval=0.05)


@contextlib.asynccontextmanager
async def running(serve: Any) -> AsyncIterator[Any]:
    """A `ServeProcess` started (and killed if it does not get ready), serving, then stopped."""
    try:
        await serve.start()
        await serving(serve)
    except BaseException:
        await serve.kill()
        raise
    try:
        yield serve
    finally:
        await serve.stop()

