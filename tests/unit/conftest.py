"""Fixtures of the state machine's unit tests: a fresh fake world per test, one shared machine."""

from __future__ import annotations

import pytest
from transitions.extensions.asyncio import AsyncMachine

from statemachine.machine import build_machine
from tests.fakes import Harness

# (tests/conftest.py registers tests.unit.helpers for assertion rewriting: tests outside this
# folder import it before this file is read)


@pytest.fixture(scope="session")
def machine() -> AsyncMachine:
    """The one machine of the "process": every test's jobs are models of it, as in `serve`."""
    return build_machine()


@pytest.fixture
def h() -> Harness:
    return Harness()
