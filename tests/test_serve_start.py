"""`serve` stopped while it starts: a SIGTERM (or SIGINT) that comes before `serve` is ready
ends the start at once and closes what it had opened, in order, and `serve` exits 0 with a line
saying so; it is not killed by the signal's default action, as it was before its handlers were
installed at the end of the start (which can take a minute: a broker or database slow to
answer, the intake waiting for its own connections)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from emulators.runner import EmulatorHandle

from .helpers import ROOT, service_env, wait_until


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_serve_starts_ends_the_start_cleanly(
        database_url: str, emulators: EmulatorHandle, tmp_path: Path, sig: signal.Signals) -> None:
    # a "broker" that takes the connection and never answers: serve's start waits on it
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # (until serve closes the connection)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = service_env(database_url, f"amqp://guest:guest@127.0.0.1:{port}/", emulators)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "failover.cli", "serve", env=env,
                                                    stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=str(ROOT))
    try:
        async def connecting() -> bool:
            assert proc.returncode is None, log_path.read_text()[-2000:]
            return bool(accepted)

        await wait_until(connecting, 30, "serve to connect to the silent broker", interval=0.05)
        proc.send_signal(sig)
        code = await asyncio.wait_for(proc.wait(), 15)
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        assert code == 0, log_path.read_text()[-2000:]
        said = [line["message"] for line in lines if line.get("message", "").startswith("stopped while starting")]
        assert len(said) == 1 and sig.name in said[0], said
        assert not [line for line in lines if line.get("level") in ("ERROR", "CRITICAL")], lines
        assert not [line for line in lines if line.get("message") == "serving"], "serve reported itself serving"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        await server.wait_closed()


async def test_the_intake_process_stopped_while_it_starts_gives_up_at_once(
        amqp_url: str, emulators: EmulatorHandle, tmp_path: Path) -> None:
    """The intake process (`python -m failover.intake`, as serve starts it) asked to stop
    (SIGTERM, what serve's stop sends) while its start waits on a database that does not
    answer gives up at once and exits 0, as the intake thread does, instead of holding serve's
    stop until the connect times out or serve kills it."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = service_env(f"mysql+asyncmy://root@127.0.0.1:{port}/nothing", amqp_url, emulators)
    log_path = tmp_path / "intake.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "failover.intake", "owner-under-test",
                                                    env=env, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=log, cwd=str(ROOT))
    try:
        async def connecting() -> bool:
            assert proc.returncode is None, log_path.read_text()[-2000:]
            return bool(accepted)

        await wait_until(connecting, 30, "the intake to connect to the silent database", interval=0.05)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 5)  # (the driver's own connect timeout is 10 s)
        assert code == 0, log_path.read_text()[-2000:]
        assert "stopped while starting" in log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        await server.wait_closed()
