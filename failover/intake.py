"""The intake process (`FAILOVER_INTAKE_PROCESS=true`): commands taken, recorded and answered in
a process of their own, beside `serve`'s event loop instead of inside it. The intake thread
(`FAILOVER_INTAKE_THREAD`, on by default; `IntakeThread` below) runs the same in a thread of
`serve`'s, with an event loop of its own, and tells `serve` the same messages without a pipe.

Why: in one process, a command's delivery, its two database round trips and its `JobAccepted`
each wait their turn in an event loop busy with every running job's calls, commits and events.
At 20 requests/s on two cores that queue made request -> JobAccepted 67-100 ms at p50 and
107-208 ms at p99 (bench/PROFILE.md); the same work in a process that does nothing else
measured 11.7 / 37.8 ms in the same benchmark run.

How: `serve` starts `python -m failover.intake OWNER` and keeps it running (restarted after a
pause should it die). The child consumes `failover.commands` and records each command exactly as
one process would (consumers/commands.py, adapters/db/commands.py), but leases the jobs it
records to `OWNER/intake`; it publishes the decision's first event at once with confirms, and
tells `serve`, one JSON line per message on its stdout, what the in-process consumer would have
told the runner and the relay, in the same order:

    {"m": "hold", "job": ...}        a command that may create this job is being recorded
    {"m": "sending", "ids": [...]}   its first events are committed and being published now
    {"m": "sent", "events": [[id, type], ...]}, {"m": "unsent", "ids": [...]}
    {"m": "adopt", "job": ..., "first": bool}  run it (its JobAccepted is confirmed, or left to the
                                     relay); first: a live failover, before the others waiting
    {"m": "unhold", "job": ...}
    {"m": "count", "type": ..., "outcome": ...}   the commands metric, counted by `serve`
    {"m": "ready"}                    consuming
    {"m": "broker", "up": ...}        its broker connection went down, or is back (serve's
                                      /readyz names the broker meanwhile)
    {"m": "lag", "s": ...}            how late its event loop woke its quarter-second timer
                                      (failover_intake_loop_lag_seconds)

The runner takes a job from `OWNER/intake` only at `adopt`, so none starts before its first
event left (its claims pass over jobs leased to another name). The relay skips what the child
is publishing, and every event of a held job, and marks them sent once confirmed. A hold line
that reaches `serve` only after a relay round has read the commit it announced (serve's loop
stalled while the child went on) lets the relay publish that `JobAccepted` too: a duplicate,
which every consumer drops by job_id and sequence; the order of the job's events holds (the
relay publishes in commit order, and the job has not started). Should the child die, `serve`
releases its holds and hands whatever it was publishing to the relay; its unacked deliveries go
back to the queue, and a job it had recorded but not handed over is claimed once its lease
(`FAILOVER_LEASE_SECONDS`) runs out. The child stops on SIGTERM (taking no more, finishing the
deliveries under way) or when `serve` is gone (its stdin closes). It reads its settings from the
environment (and `.env`), as `failoverctl serve` does.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("failover.intake")
# an intake's body: (settings, owner, send(kind, **fields), stop) -> runs until stop is set
Body: TypeAlias = "Callable[[Any, str, Callable[..., None], asyncio.Event], Awaitable[None]]"
RESTART_PAUSE = 1.0  # seconds before a child that died is started again (doubling, up to 30)
INTAKE_POOL = 16  # the child's database connections (a delivery holds one for two round trips)
# how often the intake looks at its broker connection, and tells serve when it went down or came
# back (serve's /readyz names the broker while the intake's connection is down); the same timer
# measures how late the intake's event loop wakes (failover_intake_loop_lag_seconds)
BROKER_WATCH_SECONDS = 0.25


class _Supervisor(abc.ABC):
    """serve's side of an intake (a child process or a thread): starts it, applies what it
    says, in order, and starts it again should it end while serve runs."""

    what = "the intake"

    def __init__(self, owner: str, *, hold: Callable[[str], None], unhold: Callable[[str], None],
                 adopt: Callable[[str, bool], None], relay: Any, count: Callable[[str, str], None],
                 stop_seconds: float = 15.0, restart_pause: float = RESTART_PAUSE,
                 restarted: Callable[[], None] = lambda: None,
                 lag: Callable[[float], None] = lambda seconds: None) -> None:
        self.owner = owner
        self.hold, self.unhold, self.adopt, self.count = hold, unhold, adopt, count
        self.relay = relay  # publishers.relay.OutboxRelay
        self.stop_seconds = stop_seconds
        self.restart_pause = restart_pause
        self.restarted = restarted  # (failover_intake_process_restarts_total)
        self.lag = lag  # (failover_intake_loop_lag_seconds)
        self.ready = asyncio.Event()
        self.broker_up = True  # the intake's own broker connection, as it last said ("broker")
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_asked = asyncio.Event()  # ends a restart's pause at once
        self._ever_ready = False  # once it was, an intake that cannot start is tried again
        self._sending: set[int] = set()  # outbox ids the intake is publishing

    @property
    def alive(self) -> bool:
        return self.ready.is_set() and self._running()

    @abc.abstractmethod
    def _running(self) -> bool:
        """Whether the intake's thread or process is running."""

    @abc.abstractmethod
    async def _run_once(self) -> str:
        """Start the intake and return once it has ended and everything it said is applied:
        how it ended, for the log."""

    @abc.abstractmethod
    def _ask_stop(self) -> None:
        """Ask the intake under way to finish the deliveries it has and stop."""

    @abc.abstractmethod
    def _force_stop(self) -> float:
        """It did not stop when asked: end it, and say how long it may take to end."""

    async def start(self, timeout: float = 60.0) -> None:
        """Start the intake; return once it consumes. An intake that cannot start (bad settings,
        the broker or the database unreachable) is an error here, with its reason in the log."""
        self._task = asyncio.create_task(self._supervise(), name="intake")
        ready = asyncio.create_task(self.ready.wait())
        try:
            await asyncio.wait({ready, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ever_ready:  # (one that was ready and has died since is being started again)
            await self.stop()
            raise RuntimeError(f"{self.what} did not start within {timeout:.0f} s; the log lines above say "
                               "why (FAILOVER_INTAKE_PROCESS=false and FAILOVER_INTAKE_THREAD=false run the "
                               "intake in serve's own event loop)")

    async def _supervise(self) -> None:
        pause = self.restart_pause
        while not self._stopping:
            began = time.monotonic()
            ended = await self._run_once()
            self.ready.clear()  # (not alive, whether or not its thread or process is quite gone)
            if self._stopping:
                return
            if not self._ever_ready:  # never started: serve's start fails, the log says why
                log.error("%s %s before it was ready", self.what, ended)
                return
            pause = self.restart_pause if time.monotonic() - began > 60 else min(pause * 2, 30.0)
            self.restarts += 1
            self.restarted()
            log.error("%s %s; commands wait in the queue until it is started again in %.0f s",
                      self.what, ended, pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_asked.wait(), pause)

    def _apply(self, msg: dict[str, Any]) -> None:
        kind = msg["m"]
        if kind == "hold":  # (the relay keeps the count: release_all_elsewhere)
            self.hold(msg["job"])
            self.relay.hold_elsewhere(msg["job"])
        elif kind == "unhold":
            self.unhold(msg["job"])
            self.relay.release_elsewhere(msg["job"])
        elif kind == "adopt":
            self.adopt(msg["job"], bool(msg.get("first")))
        elif kind == "sending":
            self._sending.update(msg["ids"])
            self.relay.sending_elsewhere(msg["ids"])
        elif kind == "sent":
            events = [(int(i), str(t)) for i, t in msg["events"]]
            self._sending.difference_update(i for i, _ in events)
            self.relay.sent_elsewhere(events)
        elif kind == "unsent":
            self._sending.difference_update(msg["ids"])
            self.relay.unsent_elsewhere(msg["ids"])
        elif kind == "count":
            self.count(msg["type"], msg["outcome"])
        elif kind == "ready":
            self._ever_ready = True
            self.broker_up = True
            self.ready.set()
        elif kind == "lag":
            self.lag(float(msg["s"]))
        elif kind == "broker":
            self.broker_up = bool(msg["up"])
            if self.broker_up:
                log.info("%s: its broker connection is back; this serve takes commands again", self.what)
            else:
                log.warning("%s: its broker connection is down; this serve takes no commands until it is "
                            "back (they wait in the queue; /readyz names the broker)", self.what)

    def _released(self) -> None:
        """The intake is gone: its holds end (a recorded job is then claimed and resumed here)
        and what it was publishing is the relay's."""
        for job_id, n in self.relay.release_all_elsewhere().items():
            for _ in range(n):
                self.unhold(job_id)
        if self._sending:
            self.relay.unsent_elsewhere(list(self._sending))
            self._sending.clear()

    async def stop(self, seconds: float | None = None) -> None:
        """Ask the intake to stop and wait for it to finish the deliveries under way (at most
        `seconds`, by default `stop_seconds`)."""
        self._stopping = True
        self._stop_asked.set()
        self._ask_stop()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), seconds if seconds is not None else self.stop_seconds)
        except TimeoutError:
            grace = self._force_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, grace)


