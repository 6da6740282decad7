"""`failoverctl check`, run as people run it (the installed program as a subprocess) against the
real broker and database and the project's emulators over HTTP: every check passes with right
settings, and each wrong setting fails its own check, naming the variable to fix."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from emulators.runner import EmulatorHandle

from .helpers import free_port, service_env
from .test_cli import Ctl, Result

_ALL = ["database", "broker", "cloudstack", "zone", "template", "network", "service offering", "appliance VM",
        "expunge", "volume daemon", "driver injection"]


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
    assert {n: c["ok"] for n, c in checks.items()} == {**{n: True for n in _ALL}, "expunge": None}
    # a note, not a failure: CloudStack's default for a user account (the emulator's too)
    assert "allow.user.expunge.recover.vm" in checks["expunge"]["detail"]
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
