"""What the crash tests share: a "cell" (its own database, vhost, emulators and `serve`
processes), an event log bound to `#`, kill triggers, and the checks (exactly-once in the
emulated world, the stream rules, projections equal to a fold of the events, ownership
intervals from the processes' logs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from adapters.bus import EVENTS_EXCHANGE
from adapters.db import raw
from adapters.db.engine import make_engine
from adapters.db.migrate import upgrade
from adapters.db.tables import failover_jobs, job_steps, job_tracking, log_events, outbox
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle, start_emulators
from failover.client import BusClient
from schemas.events import Event
from schemas.parsing import parse_event

from ..helpers import ServeProcess, service_env

_MIGRATING = asyncio.Lock()
TERMINAL = ("JobCompleted", "JobFailed", "JobCancelled", "JobRejected")
CRASH_ENV = {
    "FAILOVER_LEASE_SECONDS": "2.5",
    "FAILOVER_CLAIM_INTERVAL_SECONDS": "0.2",
    "FAILOVER_OUTBOX_POLL_SECONDS": "0.1",
    "FAILOVER_SNAPSHOT_TIMEOUT_SECONDS": "60",
    "FAILOVER_ASYNC_JOB_TIMEOUT_SECONDS": "60",
    "FAILOVER_VOLUME_OPERATION_TIMEOUT_SECONDS": "60",
    "FAILOVER_DRAIN_SECONDS": "20",
}


# --------------------------------------------------------------------------- resources


async def fresh_database(url: str) -> str:
    """Drop and create the database of `url`, then migrate it."""
    parsed = make_url(url)
    name = parsed.database
    assert name
    server = create_async_engine(parsed.set(database=""))
    async with server.begin() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        await conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    await server.dispose()
    async with _MIGRATING:  # alembic's EnvironmentContext is process-global: one at a time
        await asyncio.to_thread(upgrade, url)
    return url


def derived_database(base_url: str, suffix: str) -> str:
    parsed = make_url(base_url)
    return parsed.set(database=f"{parsed.database}_{suffix}").render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def database_of_its_own(base_url: str, suffix: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh, migrated database beside the tests' own (`<name>_<suffix>`): what a
    module uses whose work the session's `serve` process must not pick up."""
    engine = make_engine(await fresh_database(derived_database(base_url, suffix)), pool_size=4)
    try:
        yield engine
    finally:
        await engine.dispose()


# the three ways the service's SQL goes to the server (adapters/db/raw.py): MariaDB's (scripts,
# blocks and `IF`), MySQL's (scripts, no compound statements; MariaDB runs what is sent to MySQL)
# and one statement per request (an engine whose connections take one)
SQL_WAYS = ("mariadb", "mysql", "one-at-a-time")


@contextlib.asynccontextmanager
async def engine_speaking(way: str, url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on `url` whose SQL goes the `way` of `SQL_WAYS`."""
    engine = create_async_engine(url) if way == "one-at-a-time" else make_engine(url, pool_size=2)
    try:
        async with engine.connect():  # the dialect learns the server's flavour on the first connect
            pass
        if way == "mysql":
            engine.sync_engine.dialect.is_mariadb = False  # type: ignore[attr-defined]
        async with raw.transaction(engine) as tx:
            assert (tx.scripts, tx.compound) == {
                "mariadb": (True, True), "mysql": (True, False), "one-at-a-time": (False, False)}[way]
        yield engine
    finally:
        await engine.dispose()


def derived_vhost(amqp_url: str, suffix: str) -> str:
    """A vhost next to the tests' own (`<vhost>-<suffix>`) on the shared broker; its URL."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(amqp_url)
    base = parts.path.lstrip("/") or "failover-test"
    vhost = f"{base}-{suffix}"
    if shutil.which("rabbitmqctl"):
        subprocess.run(["rabbitmqctl", "add_vhost", vhost], capture_output=True, text=True, timeout=60)
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, parts.username or "guest",
                        ".*", ".*", ".*"], capture_output=True, timeout=60)
    return urlunsplit(parts._replace(path="/" + vhost))


# --------------------------------------------------------------------------- events


@dataclass
class Seen:
    arrived: float  # time.time() at arrival in the test
    event: Event
    message_id: str | None