class IntakeProcess(_Supervisor):
    """`FAILOVER_INTAKE_PROCESS=true`: the intake in a child process, its messages JSON lines
    on the child's stdout."""

    what = "the intake process"

    def __init__(self, owner: str, *, argv: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(owner, **kwargs)
        self.argv = argv or [sys.executable, "-m", "failover.intake", owner]
        self._proc: asyncio.SubprocessTransport | None = None

    def _running(self) -> bool:
        return self._proc is not None and self._proc.get_returncode() is None

    @property
    def pid(self) -> int | None:
        return self._proc.get_pid() if self._proc is not None else None

    async def _run_once(self) -> str:
        loop = asyncio.get_running_loop()
        try:
            # its stdin is a pipe from here: it ends when serve does, however serve ends
            transport, child = await loop.subprocess_exec(
                lambda: _ChildLines(self._on), *self.argv, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=None)
        except OSError as exc:  # (no process: nothing to release)
            log.error("the intake process could not be started (%s)", exc)
            return "could not be started"
        self._proc = transport
        if self._stopping:  # stop() came while it was being started
            self._ask_stop()
        try:
            await child.gone.wait()  # exited, and every line it wrote applied
        finally:
            self._released()
        code = transport.get_returncode()
        transport.close()
        return f"exited with {code}"

    def _ask_stop(self) -> None:  # SIGTERM
        proc = self._proc
        if proc is not None and proc.get_returncode() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def _force_stop(self) -> float:
        proc = self._proc  # (the current child: one may have been started meanwhile)
        log.warning("the intake process did not stop in time; killed")
        if proc is not None and proc.get_returncode() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return 5.0  # (its pipes close as it dies)

    def _on(self, line: bytes) -> None:
        try:
            self._apply(json.loads(line))
        except Exception:  # a line of ours that cannot be applied: say so, never stop reading
            log.exception("intake process: could not apply %r", line[:200])


class IntakeThread(_Supervisor):
    """`FAILOVER_INTAKE_THREAD` (on by default): the intake in a thread of serve's, with an event loop,
    a broker connection and database connections of its own; its messages are applied in
    serve's loop, in the order it sent them (`call_soon_threadsafe`).

    Both threads share one interpreter lock: the same work, measured no dearer (README,
    "A fast answer under load"). What changes is the wait. A delivery, a database answer or a
    confirm for the intake wakes its own loop, which waits only for the lock (handed over after
    `sys.getswitchinterval()` at the latest, but for a collection or a long call in C), where in
    serve's loop it waited behind every running job's ready callbacks."""

    what = "the intake thread"

    def __init__(self, owner: str, settings: Settings | None, *, body: Body | None = None,
                 switch_seconds: float | None = None, **kwargs: Any) -> None:
        super().__init__(owner, **kwargs)
        self.settings = settings
        # FAILOVER_INTAKE_THREAD_SWITCH_SECONDS: at Python's 5 ms, an answer's four or five
        # steps (the delivery, two database answers, the confirm) each waited up to that long
        # for the lock while serve's loop ran jobs; set for the process while the thread runs
        self.switch_seconds = switch_seconds
        self._switch_before: float | None = None
        # what the thread runs: `_intake` (a stand-in in the supervisor's tests)
        self._body: Body = body or partial(_intake, where="a thread")
        self._thread: threading.Thread | None = None
        self._stop_child: Callable[[], None] | None = None

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self, timeout: float = 60.0) -> None:
        if self.switch_seconds is not None and self._switch_before is None:
            self._switch_before = sys.getswitchinterval()
            sys.setswitchinterval(self.switch_seconds)
        await super().start(timeout)

    async def stop(self, seconds: float | None = None) -> None:
        try:
            await super().stop(seconds)
        finally:
            if self._switch_before is not None:
                sys.setswitchinterval(self._switch_before)
                self._switch_before = None

    async def _run_once(self) -> str:
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        ended: list[str] = []
        run = _ThreadRun()

        def apply(msg: dict[str, Any]) -> None:  # (in serve's loop)
            if not run.released:  # a thread left behind after its time changes nothing any more
                self._apply(msg)

        def send(kind: str, **fields: Any) -> None:  # (in the intake's thread)
            run.said_ready = run.said_ready or kind == "ready"
            try:
                loop.call_soon_threadsafe(apply, {"m": kind, **fields})
            except RuntimeError:  # serve's loop is closed: serve is going, and its intake with it
                if run.stop_here is not None:
                    run.stop_here()

        async def body() -> None:
            stop = asyncio.Event()
            child_loop = asyncio.get_running_loop()
            task = asyncio.current_task()

            def stop_here() -> None:  # (in the intake's thread)
                stop.set()
                if not run.said_ready and task is not None:
                    task.cancel()  # still starting (a broker or database slow to answer): give up now

            def stop_from_serve() -> None:
                child_loop.call_soon_threadsafe(stop_here)

            run.stop_here, self._stop_child = stop_here, stop_from_serve
            if self._stopping:
                stop_here()
            await self._body(self.settings, self.owner, send, stop)

        def thread() -> None:
            try:
                from .cli import _loop_factory
                with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                    runner.run(body())
                ended.append("stopped")
            except asyncio.CancelledError:
                ended.append("stopped while starting")
            except BaseException as exc:
                log.error("the intake thread failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
                ended.append(f"failed ({type(exc).__name__})")
            finally:
                with contextlib.suppress(RuntimeError):  # serve's loop is closed: nothing to tell
                    loop.call_soon_threadsafe(gone.set)  # (after every message it sent)

        self._thread = threading.Thread(target=thread, name="failover-intake", daemon=True)
        self._thread.start()
        try:
            await gone.wait()
        finally:
            run.released = True
            self.ready.clear()
            self._ask_stop()  # (one left behind after its time: it stops once it can)
            self._stop_child = None
            self._released()
        return ended[0] if ended else "ended"

    def _ask_stop(self) -> None:
        stop = self._stop_child
        if stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: it is ending
                stop()

    def _force_stop(self) -> float:  # a thread cannot be killed: it ends with serve
        log.warning("the intake thread did not stop in time; its deliveries under way go back to the "
                    "queue when serve exits, and what it says from now on is ignored")
        return 0.0  # (its holds are released now: serve's drain hands the jobs back)


@dataclass(slots=True)
class _ThreadRun:
    """One start of the intake thread, as both threads see it."""
    said_ready: bool = False
    released: bool = False  # serve is done with it: its holds released, its messages dropped
    stop_here: Callable[[], None] | None = None  # (in the intake's thread)


class _ChildLines(asyncio.SubprocessProtocol):
    """The child's stdout, applied line by line as it arrives (no task of its own in between:
    a hold the child wrote before committing is applied as soon as the loop sees the pipe
    readable, which is no later than it sees the answer of any read made after that commit)."""

    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        self.on_line = on_line
        self.buffer = b""
        self.gone = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            if line:
                self.on_line(line)

    def connection_lost(self, exc: Exception | None) -> None:  # exited, its pipes closed
        self.gone.set()


# --------------------------------------------------------------------------- the child


class _Pipe(asyncio.Protocol):
    """One end of a pipe: `gone` is set once it is closed (read end: serve is gone; write
    end: every line written has been handed to the kernel)."""

    def __init__(self, gone: asyncio.Event | None = None) -> None:
        self.gone = gone or asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()


async def _child(settings: Settings, owner: str, out: int) -> None:
    """The intake process's body: `_intake`, its lines written to serve over the pipe `out`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    starting, ready, aborted = asyncio.current_task(), [False], [False]

    def on_term() -> None:  # stop taking commands; while still starting (a broker or database slow
        stop.set()          # to answer), give up at once, as the intake thread does
        if not ready[0] and not aborted[0] and starting is not None:
            aborted[0] = True
            starting.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    # serve's stdin end: closed when serve is gone
    await loop.connect_read_pipe(lambda: _Pipe(stop), os.fdopen(0, "rb"))
    writer, written = await loop.connect_write_pipe(_Pipe, os.fdopen(out, "wb"))

    def send(kind: str, **fields: Any) -> None:
        ready[0] = ready[0] or kind == "ready"
        if writer.is_closing():  # exiting: serve releases whatever is still held
            return
        writer.write(json.dumps({"m": kind, **fields}, separators=(",", ":")).encode() + b"\n")

    try:
        await _intake(settings, owner, send, stop, where=f"process {os.getpid()}")
    except asyncio.CancelledError:
        if not (aborted[0] and starting is not None and starting.uncancel() == 0):
            raise
        log.info("intake: stopped while starting")
    finally:
        writer.close()  # after the lines still buffered (the last unholds) are written
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(written.gone.wait(), 5.0)


async def _intake(settings: Settings, owner: str, send: Callable[..., None], stop: asyncio.Event, *,
                  where: str) -> None:
    """Consume, record and answer commands until `stop` is set, telling serve what happened
    through `send(kind, **fields)` (the messages of this module's docstring), in order."""
    import aio_pika
    from sqlalchemy import text

    from adapters import bus
    from adapters.db.commands import CommandRecorder
    from adapters.db.engine import make_engine
    from adapters.db.outbox import OutboxEvent, OutboxStore
    from adapters.db.store import intake_owner
    from consumers.commands import CommandConsumer
    from publishers.relay import OutboxRelay

    engine = make_engine(settings.database_url.get_secret_value(), pool_size=INTAKE_POOL, max_overflow=0)
    connection: aio_pika.abc.AbstractRobustConnection | None = None
    try:
        # one connection opened now: an unreachable database stops the start here, with its
        # reason, and the first command does not wait for a connection's handshake (with the
        # pool empty, the benchmark's one-job probe was answered in 17-18 ms, against 10-12 in
        # serve's own loop)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        connection = await bus.connect(settings.amqp_url.get_secret_value(), ca_file=settings.amqp_ca_file,
                                       name=f"failover {owner} intake")
        topology = await bus.declare(connection)
        # only its publish: the relay itself runs in serve
        publisher = OutboxRelay(OutboxStore(engine, owner), topology.events, batch=1, poll_seconds=1.0,
                                lease_seconds=settings.lease_seconds)

        async def publish_first(events: Collection[OutboxEvent]) -> bool:
            send("sending", ids=[e.id for e in events])
            try:
                results = await publisher.publish_events(events)
            except BaseException:
                send("unsent", ids=[e.id for e in events])
                raise
            send("sent", events=[[e.id, e.event_type] for e, r in zip(events, results, strict=True) if r is None])
            failed = [e for e, r in zip(events, results, strict=True) if r is not None]
            if failed:
                why = next(r for r in results if r is not None)
                log.info("intake: %d first event(s) not confirmed at once (%s); the relay publishes them",
                         len(failed), type(why).__name__)
                send("unsent", ids=[e.id for e in failed])
            return not failed

        # jobs recorded here are leased to the intake's own name until serve takes them (at
        # `adopt`), so serve's claims never start one before its first event is out, whenever
        # the hold line arrives
        recorder = CommandRecorder(engine, intake_owner(owner), settings.lease_seconds)
        channel = await connection.channel(publisher_confirms=True)
        queue = await bus.declare_work_queue(channel, bus.COMMANDS_QUEUE, bus.COMMANDS_EXCHANGE,
                                             delivery_limit=settings.delivery_limit, prefetch=settings.command_prefetch)
        dlx = await channel.get_exchange(bus.DLX_EXCHANGE)
        consumer = CommandConsumer(
            queue, dlx, recorder, max_bytes=settings.max_message_bytes,
            on_accepted=lambda job_id, first: send("adopt", job=job_id, first=first),
            count=lambda t, o: send("count", type=t, outcome=o),
            publish_first=publish_first,
            hold=lambda job_id: send("hold", job=job_id),
            unhold=lambda job_id: send("unhold", job=job_id))
        if stop.is_set():  # (asked to stop while it was starting)
            return
        await consumer.start()
        log.info("intake consuming commands", extra={"fields": {"owner": owner, "in": where}})
        send("ready")
        up = True
        loop = asyncio.get_running_loop()
        # (one waiter for the whole run: `wait_for` would make a task per turn and, timing out,
        # cancel and await it, a loop turn or two more than the lag it measures)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():  # tell serve when the connection goes down and when it is back
                began = loop.time()
                await asyncio.wait({stopped}, timeout=BROKER_WATCH_SECONDS)
                if not stop.is_set():  # (how late the timer woke: the wait for a command's turn)
                    send("lag", s=round(max(0.0, loop.time() - began - BROKER_WATCH_SECONDS), 6))
                now = not connection.is_closed and connection.connected.is_set()
                if now != up:
                    up = now
                    send("broker", up=now)
        finally:
            stopped.cancel()
        try:
            await asyncio.wait_for(consumer.stop(), 10.0)
        except TimeoutError:  # the deliveries still under way are unacked: the broker redelivers them
            log.warning("intake: deliveries still being recorded after 10 s; stopping anyway")
    finally:
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        await engine.dispose()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m failover.intake OWNER (started by `failoverctl serve` when "
              "FAILOVER_INTAKE_PROCESS=true)", file=sys.stderr)
        return 2
    from .cli import _loop_factory
    from .logs import configure
    from .settings import Settings

    # the protocol gets the real stdout; anything else printed goes to stderr, with the logs
    out = os.dup(1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: serve stops us in order
    settings = Settings()  # type: ignore[call-arg]  # (from the environment serve passes on)
    configure(settings.log_level, settings.log_format)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_child(settings, argv[0], out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
