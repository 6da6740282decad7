"""Fixtures of the hostile-input tests: a watcher of everything the shared `serve` process says
on the bus (every event, every dead letter), on the session's vhost."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

pytest.register_assert_rewrite("tests.hostile.helpers")

from tests.helpers import ServeProcess  # noqa: E402

from .helpers import Watcher, serving  # noqa: E402


@pytest.fixture(scope="session")
async def watcher(serve: ServeProcess, amqp_url: str) -> AsyncIterator[Watcher]:
    """Started once the service has declared its topology; drains `failover.dead` first."""
    await serving(serve)  # /readyz says 200 before the command queue exists
    watch = await Watcher.start(amqp_url)
    yield watch
    await watch.close()
