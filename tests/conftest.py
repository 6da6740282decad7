"""Shared fixtures: the real MariaDB and RabbitMQ (local servers, or testcontainers where Docker
exists and no server answers), the project's emulators, and `failoverctl serve` processes.

Selected by FAILOVER_TEST_DATABASE_URL / FAILOVER_TEST_AMQP_URL, else the local defaults. The
test database (`failover_test` by default) is recreated and migrated once per session; the
broker side uses its own vhost (`failover-test`) when `rabbitmqctl` can create it, so a
developer's running service is never disturbed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from adapters.db.engine import make_engine
from adapters.db.migrate import upgrade
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle, start_emulators
from failover.client import BusClient

from .helpers import ServeProcess, service_env

# the unit tests' helpers assert inside their functions: rewritten for pytest's messages, which
# must be asked before anything imports them (tests outside tests/unit do, during collection)
pytest.register_assert_rewrite("tests.unit.helpers")

DEFAULT_DB = "mysql+asyncmy://root@127.0.0.1:3306/failover_test"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
TEST_VHOST = "failover-test"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("FAILOVER_TEST_DATABASE_URL")
    if url is None and not _reachable("127.0.0.1", 3306):
        from testcontainers.mysql import MySqlContainer  # Docker machines without a local server

        with MySqlContainer("mariadb:11", dialect="asyncmy") as container:
            yield _fresh_database(container.get_connection_url())
        return
    yield _fresh_database(url or DEFAULT_DB)


def _fresh_database(url: str) -> str:
    parsed = make_url(url)
    name = parsed.database or "failover_test"

    async def recreate() -> None:
        server = create_async_engine(parsed.set(database=""))
        async with server.begin() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
            await conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
        await server.dispose()

    asyncio.run(recreate())
    rendered = parsed.set(database=name).render_as_string(hide_password=False)
    upgrade(rendered)
    return rendered


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("FAILOVER_TEST_AMQP_URL")
    if url is None and not _reachable("127.0.0.1", 5672):
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13") as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    url = url or DEFAULT_AMQP
    parts = urlsplit(url)
    vhost = parts.path.lstrip("/") or TEST_VHOST
    if shutil.which("rabbitmqctl") and vhost != "/":
        made = subprocess.run(["rabbitmqctl", "add_vhost", vhost], capture_output=True, text=True)
        if made.returncode == 0 or "already_exists" in (made.stdout + made.stderr):
            subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, parts.username or "guest",
                            ".*", ".*", ".*"], capture_output=True, check=True)
            url = urlunsplit(parts._replace(path="/" + vhost))
    asyncio.run(_clean_broker(url))
    yield url


async def _clean_broker(url: str) -> None:
    """Start from empty queues: a previous session's leftovers must not reach this one."""
    connection = await aio_pika.connect(url)
    async with connection:
        for name in ("failover.commands", "failover.projector", "failover.dead"):
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except Exception:
                pass


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url, pool_size=5)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def emulators() -> AsyncIterator[EmulatorHandle]:
    handle = await start_emulators()
    yield handle
    await handle.close()


@pytest.fixture
async def control(emulators: EmulatorHandle) -> AsyncIterator[EmulatorControl]:
    async with EmulatorControl(emulators.control_url) as ctl:
        await ctl.clear_faults()
        await ctl.set_latency(async_job_seconds=0, operation_seconds=0, api_seconds=0)
        await ctl.set_api_limit(0)
        yield ctl
        await ctl.clear_faults()
        await ctl.set_api_limit(0)


@pytest.fixture(scope="session")
async def bus(amqp_url: str) -> AsyncIterator[BusClient]:
    async with BusClient.connect(amqp_url) as client:
        yield client


@pytest.fixture(scope="session")
async def serve(database_url: str, amqp_url: str, emulators: EmulatorHandle,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServeProcess]:
    """One `failoverctl serve` process for the session, as users run it."""
    env = service_env(database_url, amqp_url, emulators)
    proc = ServeProcess(env, tmp_path_factory.mktemp("serve") / "serve.log")
    await proc.start()
    yield proc
    await proc.stop()


def pytest_collection_modifyitems(items: list[Any]) -> None:
    # the slow fault tests last, so a quick failure shows first
    items.sort(key=lambda item: 1 if item.get_closest_marker("slow") else 0)


_SERVE_LOG_FROM = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    serve = getattr(item, "funcargs", {}).get("serve")
    if isinstance(serve, ServeProcess):
        item.stash[_SERVE_LOG_FROM] = serve.log_size()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that used the session's `serve` shows what that process said meanwhile
    (its warnings and its lease decisions): a rare failure in CI is then explained by CI's own
    output, not by logs a later run has overwritten."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    serve = getattr(item, "funcargs", {}).get("serve")
    if report.when == "call" and report.failed and isinstance(serve, ServeProcess):
        excerpt = serve.log_excerpt(item.stash.get(_SERVE_LOG_FROM, 0))
        report.sections.append(("serve's log during this test (warnings, drives, take-overs)",
                                excerpt or "(nothing)"))
