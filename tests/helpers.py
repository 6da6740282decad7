"""Test helpers: `serve` processes, waiting on conditions with deadlines, and client actions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiohttp
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.tables import failover_jobs, job_steps, job_tracking, log_events
from emulators.events import EventBus
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from schemas.commands import FailoverRequested
from schemas.events import Event

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(database_url: str, amqp_url: str, emu: EmulatorHandle, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVER_")}
    env.update({
        "FAILOVER_DATABASE_URL": database_url,
        "FAILOVER_AMQP_URL": amqp_url,
        "FAILOVER_CLOUDSTACK_URL": emu.cloudstack_url,
        "FAILOVER_CLOUDSTACK_API_KEY": emu.api_key,
        "FAILOVER_CLOUDSTACK_SECRET_KEY": emu.secret_key,
        "FAILOVER_ZONE": emu.zone_name,
        "FAILOVER_TEMPLATE_ID": emu.template_id,
        "FAILOVER_SERVICE_OFFERING_ID": emu.service_offering_id,
        "FAILOVER_NETWORK_ID": emu.network_id,
        "FAILOVER_APPLIANCE_VM_ID": emu.appliance_vm_id,
        "FAILOVER_VOLUME_DAEMON_URL": emu.volume_daemon_url,
        "FAILOVER_VIRTIO_INJECT_COMMAND": f"{sys.executable} -m emulators.inject --control-url {emu.control_url}",
        "FAILOVER_POLL_INTERVAL_SECONDS": "0.05",
        "FAILOVER_RETRY_BACKOFF_SECONDS": "0.05",
        "FAILOVER_RETRY_ATTEMPTS": "3",
        # the attempts alone: the fault tests fail a step at its third try (the window's own
        # tests set it: tests/crash/test_retry_window.py)
        "FAILOVER_RETRY_WINDOW_SECONDS": "0",
        "FAILOVER_SNAPSHOT_TIMEOUT_SECONDS": "3",
        "FAILOVER_ASYNC_JOB_TIMEOUT_SECONDS": "3",
        "FAILOVER_VOLUME_OPERATION_TIMEOUT_SECONDS": "3",
        "FAILOVER_INJECT_TIMEOUT_SECONDS": "20",
        "FAILOVER_LEASE_SECONDS": "5",
        "FAILOVER_CLAIM_INTERVAL_SECONDS": "0.5",
        "FAILOVER_LOG_FORMAT": "json",
        "FAILOVER_LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
    })
    env.update(extra)
    return env


async def wait_until(check: Callable[[], Awaitable[T | None]], timeout: float, what: str,
                     interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain `predicate` as the async check `wait_until` polls."""
    async def check() -> bool:
        return predicate()
    return check


# the log lines a failed test's report shows (tests/conftest.py)
_EXCERPT_MARKS = ('"level": "WARNING"', '"level": "ERROR"', '"level": "CRITICAL"', '"drive": ',
                  "taken over", "Traceback")


