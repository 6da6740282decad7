"""Fixtures: one pair of emulators for the session over real HTTP, a fresh world per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from cs import AIOCloudStack

from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle, start_emulators


@pytest.fixture(scope="session")
async def emulators() -> AsyncIterator[EmulatorHandle]:
    """The emulators, listening on ephemeral ports for the whole session."""
    handle = await start_emulators()
    yield handle
    await handle.close()


@pytest.fixture
async def emu(emulators: EmulatorHandle) -> EmulatorHandle:
    """The emulators with a fresh world."""
    emulators.world.reset()
    return emulators


@pytest.fixture
async def cs(emu: EmulatorHandle) -> AsyncIterator[AIOCloudStack]:
    """The real ``cs`` client, signed with the emulator's keys."""
    async with AIOCloudStack(
        emu.cloudstack_url, emu.api_key, emu.secret_key, fetch_result=False, timeout=10
    ) as client:
        yield client


@pytest.fixture
async def control(emu: EmulatorHandle) -> AsyncIterator[EmulatorControl]:
    """The control API client."""
    async with EmulatorControl(emu.control_url) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client with a deadline on every request."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session
