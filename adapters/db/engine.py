"""The SQLAlchemy async engine (asyncmy) and small helpers shared by the repositories."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def make_engine(url: str, *, pool_size: int = 10, ssl_ca: str | None = None) -> AsyncEngine:
    """An engine for `url`; its query string goes to the driver (e.g. `unix_socket=`), and
    `ssl_ca` (or `?ssl_ca=` in the URL) turns TLS on with that CA bundle."""
    parsed = make_url(url)
    query = dict(parsed.query)
    connect_args: dict[str, Any] = {}
    ca = ssl_ca or query.pop("ssl_ca", None)
    if ca:
        ctx = ssl.create_default_context(cafile=str(ca))
        connect_args["ssl"] = ctx
        parsed = parsed.set(query=query)
    return create_async_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args,
    )


def utcnow() -> datetime:
    """Now, UTC, naive (the columns store UTC without a zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_db_time(value: float | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)


def from_db_time(value: datetime | None) -> float | None:
    return None if value is None else value.replace(tzinfo=UTC).timestamp()


def is_connection_error(exc: BaseException) -> bool:
    """True when the database is unreachable (worth waiting for), not a logic error."""
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (ConnectionError, OSError))
