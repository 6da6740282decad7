"""Fixtures of the state machine's unit tests: a fresh fake world per test, one shared machine."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.unit.helpers")

from transitions.extensions.asyncio import AsyncMachine  # noqa: E402

from statemachine.machine import build_machine  # noqa: E402
from tests.fakes import Harness  # noqa: E402


@pytest.fixture(scope="session")
def machine() -> AsyncMachine:
    """The one machine of the "process": every test's jobs are models of it, as in `serve`."""
    return build_machine()


@pytest.fixture
def h() -> Harness:
    return Harness()
