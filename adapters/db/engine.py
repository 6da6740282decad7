"""The SQLAlchemy async engine (asyncmy) and small helpers shared by the repositories."""

from __future__ import annotations

import ssl
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, event, func, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import UpdateBase

from . import raw

# The TLS options of a database URL (MySQL Connector / SQLAlchemy spellings), turned into one
# verifying SSLContext here rather than left to the driver: asyncmy alone would not verify the
# server for `?ssl=true` without a CA, and a context given in `connect_args` would silently drop
# a client certificate named in the URL.
TLS_OPTIONS = ("ssl", "ssl_ca", "ssl_capath", "ssl_cert", "ssl_key", "ssl_cipher", "ssl_check_hostname")
_FALSE = ("0", "false", "no", "off", "")


def _last(value: Any) -> str:
    return str(value[-1] if isinstance(value, tuple | list) else value)


def tls_context(options: dict[str, str]) -> ssl.SSLContext | None:
    """The SSLContext for a database URL's TLS options; None when they ask for no TLS.

    `ssl_ca` / `ssl_capath`: the CA to verify the server with (else the system's CAs);
    `ssl_cert` + `ssl_key`: a client certificate; `ssl_cipher`; `ssl_check_hostname=false` to
    accept a certificate for another name (the chain is still verified). `ssl=true` alone means
    TLS verified against the system's CAs. At least TLS 1.2.
    """
    wanted = {k: v for k, v in options.items() if k != "ssl"}
    if not wanted and options.get("ssl", "").strip().lower() in _FALSE:
        return None
    context = ssl.create_default_context(cafile=wanted.get("ssl_ca") or None,
                                         capath=wanted.get("ssl_capath") or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if wanted.get("ssl_check_hostname", "true").strip().lower() in _FALSE:
        context.check_hostname = False
    if wanted.get("ssl_cert"):
        context.load_cert_chain(wanted["ssl_cert"], keyfile=wanted.get("ssl_key") or None)
    if wanted.get("ssl_cipher"):
        context.set_ciphers(wanted["ssl_cipher"])
    return context


# A connection used within the last IDLE_PING_SECONDS is handed out without a ping: a busy
# service reuses its connections within milliseconds, and a ping at every checkout (SQLAlchemy's
# pool_pre_ping) was a round trip per transaction, a quarter of a job's ~200 round trips and ~5%
# of serve's CPU in the benchmark's profile. A connection idle for longer (a database restart, a
# network blip or wait_timeout may have cut it) is pinged first and, when dead, replaced before
# anyone uses it, as pool_pre_ping would. A connection that dies while in use fails its
# statement with or without a ping: the callers retry (commands, projector, relay) or resume the
# job from its record.
IDLE_PING_SECONDS = 1.0


def _ping_when_idle(engine: AsyncEngine, idle_seconds: float) -> None:
    pool, dialect = engine.sync_engine.pool, engine.sync_engine.dialect

    @event.listens_for(pool, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")  # none on a new connection (the dict is per connection)
        if since is None or time.monotonic() - since < idle_seconds:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool replaces it and checks out again
            raise DisconnectionError(f"an idle database connection is gone ({type(exc).__name__})") from exc


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int | None = None, ssl_ca: str | None = None,
                idle_ping_seconds: float = IDLE_PING_SECONDS) -> AsyncEngine:
    """An engine for `url`; its query string goes to the driver (e.g. `unix_socket=`), except
    the TLS options (`ssl_ca=`, `ssl_cert=`, `ssl_key=`, ... see `tls_context`), which turn TLS
    on with a verifying context. `ssl_ca` given here counts as `?ssl_ca=`. A pooled connection
    idle for `idle_ping_seconds` or more is pinged before it is handed out. `max_overflow`
    (default: `pool_size`): connections opened beyond the pool when it is all in use, each
    closed again when handed back to a full pool."""
    parsed = make_url(url)
    query = dict(parsed.query)
    options = {key: _last(query.pop(key)) for key in TLS_OPTIONS if key in query}
    if ssl_ca:
        options["ssl_ca"] = ssl_ca
    connect_args: dict[str, Any] = {}
    if options:
        context = tls_context(options)
        if context is not None:
            connect_args["ssl"] = context
        parsed = parsed.set(query=query)
    engine = create_async_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_pre_ping=False,  # see IDLE_PING_SECONDS
        pool_recycle=1800,
        # No ROLLBACK when a connection goes back to the pool: every use here is an
        # `engine.begin()` (committed or rolled back by it) or an `engine.connect()` block (whose
        # close rolls its transaction back itself), so the pool's own reset was a second,
        # empty ROLLBACK after every commit: 45 round trips of a job's ~300 (bench/PROFILE.md).
        pool_reset_on_return=None,
        connect_args=connect_args,
    )
    _ping_when_idle(engine, idle_ping_seconds)
    raw.multi_statements(engine)
    return engine


Hinted = TypeVar("Hinted", bound="Select[Any] | UpdateBase")


def index_hint(statement: Hinted, hint: str, table: Any = None) -> Hinted:
    """`statement` with `hint` (`FORCE INDEX (name)`) after its table, in MySQL's and MariaDB's
    SQL alike: SQLAlchemy keeps a hint for one dialect name, and a `mariadb://` URL is the
    dialect `mariadb`, which would send the statement without it."""
    for name in ("mysql", "mariadb"):
        if isinstance(statement, Select):
            statement = statement.with_hint(table, hint, dialect_name=name)
        else:
            statement = statement.with_hint(hint, table, dialect_name=name)
    return statement


def db_now_plus(microseconds: int) -> Any:
    """The server's now(6) plus this many microseconds, as an SQL expression (leases' expiries:
    the server's clock, the one the fences compare against)."""
    return func.date_add(func.now(6), text(f"INTERVAL {int(microseconds)} MICROSECOND"))


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
    if isinstance(exc, (OperationalError, PoolTimeout)):  # (no connection free in the pool: too slow to answer)
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (ConnectionError, OSError))
