"""The bench's client side: seeding VMs, publishing commands as any client does, and timing
the events that come back on the bus (without parsing their bodies, to stay light)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.bus import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from emulators.client import EmulatorControl
from failover.seed import SeededVm, seed_vm
from schemas.commands import FailoverRequested

from .infra import BenchError

TERMINAL = ("JobCompleted", "JobFailed", "JobCancelled", "JobRejected")
LINUX = "rhel8_64Guest"


async def seed_vms(engine: AsyncEngine, control_url: str, appliance_vm_id: str, count: int, *,
                   prefix: str, disks: int = 2, os_type: str = LINUX, concurrency: int = 16) -> list[SeededVm]:
    """`count` replicated VMs (each `disks` volumes on the appliance, and its platform rows)."""
    sem = asyncio.Semaphore(concurrency)
    async with EmulatorControl(control_url) as control:
        async def one(i: int) -> SeededVm:
            async with sem:
                return await seed_vm(engine, control, appliance_vm_id, vm_name=f"{prefix}-{i:05d}",
                                     os_type=os_type, disks=disks, cpu_count=2, memory_mb=2048)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


@dataclass
class Timings:
    """When each request was published and when each watched event was first seen."""

    published: dict[str, float] = field(default_factory=dict)  # request_id -> time.time()
    seen: dict[str, dict[str, float]] = field(default_factory=dict)  # job_id -> {event type: time}
    terminal: dict[str, str] = field(default_factory=dict)  # job_id -> terminal event type
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0

    def latencies(self, event_type: str) -> list[float]:
        out = []
        for rid, t0 in self.published.items():
            t = self.seen.get(rid, {}).get(event_type)
            if t is not None:
                out.append(t - t0)
        return out


class Client:
    """A confirming publisher on `failover.commands` and a private queue on `failover.events`
    bound to the events it times (JobAccepted and the terminal ones)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> Client:
        self.connection = await aio_pika.connect(self.url, client_properties={"connection_name": "bench-client"})
        self.pub = await self.connection.channel(publisher_confirms=True)
        self.commands = await self.pub.declare_exchange(COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        self.sub = await self.connection.channel()
        await self.sub.set_qos(prefetch_count=2000)
        events = await self.sub.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        self.queue = await self.sub.declare_queue(exclusive=True, auto_delete=True)
        for kind in ("JobAccepted", *TERMINAL):
            await self.queue.bind(events, routing_key=f"job.*.{kind}")
        self.timings = Timings()
        self._tag = await self.queue.consume(self._on_event, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    def reset(self, expected: int) -> Timings:
        self.timings = Timings(expected=expected)
        return self.timings

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        now = time.time()
        parts = (message.routing_key or "").split(".")
        if len(parts) != 3:
            return
        job_id, kind = parts[1], parts[2]
        t = self.timings
        seen = t.seen.setdefault(job_id, {})
        seen.setdefault(kind, now)
        if kind in TERMINAL and job_id in t.published and job_id not in t.terminal:
            t.terminal[job_id] = kind
            if len(t.terminal) >= t.expected:
                t.done.set()

    @staticmethod
    def failover_body(vm_id: str) -> tuple[str, bytes]:
        rid = uuid.uuid4()
        cmd = FailoverRequested(request_id=rid, vm_id=vm_id, failover_type="test", requested_by="bench",
                                options={"driver_injection": "auto"})
        return str(rid), cmd.model_dump_json().encode()

    async def publish(self, rid: str, body: bytes) -> None:
        self.timings.published[rid] = time.time()
        await self.commands.publish(
            aio_pika.Message(body=body, content_type="application/json", type="FailoverRequested",
                             message_id=str(uuid.uuid4()), correlation_id=rid,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="FailoverRequested")

    async def burst(self, vm_ids: list[str]) -> Timings:
        """Publish one test failover per VM, all at once."""
        bodies = [self.failover_body(v) for v in vm_ids]
        t = self.reset(len(bodies))
        await asyncio.gather(*(self.publish(rid, body) for rid, body in bodies))
        return t

    async def paced(self, vm_ids: list[str], rate: float) -> Timings:
        """Publish one test failover per VM at `rate` per second (absolute schedule, no drift)."""
        bodies = [self.failover_body(v) for v in vm_ids]
        t = self.reset(len(bodies))
        start = time.monotonic()
        tasks = []
        for i, (rid, body) in enumerate(bodies):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.publish(rid, body)))
        await asyncio.gather(*tasks)
        return t

    async def wait_all(self, timings: Timings, timeout: float, what: str) -> None:
        try:
            await asyncio.wait_for(timings.done.wait(), timeout)
        except TimeoutError:
            raise BenchError(f"{what}: only {len(timings.terminal)} of {timings.expected} jobs ended "
                             f"within {timeout:.0f} s") from None


def summarize(timings: Timings) -> dict[str, Any]:
    """Wall time from the first publish to the last terminal event, outcomes, latencies."""
    if not timings.published:
        return {}
    first = min(timings.published.values())
    ends = [timings.seen[j][k] for j, k in timings.terminal.items()]
    outcomes: dict[str, int] = {}
    for kind in timings.terminal.values():
        outcomes[kind] = outcomes.get(kind, 0) + 1
    return {"first_publish": first, "last_end": max(ends) if ends else None,
            "wall_seconds": (max(ends) - first) if ends else None, "outcomes": outcomes,
            "publish_seconds": max(timings.published.values()) - first}


def require_all_completed(timings: Timings, what: str) -> None:
    bad = {j: k for j, k in timings.terminal.items() if k != "JobCompleted"}
    if bad:
        sample = list(bad.items())[:5]
        raise BenchError(f"{what}: {len(bad)} job(s) did not complete, e.g. {sample}")
