"""Guarantee 10, end to end: with a recognisable CloudStack secret key and a recognisable
database password, a `serve` process runs failovers that complete, fail and roll back, a
cleanup, bad and unreadable commands; then everything it wrote is searched: its log output
(at DEBUG), every event published (a queue bound to `#`), every dead letter, every row of every
table. Neither secret is found, in clear, base64 (any alignment), URL-encoded, hex or JSON form."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from adapters.db.engine import make_engine
from emulators.client import EmulatorControl
from emulators.runner import start_emulators
from failover.seed import seed_vm
from tests.helpers import ServeProcess, service_env

from .helpers import Watcher, command, private_stack, publish_raw, rabbitmqctl_available, serving

pytestmark = pytest.mark.skipif(not rabbitmqctl_available(), reason="needs rabbitmqctl for a private vhost")

CS_SECRET = "SeCrEt-9f8e7d-DO-NOT-LEAK"
DB_USER = "failover_secret_test"
DB_PASSWORD = "Pw#7c6b5a/DO-NOT-LEAK+%&"


def forms(secret: str) -> Iterator[tuple[str, bytes]]:
    """Every way the secret could be written that this test looks for."""
    raw = secret.encode()
    yield "clear", raw
    yield "clear, any case", raw.lower()
    yield "json", json.dumps(secret)[1:-1].encode()
    for name, encoded in (("url", quote(secret)), ("url, safe=''", quote(secret, safe="")),
                          ("form", quote_plus(secret))):
        yield name, encoded.encode()
        yield name + ", lower-case escapes", encoded.lower().encode()
    yield "hex", raw.hex().encode()
    for shift in range(3):  # base64 of a text that holds the secret at any offset
        for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            yield f"{name}+{shift}", encode(b"\0" * shift + raw)[4:-4]


def assert_absent(where: str, haystack: bytes) -> None:
    lowered = haystack.lower()
    decoded = unquote(haystack.decode("utf-8", "replace")).encode()  # any percent-encoding of it
    for secret in (CS_SECRET, DB_PASSWORD):
        for name, needle in forms(secret):
            found = (lowered if name.startswith("clear, any") else haystack).find(needle)
            assert found < 0, f"{secret!r} ({name}) in {where}: ...{haystack[max(0, found - 80):found + 80]!r}..."
        found = decoded.find(secret.encode())
        assert found < 0, f"{secret!r} (percent-encoded) in {where}: ...{decoded[max(0, found - 80):found + 80]!r}..."


def test_the_search_finds_what_it_looks_for() -> None:
    """The search itself, on texts that do hold the secrets."""
    for secret in (CS_SECRET, DB_PASSWORD):
        for text_with_it in (f"x{secret}y", json.dumps({"k": secret}), quote(f"a={secret}"),
                             base64.b64encode(f"ab{secret}cd".encode()).decode(), secret.upper(),
                             f"url=mysql://u:{quote(secret, safe='')}@h/db", quote(secret, safe="+")):
            with pytest.raises(AssertionError):
                assert_absent("sample", text_with_it.encode())


async def _create_user(root_url: str, database: str) -> None:
    server = create_async_engine(make_url(root_url).set(database=""))
    async with server.begin() as conn:
        for host in ("%", "localhost", "127.0.0.1"):
            await conn.execute(text(f"DROP USER IF EXISTS '{DB_USER}'@'{host}'"))
            await conn.execute(text(f"CREATE USER '{DB_USER}'@'{host}' IDENTIFIED BY :pw"), {"pw": DB_PASSWORD})
            await conn.execute(text(f"GRANT ALL ON `{database}`.* TO '{DB_USER}'@'{host}'"))
    await server.dispose()


async def _drop_user(root_url: str) -> None:
    server = create_async_engine(make_url(root_url).set(database=""))
    async with server.begin() as conn:
        for host in ("%", "localhost", "127.0.0.1"):
            await conn.execute(text(f"DROP USER IF EXISTS '{DB_USER}'@'{host}'"))
    await server.dispose()


async def _every_row(engine: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    async with engine.connect() as conn:
        tables = [r[0] for r in await conn.execute(text("SHOW TABLES"))]
        for table in tables:
            out[table] = [tuple(r) for r in await conn.execute(text(f"SELECT * FROM `{table}`"))]
    return out


async def test_no_secret_in_logs_events_or_tables(database_url: str, amqp_url: str, tmp_path: Path) -> None:
    async with private_stack(database_url, amqp_url, "secrets") as stack:
        await _create_user(database_url, stack.database)
        user_url = make_url(stack.database_url).set(username=DB_USER, password=DB_PASSWORD)
        service_db_url = user_url.render_as_string(hide_password=False)
        assert make_url(service_db_url).password == DB_PASSWORD
        emu = await start_emulators(secret_key=CS_SECRET)
        root = make_engine(stack.database_url, pool_size=2)
        log_path = tmp_path / "serve.log"
        serve = ServeProcess(service_env(service_db_url, stack.amqp_url, emu, FAILOVER_LOG_LEVEL="DEBUG"),
                             log_path)
        watcher = await Watcher.start(stack.amqp_url)
        try:
            assert serve.env["FAILOVER_CLOUDSTACK_SECRET_KEY"] == CS_SECRET
            try:
                await serve.start()
                await serving(serve)
            except BaseException:
                await serve.kill()
                raise
            async with EmulatorControl(emu.control_url) as control:
                ok = await seed_vm(root, control, emu.appliance_vm_id, vm_name="secret keeper 01")
                refused = await seed_vm(root, control, emu.appliance_vm_id, vm_name="secret keeper 02")
                broken = await seed_vm(root, control, emu.appliance_vm_id, vm_name="secret keeper 03")

                async def run(body: dict[str, Any]) -> list[Any]:
                    await publish_raw(watcher.channel, json.dumps(body).encode(), routing_key=body["type"])
                    return await watcher.until_ended(body["request_id"], timeout=60)

                done = await run(command(vm_id=ok.vm_id))
                assert done[-1].type == "JobCompleted"
                cleanup = {"type": "CleanupRequested", "schema_version": 1, "request_id": str(uuid.uuid4()),
                           "failover_job_id": done[0].job_id.__str__(), "requested_by": "tests"}
                assert (await run(cleanup))[-1].type == "JobCompleted"
                await control.add_fault(api="cloudstack", command="deployVirtualMachine", kind="refuse")
                failed = await run(command(vm_id=refused.vm_id))
                assert failed[-1].type == "JobFailed" and failed[-1].rolled_back
                await control.add_fault(api="volume-daemon", command="attach-root", kind="malformed")
                failed = await run(command(vm_id=broken.vm_id))
                assert failed[-1].type == "JobFailed"
                assert (await run(command(failover_type="tset")))[-1].reason == "invalid"
                assert (await run(command(vm_id="no-such-vm")))[-1].reason == "not_found"
                dead_id = await publish_raw(watcher.channel, b"{not json")
                await watcher.dead_letter(dead_id)
            assert await serve.stop() == 0

            # everything the service wrote
            log = log_path.read_bytes()
            assert b'"serving"' in log and b"DEBUG" in log  # the log is there, and verbose
            assert f"{DB_USER}:***@".encode() in log  # the database URL was logged, redacted
            assert_absent("the service's log", log)
            assert len(watcher.raw_events) > 50
            for key, headers, body in watcher.raw_events:
                assert_absent(f"event {key}", body + repr(headers).encode() + key.encode())
            for letters in watcher.dead.values():
                for letter in letters:
                    assert_absent("a dead letter", letter.body + repr(letter.headers).encode())
            rows = await _every_row(root)
            assert rows["outbox"] and rows["log_events"] and rows["resource_ledger"] and rows["job_tracking"]
            for table, content in rows.items():
                assert_absent(f"table {table}", repr(content).encode("utf-8", "backslashreplace"))
                assert_absent(f"table {table}", str(content).encode("utf-8", "surrogateescape"))
        finally:
            await watcher.close()
            await serve.stop()
            await root.dispose()
            await emu.close()
            await _drop_user(database_url)
