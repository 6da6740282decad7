"""Driving the Celery peer (bench/celery_peer.py): a worker subprocess per pool, chains
published from this process, completion read from the audit rows."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path
from typing import Any

import aio_pika
from sqlalchemy import text
from sqlalchemy.engine import make_url

from .infra import (
    CELERY_USER,
    ROOT,
    USER_PASSWORD,
    BenchError,
    CpuMeter,
    children,
    proc_status,
    python_probe,
    quantile,
    substrate_pids,
    user_stats,
    wait_until,
)
from .service_phases import Bench

QUEUE = "bench.celery"


def celery_env(bench: Bench, run_id: str) -> dict[str, str]:
    emu = bench.emu.state
    u = make_url(bench.db_url)
    return {
        "BENCH_CELERY_BROKER": bench.amqp_url,
        "BENCH_CELERY_QUEUE": QUEUE,
        "BENCH_CELERY_RUN": run_id,
        "BENCH_CELERY_CS_URL": emu["cloudstack_url"],
        "BENCH_CELERY_CS_KEY": emu["api_key"],
        "BENCH_CELERY_CS_SECRET": emu["secret_key"],
        "BENCH_CELERY_VD_URL": emu["volume_daemon_url"],
        "BENCH_CELERY_APPLIANCE": emu["appliance_vm_id"],
        "BENCH_CELERY_NETWORK": emu["network_id"],
        "BENCH_CELERY_ZONE": emu["zone_name"],
        "BENCH_CELERY_TEMPLATE": emu["template_id"],
        "BENCH_CELERY_OFFERING": emu["service_offering_id"],
        "BENCH_CELERY_POLL": str(bench.args.poll_interval),
        "BENCH_CELERY_DB_HOST": u.host or "127.0.0.1",
        "BENCH_CELERY_DB_PORT": str(u.port or 3306),
        "BENCH_CELERY_DB_USER": CELERY_USER,
        "BENCH_CELERY_DB_PASSWORD": USER_PASSWORD,
        "BENCH_CELERY_DB_NAME": u.database or "failover_bench",
    }


async def create_audit_table(bench: Bench) -> None:
    async with bench.engine.begin() as conn:
        exists = (await conn.execute(text(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = 'celery_audit'"))).scalar_one()
        if exists:
            await conn.execute(text("DROP TABLE celery_audit"))
        await conn.execute(text(
            "CREATE TABLE celery_audit (id BIGINT AUTO_INCREMENT PRIMARY KEY, run_id VARCHAR(64) NOT NULL, "
            "job_id VARCHAR(36) NOT NULL, step VARCHAR(64) NOT NULL, status VARCHAR(32) NOT NULL, "
            "detail VARCHAR(255) NOT NULL DEFAULT '', at DATETIME(6) NOT NULL, "
            "KEY run_step (run_id, step)) ENGINE=InnoDB"))


async def delete_queue(amqp_url: str) -> None:
    conn = await aio_pika.connect(amqp_url)
    try:
        ch = await conn.channel()
        await ch.queue_delete(QUEUE)
    except Exception:
        pass
    finally:
        await conn.close()


class Worker:
    """`celery -A bench.celery_peer worker -P pool -c n` as a subprocess."""

    def __init__(self, env: dict[str, str], pool: str, concurrency: int, log: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.pool = pool
        self.concurrency = concurrency
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, amqp_url: str, timeout: float = 60.0) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.celery_peer", "worker", "-P", self.pool,
             "-c", str(self.concurrency), "-Q", QUEUE, "--loglevel", "WARNING", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-n", f"bench-{self.pool}@%h"],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT))

        async def consuming() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"the celery worker exited with {self.proc.returncode}; see {self.log_path}")
            conn = await aio_pika.connect(amqp_url)
            try:
                ch = await conn.channel()
                try:
                    q = await ch.declare_queue(QUEUE, passive=True)
                except Exception:
                    return False
                return bool(q.declaration_result.consumer_count)
            finally:
                await conn.close()

        await wait_until(consuming, timeout, f"the celery worker ({self.pool}) to consume", interval=0.3)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *children(self.proc.pid)]

    def errors(self) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if "ERROR" in line or "Traceback" in line]

    async def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGQUIT)
                await asyncio.sleep(2)
                if self.proc.poll() is None:
                    self.proc.kill()
                self.proc.wait()
        self._log.close()


async def run_pool(bench: Bench, *, label: str, pool: str, concurrency: int, count: int,
                   latency: float = 0.0) -> dict[str, Any]:
    """`count` failover chains at once on one worker with this pool; returns its figures."""
    run_id = f"{label}-{pool}-{uuid.uuid4().hex[:6]}"
    env = celery_env(bench, run_id)
    os.environ.update(env)  # the publishing side reads the broker and queue from the environment
    from . import celery_peer

    vm_ids = await bench.fresh_world(count, f"cel-{label[:4]}-{pool[:4]}", async_job_seconds=latency,
                                     operation_seconds=latency)
    await delete_queue(bench.amqp_url)  # nothing an earlier run left may reach this one
    # a prefork child runs one task at a time; threads and greenlets share one process pool
    env["BENCH_CELERY_DB_POOL"] = "2" if pool == "prefork" else str(min(20, concurrency))
    # every task publishes the next one of its chain with a confirm: Celery's default producer
    # pool (10) made gevent wait for producers; one per green thread, up to 200, lifts that
    env["BENCH_CELERY_BROKER_POOL"] = "10" if pool == "prefork" else str(max(10, min(concurrency, 200)))
    worker = Worker(env, pool, concurrency, bench.results / f"celery-{label}-{pool}.log")
    await worker.start(bench.amqp_url)
    try:
        # warm up: every pool process opens its connections before the clock starts
        warm = min(max(2 * concurrency, 8), 200)
        for _ in range(warm):
            celery_peer.warm.apply_async()
        warm_stmt = text("SELECT COUNT(*) FROM celery_audit WHERE run_id = :r AND step = 'warm'")

        async def warmed() -> bool:
            async with bench.engine.connect() as c:
                return int((await c.execute(warm_stmt, {"r": run_id})).scalar_one()) >= warm

        await wait_until(warmed, 120, f"the celery worker ({pool}) to warm up", interval=0.2)
        quiet = await bench.quiet(*worker.pids())
        speed = python_probe()  # the machine's speed right before the burst
        idle_rss = sum(proc_status(p).get("VmRSS", 0) for p in worker.pids())
        meter = CpuMeter({"celery": worker.pids(), "emulators": [bench.emu.pid], **substrate_pids()})
        jobs = [(str(uuid.uuid4()), v) for v in vm_ids]
        published: dict[str, float] = {}

        def publish(job: tuple[str, str]) -> None:
            published[job[0]] = time.time()
            celery_peer.failover_chain(*job).apply_async()

        us0 = await user_stats(bench.engine, CELERY_USER)
        meter.start()
        first = time.time()
        with ThreadPoolExecutor(8) as ex:
            await asyncio.get_running_loop().run_in_executor(None, lambda: list(ex.map(publish, jobs)))
        publish_seconds = time.time() - first
        count_stmt = text("SELECT COUNT(*) FROM celery_audit WHERE run_id = :r AND step = 'vm-startup-validation'")

        async def finished() -> bool:
            errors = worker.errors()
            if errors:
                raise BenchError(f"celery {pool}: a task failed: {errors[:3]}")
            async with bench.engine.connect() as c:
                return int((await c.execute(count_stmt, {"r": run_id})).scalar_one()) >= count

        await wait_until(finished, bench.args.deadline, f"{count} celery chains ({pool})", interval=0.25)
        cpu = meter.stop()
        us1 = await user_stats(bench.engine, CELERY_USER)
        hwm = sum(proc_status(p).get("VmHWM", 0) for p in worker.pids())
        async with bench.engine.connect() as c:
            rows = (await c.execute(text(
                "SELECT job_id, at FROM celery_audit WHERE run_id = :r AND step = 'vm-startup-validation'"),
                {"r": run_id})).all()
            tasks = int((await c.execute(text("SELECT COUNT(*) FROM celery_audit WHERE run_id = :r AND step <> 'warm'"),
                                         {"r": run_id})).scalar_one())
    finally:
        await worker.stop()
        await delete_queue(bench.amqp_url)
    ends = {r.job_id: r.at.replace(tzinfo=UTC).timestamp() for r in rows}
    last = max(ends.values())
    wall = last - first
    lat = [ends[j] - t for j, t in published.items() if j in ends]
    return {
        "pool": pool, "concurrency": concurrency, "jobs": count, "audit_rows": tasks, "quiet_wait": quiet,
        "python_probe_ms": speed,
        "wall_seconds": round(wall, 3), "jobs_per_second": round(count / wall, 2),
        "publish_seconds": round(publish_seconds, 3),
        "request_to_completed_ms": {"p50": round((quantile(lat, 0.5) or 0) * 1000, 1),
                                    "p99": round((quantile(lat, 0.99) or 0) * 1000, 1)},
        "idle_rss_kb": idle_rss, "peak_rss_kb": hwm,
        "worker_cpu_ms_per_job": round(1000 * cpu["cpu_seconds"]["celery"] / count, 1),
        "db_per_job": {k: round((us1[k] - us0[k]) / count, 3) for k in us0},
        "cpu": cpu,
    }
