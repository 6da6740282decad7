"""The command consumer's wait for the database (`CommandConsumer._with_db`): a first attempt
that succeeds builds no retrying machinery and leaves nothing to Python's cycle collector; a
connection error is retried as tenacity would (the outage bounded by `db_outage_seconds`); any
other error goes to the caller at once."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from consumers.commands import CommandConsumer


def _consumer(outage: float = 5.0) -> CommandConsumer:
    # (`_with_db` uses none of the broker's objects nor the recorder)
    return CommandConsumer(None, None, None, max_bytes=1024, on_accepted=lambda j, first: None,  # type: ignore[arg-type]
                           count=lambda t, o: None, db_outage_seconds=outage, delivery_limit=5)


async def test_a_command_recorded_at_once_leaves_nothing_to_the_cycle_collector() -> None:
    consumer = _consumer()

    async def record() -> Any:
        return "decision"

    assert await consumer._with_db(record) == "decision"  # warm: first calls import and cache
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            assert await consumer._with_db(record) == "decision"
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__module__ for o in gc.garbage if type(o).__module__.startswith("tenacity")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == [], f"{len(left)} of tenacity's objects left to the cycle collector by 50 commands"


async def test_a_connection_error_is_waited_out_and_the_command_recorded() -> None:
    consumer = _consumer()
    calls: list[int] = []

    async def record() -> Any:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("the database is away")
        return "decision"

    assert await consumer._with_db(record) == "decision"
    assert len(calls) == 3


async def test_a_connection_error_past_the_outage_bound_reaches_the_caller() -> None:
    consumer = _consumer(outage=0.3)
    calls: list[int] = []

    async def record() -> Any:
        calls.append(1)
        raise ConnectionRefusedError("the database is away")

    with pytest.raises(ConnectionRefusedError):
        await consumer._with_db(record)
    assert 2 <= len(calls) <= 4, calls  # waits of 0.2 s, then 0.4: the bound ends it


async def test_any_other_error_reaches_the_caller_at_once() -> None:
    consumer = _consumer()
    calls: list[int] = []

    async def record() -> Any:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        await consumer._with_db(record)
    assert len(calls) == 1


async def test_the_outage_bound_counts_the_first_attempts_own_time() -> None:
    """A first call that took the whole bound before it failed is not tried again: the bound
    counts from before it, not from when the retrying began."""
    import asyncio

    consumer = _consumer(outage=0.25)
    calls: list[int] = []

    async def record() -> Any:
        calls.append(1)
        await asyncio.sleep(0.3)  # a connect that hangs, then fails
        raise ConnectionRefusedError("the database is away")

    with pytest.raises(ConnectionRefusedError):
        await consumer._with_db(record)
    assert len(calls) == 1, calls
