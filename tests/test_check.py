"""`failoverctl check`, run as people run it (the installed program as a subprocess) against the
real broker and database and the project's emulators over HTTP: every check passes with right
settings, and each wrong setting fails its own check, naming the variable to fix."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from adapters.db.tables import failover_jobs, outbox, vm_name_claims
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import seed_vm

from .helpers import ServeProcess, failover, free_port, service_env
from .test_cli import Ctl, Result

_ALL = ["database", "broker", "cloudstack", "zone", "template", "network", "service offering", "appliance VM",
        "account rights", "volume daemon", "driver injection"]


@pytest.fixture
def check_ctl(database_url: str, amqp_url: str, emulators: EmulatorHandle, tmp_path: Path) -> Ctl:
    env = service_env(database_url, amqp_url, emulators, COLUMNS="200",
                      FAILOVER_INJECT_LOCK_DIR=str(tmp_path / "locks"))
    return Ctl(env, tmp_path)


def _by_name(result: Result) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in result.json_lines()}


async def test_every_check_passes_with_right_settings(check_ctl: Ctl, emulators: EmulatorHandle) -> None:
    result = await check_ctl("check", "--json")
    checks = _by_name(result)
    assert list(checks) == _ALL, result.err
    assert result.code == 0, checks
    assert {n: c["ok"] for n, c in checks.items()} == {**{n: True for n in _ALL}, "account rights": None}
    # a note, not a failure: CloudStack's default for a user account (the emulator's too)
    assert "allow.user.expunge.recover.vm" in checks["account rights"]["detail"]
    assert "custom" in checks["service offering"]["detail"]
    assert "its API answers" in checks["volume daemon"]["detail"]
    assert emulators.template_id in checks["template"]["detail"]
    assert "ready" in checks["template"]["detail"]
    assert emulators.appliance_vm_id in checks["appliance VM"]["detail"]
    table = await check_ctl("check")
    assert table.code == 0 and "every check passed" in table.out


async def test_each_wrong_id_fails_its_own_check_naming_the_setting(check_ctl: Ctl) -> None:
    wrong = {"FAILOVER_TEMPLATE_ID": "template", "FAILOVER_NETWORK_ID": "network",
             "FAILOVER_SERVICE_OFFERING_ID": "service offering", "FAILOVER_APPLIANCE_VM_ID": "appliance VM"}
    result = await check_ctl("check", "--json", **{setting: str(uuid.uuid4()) for setting in wrong})
    assert result.code == 1
    checks = _by_name(result)
    for setting, name in wrong.items():
        assert checks[name]["ok"] is False and setting in checks[name]["detail"], checks[name]
    assert all(checks[n]["ok"] is not False for n in _ALL if n not in wrong.values()), checks
    table = await check_ctl("check", FAILOVER_TEMPLATE_ID=str(uuid.uuid4()))
    assert table.code == 1 and "FAILED" in table.out and "1 check(s) failed: template" in table.out


async def test_a_volume_daemon_url_of_another_server_is_said(check_ctl: Ctl, emulators: EmulatorHandle) -> None:
    """A URL that answers, but not to the daemon's listing of operations (here CloudStack's
    emulator: a 404) is a note naming the setting, not a pass: a daemon without that listing
    works (the service then polls each operation), another server does not; a password in the
    URL is not shown."""
    other = emulators.cloudstack_url.replace("http://", "http://ops:secret-pw@").rsplit("/client/api", 1)[0]
    result = await check_ctl("check", "--json", FAILOVER_VOLUME_DAEMON_URL=other)
    checks = _by_name(result)
    daemon = checks["volume daemon"]
    assert daemon["ok"] is None and "FAILOVER_VOLUME_DAEMON_URL" in daemon["detail"] and "404" in daemon["detail"]
    assert result.code == 0  # (a note)
    assert "secret-pw" not in result.out + result.err


async def test_a_zone_not_found_skips_what_needs_it(check_ctl: Ctl) -> None:
    result = await check_ctl("check", "--json", FAILOVER_ZONE="no-such-zone")
    checks = _by_name(result)
    assert result.code == 1
    assert checks["zone"]["ok"] is False and "FAILOVER_ZONE" in checks["zone"]["detail"]
    assert "template" not in checks and "network" not in checks  # (looked up in the zone)
    assert checks["service offering"]["ok"] is True


async def test_cloudstack_refusing_the_key_and_systems_out_of_reach_fail_saying_what_to_fix(
        check_ctl: Ctl, database_url: str) -> None:
    result = await check_ctl("check", "--json", FAILOVER_CLOUDSTACK_SECRET_KEY="not-the-secret",
                             FAILOVER_VOLUME_DAEMON_URL=f"http://127.0.0.1:{free_port()}",
                             FAILOVER_VIRTIO_INJECT_COMMAND="/nonexistent/inject-virtio-drivers.sh",
                             FAILOVER_AMQP_URL=f"amqp://guest:secret-pw@127.0.0.1:{free_port()}/")
    assert result.code == 1
    checks = _by_name(result)
    assert list(checks) == ["database", "broker", "cloudstack", "volume daemon", "driver injection"]
    assert checks["database"]["ok"] is True
    assert checks["broker"]["ok"] is False and "FAILOVER_AMQP_URL" in checks["broker"]["detail"]
    assert "secret-pw" not in result.out + result.err
    assert checks["cloudstack"]["ok"] is False and "401" in checks["cloudstack"]["detail"]
    assert checks["volume daemon"]["ok"] is False and "FAILOVER_VOLUME_DAEMON_URL" in checks["volume daemon"]["detail"]
    injection = checks["driver injection"]
    assert injection["ok"] is False and "FAILOVER_VIRTIO_INJECT_COMMAND" in injection["detail"]


@pytest.fixture
async def empty_database(database_url: str) -> AsyncIterator[str]:
    """A database that exists and was never migrated."""
    url = make_url(database_url)
    name = f"failover_check_{uuid.uuid4().hex[:8]}"
    server = create_async_engine(url.set(database=""))
    async with server.begin() as conn:
        await conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        async with server.begin() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        await server.dispose()


async def test_a_database_not_migrated_fails_saying_to_upgrade(check_ctl: Ctl, empty_database: str) -> None:
    result = await check_ctl("check", "--json", FAILOVER_DATABASE_URL=empty_database)
    checks = _by_name(result)
    assert result.code == 1
    assert checks["database"]["ok"] is False and "failoverctl db upgrade" in checks["database"]["detail"]
    assert all(c["ok"] is not False for n, c in checks.items() if n != "database"), checks


async def test_vms_are_validated_as_a_test_failovers_first_step_would(
        check_ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle, serve: ServeProcess,
        bus: BusClient) -> None:
    """--vm runs the step's own validation, read only: a VM ready to fail over passes (its
    volumes, networks and driver choice said), one whose replication has not completed, one
    never replicated and one a job holds each fail, saying why."""
    ready = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="check-ready", os_type="windows2019srv_64Guest",
                          test_network_id=emulators.test_network_id)
    syncing = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="check-syncing",
                            replication_status="replicating")
    held = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="check-held")
    done = await failover(bus, held.vm_id, timeout=60)
    assert done[-1].type == "JobCompleted"  # (a test failover not cleaned up holds its VM)
    calls, rows = len(await control.calls()), await _job_rows(db)
    unknown = "4205" + uuid.uuid4().hex[:4] + "-no-such-vm"
    result = await check_ctl("check", "--json", "--vm", ready.vm_id, "--vm", syncing.vm_id, "--vm", unknown,
                             "--vm", held.vm_id)
    assert result.code == 1
    by_vm = {c["name"]: c for c in result.json_lines() if c["name"].startswith("VM ")}
    passed = by_vm[f"VM {ready.vm_id}"]
    assert passed["ok"] is True, passed
    assert "2 volume(s) on the appliance" in passed["detail"] and "test network mappings" in passed["detail"]
    assert "driver injection yes" in passed["detail"]
    assert by_vm[f"VM {syncing.vm_id}"]["ok"] is False and "'replicating'" in by_vm[f"VM {syncing.vm_id}"]["detail"]
    assert by_vm[f"VM {unknown}"]["ok"] is False and "vm_replication_contexts" in by_vm[f"VM {unknown}"]["detail"]
    holder = by_vm[f"VM {held.vm_id}"]
    assert holder["ok"] is False and str(done[-1].job_id) in holder["detail"] and "rejected" in holder["detail"]
    # read only: CloudStack saw lookups, nothing made or moved
    made = [c["command"] for c in (await control.calls())[calls:] if not c["command"].startswith(("list", "get", "query", "health"))]
    assert made == [], made
    assert await _job_rows(db) == rows


async def _job_rows(db: Any) -> tuple[int, int, int]:
    async with db.connect() as conn:
        counts = [(await conn.execute(select(func.count()).select_from(t))).scalar_one()
                  for t in (failover_jobs, vm_name_claims, outbox)]
    return counts[0], counts[1], counts[2]