class EventLog:
    """Every event of `failover.events` (a durable queue bound to `#`, on a robust
    connection, so a broker restart loses nothing), with arrival times."""

    def __init__(self, amqp_url: str, queue_name: str | None = None) -> None:
        self.amqp_url = amqp_url
        self.queue_name = queue_name or f"crash-test-events-{uuid.uuid4().hex[:8]}"
        self.seen: list[Seen] = []
        self.by_job: dict[str, list[Seen]] = defaultdict(list)
        self._first: dict[str, dict[int, Event]] = defaultdict(dict)  # job -> sequence -> event
        self._contiguous: dict[str, int] = defaultdict(int)  # job -> n: events 1..n all seen
        self.unreadable = 0
        self._new = asyncio.Event()
        self.connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        self.connection = await aio_pika.connect_robust(
            self.amqp_url, client_properties={"connection_name": "crash-test event log"})
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=2000)
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        self._channel = channel
        self._queue = await channel.declare_queue(self.queue_name, durable=True)
        await self._queue.bind(exchange, routing_key="#")
        await self._queue.consume(self._on_message)

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self._queue.delete(if_unused=False, if_empty=False)
            with contextlib.suppress(Exception):
                await self.connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = parse_event(message.body)
        except Exception:
            self.unreadable += 1
        else:
            seen = Seen(time.time(), event, message.message_id)
            job = str(event.job_id)
            self.seen.append(seen)
            self.by_job[job].append(seen)
            first = self._first[job]
            first.setdefault(event.sequence, event)
            n = self._contiguous[job]
            while n + 1 in first:
                n += 1
            self._contiguous[job] = n
            self._new.set()
        # a delivery from before a reconnect cannot be acked: it comes again (deduplicated)
        with contextlib.suppress(Exception):
            await message.ack()

    async def wait(self, predicate: Callable[[], Any], timeout: float, what: str,
                   every: float = 0.0) -> Any:
        """Until `predicate()` is true: checked on each new event (at most once per `every`
        seconds), and at least every quarter second."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), min(remaining, 0.25))
            if every:
                await asyncio.sleep(every)

    def stream(self, job_id: str) -> list[Event]:
        """The job's events by sequence, each once."""
        first = self._first.get(job_id, {})
        return [first[k] for k in sorted(first)]

    def ended(self, job_id: str) -> Event | None:
        """The job's last event, once every event up to it has been seen and it ends the job."""
        first = self._first.get(job_id)
        if not first:
            return None
        n = self._contiguous[job_id]
        last = first.get(n)
        if last is not None and n == max(first) and last.type in TERMINAL:
            return last
        return None

    def has(self, job_id: str, type_: str, step: str | None = None) -> Seen | None:
        for s in self.by_job.get(job_id, []):
            if s.event.type == type_ and (step is None or getattr(s.event, "step", None) == step):
                return s
        return None

    async def wait_ended(self, job_ids: Iterable[str], timeout: float) -> None:
        ids = list(job_ids)
        try:
            await self.wait(lambda: all(self.ended(j) for j in ids), timeout, "jobs to end",
                            every=0.05 if len(ids) > 20 else 0.0)
        except AssertionError:
            left = [j for j in ids if not self.ended(j)]
            raise AssertionError(f"timed out after {timeout:.0f} s: {len(left)} of {len(ids)} jobs did not "
                                 f"end, e.g. {left[:3]}") from None


def stream_problems(log: EventLog, job_id: str) -> list[str]:
    """The contract's stream rules: 1..n without gaps, one event per sequence, one end."""
    problems = []
    by_seq: dict[int, set[str]] = defaultdict(set)
    for s in log.by_job.get(job_id, []):
        by_seq[s.event.sequence].add(str(s.event.event_id))
    clash = {k: v for k, v in by_seq.items() if len(v) > 1}
    if clash:
        problems.append(f"different events with the same sequence: {sorted(clash)}")
    seqs = sorted(by_seq)
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"sequence gaps: {seqs[:5]}...{seqs[-5:]}")
    stream = log.stream(job_id)
    ends = [e for e in stream if e.type in ("JobCompleted", "JobFailed", "JobCancelled")]
    if len(ends) != 1 or not stream or stream[-1].type not in TERMINAL:
        problems.append(f"{len(ends)} end events; last {stream[-1].type if stream else None}")
    return problems


def shape(stream: list[Event]) -> list[tuple[str, str | None]]:
    """The stream without its log lines: what an uninterrupted run shows too."""
    return [(e.type, getattr(e, "step", None)) for e in stream if e.type != "LogRecorded"]


