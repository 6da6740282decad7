"""The engine's pool against the real MariaDB: a connection cut while idle in the pool is found
dead and replaced before anyone uses it (what pool_pre_ping did at every checkout, now only for
connections idle longer than `idle_ping_seconds`)."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.engine import make_engine


async def _connection_id(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT CONNECTION_ID()"))).scalar_one())


async def _cut(db: AsyncEngine, connection_id: int) -> None:
    async with db.connect() as conn:
        await conn.execute(text(f"KILL CONNECTION {connection_id}"))


async def test_an_idle_connection_cut_by_the_server_is_replaced_before_use(database_url: str, db: AsyncEngine) -> None:
    engine = make_engine(database_url, pool_size=1, idle_ping_seconds=0.0)  # every checkout counts as idle
    try:
        first = await _connection_id(engine)
        await _cut(db, first)
        second = await _connection_id(engine)  # no error: pinged, found dead, replaced
        assert second != first
    finally:
        await engine.dispose()


async def test_a_recently_used_connection_is_not_pinged(database_url: str, db: AsyncEngine) -> None:
    """The other side of the trade: within `idle_ping_seconds` nothing is checked, so a
    connection cut in that window fails its next statement (and the pool then replaces it)."""
    engine = make_engine(database_url, pool_size=1, idle_ping_seconds=3600.0)
    try:
        first = await _connection_id(engine)
        await _cut(db, first)
        with pytest.raises(OperationalError):
            await _connection_id(engine)
        assert await _connection_id(engine) != first  # the failed one was invalidated
    finally:
        await engine.dispose()
