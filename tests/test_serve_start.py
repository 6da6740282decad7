"""`serve` stopped while it starts: a SIGTERM (or SIGINT) that comes before `serve` is ready
ends the start at once and closes what it had opened, in order, and `serve` exits 0 with a line
saying so; it is not killed by the signal's default action, as it was before its handlers were
installed at the end of the start (which can take a minute: a broker or database slow to
answer, the intake waiting for its own connections)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from emulators.runner import EmulatorHandle

from .helpers import ROOT, service_env, wait_until


@contextlib.asynccontextmanager
async def _silent_peer() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A server that takes connections and never answers (a broker or database a start waits
    on): its port, and the connections it took."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # (until the peer closes the connection)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


async def _signalled_while_connecting(proc: asyncio.subprocess.Process, log_path: Path,
                                      accepted: list[asyncio.StreamWriter], sig: int, what: str,
                                      deadline: float) -> int:
    """`sig` sent to `proc` once it has connected to the silent peer: its exit code, within
    `deadline` seconds (killed, whatever happens)."""
    try:
        async def connecting() -> bool:
            assert proc.returncode is None, log_path.read_text()[-2000:]
            return bool(accepted)

        await wait_until(connecting, 30, f"{what} to connect to the silent peer", interval=0.05)
        proc.send_signal(sig)
        return await asyncio.wait_for(proc.wait(), deadline)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_serve_starts_ends_the_start_cleanly(
        database_url: str, emulators: EmulatorHandle, tmp_path: Path, sig: signal.Signals) -> None:
    async with _silent_peer() as (port, accepted):  # a "broker" serve's start waits on
        env = service_env(database_url, f"amqp://guest:guest@127.0.0.1:{port}/", emulators)
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "failover.cli", "serve", env=env,
                                                        stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=str(ROOT))
        code = await _signalled_while_connecting(proc, log_path, accepted, sig, "serve", 15)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert code == 0, log_path.read_text()[-2000:]
    said = [line["message"] for line in lines if line.get("message", "").startswith("stopped while starting")]
    assert len(said) == 1 and sig.name in said[0], said
    assert not [line for line in lines if line.get("level") in ("ERROR", "CRITICAL")], lines
    assert not [line for line in lines if line.get("message") == "serving"], "serve reported itself serving"


async def test_the_intake_process_stopped_while_it_starts_gives_up_at_once(
        amqp_url: str, emulators: EmulatorHandle, tmp_path: Path) -> None:
    """The intake process (`python -m failover.intake`, as serve starts it) asked to stop
    (SIGTERM, what serve's stop sends) while its start waits on a database that does not
    answer gives up at once and exits 0, as the intake thread does, instead of holding serve's
    stop until the connect times out or serve kills it."""
    async with _silent_peer() as (port, accepted):  # a "database" the intake's start waits on
        env = service_env(f"mysql+asyncmy://root@127.0.0.1:{port}/nothing", amqp_url, emulators)
        log_path = tmp_path / "intake.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "failover.intake", "owner-under-test",
                                                        env=env, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE, stderr=log, cwd=str(ROOT))
        # (within 5 s: the driver's own connect timeout is 10 s)
        code = await _signalled_while_connecting(proc, log_path, accepted, signal.SIGTERM, "the intake", 5)
    assert code == 0, log_path.read_text()[-2000:]
    assert "stopped while starting" in log_path.read_text()


async def test_serve_refuses_a_database_not_migrated_to_its_version(
        database_url: str, amqp_url: str, emulators: EmulatorHandle, tmp_path: Path) -> None:
    """A `serve` of this version on a database at an older migration would run jobs without
    what the newer schema keeps (the VM name claims): it does not start, and says what to do."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    from adapters.db.migrate import upgrade

    name = f"failover_old_{uuid.uuid4().hex[:8]}"
    url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    server = create_async_engine(make_url(database_url).set(database=""))
    async with server.begin() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        await conn.execute(text(f"CREATE DATABASE `{name}`"))
    try:
        await asyncio.to_thread(upgrade, url, "0001")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "failover.cli", "serve", env=service_env(url, amqp_url, emulators),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(ROOT))
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:  # (it started after all: not left running)
                proc.kill()
                await proc.wait()
        text_out = out.decode()
        assert proc.returncode == 3, text_out[-2000:]
        assert "the database is at migration 0001" in text_out and "failoverctl db upgrade" in text_out, text_out[-2000:]
    finally:
        async with server.begin() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        await server.dispose()
