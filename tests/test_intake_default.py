"""Where `serve` takes commands by default: in a thread of its own (`FAILOVER_INTAKE_THREAD`'s
default), wherever it can; in its own event loop where the thread cannot run (roles without
the relay) or was turned off; in the intake process when that is asked for. Only an explicit
`FAILOVER_INTAKE_THREAD=true` that cannot run is an error (tests/test_cli.py); the default
never stops `serve` from starting.

Each case starts a real `serve` and reads where its "serving" line says it takes commands;
the last runs a test failover end to end with the intake in serve's loop, the shape that was
the default until the twentieth session.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.db.tables import failover_jobs
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import seed_vm
from schemas.commands import FailoverRequested

from .helpers import ServeProcess, metric, metrics, service_env, wait_until


async def _serving(env: dict[str, str], log: Path, roles: str | None = None) -> tuple[ServeProcess, dict[str, Any]]:
    """serve started with `env` (and `roles`), and the fields of its "serving" line."""
    serve = ServeProcess(env, log, roles=roles)
    await serve.start()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    serving = [line["fields"] for line in lines if line.get("message") == "serving"]
    assert len(serving) == 1, serving
    return serve, serving[0]


@pytest.mark.parametrize(("settings", "roles", "place"), [
    ({}, None, "thread"),
    ({}, "orchestrator,projector", "loop"),  # no relay: the default gives way, serve starts
    ({"FAILOVER_INTAKE_PROCESS": "true"}, None, "process"),  # asked for: the default gives way
    ({"FAILOVER_INTAKE_THREAD": "false"}, None, "loop"),
    ({}, "relay,projector", None),  # no orchestrator: it takes no commands
])
async def test_serve_takes_commands_where_its_settings_and_roles_allow(
        database_url: str, amqp_url: str, emulators: EmulatorHandle, tmp_path: Path,
        settings: dict[str, str], roles: str | None, place: str | None) -> None:
    serve, fields = await _serving(service_env(database_url, amqp_url, emulators, **settings),
                                   tmp_path / "serve.log", roles)
    try:
        assert fields["intake"] == place, fields
        said = [line for line in serve.log_path.read_text().splitlines() if "intake consuming commands" in line]
        if place == "thread":
            assert len(said) == 1 and "a thread" in said[0], said
        elif place == "process":
            assert len(said) == 1 and "process" in said[0], said
        else:
            assert said == [], said
    finally:
        await serve.stop()


async def test_a_test_failover_runs_end_to_end_with_the_intake_in_serves_loop(
        database_url: str, amqp_url: str, emulators: EmulatorHandle, control: EmulatorControl, db: Any,
        tmp_path: Path) -> None:
    serve, fields = await _serving(service_env(database_url, amqp_url, emulators, FAILOVER_INTAKE_THREAD="false"),
                                   tmp_path / "serve.log")
    try:
        assert fields["intake"] == "loop"
        vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="intake in loop",
                           os_type="ubuntu64Guest", test_network_id=emulators.test_network_id)
        job = uuid.uuid4()
        async with BusClient.connect(amqp_url) as bus:
            queue = await bus.bind(f"job.{job}.#")
            await bus.publish(FailoverRequested(request_id=job, vm_id=vm.vm_id, failover_type="test",
                                                requested_by="intake-default-tests"))
            events = [e async for e in bus.events(queue, timeout=60)]
        kinds = [e.type for e in events]
        assert kinds and kinds[0] == "JobAccepted" and kinds[-1] == "JobCompleted", kinds
        async with db.connect() as conn:
            status = (await conn.execute(failover_jobs.select().where(failover_jobs.c.job_id == str(job)))).one().status
        assert status == "completed"
    finally:
        await serve.stop()


def _close_connection_named(name: str) -> int:
    """Close the broker connections whose client named them `name` (rabbitmqctl, as an operator
    or a network fault would): how many there were."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    pids = [line.split("\t", 1)[0] for line in listed.splitlines() if f'"{name}"' in line]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "close_connection", pid, "closed by the intake readiness test"],
                       capture_output=True, text=True, check=True, timeout=60)
    return len(pids)


