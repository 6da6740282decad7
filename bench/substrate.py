"""The substrate's ceiling, on the same RabbitMQ and MariaDB, in the same run: how fast the
broker moves confirmed persistent messages of our size through a queue like ours, and how
many single-row commits the database makes per second."""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from typing import Any

import aio_pika
import asyncmy
from sqlalchemy.engine import make_url

from .infra import BenchError, CpuMeter, substrate_pids

QUEUE = "bench.substrate"


async def broker_rate(url: str, *, messages: int, body_bytes: int, window: int = 500,
                      prefetch: int = 256) -> dict[str, Any]:
    """Publish `messages` persistent messages with publisher confirms (up to `window` in flight,
    as the relay publishes a batch) to a quorum queue (as failover.projector is), while a consumer
    on another connection acks each one (prefetch as the projector's). Rate = messages / (last
    ack - first publish)."""
    pub_conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-substrate-pub"})
    sub_conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-substrate-sub"})
    try:
        setup = await pub_conn.channel()
        try:
            await setup.queue_delete(QUEUE)
        except Exception:
            setup = await pub_conn.channel()
        await setup.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        channel = await pub_conn.channel(publisher_confirms=True)
        sub = await sub_conn.channel()
        await sub.set_qos(prefetch_count=prefetch)
        queue = await sub.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        body = (b'{"type":"LogRecorded","pad":"' + b"x" * max(0, body_bytes - 32) + b'"}')[:max(body_bytes, 32)]
        got = 0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            await message.ack()
            got += 1
            if got >= messages:
                done.set()

        tag = await queue.consume(on_message)
        meter = CpuMeter(substrate_pids())
        meter.start()
        began = time.monotonic()
        sent = 0
        while sent < messages:
            n = min(window, messages - sent)
            await asyncio.gather(*(channel.default_exchange.publish(
                aio_pika.Message(body=body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 content_type="application/json"), routing_key=QUEUE) for _ in range(n)))
            sent += n
        published = time.monotonic() - began
        try:
            await asyncio.wait_for(done.wait(), 120)
        except TimeoutError:
            raise BenchError(f"broker ceiling: {got} of {messages} consumed within 120 s") from None
        wall = time.monotonic() - began
        cpu = meter.stop()
        await queue.cancel(tag)
        await setup.queue_delete(QUEUE)
    finally:
        await pub_conn.close()
        await sub_conn.close()
    return {"messages": messages, "body_bytes": len(body), "seconds": round(wall, 3),
            "publish_seconds": round(published, 3), "messages_per_second": round(messages / wall, 1),
            "publish_only_per_second": round(messages / published, 1), "cpu": cpu}


async def db_commit_rate(db_url: str, *, seconds: float, connections: int, row_bytes: int) -> dict[str, Any]:
    """`connections` connections (the service's pool size), each inserting one row and
    committing, as fast as it can, for `seconds` (asyncmy, the service's driver)."""
    u = make_url(db_url)
    kw: dict[str, Any] = {"host": u.host or "127.0.0.1", "port": u.port or 3306, "user": u.username or "root",
                          "password": u.password or "", "db": u.database, "autocommit": False}
    if "unix_socket" in u.query:
        kw["unix_socket"] = u.query["unix_socket"]
    warnings.filterwarnings("ignore", message=".*Unknown table.*")
    setup = await asyncmy.connect(**kw)
    async with setup.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
                          "AND TABLE_NAME = 'bench_commits'")
        if (await cur.fetchone())[0]:
            await cur.execute("DROP TABLE bench_commits")
        await cur.execute("CREATE TABLE bench_commits (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
                          "k VARCHAR(36) NOT NULL, body LONGTEXT NOT NULL, at DATETIME(6) NOT NULL) "
                          "ENGINE=InnoDB")
    await setup.commit()
    payload = "x" * row_bytes
    count = 0
    deadline = 0.0

    async def worker() -> None:
        nonlocal count
        conn = await asyncmy.connect(**kw)
        try:
            async with conn.cursor() as cur:
                while time.monotonic() < deadline:
                    await cur.execute("INSERT INTO bench_commits (k, body, at) VALUES (%s, %s, UTC_TIMESTAMP(6))",
                                      (os.urandom(8).hex(), payload))
                    await conn.commit()
                    count += 1
        finally:
            conn.close()

    meter = CpuMeter(substrate_pids())
    meter.start()
    began = time.monotonic()
    deadline = began + seconds
    await asyncio.gather(*(worker() for _ in range(connections)))
    wall = time.monotonic() - began
    cpu = meter.stop()
    async with setup.cursor() as cur:
        await cur.execute("DROP TABLE bench_commits")
    await setup.commit()
    setup.close()
    return {"commits": count, "seconds": round(wall, 3), "connections": connections, "row_bytes": row_bytes,
            "commits_per_second": round(count / wall, 1), "cpu": cpu}
