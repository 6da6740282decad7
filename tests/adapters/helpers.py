"""Helpers for the adapter tests: deadlines instead of sleeps, a closed port, the world's state."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from emulators.client import EmulatorControl

T = TypeVar("T")


async def wait_until(probe: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
                     timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``probe`` (sync or async) until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def closed_port_url(path: str = "") -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


async def world_item(control: EmulatorControl, kind: str, item_id: str) -> dict[str, Any]:
    """One vm / volume / snapshot of the emulator's state, destroyed ones included."""
    state = await control.state()
    [item] = [i for i in state[kind] if i["id"] == item_id]
    return dict(item)


class Observed:
    """An adapter's ``observe`` callback that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, float]] = []

    def __call__(self, adapter: str, operation: str, outcome: str, seconds: float) -> None:
        self.calls.append((adapter, operation, outcome, seconds))
