"""CloudStack's event bus as hints (adapters/cloudstack_events.py), against the CloudStack
emulator publishing each async job's end on the real broker as CloudStack's RabbitMQ event bus
does (emulators/events.py): a wait ends when the event comes, not at the next poll round, and
its result is still CloudStack's own answer. The poller's side (`poke`) also on its own, with
stand-in polls: a poke before the wait began, and a poke whose ask fails."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from adapters import bus
from adapters.cloudstack_events import CloudStackEvents
from adapters.poller import SharedPoller
from emulators.client import EmulatorControl
from emulators.events import EventBus
from emulators.runner import EmulatorHandle
from statemachine.errors import TransientError

from ..helpers import emulated_event_bus, wait_until
from ..test_intake_default import _close_connection_named
from .conftest import CloudStackFactory

SLOW_ROUNDS = 30.0  # a poll interval no wait in these tests lives to see


@pytest.fixture
async def event_bus(emu: EmulatorHandle, amqp_url: str) -> AsyncIterator[EventBus]:
    async with emulated_event_bus(emu, amqp_url) as published:
        yield published


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[Any]:
    conn = await bus.connect(amqp_url, name="cloudstack events tests")
    try:
        yield conn
    finally:
        await conn.close()


async def test_a_wait_ends_when_cloudstack_says_its_job_is_done(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl,
        event_bus: EventBus, connection: Any) -> None:
    cs = make_cloudstack(poll_interval=SLOW_ROUNDS)
    seen: list[str] = []
    await CloudStackEvents(event_bus.exchange_name, cs.job_done, queue=_queue(), seen=seen.append).start(connection)
    volume = str((await control.create_volume("disk", 10, vm_id=emu.appliance_vm_id))["id"])
    await control.set_latency(async_job_seconds=0.3)
    started = await cs.create_snapshot(volume, "snap")
    began = time.monotonic()
    result = await asyncio.wait_for(cs.wait_job(started.job_id, timeout=60), 10)
    assert time.monotonic() - began < 5, "the wait lasted into the poll rounds"
    # CloudStack's own answer, read after the event
    assert result["snapshot"]["id"] == started.resource_id and result["snapshot"]["state"] == "BackedUp"
    assert cs.waits_ended_by_events == 1 and seen == ["read"]
    queries = await control.calls(api="cloudstack", command="queryAsyncJobResult")
    assert len(queries) == 2  # its first ask, then the one the event brought forward


def _queue() -> str:
    return f"failover.cloudstack-events.test-{uuid.uuid4().hex[:8]}"


async def test_the_listener_is_back_after_its_broker_connection_was_lost(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl,
        event_bus: EventBus, amqp_url: str) -> None:
    """Its connection closed under it (an operator, a network fault): once aio-pika has
    connected again, the listener's queue, binding and consumer are back, and a wait ends on
    its event again."""
    name = f"cloudstack events reconnect {uuid.uuid4().hex[:8]}"
    conn = await bus.connect(amqp_url, name=name)
    try:
        cs = make_cloudstack(poll_interval=SLOW_ROUNDS)
        seen: list[str] = []
        await CloudStackEvents(event_bus.exchange_name, cs.job_done, queue=_queue(), seen=seen.append).start(conn)
        assert await asyncio.to_thread(_close_connection_named, name) == 1

        async def back() -> bool:
            return not conn.is_closed and conn.connected.is_set() and len(await asyncio.to_thread(
                _connections_named, name)) == 1

        await wait_until(back, 30, "the listener's connection to be back", interval=0.2)
        volume = str((await control.create_volume("disk", 10, vm_id=emu.appliance_vm_id))["id"])
        await control.set_latency(async_job_seconds=0.3)
        started = await cs.create_snapshot(volume, "after the reconnect")
        result = await asyncio.wait_for(cs.wait_job(started.job_id, timeout=60), 10)
        assert result["snapshot"]["id"] == started.resource_id and seen == ["read"]
        assert cs.waits_ended_by_events == 1
    finally:
        await conn.close()


def _connections_named(name: str) -> list[str]:
    listed = subprocess.run(["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split("\t", 1)[0] for line in listed.splitlines() if f'"{name}"' in line]


async def test_the_emulated_event_is_cloudstacks(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl,
        event_bus: EventBus, connection: Any) -> None:
    """Routing key and body as CloudStack's RabbitMQ event bus publishes them."""
    channel = await connection.channel()
    exchange = await channel.declare_exchange(event_bus.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="#")
    cs = make_cloudstack()
    volume = str((await control.create_volume("disk", 10, vm_id=emu.appliance_vm_id))["id"])
    started = await cs.create_snapshot(volume, "snap")
    await cs.wait_job(started.job_id, timeout=10)
    message = await _next(queue)
    assert message.routing_key == f"management-server.AsyncJobEvent.complete.Snapshot.{started.resource_id}"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    body = json.loads(message.body)
    assert body["jobId"] == started.job_id and body["status"] == "SUCCEEDED"
    assert body["commandEventType"] == "SNAPSHOT.CREATE" and body["instanceType"] == "Snapshot"
    assert body["instanceUuid"] == started.resource_id and body["resultCode"] == "0"
    assert all(isinstance(v, str) for k, v in body.items() if k not in ("jobResult", "cmdInfo")), body
    assert body["jobResult"]["snapshot"]["id"] == started.resource_id
    await channel.close()


