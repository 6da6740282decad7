"""The command consumer: parse at the edge, answer bad input, record, then ack.

Every delivery ends in exactly one of: a job, a `JobRejected`, or `failover.dead` (with the
reason in `x-failover-reason`). A delivery is acked only after its command is recorded, and
never held for longer than that: the job runs from the database, not from the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from adapters.bus import REASON_HEADER
from adapters.db.commands import CommandRecorder, Decision
from adapters.db.engine import is_connection_error
from schemas.parsing import InvalidCommand, UnreadableMessage, parse_command

log = logging.getLogger("failover.commands")


class CommandConsumer:
    def __init__(self, queue: AbstractQueue, dlx: AbstractExchange, recorder: CommandRecorder, *,
                 max_bytes: int, on_accepted: Callable[[str], None],
                 count: Callable[[str, str], None], db_outage_seconds: float = 300.0) -> None:
        self.queue = queue
        self.dlx = dlx
        self.recorder = recorder
        self.max_bytes = max_bytes
        self.on_accepted = on_accepted
        self.count = count
        self.db_outage_seconds = db_outage_seconds
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
        except Exception:
            log.exception("command delivery could not be handled; requeued (it is dead-lettered after "
                          "the queue's delivery limit)")
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
            decision = await self._with_db(lambda: self.recorder.reject_invalid(
                bad.request_id, bad.command_type, bad.vm_id, bad.detail, bad.job_type))
            await message.ack()
            self.count(bad.command_type or "unknown", decision.outcome)
            log.info("command %s rejected: %s", bad.request_id, bad.detail)
            return
        decision = await self._with_db(lambda: self.recorder.record(command))
        await message.ack()
        self.count(command.type, "accepted" if decision.outcome == "signalled" else decision.outcome)
        log.info("command %s %s recorded: %s%s", command.type, command.request_id, decision.outcome,
                 f" ({decision.detail})" if decision.detail else "")
        if decision.job_id:
            self.on_accepted(decision.job_id)

    async def _with_db(self, call: Callable[[], Awaitable[Decision]]) -> Decision:
        """Record, waiting out a database outage (bounded) instead of bouncing the message."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_connection_error),
            wait=wait_exponential(multiplier=0.2, max=5),
            stop=stop_after_delay(self.db_outage_seconds),
            reraise=True,
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason
        headers["x-original-routing-key"] = message.routing_key or ""
        await self.dlx.publish(
            aio_pika.Message(body=message.body, headers=headers, content_type=message.content_type,
                             message_id=message.message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=message.routing_key or "",
        )
        await message.ack()
        self.count("unknown", "dead_lettered")
        log.warning("command delivery dead-lettered to failover.dead: %s", reason)
