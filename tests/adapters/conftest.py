"""Fixtures for the adapter tests: the project's emulators over real HTTP (started once for
this package, on ephemeral ports), a fresh world per test, and the adapters pointed at them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from adapters.cloudstack import CloudStackAdapter
from adapters.volume_daemon import VolumeDaemonAdapter
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle, start_emulators

POLL = 0.01  # adapters poll the emulators this often: the tests stay fast


@pytest.fixture(scope="session")
async def adapter_emulators() -> AsyncIterator[EmulatorHandle]:
    """The CloudStack and Volume Daemon emulators, for every adapter test."""
    handle = await start_emulators()
    yield handle
    await handle.close()


@pytest.fixture
async def control(adapter_emulators: EmulatorHandle) -> AsyncIterator[EmulatorControl]:
    """The emulators' control API, on a fresh world (no faults, no latency, empty call log)."""
    async with EmulatorControl(adapter_emulators.control_url) as ctl:
        await ctl.reset()
        yield ctl
        await ctl.clear_faults()


@pytest.fixture
async def emu(adapter_emulators: EmulatorHandle, control: EmulatorControl) -> EmulatorHandle:
    """The emulators' URLs and seed ids, once the world is fresh."""
    return adapter_emulators


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The adapters' HTTP session, as the service makes it (no timeout of its own)."""
    async with aiohttp.ClientSession() as session:
        yield session


CloudStackFactory = Callable[..., CloudStackAdapter]
DaemonFactory = Callable[..., VolumeDaemonAdapter]


@pytest.fixture
def make_cloudstack(emu: EmulatorHandle, http: aiohttp.ClientSession) -> CloudStackFactory:
    """A CloudStack adapter on the emulator; keyword arguments override the defaults."""

    def make(**overrides: object) -> CloudStackAdapter:
        args: dict[str, object] = {
            "endpoint": emu.cloudstack_url, "api_key": emu.api_key, "secret_key": emu.secret_key,
            "session": http, "poll_interval": POLL, "timeout": 5.0,
        }
        args.update(overrides)
        return CloudStackAdapter(**args)  # type: ignore[arg-type]

    return make


@pytest.fixture
def cloudstack(make_cloudstack: CloudStackFactory) -> CloudStackAdapter:
    return make_cloudstack()


@pytest.fixture
def make_daemon(emu: EmulatorHandle, http: aiohttp.ClientSession) -> DaemonFactory:
    """A Volume Daemon adapter on the emulator; keyword arguments override the defaults."""

    def make(**overrides: object) -> VolumeDaemonAdapter:
        args: dict[str, object] = {
            "base_url": emu.volume_daemon_url, "session": http, "poll_interval": POLL,
            "timeout": 5.0,
        }
        args.update(overrides)
        return VolumeDaemonAdapter(**args)  # type: ignore[arg-type]

    return make


@pytest.fixture
def daemon(make_daemon: DaemonFactory) -> VolumeDaemonAdapter:
    return make_daemon()


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[[int, bytes, str], str]]:
    """A real HTTP server standing where a proxy in front of CloudStack or the daemon would
    answer by itself (an HTML 502, say): ``proxy(status, body, content_type)`` returns its base
    URL, answering every request so from then on."""
    from aiohttp import web

    answer: dict[str, object] = {"status": 502, "body": b"", "content_type": "text/html"}

    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=int(answer["status"]), body=answer["body"],  # type: ignore[call-overload]
                            headers={"Content-Type": str(answer["content_type"])})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    def configure(status: int, body: bytes, content_type: str = "text/html") -> str:
        answer.update(status=status, body=body, content_type=content_type)
        return f"http://127.0.0.1:{port}"

    yield configure
    await runner.cleanup()