# --------------------------------------------------------------------------- the fold


def fold(stream: list[Event]) -> dict[str, Any]:
    """The read models of one job, folded from its events (as CONTRACT.md defines them)."""
    tracking: dict[str, Any] = {"status": None, "percent_complete": 0, "job_type": None,
                                "rolled_back": None, "vm_id": None, "correlation_id": None}
    steps: dict[str, tuple[int, str]] = {}
    logs: dict[int, tuple[Any, ...]] = {}
    status_of = {"JobAccepted": "pending", "StepStarted": "running", "RollbackStarted": "running",
                 "RollbackCompleted": "running", "RollbackFailed": "running", "JobCompleted": "completed",
                 "JobFailed": "failed", "JobCancelled": "cancelled"}
    step_status = {"StepStarted": "running", "StepCompleted": "completed", "StepSkipped": "skipped",
                   "StepFailed": "failed"}
    for e in sorted(stream, key=lambda e: e.sequence):
        tracking["job_type"] = tracking["job_type"] or e.job_type
        tracking["vm_id"] = tracking["vm_id"] or e.vm_id
        tracking["correlation_id"] = tracking["correlation_id"] or str(e.correlation_id)
        if e.type in status_of:
            tracking["status"] = status_of[e.type]
        if e.type == "JobAccepted":
            for s in e.steps:  # type: ignore[attr-defined]
                steps.setdefault(s.name, (s.order, "pending"))
        if e.type in step_status:
            steps[e.step] = (e.step_order, step_status[e.type])  # type: ignore[attr-defined]
        if hasattr(e, "percent_complete"):
            tracking["percent_complete"] = max(tracking["percent_complete"], e.percent_complete)
        if e.type == "JobCompleted":
            tracking["percent_complete"] = 100
        if e.type == "RollbackCompleted":
            tracking["rolled_back"] = True
        if e.type == "RollbackFailed":
            tracking["rolled_back"] = False
        if e.type in ("JobFailed", "JobCancelled"):
            tracking["rolled_back"] = e.rolled_back  # type: ignore[attr-defined]
        if e.type == "LogRecorded":
            logs[e.sequence] = (e.level, e.message, e.fields, str(e.correlation_id), e.step)  # type: ignore[attr-defined]
    return {"tracking": tracking, "steps": steps, "logs": logs}


async def projection_of(db: AsyncEngine, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The read-model rows of these jobs, in the fold's form."""
    out: dict[str, dict[str, Any]] = {j: {"tracking": None, "steps": {}, "logs": {}} for j in job_ids}
    async with db.connect() as conn:
        for chunk in [job_ids[i:i + 200] for i in range(0, len(job_ids), 200)]:
            for r in (await conn.execute(select(job_tracking).where(job_tracking.c.id.in_(chunk)))).all():
                out[r.id]["tracking"] = {
                    "status": r.status, "percent_complete": r.percent_complete, "job_type": r.job_type,
                    "rolled_back": None if r.rolled_back is None else bool(r.rolled_back), "vm_id": r.vm_id,
                    "correlation_id": r.correlation_id}
            for r in (await conn.execute(select(job_steps).where(job_steps.c.job_id.in_(chunk)))).all():
                out[r.job_id]["steps"][r.step_name] = (r.step_order, r.status)
            for r in (await conn.execute(select(log_events).where(log_events.c.job_id.in_(chunk)))).all():
                out[r.job_id]["logs"][r.sequence] = (r.level, r.message, r.fields, r.correlation_id, r.step_name)
    return out


async def projection_problems(db: AsyncEngine, log: EventLog, job_ids: list[str]) -> list[str]:
    rows = await projection_of(db, job_ids)
    problems = []
    for j in job_ids:
        want, got = fold(log.stream(j)), rows[j]
        for part in ("tracking", "steps", "logs"):
            if want[part] != got[part]:
                if part == "logs":
                    missing = sorted(set(want["logs"]) ^ set(got["logs"]))
                    diff = [k for k in want["logs"] if k in got["logs"] and want["logs"][k] != got["logs"][k]]
                    problems.append(f"job {j}: log_events differ (missing/extra {missing[:5]}, changed {diff[:3]})")
                else:
                    problems.append(f"job {j}: {part} {got[part]} != fold {want[part]}")
    return problems


async def projected_all(db: AsyncEngine, log: EventLog, job_ids: list[str], timeout: float) -> None:
    """Wait until the projector has caught up with every event the test saw of these jobs."""
    want = {j: max(e.sequence for e in log.stream(j)) for j in job_ids}

    async def caught_up() -> bool:
        async with db.connect() as conn:
            rows = dict((await conn.execute(select(job_tracking.c.id, job_tracking.c.last_sequence)
                                            .where(job_tracking.c.id.in_(job_ids)))).all())
        return all(rows.get(j, 0) >= n for j, n in want.items())

    deadline = time.monotonic() + timeout
    while not await caught_up():
        if time.monotonic() > deadline:
            raise AssertionError("the projector did not catch up with the events")
        await asyncio.sleep(0.1)


async def outbox_unsent(db: AsyncEngine) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(text("COUNT(*)")).select_from(outbox)
                                       .where(outbox.c.published_at.is_(None)))).scalar_one())


