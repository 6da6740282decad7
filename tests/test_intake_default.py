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

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from adapters.db.tables import failover_jobs
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import seed_vm
from schemas.commands import FailoverRequested

from .helpers import ServeProcess, service_env


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
        elif place == "loop" or place is None:
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
        assert [e.type for e in events][0] == "JobAccepted"
        assert events[-1].type == "JobCompleted", [e.type for e in events]
        async with db.connect() as conn:
            status = (await conn.execute(failover_jobs.select().where(failover_jobs.c.job_id == str(job)))).one().status
        assert status == "completed"
    finally:
        await serve.stop()
