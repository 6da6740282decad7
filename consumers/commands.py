"""The command consumer: parse at the edge, answer bad input, record, then ack.

Every delivery ends in exactly one of: a job, a `JobRejected`, or `failover.dead` (with the
reason in `x-failover-reason`). A delivery is acked only after its command is recorded, and
never held for longer than that: the job runs from the database, not from the message.

A delivery whose handling keeps failing (the database refuses the write, say) is requeued, and
on its last delivery before the queue's `x-delivery-limit` the consumer dead-letters it itself,
with the error as the reason: the broker would dead-letter it one delivery later, but without an
`x-failover-reason`, and an operator could not tell why.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue
from pamqp import encode as pamqp_encode
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from adapters import amqp_decoding
from adapters.bus import REASON_HEADER
from adapters.db.commands import CommandRecorder, Decision
from adapters.db.engine import is_connection_error
from adapters.db.outbox import OutboxEvent
from schemas.parsing import InvalidCommand, UnreadableMessage, parse_command

log = logging.getLogger("failover.commands")

# A client's properties or headers that are not UTF-8, or an impossible timestamp, must not stop
# the connection from reading the delivery (see adapters/amqp_decoding.py).
amqp_decoding.install()

DELIVERY_COUNT_HEADER = "x-delivery-count"  # set by quorum queues on every redelivery
_DEFAULT_FRAME_MAX = 131072  # RabbitMQ's default
_HEADER_ROOM = 4096  # our two headers (<= ~1.3 KB), the other properties, the frame's own bytes


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """How many times this delivery was returned to the queue before (0 the first time; a
    client's own `x-delivery-count` on a first delivery counts for nothing)."""
    if not message.redelivered:
        return 0
    value = (message.headers or {}).get(DELIVERY_COUNT_HEADER)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, value)


def _publishable(value: Any, depth: int = 0) -> Any:
    """A header value as pamqp can encode it again: the bytes of a long string that was not
    UTF-8 as a byte array, anything else it cannot encode as text."""
    if value is None or isinstance(value, bool | int | float | str | bytearray | decimal.Decimal
                                   | datetime.datetime):
        return value
    if isinstance(value, bytes | memoryview):
        return bytearray(value)
    if depth < 32 and isinstance(value, dict):
        return {str(k): _publishable(v, depth + 1) for k, v in value.items()}
    if depth < 32 and isinstance(value, list | tuple):
        return [_publishable(v, depth + 1) for v in value]
    return repr(value)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _short(value: Any) -> str | None:
    """A short-string property (at most 255 bytes of UTF-8), or None."""
    text = _text(value)
    if text is None:
        return None
    return text.encode("utf-8")[:255].decode("utf-8", "ignore")


def _error_reason(exc: BaseException, deliveries: int) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    reason = (f"the command could not be handled in {deliveries} deliveries; last error: "
              f"{type(exc).__name__}: {first_line}")
    return reason.encode("ascii", "backslashreplace").decode("ascii")[:500]  # a header value


