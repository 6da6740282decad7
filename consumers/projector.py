"""The projector: folds events from `failover.events` into job_tracking, job_steps and
log_events, a batch per transaction, idempotent by (`job_id`, `sequence`).

A delivery is acked only after its event is applied (or found already applied). While the
database is unreachable the batch is retried, with growing pauses, and nothing is acked: the
deliveries wait in the queue. A batch that keeps failing for another reason is applied event
by event, so one event that cannot be applied (it goes to `failover.dead`) never holds up the
others. A delivery received before a broker reconnect cannot be acked any more: the broker
delivers it again, and the second application is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from adapters.db.engine import is_connection_error
from adapters.db.projections import Projections
from schemas.events import Event
from schemas.parsing import parse_event

log = logging.getLogger("failover.projector")
BATCH_TRIES = 3  # tries of a whole batch failing for a reason other than the connection


class Projector:
    def __init__(self, queue: AbstractQueue, projections: Projections, *, batch: int,
                 observe: Callable[[int, int, list[float]], None] = lambda a, d, lags: None,
                 linger: float = 0.0) -> None:
        self.queue = queue
        self.projections = projections
        self.batch = batch
        # after a batch smaller than `batch`, how long the next waits for more deliveries: at a
        # steady trickle each event was a transaction of its own (see FAILOVER_PROJECTOR_LINGER_SECONDS)
        self.linger = linger
        self.observe = observe
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: str | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="projector")
        self._tag = await self.queue.consume(self._buffer.put)

    async def stop(self) -> None:
        if self._tag is not None:
            with contextlib.suppress(Exception):  # the broker may be gone: the consumer goes with it
                await self.queue.cancel(self._tag)
            self._tag = None
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _work(self) -> None:
        full = True  # the last batch was full: more are waiting, no pause
        while True:
            messages = [await self._buffer.get()]
            if self.linger and not full and self._buffer.qsize() < self.batch - 1:
                await asyncio.sleep(self.linger)  # let the trickle gather into one transaction
            while len(messages) < self.batch and not self._buffer.empty():
                messages.append(self._buffer.get_nowait())
            full = len(messages) >= self.batch
            try:
                await self._handle(messages)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the worker die: the deliveries come again
                log.exception("projector: a batch of %d deliveries could not be handled; requeued", len(messages))
                # settled now: the next batch's one `multiple` ack would otherwise ack them unapplied
                for m in messages:
                    if not m.processed:
                        await _settle(m.nack(requeue=True))
                await asyncio.sleep(1.0)

    async def _handle(self, messages: list[AbstractIncomingMessage]) -> None:
        events: list[Event] = []
        good: list[AbstractIncomingMessage] = []
        for m in messages:
            try:
                events.append(parse_event(m.body))
                good.append(m)
            except Exception as exc:  # not ours to fold: park it in failover.dead
                log.warning("projector: unreadable event dead-lettered: %s", exc)
                await _settle(m.reject(requeue=False))
        if not events:
            return
        applied, dupes = await self._apply_batch(events, good)  # settled: acked or dead-lettered
        now = time.time()
        try:
            self.observe(applied, dupes, [now - e.occurred_at.timestamp() for e in events])
        except Exception:  # metrics only: the batch stays settled (a nack now would be refused)
            log.exception("projector: recording the batch's metrics failed")

    async def _apply_batch(self, events: list[Event], messages: list[AbstractIncomingMessage]) -> tuple[int, int]:
        pause, tries, races = 0.2, 0, 0
        while True:
            try:
                applied, dupes = await self.projections.apply(events)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _unreachable(exc):
                    log.warning("projector: the database is unreachable (%s); retrying %d events in %.1f s",
                                type(exc).__name__, len(events), pause)
                elif _duplicate(exc) and races < 10:
                    # another projector applied some of these events at the same moment: the
                    # next try sees them as applied
                    races += 1
                    await asyncio.sleep(0.01 * races)
                    continue
                else:
                    tries += 1
                    log.warning("projector: applying %d events failed (%s: %s), try %d of %d", len(events),
                                type(exc).__name__, exc, tries, BATCH_TRIES)
                    if tries >= BATCH_TRIES:
                        return await self._one_by_one(events, messages)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
        await _ack_all(messages)
        return applied, dupes

    async def _one_by_one(self, events: list[Event], messages: list[AbstractIncomingMessage]) -> tuple[int, int]:
        applied = dupes = 0
        for event, message in zip(events, messages, strict=True):
            pause, races = 0.2, 0
            while True:
                try:
                    a, d = await self.projections.apply([event])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if _duplicate(exc) and races < 10:
                        races += 1
                        await asyncio.sleep(0.01 * races)
                        continue
                    if _unreachable(exc):
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, 5.0)
                        continue
                    log.error("projector: event %s (job %s, sequence %d) cannot be applied (%s: %s); "
                              "dead-lettered to failover.dead", event.type, event.job_id, event.sequence,
                              type(exc).__name__, exc)
                    await _settle(message.reject(requeue=False))
                    break
                applied, dupes = applied + a, dupes + d
                await _settle(message.ack())
                break
        return applied, dupes


def _duplicate(exc: BaseException) -> bool:
    code = getattr(getattr(exc, "orig", None), "args", (None,))
    return bool(code) and code[0] == 1062


def _unreachable(exc: BaseException) -> bool:
    """The database could not be reached (worth waiting for without limit), as opposed to a
    refusal of these events (a deadlock, bad data), which is retried a few times only."""
    if not is_connection_error(exc):
        return False
    code = getattr(getattr(exc, "orig", None), "args", (None,))
    code = code[0] if code else None
    return not isinstance(code, int) or code in (1040, 1053, 1927, 2002, 2003, 2005, 2006, 2013)


async def _ack_all(messages: list[AbstractIncomingMessage]) -> None:
    """Ack a batch with one frame: `multiple` acks every delivery of the channel up to the last
    one, and every earlier delivery is in this batch or an earlier one, all settled already (one
    worker, deliveries in order). A batch that spans a reconnect (two channels) is acked one by
    one: the old channel's deliveries come again anyway."""
    last = messages[-1]
    if all(m.channel is last.channel for m in messages):
        await _settle(last.ack(multiple=True))
    else:
        for m in messages:
            await _settle(m.ack())


async def _settle(call: object) -> None:
    """Ack / reject a delivery; one from before a broker reconnect cannot be settled any more
    (the broker requeued it when the old channel closed): ignore that."""
    try:
        await call  # type: ignore[misc]
    except Exception as exc:
        log.debug("projector: could not settle a delivery (%s); the broker delivers it again", exc)
