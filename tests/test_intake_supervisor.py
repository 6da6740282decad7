"""serve's side of the intake process (failover/intake.py), with stand-in children: real
processes and pipes, speaking the intake's line protocol, that start, die or fail on cue.

The full path (a real child, the broker, the database) is tests/crash/test_intake_process.py."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from adapters.db.engine import is_connection_error
from failover.intake import IntakeProcess, IntakeThread, _ChildLines

from .helpers import wait_until

# a stand-in child: the nth start (counted in the file argv[1]) follows argv[2], one letter per
# start: "r" says ready and stays until its stdin closes or SIGTERM, "d" says ready and dies,
# "f" fails before it is ready
CHILD = """
import pathlib, sys
counter = pathlib.Path(sys.argv[1])
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
plan = sys.argv[2][min(n, len(sys.argv[2]) - 1)]
if plan == "f":
    sys.exit(3)
sys.stdout.write('{"m":"hold","job":"j1"}\\n{"m":"sending","ids":[7]}\\n{"m":"ready"}\\n')
sys.stdout.flush()
if plan == "d":
    sys.exit(1)
sys.stdin.read()
"""


class Relay:
    """What the supervisor hands to the relay, kept to read back (the relay's own behaviour is
    tests/test_relay.py's)."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.sending: set[int] = set()

    def hold_elsewhere(self, job_id: str) -> None:
        self.held[job_id] = self.held.get(job_id, 0) + 1

    def release_elsewhere(self, job_id: str) -> None:
        self.held[job_id] -= 1

    def sending_elsewhere(self, ids: list[int]) -> None:
        self.sending.update(ids)

    def sent_elsewhere(self, events: list[tuple[int, str]]) -> None:
        self.sending.difference_update(i for i, _ in events)

    def release_all_elsewhere(self) -> dict[str, int]:
        held, self.held = self.held, {j: 0 for j in self.held}
        return held

    def unsent_elsewhere(self, ids: list[int]) -> None:
        self.sending.difference_update(ids)


def _intake(tmp_path: Path, plan: str, relay: Relay, pause: float = 0.05) -> IntakeProcess:
    return IntakeProcess("owner", hold=lambda j: None, unhold=lambda j: None, adopt=lambda j, first: None,
                         relay=relay, count=lambda t, o: None, restart_pause=pause,
                         argv=[sys.executable, "-c", CHILD, str(tmp_path / "starts"), plan])


def _starts(tmp_path: Path) -> int:
    return int((tmp_path / "starts").read_text())


async def test_a_child_that_fails_to_start_again_is_retried_until_one_runs(tmp_path: Path) -> None:
    relay = Relay()
    intake = _intake(tmp_path, "dffr", relay)
    await intake.start(timeout=10)
    try:
        # the first dies, the next two fail before they are ready (a broker that is down), the
        # fourth runs: a restart that fails is no reason to give up
        await wait_until(lambda: _ran(intake, tmp_path, 4), 30, "the fourth child to be ready", interval=0.05)
        assert intake.restarts == 3
        # each dead child's hold and unconfirmed publish were handed back; the live one's stand
        assert relay.held == {"j1": 1} and relay.sending == {7}
    finally:
        await intake.stop(5)
    assert not intake.alive and relay.held == {"j1": 0} and relay.sending == set()


async def test_a_first_child_that_cannot_start_fails_serves_start(tmp_path: Path) -> None:
    intake = _intake(tmp_path, "f", Relay())
    with pytest.raises(RuntimeError, match="FAILOVER_INTAKE_PROCESS=false"):
        await intake.start(timeout=10)
    assert _starts(tmp_path) == 1  # not tried again: the settings or the servers are wrong


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_stop_ends_a_restart_pause_at_once(tmp_path: Path, kind: str) -> None:
    starts = list[int]()
    intake = (_intake(tmp_path, "dr", Relay(), pause=1.0) if kind == "process"
              else _thread(Relay(), _planned("dr", starts), pause=1.0))
    await intake.start(timeout=10)
    await wait_until(lambda: _pausing(intake), 10, "the first one's end", interval=0.01)
    began = time.monotonic()
    await intake.stop(10)
    assert time.monotonic() - began < 1.0  # the pause before the next start is 2 s
    assert (_starts(tmp_path) if kind == "process" else len(starts)) == 1


def test_lines_split_across_reads_are_applied_whole() -> None:
    got: list[bytes] = []
    lines = _ChildLines(got.append)
    for chunk in (b'{"m":"ho', b'ld","job":"a"}\n{"m":"ready"}\n{"m"', b':"adopt","job":"a"}\n'):
        lines.pipe_data_received(1, chunk)
    lines.pipe_data_received(2, b"not ours\n")  # (stderr is not read as lines)
    assert got == [b'{"m":"hold","job":"a"}', b'{"m":"ready"}', b'{"m":"adopt","job":"a"}']


def test_a_full_pool_is_waited_out_like_an_unreachable_database(tmp_path: Path) -> None:
    """(SQLAlchemy's own pool on a throwaway SQLite file: what is tested is how its timeout is
    classified, by adapters/db/engine.py, for the recorder's and the projector's retries)"""
    engine = create_engine(f"sqlite:///{tmp_path / 'pool.db'}", poolclass=QueuePool, pool_size=1, max_overflow=0,
                           pool_timeout=0.01)
    held = engine.connect()
    try:
        with pytest.raises(PoolTimeout) as caught:
            engine.connect()
        assert is_connection_error(caught.value)
    finally:
        held.close()
        engine.dispose()


async def _ran(intake: IntakeProcess, tmp_path: Path, starts: int) -> bool:
    return intake.alive and (tmp_path / "starts").exists() and _starts(tmp_path) == starts


async def _pausing(intake: IntakeProcess | IntakeThread) -> bool:
    return intake.restarts == 1 and not intake.alive


# ---------------------------------------------------------------- the intake in a thread
# (FAILOVER_INTAKE_THREAD): the same supervisor, a thread with its own event loop instead of a
# child process; the stand-in bodies below run in that thread and speak through `send`


def _thread(relay: Relay, body: Any, pause: float = 0.05, switch_seconds: float | None = None,
            **told: Any) -> IntakeThread:
    kwargs: dict[str, Any] = dict(hold=lambda j: None, unhold=lambda j: None, adopt=lambda j, first: None,
                                  count=lambda t, o: None)
    kwargs.update(told)
    return IntakeThread("owner", None, body=body, relay=relay, restart_pause=pause, switch_seconds=switch_seconds,
                        **kwargs)


def _planned(plan: str, starts: list[int]) -> Any:
    """A stand-in body following `plan` as CHILD does ("r" stays until stopped, "d" dies once
    ready, "f" fails before it is ready), counting its starts."""

    async def body(settings: object, owner: str, send: Any, stop: asyncio.Event) -> None:
        starts.append(threading.get_ident())
        step = plan[min(len(starts) - 1, len(plan) - 1)]
        if step == "f":
            raise ConnectionError("the broker is down")
        send("hold", job="j1")
        send("sending", ids=[7])
        send("ready")
        if step == "d":
            raise RuntimeError("died")
        await stop.wait()
        send("unhold", job="j1")

    return body


async def test_an_intake_thread_that_dies_is_started_again_and_its_holds_released() -> None:
    relay, starts = Relay(), list[int]()
    intake = _thread(relay, _planned("dffr", starts))
    await intake.start(timeout=10)
    try:
        await wait_until(lambda: _thread_ran(intake, starts, 4), 30, "the fourth start to be ready", interval=0.05)
        assert intake.restarts == 3
        assert relay.held == {"j1": 1} and relay.sending == {7}
        assert threading.get_ident() not in starts  # each ran in a thread of its own, not serve's
    finally:
        await intake.stop(5)
    # asked to stop, the live one finished (its last unhold applied) and ended
    assert not intake.alive and relay.held == {"j1": 0} and relay.sending == set()


async def test_a_first_intake_thread_that_cannot_start_fails_serves_start() -> None:
    starts: list[int] = []
    intake = _thread(Relay(), _planned("f", starts))
    with pytest.raises(RuntimeError, match="the intake thread did not start"):
        await intake.start(timeout=10)
    assert len(starts) == 1


async def test_an_intake_threads_messages_are_applied_in_serves_loop_in_order() -> None:
    applied: list[tuple[str, str, int]] = []
    firsts: list[str] = []
    serve_thread = threading.get_ident()

    async def body(settings: object, owner: str, send: Any, stop: asyncio.Event) -> None:
        send("ready")
        for i in range(200):  # as fast as the thread can: every message lands, in order
            send("hold", job=f"j{i}")
            send("adopt", job=f"j{i}", first=i % 50 == 0)  # (a live failover now and then)
        await stop.wait()

    def adopt(job_id: str, first: bool) -> None:
        applied.append(("adopt", job_id, threading.get_ident()))
        if first:
            firsts.append(job_id)

    relay = Relay()
    intake = _thread(relay, body, hold=lambda j: applied.append(("hold", j, threading.get_ident())), adopt=adopt)
    await intake.start(timeout=10)
    try:
        await wait_until(lambda: _count(applied, 400), 10, "the messages to be applied", interval=0.01)
    finally:
        await intake.stop(5)
    assert [(k, j) for k, j, _ in applied] == [(k, f"j{i}") for i in range(200) for k in ("hold", "adopt")]
    assert {t for _, _, t in applied} == {serve_thread}
    assert firsts == ["j0", "j50", "j100", "j150"]  # the runner is told which jobs go first


async def test_an_intake_thread_that_will_not_stop_is_left_behind_and_then_ignored() -> None:
    said_late = threading.Event()

    async def stubborn(settings: object, owner: str, send: Any, stop: asyncio.Event) -> None:
        send("hold", job="j1")
        send("ready")
        await asyncio.to_thread(time.sleep, 1.5)  # (deaf to stop meanwhile)
        send("hold", job="late")
        send("adopt", job="late")
        said_late.set()

    relay, adopted = Relay(), list[str]()
    intake = _thread(relay, stubborn, adopt=lambda j, first: adopted.append(j))
    await intake.start(timeout=10)
    assert relay.held == {"j1": 1}
    began = time.monotonic()
    await intake.stop(0.2)
    assert time.monotonic() - began < 1.0  # 0.2 s, and no grace: a thread cannot be killed
    assert not intake.alive and relay.held == {"j1": 0}  # its hold released: the drain goes on
    await wait_until(lambda: _set(said_late), 10, "the stubborn thread's late messages", interval=0.02)
    # whatever it queued for serve's loop runs before a callback queued after it
    marker = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(marker.set_result, None)
    await marker
    assert relay.held == {"j1": 0} and adopted == []  # said after its release: ignored


async def test_an_intake_thread_stopped_while_it_starts_gives_up_at_once() -> None:
    connecting = threading.Event()

    async def hung(settings: object, owner: str, send: Any, stop: asyncio.Event) -> None:
        connecting.set()
        await asyncio.sleep(60)  # a broker that accepts the connection and never answers

    intake = _thread(Relay(), hung)
    starting = asyncio.create_task(intake.start(timeout=30))
    await wait_until(lambda: _set(connecting), 10, "the thread to be connecting", interval=0.01)
    began = time.monotonic()
    await intake.stop(10)
    assert time.monotonic() - began < 2.0  # cancelled where it waited, not after its 60 s
    with pytest.raises(RuntimeError, match="did not start"):
        await starting
    assert not intake.alive


async def _set(event: threading.Event) -> bool:
    return event.is_set()


async def _thread_ran(intake: IntakeThread, starts: list[int], n: int) -> bool:
    return intake.alive and len(starts) == n


async def _count(applied: list[Any], n: int) -> bool:
    return len(applied) >= n


async def test_an_intake_thread_shortens_the_switch_interval_while_it_runs() -> None:
    async def body(settings: object, owner: str, send: Any, stop: asyncio.Event) -> None:
        send("ready")
        await stop.wait()

    before = sys.getswitchinterval()
    intake = _thread(Relay(), body, switch_seconds=0.001)
    await intake.start(timeout=10)
    try:
        assert sys.getswitchinterval() == pytest.approx(0.001)
    finally:
        await intake.stop(5)
    assert sys.getswitchinterval() == pytest.approx(before)