class CommandConsumer:
    def __init__(self, queue: AbstractQueue, dlx: AbstractExchange, recorder: CommandRecorder, *,
                 max_bytes: int, on_accepted: Callable[[str, bool], None],
                 count: Callable[[str, str], None], db_outage_seconds: float = 300.0,
                 delivery_limit: int | None = None,
                 publish_first: Callable[[Sequence[OutboxEvent]], Awaitable[object]] | None = None,
                 hold: Callable[[str], None] = lambda job_id: None,
                 unhold: Callable[[str], None] = lambda job_id: None) -> None:
        self.queue = queue
        self.dlx = dlx
        self.recorder = recorder
        self.max_bytes = max_bytes
        self.on_accepted = on_accepted
        self.count = count
        # the relay's publish_now: a decision's JobAccepted / JobRejected goes out as soon as it
        # is committed instead of queueing behind other jobs' events (publishers/relay.py)
        self.publish_first = publish_first
        # the runner's hold / unhold: a job being recorded is not claimed before `on_accepted`
        # (the job_id of a job a command creates is its request_id)
        self.hold = hold
        self.unhold = unhold
        self.db_outage_seconds = db_outage_seconds
        limit = delivery_limit if delivery_limit is not None else (queue.arguments or {}).get("x-delivery-limit")
        self.delivery_limit: int | None = limit if isinstance(limit, int) and limit >= 1 else None
        self._tag: str | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._tag = await self.queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop taking commands; wait for the ones being recorded."""
        if self._tag is not None:
            await self.queue.cancel(self._tag)
            self._tag = None
        current = asyncio.current_task()
        pending = [t for t in self._inflight if t is not current]
        if pending:
            await asyncio.wait(pending, timeout=30)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self._handle(message)
        except Exception as exc:
            returned = _delivery_count(message)
            if self.delivery_limit is not None and returned + 1 >= self.delivery_limit:
                log.exception("command delivery could not be handled %d times; dead-lettering it",
                              returned + 1)
                try:
                    await self._dead_letter(message, _error_reason(exc, returned + 1))
                    return
                except Exception:
                    log.exception("dead-lettering failed; requeued (the broker dead-letters it at the "
                                  "queue's delivery limit)")
            else:
                log.exception("command delivery could not be handled; requeued (delivery %d of at most "
                              "%s)", returned + 1, self.delivery_limit or "unlimited")
            await message.nack(requeue=True)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        invalid: InvalidCommand | None = None
        try:
            command = parse_command(message.body, self.max_bytes)
        except UnreadableMessage as exc:
            await self._dead_letter(message, exc.reason)
            return
        except InvalidCommand as exc:
            invalid = exc
        if invalid is not None:
            bad = invalid
            self.hold(str(bad.request_id))  # (its JobRejected leads the stream of that id)
            try:
                decision = await self._with_db(lambda: self.recorder.reject_invalid(
                    bad.request_id, bad.command_type, bad.vm_id, bad.detail, bad.job_type))
                await self._publish_first(decision)
                await message.ack()
            finally:
                self.unhold(str(bad.request_id))
            self.count(bad.command_type or "unknown", decision.outcome)
            log.info("command %s rejected: %s", bad.request_id, bad.detail)
            return
        held = str(command.request_id)
        self.hold(held)
        try:
            decision = await self._with_db(lambda: self.recorder.record(command))
            # before the job can start (and emit more): its first event leads its stream
            await self._publish_first(decision)
            await message.ack()
            if decision.job_id:  # (a live failover before the jobs waiting: `JobRunner.adopt`)
                self.on_accepted(decision.job_id, decision.first)
        finally:  # adopted, or (recorded or not) claimable: a recorded job is resumed by a claim
            self.unhold(held)
        self.count(command.type, "accepted" if decision.outcome == "signalled" else decision.outcome)
        log.info("command %s %s recorded: %s%s", command.type, command.request_id, decision.outcome,
                 f" ({decision.detail})" if decision.detail else "")

    async def _publish_first(self, decision: Decision) -> None:
        if decision.events and self.publish_first is not None:
            await self.publish_first(decision.events)

    async def _with_db(self, call: Callable[[], Awaitable[Decision]]) -> Decision:
        """Record, waiting out a database outage (bounded) instead of bouncing the message.

        The first attempt is a plain call: tenacity's retrying object, built for every command,
        is left in a reference cycle (its state holds its own bound methods), ~15 objects a
        command for Python's cycle collector, whose collections stop every job and command
        while they run. A connection error of that call is handed to tenacity as its first
        attempt's outcome, so the waits are as if tenacity had made it, and the outage's bound
        counts from before that call."""
        began = time.monotonic()
        try:
            return await call()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            failed: BaseException | None = exc
        left = max(0.0, self.db_outage_seconds - (time.monotonic() - began))
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_connection_error),
            wait=wait_exponential(multiplier=0.2, max=5),
            stop=stop_after_delay(left),
            reraise=True,
        ):
            with attempt:
                if failed is not None:  # the first attempt, made above
                    replay, failed = failed, None
                    raise replay
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Publish the delivery to `failover.dlx` as it came (body, headers, content type,
        message id) with the reason added, then ack it.

        The client's headers are given up (and `x-failover-headers-dropped` says so) when they
        could not be encoded again, or when with ours added they might not fit in one frame: a
        frame over the broker's `frame_max` would make it close the whole connection, which would
        redeliver this message and fail again."""
        routing_key = _text(message.routing_key) or ""
        ours: dict[str, Any] = {REASON_HEADER: reason, "x-original-routing-key": routing_key}
        client: dict[str, Any] = _publishable(dict(message.headers or {}))
        budget = await self._header_budget()
        try:
            size: int | None = len(pamqp_encode.field_table(client))
        except (TypeError, ValueError, UnicodeError, OverflowError):
            size = None
        if size is not None and size <= budget:
            headers = {**client, **ours}
        else:
            why = "they cannot be encoded again" if size is None else f"{size} bytes, over {budget}"
            headers = {**ours, "x-failover-headers-dropped": why}
            log.warning("dead-lettering a delivery without its headers (%s)", why)
        await self.dlx.publish(
            aio_pika.Message(body=message.body, headers=headers, content_type=_short(message.content_type),
                             message_id=_short(message.message_id),
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="",  # failover.dlx is a fanout; the original key is in a header
        )
        await message.ack()
        self.count("unknown", "dead_lettered")
        log.warning("command delivery dead-lettered to failover.dead: %s", reason)

    async def _header_budget(self) -> int:
        """How many bytes the client's headers may take in a dead letter: the connection's
        negotiated `frame_max`, less room for our headers and the other properties."""
        frame_max = _DEFAULT_FRAME_MAX
        try:
            underlay = await self.dlx.channel.get_underlay_channel()  # type: ignore[attr-defined]
            frame_max = int(underlay.connection.connection_tune.frame_max) or _DEFAULT_FRAME_MAX
        except Exception:  # the default is safe enough
            pass
        return max(0, frame_max - _HEADER_ROOM)