async def job_rows(db: AsyncEngine, job_ids: list[str]) -> dict[str, Any]:
    async with db.connect() as conn:
        rows = (await conn.execute(select(failover_jobs).where(failover_jobs.c.job_id.in_(job_ids)))).all()
    return {r.job_id: r for r in rows}


# --------------------------------------------------------------------------- the world


def exactly_once_problems(world: Any, vm_name: str, volume_ids: list[str], snapshot_prefix: str) -> list[str]:
    """Guarantee 3 in the emulated world: one VM created under the job's name, one snapshot
    per volume, one attach per volume onto that VM (Volume Daemon operations that took effect)."""
    problems = []
    vms = [vm for vm in world.vms.values() if vm.name.lower() == vm_name.lower()]
    if len(vms) != 1:
        problems.append(f"{len(vms)} VMs named {vm_name} were created")
    for v in volume_ids:
        snaps = [s for s in world.snapshots.values() if s.volume_id == v and s.name.startswith(snapshot_prefix)]
        if len(snaps) != 1:
            problems.append(f"{len(snaps)} snapshots of volume {v}")
    if len(vms) == 1:
        vm_id = vms[0].id
        for v in volume_ids:
            ops = [op for op in world.operations.values() if op.volume_id == v and op.vm_id == vm_id
                   and op.type in ("attach", "attach-root") and op.status == "completed"]
            if len(ops) != 1:
                problems.append(f"volume {v} was attached {len(ops)} times to VM {vm_id}")
    return problems


def calls_of(world: Any, since: int, api: str | None = None, command: str | None = None) -> list[dict[str, Any]]:
    return [c for c in world.calls.entries if c["seq"] > since and (api is None or c["api"] == api)
            and (command is None or c["command"] == command)]


class CallTrigger:
    """Runs callbacks synchronously when the emulator records a matching call: a kill then
    lands after the outside system accepted the request and before its answer reaches the
    service (the answer is lost with the process)."""

    def __init__(self, world: Any) -> None:
        self.world = world
        self._armed: list[tuple[str, str, int, list[int], Callable[[dict[str, Any]], None]]] = []
        original = world.calls.record

        def record(api: str, command: str, params: dict[str, Any]) -> dict[str, Any]:
            entry = original(api, command, params)
            for armed in list(self._armed):
                a_api, a_command, nth, count, fire = armed
                if a_api == api and a_command == command:
                    count[0] += 1
                    if count[0] == nth:
                        self._armed.remove(armed)
                        fire(entry)
            return entry

        world.calls.record = record

    def arm(self, api: str, command: str, nth: int, fire: Callable[[dict[str, Any]], None]) -> None:
        self._armed.append((api, command, nth, [0], fire))

    def disarm(self) -> None:
        self._armed.clear()


# --------------------------------------------------------------------------- processes


def sigkill(serve: ServeProcess) -> float:
    """kill -9 now; the moment it was sent."""
    assert serve.proc is not None
    when = time.time()
    with contextlib.suppress(ProcessLookupError):
        os.kill(serve.proc.pid, signal.SIGKILL)
    return when


async def reap(serve: ServeProcess) -> None:
    if serve.proc is not None:
        await serve.proc.wait()
    with contextlib.suppress(Exception):
        serve._log.close()


