"""Wiring: `serve` builds everything here, in one place, from the settings.

Nothing connects at import time. `failoverctl serve` calls `run_service`; the tests and the
benchmark run that command as a process of its own, as users do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from adapters import bus
from adapters.cloudstack import CloudStackAdapter
from adapters.cloudstack_events import CloudStackEvents
from adapters.db.commands import CommandRecorder
from adapters.db.engine import make_engine
from adapters.db.migrate import SchemaBehind, schema_problem
from adapters.db.outbox import OutboxStore
from adapters.db.platform import PlatformTables
from adapters.db.projections import Projections
from adapters.db.store import JobStore
from adapters.injection import InjectionScript
from adapters.volume_daemon import VolumeDaemonAdapter
from consumers.commands import CommandConsumer
from consumers.projector import Projector
from publishers.relay import OutboxRelay
from statemachine.context import EngineConfig, JobContext, Observer, Ports
from statemachine.machine import STATES, build_machine
from statemachine.ports import JobRow

from . import metrics as m
from .health import named_checks, start_health_server
from .intake import IntakeProcess, IntakeThread
from .logs import bind_job, remember_job
from .runner import JobRunner
from .settings import Settings, redact_url

log = logging.getLogger("failover.service")
ROLES = ("orchestrator", "relay", "projector")


def roles_problem(settings: Settings, roles: Iterable[str]) -> str | None:
    """Why these settings cannot run with these roles (None: they can)."""
    roles = tuple(roles)
    asked = (("PROCESS", settings.intake_process), ("THREAD", settings.intake_thread and settings.intake_thread_explicit))
    for name, on in asked:  # (the thread's default runs it only where it can: Settings.intake_thread_wanted)
        if on and "orchestrator" in roles and "relay" not in roles:
            return (f"FAILOVER_INTAKE_{name}=true needs the relay role beside the orchestrator (the intake "
                    "tells the relay what it published): add relay to --roles, or set "
                    f"FAILOVER_INTAKE_{name}=false")
    return None


def _intake_place(svc: Service) -> str | None:
    """Where this serve takes commands: "thread", "process", "loop" (its own event loop, beside
    the jobs), or None (no orchestrator role: it takes none)."""
    if "orchestrator" not in svc.roles:
        return None
    if svc.intake is None:
        return "loop"
    return "process" if isinstance(svc.intake, IntakeProcess) else "thread"


def owner_id(settings: Settings) -> str:
    return settings.process_name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def engine_config(s: Settings) -> EngineConfig:
    return EngineConfig(
        zone=s.zone, template_id=s.template_id, service_offering_id=s.service_offering_id,
        disk_offering_id=s.disk_offering_id, default_network_id=s.network_id,
        appliance_vm_id=s.appliance_vm_id, snapshot_timeout=s.snapshot_timeout_seconds,
        async_job_timeout=s.async_job_timeout_seconds, volume_operation_timeout=s.volume_operation_timeout_seconds,
        retry_attempts=s.retry_attempts, retry_backoff=s.retry_backoff_seconds,
        retry_window=s.retry_window_seconds)


def tune_gc(young_after: int, full_after: int) -> None:
    """Set Python's collector for a process that holds many jobs' objects.

    `young_after` (`FAILOVER_GC_YOUNG_COLLECTION_AFTER`; Python's own threshold is 700): a young
    collection runs once this many more container objects were made than freed. A job's
    calls, commits and events make thousands that their reference counts free a moment later;
    at 700, collections kept catching them alive, and walked them again in the middle
    generation: 3.3 young and 0.3 middle collections per burst job, 1.9-4.0 ms of serve's CPU
    per job, 10-15% of it. At 10,000: 0.12 and 0.01 per job, 0.8-1.3 ms, with pauses of 5-12
    and 17-35 ms instead of 0.3-0.7 and 2.6-5.3 (bench/PROFILE.md).

    `full_after` (`FAILOVER_GC_FULL_COLLECTION_AFTER`; Python's own threshold is 10): a full
    collection only after this many middle ones. It walks every live object, and a thousand
    jobs in flight hold many: with 1,000 slow jobs, serve spent 29.3 s of CPU at 10 and 23.1 s
    at 100, and the phase took 30.9 s instead of 36.7 (bench/PROFILE.md). Memory held by
    garbage in cycles waits longer (RSS per job in flight 64.6 -> 78.5 kB in the same runs)."""
    _, middle, _ = gc.get_threshold()
    gc.set_threshold(young_after, middle, full_after)


def _observer(runner_ref: list[JobRunner]) -> Observer:
    def state_changed(job_id: str, old: str | None, new: str | None) -> None:
        if runner_ref:
            ctx = runner_ref[0].contexts.get(job_id)
            if ctx is not None:  # every line logged while this job's code runs names the job
                bind_job(job_id, str(ctx.row.correlation_id))
            # the in-progress gauge moves at once (runner.on_state), not only every few seconds
            # in `_gauges`: short steps show too
            runner_ref[0].state_changed(job_id, old, new)

    def job_ended(job_type: str, outcome: str, seconds: float) -> None:
        m.JOBS_ENDED.labels(job_type=job_type, outcome=outcome).inc()
        m.JOB_DURATION.labels(job_type=job_type, outcome=outcome).observe(seconds)

    return Observer(
        step_finished=lambda jt, step, outcome, s: m.child(m.STEP_DURATION, jt, step, outcome).observe(s),
        job_started=lambda jt: m.JOBS_STARTED.labels(job_type=jt).inc(),
        job_ended=job_ended,
        rollback_ended=lambda outcome: m.ROLLBACKS.labels(outcome=outcome).inc(),
        state_changed=state_changed,
        retried=lambda code, message: None,
    )


@dataclass
class Service:
    """A running `serve` process's parts (tests reach in for counts and state)."""

    settings: Settings
    owner: str
    roles: tuple[str, ...]
    store: JobStore | None = None
    runner: JobRunner | None = None
    relay: OutboxRelay | None = None
    intake: IntakeProcess | IntakeThread | None = None  # FAILOVER_INTAKE_PROCESS / _THREAD
    health_port: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class _CancelledStepNoise(logging.Filter):
    """transitions logs an ERROR for every callback that is cancelled; the runner cancels a
    job's step on purpose (its lease is in doubt, or the drain time is over), and says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CancelledError" not in record.getMessage()


def _hold(runner: JobRunner, relay: OutboxRelay | None, job_id: str) -> None:
    """The command consumer is recording a command for `job_id`: its runner's claims pass the
    job by, and its relay reads none of the job's events until `_unhold`, by when `publish_now`
    has them. (A relay round whose read of the outbox returned between the record's commit and
    `publish_now` published the job's first event a second time.)"""
    runner.hold(job_id)
    if relay is not None:
        relay.hold_elsewhere(job_id)


def _unhold(runner: JobRunner, relay: OutboxRelay | None, job_id: str) -> None:
    runner.unhold(job_id)
    if relay is not None:
        relay.release_elsewhere(job_id)

async def run_service(settings: Settings, roles: Iterable[str] = ROLES, *, service: Service | None = None,
                      install_signals: bool = True) -> Service:
    """Run until SIGTERM/SIGINT (or `service.stop` is set), then drain and return."""
    roles = tuple(roles)
    if (problem := roles_problem(settings, roles)) is not None:
        raise ValueError(problem)
    noise = logging.getLogger("transitions.extensions.asyncio")
    if not any(isinstance(f, _CancelledStepNoise) for f in noise.filters):
        noise.addFilter(_CancelledStepNoise())
    svc = service or Service(settings=settings, owner=owner_id(settings), roles=roles)
    svc.roles = roles
    aborted: list[int] = []  # the signal that stopped the start (then nothing was claimed yet)
    unwinding: list[bool] = []  # the start failed (or was stopped): what it opened is being closed
    if install_signals:
        # from the first moment: a SIGTERM while serve starts (a broker or database slow to
        # answer, the intake up to a minute) ends the start at once, and what it opened is closed
        # in order (the intake's deliveries under way finished, connections closed), not killed
        loop, starting = asyncio.get_running_loop(), asyncio.current_task()

        def on_signal(sig: int) -> None:
            svc.stop.set()
            if svc.ready.is_set() or starting is None:
                return  # (serving: the drain follows)
            if aborted:  # a second one while the start is being stopped: no more waiting
                loop.remove_signal_handler(sig)
                signal.raise_signal(sig)
            elif not unwinding:  # (a start that failed ends with its own error, closing what it opened)
                aborted.append(sig)
                starting.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _serve(svc, settings, roles, lambda: unwinding.append(True))
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if aborted and current is not None and current.uncancel() == 0:
            log.info("stopped while starting (%s): no job was claimed here (one whose command the intake "
                     "had recorded already is run by another serve once its lease runs out, or by this "
                     "one when it starts again)", signal.Signals(aborted[0]).name)
            return svc
        raise


class _Stack(AsyncExitStack):
    """An exit stack that says when it begins to close on an error (before closing anything)."""

    def __init__(self, on_error: Callable[[], None]) -> None:
        super().__init__()
        self._on_error = on_error

    async def __aexit__(self, *exc: Any) -> bool | None:
        if exc[0] is not None:
            self._on_error()
        return await super().__aexit__(*exc)


async def _serve(svc: Service, settings: Settings, roles: tuple[str, ...], on_error: Callable[[], None]) -> Service:
    async with _Stack(on_error) as stack:
        # 40 kept open, none beyond: with a pool of 20 and 20 overflow, every burst of commits
        # opened overflow connections and closed them again as they came back (connect,
        # handshake, the dialect's set-up: 2% of serve's CPU with a thousand slow jobs)
        engine = make_engine(settings.database_url.get_secret_value(), pool_size=40, max_overflow=0)
        stack.push_async_callback(engine.dispose)
        try:
            problem = await schema_problem(engine)
        except DBAPIError as exc:  # (unreachable: the start goes on and waits for it, as it did)
            log.warning("could not read the database's migration (%s); serve starts without that check",
                        type(exc).__name__)
            problem = None
        if problem is not None:
            raise SchemaBehind(problem)
        # leases (jobs' and the relay's) on their own small pool: never starved by the commits
        lease_engine = make_engine(settings.database_url.get_secret_value(), pool_size=2)
        stack.push_async_callback(lease_engine.dispose)
        # the relay's and the projector's own small pool: with a thousand jobs in flight, the
        # jobs' pool has hundreds of commits queued at once, and the relay's marking of a batch
        # as sent waited behind them for up to 4 s (the progress events with it)
        events_engine = make_engine(settings.database_url.get_secret_value(), pool_size=2)
        stack.push_async_callback(events_engine.dispose)
        connection = await bus.connect(settings.amqp_url.get_secret_value(), ca_file=settings.amqp_ca_file,
                                       name=f"failover {svc.owner}")
        stack.push_async_callback(connection.close)
        topology = await bus.declare(connection)

        async def db_ok() -> bool:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True

        async def serving() -> bool:  # queues declared, consumers started (not yet while starting)
            return (svc.ready.is_set() and not svc.stop.is_set()
                    and (svc.intake is None or svc.intake.alive))

        connections = [connection]

        async def broker_ok() -> bool:  # serve's connections, and its intake's (thread or process)
            return (all(not c.is_closed and c.connected.is_set() for c in connections)
                    and (svc.intake is None or svc.intake.broker_up))

        health = await start_health_server(settings.metrics_host, settings.metrics_port,
                                           named_checks({"database": db_ok, "broker": broker_ok,
                                                         "serving": serving}))
        stack.push_async_callback(health.close)
        svc.health_port = health.port

        tasks: list[asyncio.Task[None]] = []
        # (ended before what they use is closed, also when the start fails or is stopped)
        stack.push_async_callback(_cancelled, tasks)
        relay = None
        if "relay" in roles:
            relay = OutboxRelay(OutboxStore(events_engine, svc.owner, lease_engine=lease_engine), topology.events, batch=settings.outbox_batch,
                                poll_seconds=settings.outbox_poll_seconds, lease_seconds=settings.lease_seconds,
                                linger=settings.outbox_linger_seconds,
                                published=lambda t: m.child(m.EVENTS_PUBLISHED, t).inc())
            svc.relay = relay
            tasks.append(asyncio.create_task(relay.run(), name="outbox-relay"))
        wake = relay.wake if relay is not None else (lambda: None)

        projector = None
        if "projector" in roles:
            # its own connection: a projector acking whole batches makes the broker push deliveries
            # as fast as they come, and on the relay's connection they queued the relay's publisher
            # confirms behind them (the relay's backlog went from 0.2 s to 1.5 s in a 300-job burst)
            pconnection = await bus.connect(settings.amqp_url.get_secret_value(), ca_file=settings.amqp_ca_file,
                                            name=f"failover {svc.owner} projector")
            stack.push_async_callback(pconnection.close)
            connections.append(pconnection)
            pchannel = await pconnection.channel()
            pqueue = await bus.declare_work_queue(pchannel, bus.PROJECTOR_QUEUE, bus.EVENTS_EXCHANGE,
                                                  delivery_limit=settings.delivery_limit,
                                                  prefetch=settings.projector_prefetch)

            def observe(applied: int, dupes: int, lags: list[float]) -> None:
                m.PROJECTOR_EVENTS.labels(projector="views", outcome="applied").inc(applied)
                m.PROJECTOR_EVENTS.labels(projector="views", outcome="duplicate").inc(dupes)
                for lag in lags:
                    m.PROJECTOR_LAG.observe(max(0.0, lag))

            projector = Projector(pqueue, Projections(events_engine), batch=settings.projector_prefetch, observe=observe,
                                  linger=settings.projector_linger_seconds)
            await projector.start()

        consumer = None
        if "orchestrator" in roles:
            # no cookie jar: CloudStack's API calls are signed one by one and the Volume Daemon
            # keeps no session, so every request's cookie filtering and every response's parsing
            # of Set-Cookie would be work for nothing (a share of aiohttp's CPU per call)
            http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
            stack.push_async_callback(http.close)
            store = JobStore(engine, svc.owner, on_outbox=wake, lease_engine=lease_engine,
                             lease_seconds=settings.lease_seconds)
            store.on_transaction = m.JOB_COMMITS_PER_TRANSACTION.observe
            svc.store = store
            cloudstack = CloudStackAdapter(
                settings.cloudstack_url, settings.cloudstack_api_key.get_secret_value(),
                settings.cloudstack_secret_key.get_secret_value(), session=http,
                poll_interval=settings.poll_interval_seconds, timeout=settings.http_timeout_seconds,
                batch_from=settings.poll_batch_from,
                max_calls_per_second=settings.cloudstack_max_calls_per_second,
                on_throttled=m.CLOUDSTACK_THROTTLED.inc,
                observe=m.observe_adapter_call)
            if settings.cloudstack_events_exchange:  # (in the background: the waits poll meanwhile)
                tasks.append(asyncio.create_task(_cloudstack_events(settings, svc.owner, cloudstack),
                                                 name="cloudstack-events"))
            ports = Ports(
                cloudstack=cloudstack,
                volumes=VolumeDaemonAdapter(settings.volume_daemon_url, session=http,
                                            poll_interval=settings.poll_interval_seconds,
                                            batch_from=settings.poll_batch_from,
                                            timeout=settings.http_timeout_seconds, observe=m.observe_adapter_call),
                injection=InjectionScript(settings.inject_argv, timeout=settings.inject_timeout_seconds,
                                          observe=m.observe_adapter_call, lock_dir=settings.inject_lock_dir or None),
                platform=m.observed("platform_db", PlatformTables(engine)),
                store=store,
            )
            config = engine_config(settings)
            runner_ref: list[JobRunner] = []
            observer = _observer(runner_ref)

            def make_context(row: JobRow) -> JobContext:
                remember_job(row.job_id, str(row.correlation_id))  # for the runner's lines about it
                return JobContext(row=row, ports=ports, config=config, observer=observer)

            runner = JobRunner(store, build_machine(), make_context, capacity=settings.max_concurrent_jobs,
                               lease_seconds=settings.lease_seconds, claim_interval=settings.claim_interval_seconds)
            runner.on_state = m.move_job_state
            runner_ref.append(runner)
            svc.runner = runner
            if relay is not None and (settings.intake_process or settings.intake_thread_wanted(roles)):
                told: dict[str, Any] = dict(hold=runner.hold, unhold=runner.unhold, adopt=runner.adopt, relay=relay,
                                            count=lambda t, o: m.COMMANDS.labels(type=t, outcome=o).inc(),
                                            restarted=m.INTAKE_RESTARTS.inc, lag=m.INTAKE_LOOP_LAG.observe)
                intake = (IntakeProcess(svc.owner, **told) if settings.intake_process
                          else IntakeThread(svc.owner, settings, switch_seconds=settings.intake_thread_switch_seconds,
                                            **told))
                svc.intake = intake
                stack.push_async_callback(intake.stop)  # (however serve ends; after a drain, a no-op)
                await intake.start()
            else:
                recorder = CommandRecorder(engine, svc.owner, settings.lease_seconds)
                recorder.on_outbox = wake
                cchannel = await connection.channel(publisher_confirms=True)
                cqueue = await bus.declare_work_queue(cchannel, bus.COMMANDS_QUEUE, bus.COMMANDS_EXCHANGE,
                                                      delivery_limit=settings.delivery_limit,
                                                      prefetch=settings.command_prefetch)
                dlx = await cchannel.get_exchange(bus.DLX_EXCHANGE)
                consumer = CommandConsumer(cqueue, dlx, recorder, max_bytes=settings.max_message_bytes,
                                           on_accepted=runner.adopt,
                                           count=lambda t, o: m.COMMANDS.labels(type=t, outcome=o).inc(),
                                           publish_first=relay.publish_now if relay is not None else None,
                                           hold=functools.partial(_hold, runner, relay),
                                           unhold=functools.partial(_unhold, runner, relay))
                await consumer.start()
            # (last: a start that fails above leaves no job claimed and leased by this process)
            tasks.append(asyncio.create_task(runner.run(), name="runner"))  # not job-*: see logs.py
            tasks.append(asyncio.create_task(_gauges(runner, OutboxStore(engine, svc.owner)), name="gauges"))

        log.info("serving", extra={"fields": {"roles": list(roles), "owner": svc.owner, "intake": _intake_place(svc),
                                              "metrics_port": health.port, **settings.safe_summary()}})
        # Everything made so far (modules, the ORM's tables, compiled statements, pools) lives as
        # long as the process: moved out of the collector's reach, a full collection no longer
        # walks it. Such a collection stopped every job, command and event for 60-110 ms, a
        # dozen times in a benchmark run (the worst delays of request -> JobAccepted).
        # (failover_gc_pause_seconds shows the pauses that are left)
        m.watch_gc()
        tasks.append(asyncio.create_task(m.watch_event_loop(), name="event-loop-lag"))
        gc.collect()
        gc.freeze()
        tune_gc(settings.gc_young_collection_after, settings.gc_full_collection_after)
        svc.ready.set()
        await svc.stop.wait()

        # ---- drain (guarantee 9): stop taking commands, hand jobs back, flush the outbox,
        # all bounded by FAILOVER_DRAIN_SECONDS (plus a few seconds to cancel what is stuck)
        log.info("draining: no new commands; running jobs stop at their next safe point")
        began = time.monotonic()

        def left(floor: float) -> float:
            return max(floor, settings.drain_seconds - (time.monotonic() - began))

        if consumer is not None:
            await _bounded(consumer.stop(), 10.0, "stopping the command consumer")
        if svc.intake is not None:  # its last lines (holds, what it published) are applied first
            await svc.intake.stop(min(15.0, left(1.0)))
        if svc.runner is not None:
            await svc.runner.drain(left(1.0))
        if projector is not None:
            await _bounded(projector.stop(), 5.0, "stopping the projector")
        if relay is not None:
            if not await relay.flush(left(2.0)):
                log.warning("the outbox was not flushed completely; the next relay publishes the rest")
        await _cancelled(tasks)
        log.info("drained in %.1f s", time.monotonic() - began)
    return svc


_GAUGE_STATES = [s for s in STATES if s not in ("completed", "failed", "cancelled", "cleaned_up")]


async def _cloudstack_events(settings: Settings, owner: str, cloudstack: CloudStackAdapter) -> None:
    """Listen to CloudStack's event bus (FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE) on a connection of
    its own to FAILOVER_CLOUDSTACK_EVENTS_AMQP_URL's broker (by default serve's), trying again (up
    to every minute) while that fails: serve starts and runs without it, its waits polling only.
    Runs until cancelled (serve stopping), holding the listener, then closes its connection."""
    listener = CloudStackEvents(settings.cloudstack_events_exchange, cloudstack.job_done,
                                queue=f"failover.cloudstack-events.{owner}",
                                seen=lambda outcome: m.CLOUDSTACK_JOB_EVENTS.labels(outcome=outcome).inc())
    url = settings.cloudstack_events_amqp_url or settings.amqp_url
    own: AbstractRobustConnection | None = None
    pause = 1.0
    try:
        while True:
            try:
                if own is None:
                    own = await bus.connect(url.get_secret_value(), ca_file=settings.amqp_ca_file,
                                            name=f"failover {owner} cloudstack events")
                await listener.start(own)
                await asyncio.Event().wait()  # (listening, the connection restoring it, until cancelled)
            except Exception as exc:
                log.warning("cannot listen to CloudStack's event bus (exchange %s on %s): %s: %s; the waits on "
                            "CloudStack poll only meanwhile, trying again in %.0f s: check "
                            "FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE and FAILOVER_CLOUDSTACK_EVENTS_AMQP_URL",
                            settings.cloudstack_events_exchange,
                            redact_url(url.get_secret_value()), type(exc).__name__, exc, pause)
                await asyncio.sleep(pause)
                pause = min(60.0, pause * 2)
    finally:
        if own is not None:
            with contextlib.suppress(Exception):
                await own.close()


async def _cancelled(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _bounded(call: Awaitable[object], seconds: float, what: str) -> None:
    try:
        await asyncio.wait_for(call, seconds)
    except Exception as exc:  # the broker may be gone: go on draining
        log.warning("%s failed (%s); going on", what, type(exc).__name__)


def set_waiting_gauges(runner: JobRunner) -> None:
    """`failover_jobs_waiting{priority}` from the runner's queues."""
    m.JOBS_WAITING.labels(priority="live").set(runner.waiting_first)
    m.JOBS_WAITING.labels(priority="other").set(runner.waiting - runner.waiting_first)


async def _gauges(runner: JobRunner, outbox: OutboxStore) -> None:
    while True:
        with contextlib.suppress(Exception):
            m.set_job_state_gauges(runner.entered.values(), time.time(), known_states=_GAUGE_STATES)
            set_waiting_gauges(runner)
            count, age = await outbox.backlog()
            m.OUTBOX_BACKLOG.set(count)
            m.OUTBOX_OLDEST_UNSENT_AGE.set(age)
        await asyncio.sleep(5)
