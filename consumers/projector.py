"""The projector: folds events from `failover.events` into job_tracking, job_steps and
log_events, a batch per transaction, idempotent by (`job_id`, `sequence`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from adapters.db.projections import Projections
from schemas.events import Event
from schemas.parsing import parse_event

log = logging.getLogger("failover.projector")


class Projector:
    def __init__(self, queue: AbstractQueue, projections: Projections, *, batch: int,
                 observe: Callable[[int, int, list[float]], None] = lambda a, d, lags: None) -> None:
        self.queue = queue
        self.projections = projections
        self.batch = batch
        self.observe = observe
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: str | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="projector")
        self._tag = await self.queue.consume(self._buffer.put)

    async def stop(self) -> None:
        if self._tag is not None:
            await self.queue.cancel(self._tag)
            self._tag = None
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            messages = [await self._buffer.get()]
            while len(messages) < self.batch and not self._buffer.empty():
                messages.append(self._buffer.get_nowait())
            events: list[Event] = []
            good: list[AbstractIncomingMessage] = []
            for m in messages:
                try:
                    events.append(parse_event(m.body))
                    good.append(m)
                except Exception as exc:  # not ours to fold: park it in failover.dead
                    log.warning("projector: unreadable event dead-lettered: %s", exc)
                    await m.reject(requeue=False)
            while True:
                try:
                    applied, dupes = await self.projections.apply(events)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("projector: applying %d events failed; retrying", len(events))
                    await asyncio.sleep(1.0)
            now = time.time()
            self.observe(applied, dupes, [now - e.occurred_at.timestamp() for e in events])
            for m in good:
                await m.ack()