async def test_readyz_names_the_broker_while_the_intake_threads_connection_is_down(
        database_url: str, amqp_url: str, emulators: EmulatorHandle, tmp_path: Path) -> None:
    """The intake thread has a broker connection of its own: while it is down this serve takes
    no commands, and /readyz says so (naming the broker) until the connection is back."""
    serve, fields = await _serving(service_env(database_url, amqp_url, emulators), tmp_path / "serve.log")
    try:
        assert fields["intake"] == "thread"
        seen: list[int] = []

        async def readyz() -> tuple[int, dict[str, Any]]:
            async with aiohttp.ClientSession() as http, http.get(serve.metrics_url + "/readyz") as resp:
                seen.append(resp.status)
                return resp.status, await resp.json()

        assert (await readyz())[0] == 200
        closed = await asyncio.to_thread(_close_connection_named, f"failover {fields['owner']} intake")
        assert closed == 1, f"{closed} connections named as the intake's"

        async def not_ready_for_the_broker() -> bool:
            status, body = await readyz()
            return status == 503 and body["checks"].get("broker") is False

        # aio-pika connects again 5 s after a loss: the intake looks at its connection every 0.25 s
        await wait_until(not_ready_for_the_broker, 4.5, "/readyz to name the broker", interval=0.05)

        async def ready() -> bool:
            return (await readyz())[0] == 200

        await wait_until(ready, 30, "/readyz to be ready again once the intake reconnected", interval=0.1)
        lines = serve.log_path.read_text()
        assert "its broker connection is down" in lines and "its broker connection is back" in lines
    finally:
        await serve.stop()


def _intake_child(log: Path) -> int | None:
    """The pid of serve's intake process, from its "intake consuming commands" line."""
    for line in log.read_text().splitlines():
        if line.startswith("{") and (said := json.loads(line)).get("message") == "intake consuming commands":
            where = str(said["fields"]["in"])
            if where.startswith("process "):
                return int(where.removeprefix("process "))
    return None


async def _late_wakes(serve: ServeProcess, name: str, above: str = "0.5") -> tuple[float, float]:
    """(samples, samples later than `above` seconds) of the lag histogram `name` on serve's /metrics
    (both from one scrape: a sample taken between two would count as a negative late one)."""
    count, within = await metrics(serve, (f"{name}_count", None), (f"{name}_bucket", {"le": above}))
    return count, count - within


@pytest.mark.parametrize("place", ["thread", "process"])
async def test_the_intakes_own_loop_lag_is_on_serves_metrics(
        database_url: str, amqp_url: str, emulators: EmulatorHandle, tmp_path: Path, place: str) -> None:
    """The intake's event loop (a thread's or a child process's) is not serve's: how late it wakes
    its quarter-second timer is failover_intake_loop_lag_seconds on serve's /metrics. A child
    stopped for 1 s (SIGSTOP, as a starved or swapped-out process would be) shows as a wake
    over half a second late there, and not in serve's own failover_event_loop_lag_seconds."""
    settings = {"FAILOVER_INTAKE_PROCESS": "true"} if place == "process" else {}
    serve, fields = await _serving(service_env(database_url, amqp_url, emulators, **settings), tmp_path / "serve.log")
    try:
        assert fields["intake"] == place, fields
        name = "failover_intake_loop_lag_seconds"

        async def sampled() -> bool:
            return (await metric(serve, f"{name}_count")) >= 4

        await wait_until(sampled, 10, f"samples of {name}", interval=0.1)
        if place == "process":
            child = _intake_child(serve.log_path)
            assert child is not None, "serve started no intake process"
            _, late_before = await _late_wakes(serve, name)
            _, serve_late_before = await _late_wakes(serve, "failover_event_loop_lag_seconds")
            os.kill(child, signal.SIGSTOP)
            try:
                await asyncio.sleep(1.0)  # the stimulus: the child's loop is held this long
            finally:
                os.kill(child, signal.SIGCONT)

            async def late() -> bool:
                return (await _late_wakes(serve, name))[1] > late_before

            await wait_until(late, 10, f"the stopped child's late wake in {name}", interval=0.1)
            assert (await _late_wakes(serve, "failover_event_loop_lag_seconds"))[1] == serve_late_before
    finally:
        await serve.stop()
