"""CloudStack's event bus, emulated: each async job's end published to a RabbitMQ topic exchange
as CloudStack's RabbitMQ event bus publishes it.

CloudStack (with its RabbitMQ event bus configured: `RabbitMQEventBus`, `exchange` commonly
`cloudstack-events`) publishes a job's `submit`, `update` and `complete` on that exchange, which it
declares as a durable topic exchange, as persistent text messages without publisher confirms:

- routing key `management-server.AsyncJobEvent.<submit|update|complete>.<instance type>.<instance
  uuid>` (an empty part is `*`; a `.` inside a part becomes `-`);
- body the JSON of the job's description: `jobId`, `status` (the job's status by name:
  `SUCCEEDED`, `FAILED`, `IN_PROGRESS`), `resultCode`, `processStatus`, `command`,
  `commandEventType` (e.g. `SNAPSHOT.CREATE`), `instanceType`, `instanceUuid`, `user`, `account`,
  `jobResult` and `cmdInfo` (objects); every value but the last two a string.

The emulator publishes `complete` (what the service listens for), with `command` the API's own
name where CloudStack gives its Java class.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aio_pika

from emulators.model import JOB_FAILED, JOB_SUCCEEDED, AsyncJob

log = logging.getLogger("emulators.events")

# CloudStack's event type of each API command the emulator runs as an async job
EVENT_TYPES = {
    "createSnapshot": "SNAPSHOT.CREATE", "revertSnapshot": "SNAPSHOT.REVERT", "deleteSnapshot": "SNAPSHOT.DELETE",
    "deployVirtualMachine": "VM.CREATE", "startVirtualMachine": "VM.START", "stopVirtualMachine": "VM.STOP",
    "destroyVirtualMachine": "VM.DESTROY", "expungeVirtualMachine": "VM.EXPUNGE",
    "attachVolume": "VOLUME.ATTACH", "detachVolume": "VOLUME.DETACH", "deleteVolume": "VOLUME.DELETE",
}
_STATUS = {JOB_SUCCEEDED: "SUCCEEDED", JOB_FAILED: "FAILED"}


def _part(value: str | None) -> str:
    return (value or "*").replace(".", "-")


def routing_key(job: AsyncJob, event: str = "complete") -> str:
    return ".".join(_part(p) for p in ("management-server", "AsyncJobEvent", event, job.instance_type,
                                       job.instance_id))


def body(job: AsyncJob, user: str, account: str) -> dict[str, Any]:
    return {
        "command": job.command, "user": user, "account": account, "processStatus": "0",
        "resultCode": str(job.result_code), "instanceUuid": job.instance_id or "",
        "instanceType": job.instance_type or "unknown", "commandEventType": EVENT_TYPES.get(job.command, "unknown"),
        "jobId": job.id, "jobResult": job.result or {}, "cmdInfo": {},
        "status": _STATUS.get(job.status, "IN_PROGRESS"),
    }


class EventBus:
    """Publishes the emulated jobs' ends to `exchange` on the broker at `url`."""

    def __init__(self, url: str, exchange: str, *, user: str, account: str) -> None:
        self.url, self.exchange_name = url, exchange
        self._user, self._account = user, account
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.published = 0

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": "emulated cloudstack event bus"})
        channel = await self._connection.channel()
        self._exchange = await channel.declare_exchange(self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)

    def job_ended(self, job: AsyncJob) -> None:
        """(a timer's callback: the publish runs as a task of its own)"""
        if self._exchange is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, job: AsyncJob) -> None:
        assert self._exchange is not None
        message = aio_pika.Message(json.dumps(body(job, self._user, self._account)).encode(),
                                   content_type="text/plain", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await self._exchange.publish(message, routing_key=routing_key(job))
            self.published += 1
        except Exception as exc:  # CloudStack logs a failed publish and goes on
            log.warning("failed to publish the end of job %s on %s: %s", job.id, self.exchange_name, exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
