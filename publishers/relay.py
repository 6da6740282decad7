"""The outbox relay: publishes committed events with publisher confirms, then marks them sent.

One relay at a time publishes (a leader lease in the database), in commit order, so each job's
events leave in `sequence` order. A crash between publish and mark publishes the event again:
consumers de-duplicate by (`job_id`, `sequence`).

The first event of a new stream (`JobAccepted`, `JobRejected`) does not wait for its turn:
`publish_now` sends it as soon as its transaction commits, so a client hears back in one round
trip however long the queue of other jobs' events is. Nothing of its job can be in the outbox
before it, and its job starts only once `publish_now` is done (the runner holds it until then),
so the order of every job's events holds; until the relay marks it sent (with its next batch,
or at the drain when another relay leads) the relay skips it. Should the publish fail, the
event is left to the relay like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange

from adapters.db.outbox import OutboxEvent, OutboxStore

log = logging.getLogger("failover.relay")
LEASE = "outbox-relay"


class PublishFailed(Exception):
    """Some events of a batch were not confirmed: they are published again."""


def to_properties(event: OutboxEvent) -> aiormq.spec.Basic.Properties:
    """The AMQP properties `to_message(event)` is published with, built directly: aio-pika's
    Message guards every attribute it sets, and making one to read its properties back was
    23 us of the relay's CPU per event (2.6% of serve's in a burst) against 2.5 us."""
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        message_type=event.event_type,
        message_id=event.event_id,
        correlation_id=event.correlation_id,
        delivery_mode=2,  # persistent
        priority=0,  # (aio-pika's Message sends its default too)
        timestamp=datetime.fromtimestamp(event.created_at_epoch, UTC),
        headers={},
    )


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
                 lease_seconds: float, published: Callable[[str], None] = lambda t: None,
                 confirm_timeout: float = 30.0, linger: float = 0.0) -> None:
        self.store = store
        self.exchange = exchange
        self.batch = batch
        self.poll_seconds = poll_seconds
        # woken by a commit after a round that was not full, how long to wait for more commits
        # before reading: at a steady trickle every commit woke a round of its own (a read, a
        # publish, a marking transaction per event or two; see FAILOVER_OUTBOX_LINGER_SECONDS)
        self.linger = linger
        self.lease_seconds = lease_seconds
        self.published = published
        self.confirm_timeout = confirm_timeout
        self._wake = asyncio.Event()
        self._stopping = False
        self.is_leader = False
        self._lease_checked = 0.0
        self._running: asyncio.Task[None] | None = None
        self._direct: set[int] = set()  # outbox ids publish_now is sending or has sent: skipped
        self._direct_sent: list[int] = []  # ... confirmed: marked sent with the next batch
        self._direct_calls = 0  # publish_now calls under way
        self._direct_idle = asyncio.Event()  # set while there are none
        self._direct_idle.set()
        self._held_elsewhere: Counter[str] = Counter()  # jobs whose first events the intake process publishes

    def wake(self) -> None:
        """Something was committed to the outbox: publish it now rather than at the next poll."""
        self._wake.set()

    async def _leader(self) -> bool:
        now = time.monotonic()
        if now - self._lease_checked >= self.lease_seconds / 3:
            self.is_leader = False  # until the database says otherwise
            self.is_leader = await self.store.acquire_leadership(LEASE, self.lease_seconds)
            self._lease_checked = now  # counted from before the call: conservative
        return self.is_leader

    async def publish_now(self, events: Collection[OutboxEvent]) -> bool:
        """Publish events that need not wait for the relay's queue (the first event of a new
        stream: no earlier event of its job exists), now, with confirms. True once all are
        confirmed; on any failure False, and the relay publishes them in its turn. Never raises
        (but for a cancel): the events are committed, so they go out either way."""
        if not events:
            return True
        ids = [e.id for e in events]
        self._direct.update(ids)
        self._direct_calls += 1
        self._direct_idle.clear()
        try:
            return await self._publish_now(events, ids)
        finally:
            self._direct_calls -= 1
            if not self._direct_calls:
                self._direct_idle.set()

    async def publish_events(self, events: Collection[OutboxEvent]) -> list[BaseException | None]:
        """Publish `events` now, with confirms, without any of the relay's bookkeeping: each
        one's error, or None once confirmed (the intake process's publish, failover/intake.py)."""
        try:
            return await self._publish_all(await self._channel(), events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return [exc] * len(events)

    def sending_elsewhere(self, ids: Collection[int]) -> None:
        """Another process of this `serve` (its intake process) is publishing these committed
        events at once, as `publish_now` would: skip them until `sent_elsewhere` or
        `unsent_elsewhere` says how it went."""
        self._direct.update(ids)
        self.wake()  # (as a commit's wake: the round marks what was sent meanwhile)

    def hold_elsewhere(self, job_id: str) -> None:
        """The intake process is recording a command for `job_id` (its request_id): the first
        events that commit writes are its to publish, so none of this job's events is read
        here until `release_elsewhere`. (Its `sending` line comes only after the commit, and a
        round reading the outbox in between would publish the event a second time.)"""
        self._held_elsewhere[job_id] += 1

    def release_elsewhere(self, job_id: str) -> None:
        left = self._held_elsewhere[job_id] - 1
        if left > 0:
            self._held_elsewhere[job_id] = left
        else:
            self._held_elsewhere.pop(job_id, None)
            self.wake()  # what was not confirmed over there goes now

    def release_all_elsewhere(self) -> Counter[str]:
        """The intake process is gone: every hold ends (returned, to end them in the runner too)."""
        held, self._held_elsewhere = self._held_elsewhere, Counter()
        if held:
            self.wake()
        return held

    def sent_elsewhere(self, events: Collection[tuple[int, str]]) -> None:
        """(outbox id, event type) confirmed by the broker: marked sent with the next round."""
        for event_id, event_type in events:
            self._direct_sent.append(event_id)
            self.published(event_type)

    def unsent_elsewhere(self, ids: Collection[int]) -> None:
        """Not confirmed (or the process publishing them is gone): the relay's now."""
        if ids:
            self._direct.difference_update(ids)
            self.wake()

    async def _publish_now(self, events: Collection[OutboxEvent], ids: list[int]) -> bool:
        try:
            results = await self.publish_events(events)
        except asyncio.CancelledError:
            self._direct.difference_update(ids)
            raise
        done = True
        for e, r in zip(events, results, strict=True):
            if r is None:
                self._direct_sent.append(e.id)
                self.published(e.event_type)
            else:
                done = False
                self._direct.discard(e.id)  # the relay's now
                log.info("outbox relay: event %s (%s) not sent at once (%s); it goes with the next batch",
                         e.event_id, e.event_type, type(r).__name__)
        if not done:
            self.wake()  # the relay publishes the others now
        # (the confirmed ones are marked sent with the relay's next round: a commit's wake,
        # or its poll when idle; waking it for each would make many tiny rounds under load)
        return done

    async def _mark_direct(self) -> None:
        """Another process's relay leads: mark what `publish_now` sent, or it goes again."""
        sent, self._direct_sent = self._direct_sent, []
        try:
            await self.store.mark_sent(sent)
        except BaseException:
            self._direct_sent[:0] = sent
            raise
        self._direct.difference_update(sent)

    async def _channel(self) -> aiormq.Channel:
        """The robust channel's current aiormq channel (an error while it is not open: aio-pika
        only reads it, so it is awaited bare; each asyncio.wait_for around it was one more task,
        one more event-loop turn per publish)."""
        robust: AbstractChannel = self.exchange.channel  # type: ignore[attr-defined]
        # typed as aiormq's abstract channel, whose basic_publish lacks the `wait` used below; it
        # is always an aiormq.Channel
        return cast(aiormq.Channel, await robust.get_underlay_channel())

    async def _publish(self, channel: aiormq.Channel, e: OutboxEvent) -> None:
        async with asyncio.timeout(self.confirm_timeout):  # (no task of its own, unlike wait_for)
            await channel.basic_publish(
                e.body.encode("utf-8"), exchange=self.exchange.name, routing_key=f"job.{e.job_id}.{e.event_type}",
                properties=to_properties(e), mandatory=True, wait=False)

    async def _publish_all(self, channel: aiormq.Channel, events: Collection[OutboxEvent]) -> list[BaseException | None]:
        """Publish `events` together, each waiting for its confirm; each one's error, or None.
        One event (a new job's JobAccepted) is awaited in this task: no task per publish, no
        extra event-loop turns on the way to the client's acknowledgement."""
        if len(events) == 1:
            try:
                await self._publish(channel, next(iter(events)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return [exc]
            return [None]
        return await asyncio.gather(*(self._publish(channel, e) for e in events), return_exceptions=True)

    async def publish_once(self) -> int:
        """Publish one batch of unsent events; returns how many were confirmed (and marked
        sent, with those `publish_now` sent meanwhile).

        An event is marked sent only once the broker confirmed it. A publish that fails (the
        broker is gone, the channel closed while the confirm was pending, the message was
        returned) or is not confirmed within `confirm_timeout` stays in the outbox and goes
        out again on the next round: never a silent loss, at worst a duplicate, which every
        consumer drops by (`job_id`, `sequence`)."""
        direct_sent, self._direct_sent = self._direct_sent, []
        try:
            read = await self.store.unsent(self.batch)
            held = self._held_elsewhere
            events = [e for e in read if e.id not in self._direct and (not held or e.job_id not in held)]
            if not events:
                if direct_sent:
                    await self.store.mark_sent(direct_sent)
                    self._direct.difference_update(direct_sent)
                return len(direct_sent)
        except BaseException:
            self._direct_sent[:0] = direct_sent
            raise

        # aio-pika's Exchange.publish holds the channel's lock until each message is written to
        # the socket (and the writer yields after each such write), so a batch leaves one
        # message per event-loop turn: in a process busy with many jobs that is tens of
        # milliseconds each, and the relay fell 15-30 s behind. The channel's own publish with
        # wait=False queues every frame at once (see adapters/bus.py for the room it needs);
        # each still waits for its confirm (a Basic.Nack, or a return with on_return_raises,
        # is an error).
        try:
            results = await self._publish_all(await self._channel(), events)
        except BaseException:
            self._direct_sent[:0] = direct_sent
            raise
        confirmed = [e for e, r in zip(events, results, strict=True) if r is None]
        failed = [r for r in results if r is not None]
        if confirmed or direct_sent:
            try:
                await self.store.mark_sent([e.id for e in confirmed] + direct_sent)
            except BaseException:
                self._direct_sent[:0] = direct_sent
                raise
            self._direct.difference_update(direct_sent)
            for e in confirmed:
                self.published(e.event_type)
        if failed:
            for r in failed:
                if isinstance(r, asyncio.CancelledError):
                    raise r
            raise PublishFailed(f"{len(failed)} of {len(events)} events were not confirmed by the broker "
                                f"({type(failed[0]).__name__}: {failed[0]}); they stay in the outbox")
        return len(confirmed) + len(direct_sent)

    async def run(self) -> None:
        self._running = asyncio.current_task()
        while not self._stopping:
            # cleared before reading the outbox, so a commit made while we publish wakes the
            # next round instead of being lost until the poll interval
            self._wake.clear()
            try:
                if await self._leader() and await self.publish_once() >= self.batch:
                    continue  # more waiting: no pause
                if not self.is_leader and self._direct_sent:
                    await self._mark_direct()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, PublishFailed):
                    log.warning("outbox relay: %s; retrying", exc)
                else:
                    log.warning("outbox relay: publishing failed (%s: %s); retrying, the events stay in "
                                "the outbox", type(exc).__name__, exc)
                self._lease_checked = 0.0  # the lease may have lapsed meanwhile: check it first
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):  # (no task of its own, unlike wait_for)
                    await self._wake.wait()
            if self.linger and self._wake.is_set() and not self._stopping:
                await asyncio.sleep(self.linger)  # more commits of the moment join this round

    async def flush(self, timeout: float) -> bool:
        """SIGTERM: publish what is left (if leader), then give the lease up so that another
        relay takes over at once. Bounded by `timeout`; True when nothing was left behind.

        The run loop is stopped first (it ends its round: an event it is publishing is marked
        sent, not left half-done), and leadership is asked of the database, not taken from
        `is_leader`: the loop clears that flag while it renews the lease, and a flush that read
        it then would return at once with the last events still in the outbox."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        if self._running is not None and not self._running.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._running), max(0.1, timeout / 2))
            except (TimeoutError, asyncio.CancelledError):
                self._running.cancel()
                with contextlib.suppress(BaseException):
                    await self._running
            except Exception:  # the loop's own failure: flushing below retries
                pass
        # a first event being published at once (a command recorded as the drain began): its
        # outcome decides whether it is marked sent or left to the relay, so wait for it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._direct_idle.wait(), max(0.1, deadline - time.monotonic()))
        flushed = False
        self._lease_checked = 0.0
        try:
            while time.monotonic() < deadline:
                try:
                    async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                        self._lease_checked = 0.0
                        if not await self._leader():
                            # another relay leads: it publishes what is left, but for what
                            # publish_now sent: marked here, or it goes twice
                            if self._direct_sent:
                                await self._mark_direct()
                            flushed = True
                            break
                        if await self.publish_once() == 0:
                            flushed = True
                            break
                except TimeoutError:
                    break
                except Exception as exc:  # the broker or the database is gone: the next leader publishes
                    log.warning("outbox relay: flushing failed (%s); %s", type(exc).__name__,
                                "retrying" if time.monotonic() < deadline else "giving up")
                    await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        finally:
            if self.is_leader:
                try:
                    await asyncio.wait_for(self.store.release_leadership(LEASE), 5)
                except Exception:
                    log.warning("outbox relay: could not give the leader lease up; it expires in %.0f s",
                                self.lease_seconds)
                self.is_leader = False
        return flushed