def _iso(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def drive_intervals(log_paths: dict[str, Path], killed_at: dict[str, float],
                    ended_at: float) -> dict[str, list[tuple[str, float, float]]]:
    """Per job: (process, from, to) of every time a process acted on it, from the processes'
    JSON logs (the runner's `drive` lines). A process acts on a job from its first successful
    commit after taking it (every drive begins with a commit fenced by the lease: a process
    that took a job but was fenced off did nothing) until the job's task finishes or the
    runner cancels it (it does nothing more from there); a process killed while acting acted
    until its kill."""
    out: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for name, path in log_paths.items():
        open_: dict[str, float] = {}
        stopped: dict[str, float] = {}  # the runner cancelled the job's task (lease in doubt)
        for line in path.read_text(errors="replace").splitlines():
            if '"drive": ' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            what = (rec.get("fields") or {}).get("drive")
            job = rec.get("job_id")
            if what == "start":  # taken: acting from its first successful (fenced) commit on
                open_.pop(job, None)
                stopped.pop(job, None)
            elif what == "active":
                open_[job] = _iso(rec["time"])
            elif what == "stop" and job in open_:
                stopped[job] = _iso(rec["time"])
            elif what == "end" and job in open_:
                out[job].append((name, open_.pop(job), min(_iso(rec["time"]), stopped.pop(job, 1e18))))
        for job, began in open_.items():
            out[job].append((name, began, min(killed_at.get(name, ended_at), stopped.get(job, 1e18))))
    return out


def open_drives(path: Path) -> set[str]:
    """The jobs a process is driving now, from its log."""
    driving: set[str] = set()
    for line in path.read_text(errors="replace").splitlines():
        if '"drive": ' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        what = (rec.get("fields") or {}).get("drive")
        if what == "start":
            driving.add(rec.get("job_id"))
        elif what == "end":
            driving.discard(rec.get("job_id"))
    return driving


def overlaps(intervals: dict[str, list[tuple[str, float, float]]]) -> list[str]:
    """Jobs driven by two processes at the same time."""
    found = []
    for job, spans in intervals.items():
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if a[0] != b[0] and a[1] < b[2] and b[1] < a[2]:
                    found.append(f"job {job}: {a[0]} drove it {a[1]:.3f}-{a[2]:.3f}, "
                                 f"{b[0]} {b[1]:.3f}-{b[2]:.3f}")
    return found


# --------------------------------------------------------------------------- a cell


@dataclass
class Cell:
    """One isolated world: its own database, vhost and emulators, and its serve processes."""

    name: str
    db_url: str
    amqp_url: str
    tmp: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    emu: EmulatorHandle | None = None
    db: AsyncEngine | None = None
    control: EmulatorControl | None = None
    bus_cm: Any = None
    bus: BusClient | None = None
    log: EventLog | None = None
    processes: list[ServeProcess] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)
    _n: int = 0

    async def open(self) -> Cell:
        await fresh_database(self.db_url)
        self.emu = await start_emulators()
        self.db = make_engine(self.db_url, pool_size=5)
        self.control = EmulatorControl(self.emu.control_url)
        self.bus_cm = BusClient.connect(self.amqp_url)
        self.bus = await self.bus_cm.__aenter__()
        self.log = EventLog(self.amqp_url)
        await self.log.start()
        return self

    async def close(self) -> None:
        for p in self.processes:
            with contextlib.suppress(Exception):
                if p.proc is not None and p.proc.returncode is None:
                    p.proc.kill()
                    await p.proc.wait()
        if self.log is not None:
            await self.log.close()
        if self.bus_cm is not None:
            with contextlib.suppress(Exception):
                await self.bus_cm.__aexit__(None, None, None)
        if self.control is not None:
            await self.control.close()
        if self.db is not None:
            await self.db.dispose()
        if self.emu is not None:
            await self.emu.close()

    def env(self, **extra: str) -> dict[str, str]:
        assert self.emu is not None
        return service_env(self.db_url, self.amqp_url, self.emu, **{**CRASH_ENV, **self.env_extra, **extra})

    def serve(self, roles: str | None = None, **extra: str) -> ServeProcess:
        self._n += 1
        name = f"{self.name}-p{self._n}"
        path = self.tmp / f"serve-{name}.log"
        proc = ServeProcess(self.env(FAILOVER_PROCESS_NAME=name, **extra), path, roles=roles)
        proc.name = name  # type: ignore[attr-defined]
        self.processes.append(proc)
        self.logs[name] = path
        return proc

    async def start_serve(self, roles: str | None = None, **extra: str) -> ServeProcess:
        proc = self.serve(roles, **extra)
        await proc.start(timeout=60)
        return proc