class ServeProcess:
    """`failoverctl serve` as its own process, ready when its /readyz says so."""

    def __init__(self, env: dict[str, str], log_path: Path, roles: str | None = None) -> None:
        self.port = free_port()
        self.env = {**env, "FAILOVER_METRICS_PORT": str(self.port), "FAILOVER_METRICS_HOST": "127.0.0.1"}
        self.log_path = log_path
        self.roles = roles
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        argv = [sys.executable, "-m", "failover.cli", "serve"]
        if self.roles:
            argv += ["--roles", self.roles]
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(*argv, env=self.env, stdout=self._log,
                                                         stderr=asyncio.subprocess.STDOUT, cwd=str(ROOT))

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                async with aiohttp.ClientSession() as http, http.get(self.metrics_url + "/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await wait_until(ready, timeout, "serve to be ready", interval=0.1)
        except BaseException:
            await self.kill()  # never leave an orphan behind a failed start
            raise

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_excerpt(self, since: int, lines: int = 150, width: int = 600) -> str:
        """What a failed test's reader needs of this process's log from byte `since` on: its
        warnings and errors, and where it started, stopped, took over or handed back a job (the
        lease decisions), the last `lines` of them."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        keep = [line[:width] for line in text.splitlines()
                if any(mark in line for mark in _EXCERPT_MARKS)]
        return "\n".join(keep[-lines:])

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            self._log.close()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
            self._log.close()


async def run_command(bus: BusClient, command: BaseModel, job_id: uuid.UUID | str,
                      timeout: float = 60.0) -> list[Event]:
    """Bind to the job's events, publish the command as a client would, collect until the end."""
    queue = await bus.bind(f"job.{job_id}.#")
    try:
        await bus.publish(command)
        events: list[Event] = []

        async def collect() -> None:
            async for event in bus.events(queue):
                events.append(event)

        await asyncio.wait_for(collect(), timeout)
        return events
    finally:
        await queue.delete(if_unused=False, if_empty=False)


async def failover(bus: BusClient, vm_id: str, *, live: bool = False, timeout: float = 60.0,
                   request_id: uuid.UUID | None = None, **options: Any) -> list[Event]:
    rid = request_id or uuid.uuid4()
    cmd = FailoverRequested(request_id=rid, vm_id=vm_id, failover_type="live" if live else "test",
                            requested_by="tests", options=options or {})
    return await run_command(bus, cmd, rid, timeout)


async def projected(db: AsyncEngine, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    """The job's read-model rows once the projector has recorded its end."""
    async def ended() -> dict[str, Any] | None:
        async with db.connect() as conn:
            row = (await conn.execute(select(job_tracking).where(job_tracking.c.id == job_id))).first()
            if row is None or row.status not in ("completed", "failed", "cancelled"):
                return None
            steps = (await conn.execute(select(job_steps).where(job_steps.c.job_id == job_id)
                                        .order_by(job_steps.c.step_order))).all()
            logs = (await conn.execute(select(log_events).where(log_events.c.job_id == job_id)
                                       .order_by(log_events.c.sequence))).all()
            return {"tracking": row, "steps": steps, "logs": logs}

    return await wait_until(ended, timeout, f"job {job_id} to be projected as ended")


async def failover_row(db: AsyncEngine, job_id: str) -> Any:
    async with db.connect() as conn:
        return (await conn.execute(select(failover_jobs).where(failover_jobs.c.job_id == job_id))).first()


async def metric(serve: ServeProcess, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's value from the process's /metrics (0 when absent)."""
    (value,) = await metrics(serve, (name, labels))
    return value


async def metrics(serve: ServeProcess, *queries: tuple[str, dict[str, str] | None]) -> list[float]:
    """Several samples' values, (name, labels) each, from ONE scrape of the process's /metrics
    (0 when absent): values compared with each other must come from the same moment."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(serve.metrics_url + "/metrics") as resp:
        body = await resp.text()
    totals = [0.0] * len(queries)
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            for i, (name, labels) in enumerate(queries):
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    totals[i] += sample.value
    return totals


async def watched_exchange(channel: Any, prefix: str) -> tuple[Any, Any]:
    """A topic exchange of its own for a relay under test, and a queue that sees all it gets."""
    exchange = await channel.declare_exchange(f"{prefix}-{uuid.uuid4().hex[:8]}", aio_pika.ExchangeType.TOPIC,
                                              auto_delete=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="#")
    return exchange, queue


@contextlib.asynccontextmanager
async def emulated_event_bus(emulators: EmulatorHandle, amqp_url: str) -> AsyncIterator[EventBus]:
    """The in-process emulated CloudStack publishing its async jobs' ends, as CloudStack's
    RabbitMQ event bus does, on an exchange of its own on the test broker, while it lasts."""
    published = EventBus(amqp_url, f"cloudstack-events-{uuid.uuid4().hex[:8]}", user=emulators.world.user_id,
                         account=emulators.world.account_id)
    await published.start()
    emulators.world.runner.on_job_end = published.job_ended
    try:
        yield published
    finally:
        emulators.world.runner.on_job_end = None
        await published.close()


def processes_with(token: str) -> set[int]:
    """The live (not zombie) processes with `token` as one argument of their command line."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "stat").read_text()
        except OSError:
            continue
        if token.encode() in args and status.rsplit(")", 1)[-1].split()[0] != "Z":
            found.add(int(entry.name))
    return found
