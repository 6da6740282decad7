"""The outbox relay: publishes committed events with publisher confirms, then marks them sent.

One relay at a time publishes (a leader lease in the database), in commit order, so each job's
events leave in `sequence` order. A crash between publish and mark publishes the event again:
consumers de-duplicate by (`job_id`, `sequence`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractExchange

from adapters.db.outbox import OutboxEvent, OutboxStore

log = logging.getLogger("failover.relay")
LEASE = "outbox-relay"


def to_message(event: OutboxEvent) -> aio_pika.Message:
    return aio_pika.Message(
        body=event.body.encode("utf-8"),
        content_type="application/json",
        type=event.event_type,
        message_id=event.event_id,
        correlation_id=event.correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=datetime.fromtimestamp(event.created_at_epoch, UTC),
    )


class OutboxRelay:
    def __init__(self, store: OutboxStore, exchange: AbstractExchange, *, batch: int, poll_seconds: float,
                 lease_seconds: float, published: Callable[[str], None] = lambda t: None) -> None:
        self.store = store
        self.exchange = exchange
        self.batch = batch
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.published = published
        self._wake = asyncio.Event()
        self._stopping = False
        self.is_leader = False
        self._lease_checked = 0.0

    def wake(self) -> None:
        """Something was committed to the outbox: publish it now rather than at the next poll."""
        self._wake.set()

    async def _leader(self) -> bool:
        now = time.monotonic()
        if now - self._lease_checked >= self.lease_seconds / 3:
            self.is_leader = await self.store.acquire_leadership(LEASE, self.lease_seconds)
            self._lease_checked = now
        return self.is_leader

    async def publish_once(self) -> int:
        """Publish one batch of unsent events; returns how many."""
        events = await self.store.unsent(self.batch)
        if not events:
            return 0
        await asyncio.gather(*(self.exchange.publish(
            to_message(e), routing_key=f"job.{e.job_id}.{e.event_type}", mandatory=True) for e in events))
        await self.store.mark_sent([e.id for e in events])
        for e in events:
            self.published(e.event_type)
        return len(events)

    async def run(self) -> None:
        while not self._stopping:
            try:
                if await self._leader() and await self.publish_once() >= self.batch:
                    continue  # more waiting: no pause
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay: publishing failed; retrying (events stay in the outbox)")
                self._lease_checked = 0.0
                await asyncio.sleep(1.0)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            except TimeoutError:
                pass

    async def flush(self, timeout: float) -> None:
        """SIGTERM: publish what is left (if leader), then give the lease up."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and self.is_leader and await self.publish_once():
                pass
        finally:
            if self.is_leader:
                await self.store.release_leadership(LEASE)