async def _next(queue: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            return message
        await asyncio.sleep(0.02)
    raise AssertionError("no event published within 10 s")


async def test_events_without_a_readable_job_id_are_counted_and_ignored(
        make_cloudstack: CloudStackFactory, connection: Any) -> None:
    name = f"cloudstack-events-{uuid.uuid4().hex[:8]}"
    seen: list[str] = []
    done: list[str] = []
    await CloudStackEvents(name, done.append, queue=_queue(), seen=seen.append).start(connection)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    key = "management-server.AsyncJobEvent.complete.*.*"
    for raw in (b"not json", b"[1, 2]", b'{"status": "SUCCEEDED"}', json.dumps({"jobId": "j-1"}).encode()):
        await exchange.publish(aio_pika.Message(raw), routing_key=key)

    async def all_seen() -> bool:
        return len(seen) == 4

    await wait_until(all_seen, 10, "the four events")
    assert seen == ["unreadable", "unreadable", "unreadable", "read"] and done == ["j-1"]
    await exchange.delete()
    await channel.close()


async def test_a_poke_before_its_wait_began_is_asked_about_at_once() -> None:
    asked: list[str] = []

    async def poll_one(key: str) -> str | None:
        asked.append(key)
        return f"result of {key}"

    async def poll_many(keys: Any) -> dict[str, Any]:
        return {}

    poller: SharedPoller[str] = SharedPoller(SLOW_ROUNDS, 8, poll_one, poll_many)
    poller.poke("job-1")  # (its job ended before anyone waited on it)
    result = await asyncio.wait_for(poller.wait("job-1", 60, lambda: TimeoutError()), 5)
    assert result == "result of job-1" and asked == ["job-1"] and poller.pokes_settled == 1


async def test_a_poke_whose_ask_fails_leaves_the_wait_to_the_rounds() -> None:
    """A hint's ask that fails (or finds the work still running) is not the wait's outcome."""
    answers: list[str | Exception | None] = [TransientError("CS_DOWN", "unreachable"), None, "done"]

    async def poll_one(key: str) -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def poll_many(keys: Any) -> dict[str, Any]:
        return {}

    poller: SharedPoller[str] = SharedPoller(0.2, 8, poll_one, poll_many)
    waiting = asyncio.create_task(poller.wait("job-1", 60, lambda: TimeoutError()))
    await asyncio.sleep(0)  # (the wait has begun)
    poller.poke("job-1")  # its ask fails
    poller.poke("job-1")  # (while one is under way, no second ask)
    result = await asyncio.wait_for(waiting, 5)
    assert result == "done" and poller.pokes_settled == 0 and answers == []
