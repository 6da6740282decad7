"""Start the emulators (in a test, the demo, or as ``python -m emulators``).

``start_emulators`` listens with both apps over one world and returns a handle with the
URLs and the seed ids; ``main`` runs them until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from emulators.cloudstack import API_PATH, create_cloudstack_app
from emulators.events import EventBus
from emulators.volume_daemon import create_volume_daemon_app
from emulators.world import World

DEFAULT_API_KEY = "emulator-api-key"
DEFAULT_SECRET_KEY = "emulator-secret-key"


@dataclass
class EmulatorHandle:
    """Running emulators: URLs, seed ids, the shared world, and ``close()``."""

    world: World
    cloudstack_url: str
    volume_daemon_url: str
    control_url: str
    api_key: str
    secret_key: str
    _runners: list[web.AppRunner]
    event_bus: EventBus | None = None  # the emulated CloudStack event bus, when asked for

    @property
    def appliance_vm_id(self) -> str:
        """The appliance VM (``migratekit-oma``)."""
        return self.world.appliance_vm_id

    @property
    def zone_id(self) -> str:
        """The zone's id."""
        return self.world.zone_id

    @property
    def zone_name(self) -> str:
        """The zone's name, ``zone1``."""
        return self.world.zones[self.world.zone_id].name

    @property
    def template_id(self) -> str:
        """The template's id."""
        return self.world.template_id

    @property
    def service_offering_id(self) -> str:
        """The (custom) service offering's id."""
        return self.world.service_offering_id

    @property
    def disk_offering_id(self) -> str:
        """The disk offering's id."""
        return self.world.disk_offering_id

    @property
    def network_id(self) -> str:
        """``default-net``'s id."""
        return self.world.network_id

    @property
    def test_network_id(self) -> str:
        """``test-net``'s id."""
        return self.world.test_network_id

    def as_json(self) -> dict[str, Any]:
        """URLs, keys and seed ids, as ``--state-file`` writes them."""
        return {
            "cloudstack_url": self.cloudstack_url,
            "volume_daemon_url": self.volume_daemon_url,
            "control_url": self.control_url,
            "api_key": self.api_key,
            "secret_key": self.secret_key,
            "appliance_vm_id": self.appliance_vm_id,
            "zone_id": self.zone_id,
            "zone_name": self.zone_name,
            "template_id": self.template_id,
            "service_offering_id": self.service_offering_id,
            "disk_offering_id": self.disk_offering_id,
            "network_id": self.network_id,
            "test_network_id": self.test_network_id,
        }

    async def close(self) -> None:
        """Stop listening and stop every timer."""
        self.world.close()
        for runner in self._runners:
            await runner.cleanup()
        if self.event_bus is not None:
            await self.event_bus.close()


async def _listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[-1][1])


async def start_emulators(
    host: str = "127.0.0.1",
    cloudstack_port: int = 0,
    volume_daemon_port: int = 0,
    api_key: str = DEFAULT_API_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    appliance_vm_id: str | None = None,
    template_id: str | None = None,
    service_offering_id: str | None = None,
    network_id: str | None = None,
    event_bus_url: str | None = None,
    event_bus_exchange: str = "cloudstack-events",
) -> EmulatorHandle:
    """Listen with the CloudStack and Volume Daemon apps (port 0: an ephemeral port); with
    `event_bus_url`, publish each async job's end there as CloudStack's event bus does."""
    world = World(api_key=api_key, secret_key=secret_key, appliance_vm_id=appliance_vm_id,
                  template_id=template_id, service_offering_id=service_offering_id, network_id=network_id)
    bus: EventBus | None = None
    if event_bus_url:
        bus = EventBus(event_bus_url, event_bus_exchange, user=world.user_id, account=world.account_id)
        await bus.start()
        world.event_bus = bus
        world.runner.on_job_end = bus.job_ended
    try:
        cs_runner, cs_port = await _listen(create_cloudstack_app(world), host, cloudstack_port)
        try:
            vd_runner, vd_port = await _listen(
                create_volume_daemon_app(world), host, volume_daemon_port
            )
        except BaseException:
            await cs_runner.cleanup()
            raise
    except BaseException:
        if bus is not None:
            await bus.close()
        raise
    url_host = f"[{host}]" if ":" in host else host
    cs_base = f"http://{url_host}:{cs_port}"
    return EmulatorHandle(
        world=world,
        cloudstack_url=cs_base + API_PATH,
        volume_daemon_url=f"http://{url_host}:{vd_port}",
        control_url=cs_base,
        api_key=api_key,
        secret_key=secret_key,
        _runners=[cs_runner, vd_runner],
        event_bus=bus,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emulators", description="CloudStack and Volume Daemon emulators"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cloudstack-port", type=int, default=8080)
    parser.add_argument("--volume-daemon-port", type=int, default=8090)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    parser.add_argument("--appliance-vm-id", default=None)
    parser.add_argument("--template-id", default=None, help="fixed id of the template (default: random)")
    parser.add_argument("--service-offering-id", default=None, help="fixed id of the service offering")
    parser.add_argument("--network-id", default=None, help="fixed id of default-net")
    parser.add_argument(
        "--state-file", type=Path, default=None, help="write URLs and ids here once listening"
    )
    parser.add_argument("--event-bus-url", default=None,
                        help="publish each async job's end to this RabbitMQ (amqp://...), as CloudStack's "
                             "event bus does (default: no event bus)")
    parser.add_argument("--event-bus-exchange", default="cloudstack-events",
                        help="the topic exchange of the event bus (CloudStack's RabbitMQEventBus `exchange`)")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    handle = await start_emulators(
        host=args.host,
        cloudstack_port=args.cloudstack_port,
        volume_daemon_port=args.volume_daemon_port,
        api_key=args.api_key,
        secret_key=args.secret_key,
        appliance_vm_id=args.appliance_vm_id,
        template_id=args.template_id,
        service_offering_id=args.service_offering_id,
        network_id=args.network_id,
        event_bus_url=args.event_bus_url,
        event_bus_exchange=args.event_bus_exchange,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if args.state_file is not None:
            tmp = args.state_file.with_name(args.state_file.name + ".tmp")
            tmp.write_text(json.dumps(handle.as_json(), indent=2))
            tmp.replace(args.state_file)
        print(
            f"emulators listening: cloudstack {handle.cloudstack_url} "
            f"volume-daemon {handle.volume_daemon_url} control {handle.control_url}",
            flush=True,
        )
        await stop.wait()
    finally:
        await handle.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emulators`` / ``failoverctl emulate``: serve until SIGTERM/SIGINT, exit 0."""
    args = _parser().parse_args(list(argv) if argv is not None else sys.argv[1:])
    # on uvloop when installed, as `failoverctl` runs: an emulator that shares the machine with
    # what it stands in for (the demo, the benchmarks) should take as little of it as it can
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(args))
    return 0
