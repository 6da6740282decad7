"""adapters.bus.connect against a broker that is not there."""

from __future__ import annotations

import gc

import aio_pika
import pytest

from adapters import bus


async def test_a_failed_first_connect_closes_what_it_opened() -> None:
    """aio-pika's connect_robust drops the connection it made when the first connect fails,
    unclosed: its finalizer then schedules a close (or, outside a running loop, leaves a
    coroutine never awaited). `bus.connect` closes it itself (the intake process reconnects
    this way at every restart while the broker is down)."""
    gc.disable()  # keep what the failed attempt left, cycles included, to look at it
    try:
        with pytest.raises(ConnectionError):
            await bus.connect("amqp://guest:guest@127.0.0.1:1/failed-first-connect")
        # (other tests' connections, to the real broker, may be open meanwhile: only this one counts)
        left = [o for o in gc.get_objects() if isinstance(o, aio_pika.RobustConnection)
                and o.url.path.endswith("failed-first-connect") and not o.is_closed]
        assert left == []
    finally:
        gc.enable()
