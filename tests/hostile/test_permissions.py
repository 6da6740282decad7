"""The RabbitMQ permissions README.md documents ("RabbitMQ permissions"), applied as written to
two real users in a vhost of their own: the service runs with its user's, a client
(`failoverctl`'s BusClient) with its user's publishes a command and follows its events; and
neither can do more than it needs (the client cannot publish events, read the command queue or
the dead letters; the service cannot declare anything but its own)."""

from __future__ import annotations

import asyncio
import re
import shlex
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from emulators.runner import start_emulators
from failover.client import BusClient
from schemas.commands import FailoverRequested
from tests.helpers import ROOT, ServeProcess, run_command, service_env

from .helpers import private_stack, rabbitmqctl, rabbitmqctl_available, serving

pytestmark = pytest.mark.skipif(not rabbitmqctl_available(), reason="needs rabbitmqctl for users and a vhost")


def documented_permissions() -> dict[str, tuple[str, str, str]]:
    """user -> (configure, write, read), from the README's `rabbitmqctl set_permissions` lines."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### RabbitMQ permissions", 1)[1].split("\n## ", 1)[0]
    found = {}
    for line in section.splitlines():
        if not line.startswith("rabbitmqctl "):
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[:2] != ["rabbitmqctl", "set_permissions"]:
                continue
            rest = words[2:]
            if "-p" in rest:  # the vhost option
                at = rest.index("-p")
                del rest[at:at + 2]
            user, configure, write, read = rest
            found[user] = (configure, write, read)
    return found


def test_the_readme_documents_both_users() -> None:
    perms = documented_permissions()
    assert set(perms) == {"failover", "portal"}
    for regex in (*perms["failover"], *perms["portal"]):
        re.compile(regex)


def _url(amqp_url: str, user: str, password: str) -> str:
    parts = urlsplit(amqp_url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_the_documented_permissions_are_enough_and_no_more(
        database_url: str, amqp_url: str, tmp_path: Path) -> None:
    perms = documented_permissions()
    suffix = uuid.uuid4().hex[:6]
    users = {"failover": f"hostile_svc_{suffix}", "portal": f"hostile_portal_{suffix}"}
    async with private_stack(database_url, amqp_url, "perms") as stack:
        for role, user in users.items():
            await asyncio.to_thread(rabbitmqctl, "add_user", user, "pw-" + suffix)
            await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", stack.vhost, user, *perms[role])
        emu = await start_emulators()
        serve = ServeProcess(service_env(stack.database_url, _url(stack.amqp_url, users["failover"], "pw-" + suffix),
                                         emu), tmp_path / "serve.log")
        try:
            try:
                await serve.start()  # it declares its topology and consumes with its own user
                await serving(serve)
            except BaseException:
                await serve.kill()
                raise
            portal = _url(stack.amqp_url, users["portal"], "pw-" + suffix)
            async with BusClient.connect(portal) as client:
                rid = uuid.uuid4()
                events = await run_command(client, FailoverRequested(
                    request_id=rid, vm_id="no-such-vm", failover_type="test"), rid, timeout=20)
                assert [e.type for e in events] == ["JobRejected"] and events[0].reason == "not_found"

            # ... and no more: the client cannot forge events, read commands or dead letters
            connection = await aio_pika.connect(portal)
            async with connection:
                for attempt in ("publish-event", "read-commands", "read-dead", "declare-exchange"):
                    channel = await connection.channel()
                    with pytest.raises(ChannelAccessRefused):
                        if attempt == "publish-event":
                            exchange = await channel.get_exchange("failover.events")
                            await exchange.publish(aio_pika.Message(b"{}"), routing_key="job.x.JobCompleted")
                            await channel.get_exchange("failover.events")  # the refusal closes the channel
                        elif attempt == "read-commands":
                            queue = await channel.get_queue("failover.commands")
                            await queue.get(fail=False)
                        elif attempt == "read-dead":
                            queue = await channel.get_queue("failover.dead")
                            await queue.get(fail=False)
                        else:
                            await channel.declare_exchange("portal.own", durable=False)
            service = await aio_pika.connect(_url(stack.amqp_url, users["failover"], "pw-" + suffix))
            async with service:
                channel = await service.channel()
                with pytest.raises(ChannelAccessRefused):
                    await channel.declare_queue("not.the.service.s", durable=False)
        finally:
            await serve.stop()
            await emu.close()
            for user in users.values():
                await asyncio.to_thread(rabbitmqctl, "delete_user", user, check=False)

