"""A job's hot statements without SQLAlchemy's per-statement machinery.

Each execution through SQLAlchemy's async engine builds a cache key, looks the compiled form up,
constructs and processes its parameters, wraps the result and crosses a greenlet. On the job
store's usual transaction (a fenced UPDATE, an outbox event, a ledger upsert), `JobStore.commit`
took 0.92 ms of CPU that way and takes 0.52 ms on the driver directly (`python -m bench.raw_sql`,
bench/PROFILE.md).
Here the fixed statements of the hot paths are compiled once, by SQLAlchemy, for the engine's
dialect (`Prepared`), and run on the pooled connection's asyncmy connection (`transaction`):
the same SQL, the same type conversions (the columns' own bind processors: JSON, booleans), the
same connections (the pool's: its client flags, its idle ping, its recycling), the same errors
(wrapped as SQLAlchemy's, so the callers' retry and outage checks hold).

On an engine made with `multi_statements` (every engine of `make_engine`), `Transaction.script`
sends several statements in one round trip. Each round trip costs a socket write and read, an
event-loop turn and a wake of the server's thread, whatever the statement: the usual job commit
was four of them (UPDATE, INSERT, INSERT, COMMIT) and is one on MariaDB (two on MySQL).
"""

from __future__ import annotations

import re
import weakref
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from asyncmy import errors as driver_errors
from asyncmy.constants import CLIENT
from asyncmy.converters import escape_item
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

_MISSING = object()
T = TypeVar("T")


class Prepared:
    """`statement` compiled once for `dialect` (with `column_keys`: an INSERT of those columns);
    `args(params)` turns a dict of its parameters into the driver's positional arguments."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, column_keys: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        assert isinstance(compiled, SQLCompiler)
        if not compiled.positional or compiled.positiontup is None:
            raise ValueError(f"{dialect.name}'s paramstyle is not positional")
        binds = compiled.binds
        if any(b.expanding for b in binds.values()):
            raise ValueError("a statement with an expanding IN list cannot be prepared once")
        self.sql = str(compiled)
        processors = compiled._bind_processors  # the columns' types: JSON -> text, and so on
        names = list(compiled.positiontup)
        # each positional slot: (parameter name, its fixed value if the statement holds one, processor)
        self._slots: list[tuple[str, Any, Callable[[Any], Any] | None]] = []
        for name in names:
            bind = binds[name]
            fixed = bind.effective_value if (bind.value is not None or bind.callable is not None) else _MISSING
            process = processors.get(name)
            if process is not None and not callable(process):
                raise ValueError(f"parameter {name!r} is a tuple: not preparable")
            self._slots.append((name, fixed, process))
        # a SELECT's rows: named as its columns, their values converted by the columns' types
        # (JSON text -> objects, MariaDB's 0/1 -> booleans), as SQLAlchemy's result would
        selected = getattr(statement, "selected_columns", None)
        self.row: Callable[..., Any] | None = None
        self._results: list[Callable[[Any], Any] | None] = []
        self._insert_parts: tuple[str, str, str] | None = None
        if selected is not None:
            self.row = namedtuple("Row", [c.name for c in selected], rename=True)  # type: ignore[misc]
            self._results = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in selected]

    def converted(self, found: Sequence[Sequence[Any]]) -> list[Any]:
        """The driver's rows of this SELECT as named rows of converted values."""
        assert self.row is not None, "not a SELECT of columns"
        make, results = self.row, self._results
        return [make(*[v if f is None or v is None else f(v) for f, v in zip(results, r, strict=True)])
                for r in found]

    @property
    def insert_parts(self) -> tuple[str, str, str]:
        """An INSERT's text as (head, one row's `(%s, ...)`, tail): many rows are the head, the
        rows joined by commas, and the tail (what the driver's executemany sends)."""
        if self._insert_parts is None:
            m = _INSERT_VALUES.match(self.sql)
            if m is None:
                raise ValueError(f"not an INSERT ... VALUES: {self.sql[:80]}")
            # the head and tail are sent as they are, not through `%`: unescape their %% now
            self._insert_parts = (m.group(1) % (), m.group(2), (m.group(3) or "") % ())
        return self._insert_parts

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        out = []
        for name, fixed, process in self._slots:
            value = params.get(name, fixed)
            if value is _MISSING:
                raise KeyError(f"parameter {name!r} missing for: {self.sql[:80]}")
            out.append(process(value) if process is not None and value is not None else value)
        return out


# the driver's own split of an INSERT ... VALUES (...) [ON DUPLICATE KEY UPDATE ...] (as PyMySQL's)
_INSERT_VALUES = re.compile(
    r"\s*((?:INSERT|REPLACE)\b.+\bVALUES?\s*)(\(\s*(?:%s|%\(.+\)s)\s*(?:,\s*(?:%s|%\(.+\)s)\s*)*\))"
    r"(\s*(?:(?:AS|ON DUPLICATE).*)?);?\s*\Z", re.IGNORECASE | re.DOTALL)


class Statements:
    """The `Prepared` form of each statement, made on first use (per engine: its dialect). Each
    statement given is kept with its form: give the long-lived ones, built once (module level, or
    cached per shape), not one built per call. `scripts`: the engine's connections take several
    statements at once (see `multi_statements`)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.scripts = False
        self._cache: dict[tuple[int, tuple[str, ...] | None], tuple[ClauseElement, Prepared]] = {}

    @property
    def compound(self) -> bool:
        """Whether a script may hold `IF ... END IF` outside a stored program (MariaDB since
        10.1.1; MySQL has none): known once the engine has connected."""
        return self.scripts and bool(getattr(self.dialect, "is_mariadb", False))

    def get(self, statement: ClauseElement, column_keys: Iterable[str] | None = None) -> Prepared:
        keys = tuple(column_keys) if column_keys is not None else None
        key = (id(statement), keys)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not statement:  # (the statement is kept: its id stays its own)
            hit = self._cache[key] = (statement, Prepared(statement, self.dialect, keys))
        return hit[1]


# client-side codes meaning the connection is gone: CR_SERVER_GONE_ERROR, CR_SERVER_LOST,
# CR_COMMANDS_OUT_OF_SYNC, CR_CONN_UNKNOW_PROTOCOL, CR_SERVER_LOST_EXTENDED, ER_CLIENT_INTERACTION_TIMEOUT
_GONE = {2006, 2013, 2014, 2045, 2055, 4031}


def _gone(exc: Exception) -> bool:
    code = exc.args[0] if exc.args else None
    return isinstance(exc, driver_errors.InterfaceError) or code in _GONE


class Transaction:
    """Statements of one transaction on one pooled connection (see `transaction`). The driver's
    errors come out as SQLAlchemy's (OperationalError, IntegrityError, ...: callers read
    `.orig.args[0]` for MariaDB's code, `connection_invalidated`); a statement that fails on the
    server leaves the transaction open, as it would through SQLAlchemy."""

    def __init__(self, driver_connection: Any, statements: Statements) -> None:
        self._connection = driver_connection
        self._cursor = driver_connection.cursor()  # one for all the transaction's statements (buffered)
        self._statements = statements
        self._dialect = statements.dialect
        self.scripts = statements.scripts
        self._committed = False
        # the connection's state is unknown (it is gone, or a cancel or a socket error came
        # mid-statement and left an answer unread): never to be used again
        self.broken = False

    async def _call(self, sql: str | Callable[[], str], call: Callable[[Any], Awaitable[T]]) -> T:
        """`call(cursor)`, its errors wrapped; `sql` names the statement in them (a callable: named
        once an error is known, e.g. which statement of a script failed)."""
        self._committed = False  # (a statement after a script's COMMIT begins a new transaction)
        try:
            return await call(self._cursor)
        except driver_errors.Error as exc:
            sql = sql() if callable(sql) else sql
            gone = _gone(exc)
            self.broken = self.broken or gone
            raise DBAPIError.instance(sql, None, exc, driver_errors.Error, hide_parameters=True,
                                      connection_invalidated=gone, dialect=self._dialect) from exc
        except (OSError, EOFError, AttributeError) as exc:
            # the socket went away under the driver: asyncmy then raises the transport's error,
            # an incomplete read or, on a writer it has already dropped, an AttributeError
            # (SQLAlchemy's own asyncmy adapter makes the same translation). An outage, as
            # SQLAlchemy would report it: the callers wait for the database and retry
            self.broken = True
            sql = sql() if callable(sql) else sql
            lost = driver_errors.OperationalError(2013, f"Lost connection to the database ({type(exc).__name__}: {exc})")
            raise DBAPIError.instance(sql, None, lost, driver_errors.Error, hide_parameters=True,
                                      connection_invalidated=True, dialect=self._dialect) from exc
        except BaseException:
            self.broken = True
            raise

    async def execute(self, statement: ClauseElement, params: Mapping[str, Any]) -> int:
        """Run one statement; its row count (rows matched, as SQLAlchemy's MySQL connections count)."""
        prepared = self._statements.get(statement)
        args = prepared.args(params)

        async def run(cursor: Any) -> int:
            await cursor.execute(prepared.sql, args)
            return int(cursor.rowcount)

        return await self._call(prepared.sql, run)

    async def rows(self, statement: ClauseElement, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a SELECT; its rows as the driver gives them (no result processing)."""
        prepared = self._statements.get(statement)
        args = prepared.args(params or {})

        async def run(cursor: Any) -> list[tuple[Any, ...]]:
            await cursor.execute(prepared.sql, args)
            return list(await cursor.fetchall())

        return await self._call(prepared.sql, run)

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Run a SELECT of columns; its rows, named and converted as SQLAlchemy's would be."""
        prepared = self._statements.get(statement)
        args = prepared.args(params or {})

        async def run(cursor: Any) -> Any:
            await cursor.execute(prepared.sql, args)
            return await cursor.fetchall()

        return prepared.converted(await self._call(prepared.sql, run))

    async def fetch_all(self, queries: Sequence[tuple[ClauseElement, Mapping[str, Any]]], *,
                        commit: bool = False) -> list[list[Any]]:
        """Several SELECTs of columns, and with `commit` the COMMIT that ends a read-only
        transaction, run as `script` runs its statements (in one request where the connection
        takes several): each SELECT's rows, named and converted as `fetch`'s. A read alone was
        two round trips (its SELECT, then the COMMIT that lets the connection go without a stale
        view)."""
        prepared = [self._statements.get(statement) for statement, _ in queries]
        sqls = [p.sql % tuple(map(literal, p.args(params))) for p, (_, params) in zip(prepared, queries, strict=True)]
        found: list[list[tuple[Any, ...]]] = []
        await self._script([*sqls, "COMMIT"] if commit else sqls, commit=commit, rows=False, each=found)
        return [p.converted(rows) for p, rows in zip(prepared, found, strict=False)]

    async def insert(self, statement: ClauseElement, rows: Sequence[Mapping[str, Any]]) -> int:
        """An INSERT (or upsert) of `rows`, all with the same keys, as one multi-row statement;
        the first row's id."""
        if not rows:
            return 0
        prepared = self._statements.get(statement, rows[0].keys())
        args = [prepared.args(r) for r in rows]

        async def run(cursor: Any) -> int:
            if len(args) == 1:
                await cursor.execute(prepared.sql, args[0])
            else:
                await cursor.executemany(prepared.sql, args)
            return int(cursor.lastrowid or 0)

        return await self._call(prepared.sql, run)

    def sql(self, statement: ClauseElement, params: Mapping[str, Any] | None = None) -> str:
        """`statement` with `params` in it, each value a SQL literal (`literal`), for `script`."""
        prepared = self._statements.get(statement)
        return prepared.sql % tuple(map(literal, prepared.args(params or {})))

    def insert_sqls(self, statement: ClauseElement, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """An INSERT (or upsert) of `rows` (not empty, all with the same keys) as multi-row
        statements of at most about `MAX_STATEMENT` characters each (one, usually), as the
        driver's executemany would send them (for `script`)."""
        head, tuples, tail = self.insert_rows(statement, rows)
        return [head + ",".join(tuples[start:end]) + tail
                for start, end in _bounded(tuples, MAX_STATEMENT - len(head) - len(tail))]

    def insert_rows(self, statement: ClauseElement, rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[str], str]:
        """An INSERT (or upsert) of `rows` (not empty, all with the same keys) in parts: its
        head, each row's `(...)` and its tail, as `insert_sqls` joins them; rows of several
        calls with the same keys can go in one statement (the group commit's)."""
        prepared = self._statements.get(statement, rows[0].keys())
        head, values, tail = prepared.insert_parts
        args = prepared.args
        return head, [values % tuple(map(literal, args(r))) for r in rows], tail

    @property
    def compound(self) -> bool:
        """Whether `block` (and `stop_unless_one_row`) may be used: `Statements.compound`."""
        return self._statements.compound

    def stop_unless_one_row(self) -> str | None:
        """A statement for `script` that fails, with `STOPPED`, unless the statement before it
        matched exactly one row: what comes after it then does not run (a COMMIT included).
        None where the server cannot say so in a statement (MySQL has no IF outside stored
        programs; MariaDB has since 10.1.1)."""
        return _STOP_UNLESS_ONE_ROW if self._statements.compound else None

    async def script(self, sqls: Sequence[str], *, commit: bool = False) -> list[int]:
        """Run `sqls` (from `sql`, `insert_sqls`, `stop_unless_one_row`) in order, in one round
        trip where the connection takes several statements at once (else one by one; a script
        longer than `MAX_STATEMENT` characters goes in several requests, one after the other);
        each one's row count (rows matched). The server stops at the first statement that
        fails: its error is raised as `execute`'s would be (naming that statement, without its
        values), and the ones after it did not run. With `commit`, a COMMIT ends the script, and
        the transaction is over once it returns."""
        counts, _ = await self._script([*sqls, "COMMIT"] if commit else list(sqls), commit=commit, rows=False)
        return counts

    async def script_select(self, sqls: Sequence[str], select: str, *, commit: bool = False) -> tuple[list[int], list[tuple[Any, ...]]]:
        """`script(sqls, commit=commit)` followed, in the same round trip, by `select` (a SELECT
        built here, e.g. of a user variable the script set): the counts of `sqls` and the rows
        of `select`."""
        counts, rows = await self._script([*sqls, *(["COMMIT"] if commit else []), select], commit=commit, rows=True)
        return counts[:len(sqls)], rows

    async def _script(self, sqls: list[str], *, commit: bool, rows: bool,
                      each: list[list[tuple[Any, ...]]] | None = None) -> tuple[list[int], list[tuple[Any, ...]]]:
        """`sqls` run in order: their row counts, and with `rows` the last one's rows; `each`
        (when given) receives every statement's rows, in order."""
        if not sqls:
            return [], []
        counts: list[int] = []

        async def done(cursor: Any) -> None:  # the statement the cursor is at has run
            counts.append(int(cursor.rowcount))
            if each is not None:
                each.append(list(await cursor.fetchall() or ()))

        async def run(cursor: Any) -> list[int]:
            if not self.scripts:
                for one in sqls:
                    await cursor.execute(one)
                    await done(cursor)
                return counts
            for start, end in _bounded(sqls, MAX_STATEMENT):
                await cursor.execute(";".join(sqls[start:end]))  # no arguments: the text goes as it is
                await done(cursor)
                for _ in range(end - start - 1):
                    await cursor.nextset()
                    await done(cursor)
            return counts

        def failed() -> str:  # the statement that failed: the next one without a count
            at = min(len(counts), len(sqls) - 1)
            return f"statement {at + 1} of {len(sqls)} of a script: {_named(sqls[at])}"

        async def last_rows(cursor: Any) -> list[tuple[Any, ...]]:
            return list(await cursor.fetchall() or ())

        await self._call(failed, run)
        found = await self._call(failed, last_rows) if rows else []
        if commit:
            self._committed = True
            counts.pop(-2 if rows else -1)  # the COMMIT's
        return counts, found

    async def rollback(self) -> None:
        """Undo what the transaction wrote so far; the next statement begins a new one."""
        await self._call("ROLLBACK", lambda cursor: self._connection.rollback())

    async def commit(self) -> None:
        if self._committed:  # a script's own COMMIT ended the transaction
            return
        await self._call("COMMIT", lambda cursor: self._connection.commit())


# a script's request, and a multi-row INSERT, stay under about this many characters (as the
# driver's executemany, whose statements stop at 1,024,000): well below max_allowed_packet
MAX_STATEMENT = 1_000_000
_NAMED = re.compile(r"\s*(\w+(?:\s+(?:INTO|FROM))?\s+`?\w+`?)", re.IGNORECASE)


def _named(sql: str) -> str:
    """A statement's kind and table (`INSERT INTO outbox`), never its values."""
    m = _NAMED.match(sql)
    return m.group(1) if m else sql.split(None, 1)[0] if sql.strip() else "(empty)"


def _bounded(texts: Sequence[str], limit: int) -> list[tuple[int, int]]:
    """`texts` as ranges [start, end) whose texts, joined by one character, stay within `limit`
    characters (a longer text alone): the statements of a script's requests, the rows of a
    multi-row INSERT."""
    out: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, one in enumerate(texts):
        if i > start and size + len(one) + 1 > limit:
            out.append((start, i))
            start, size = i, 0
        size += len(one) + 1
    out.append((start, len(texts)))
    return out


# MariaDB's error for a SIGNAL (ER_SIGNAL_EXCEPTION), and the message of `stop_unless_one_row`'s
SIGNALLED = 1644
STOPPED = "stopped: the statement before matched no row"


def stop_if(condition: str, message: str = STOPPED) -> str:
    """A statement for `script` (MariaDB's IF outside stored programs) that fails with `message`
    (`stopped(exc, message)`) where the SQL `condition` holds: what comes after it then does not
    run, a COMMIT included."""
    return f"IF {condition} THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'; END IF"


_STOP_UNLESS_ONE_ROW = stop_if("ROW_COUNT() <> 1")


def block(sqls: Sequence[str]) -> str:
    """`sqls` as one statement for `script`: MariaDB's anonymous block, `BEGIN NOT ATOMIC ...
    END` (where `Statements.compound` holds). Not a transaction of its own: its statements
    write into the script's, and the first that fails ends the block with its error, as in the
    script. The server answers it once instead of once per statement (on a group of 8 job
    commits of three statements each, 20 us of the client's CPU per job instead of 64, and 77 us
    of the server's instead of 146: bench/PROFILE.md), but copies each string literal in it into
    the block's UTF-8 text character by character: long values (an event's body) are cheaper
    outside."""
    return "BEGIN NOT ATOMIC " + "; ".join(sqls) + "; END"


def as_block(sqls: Sequence[str]) -> list[str]:
    """`sqls` for `script` as one `block` if that fits in one request, else as they are (a
    script longer than a request goes in several, which a block cannot)."""
    fits = sum(len(q) + 2 for q in sqls) < MAX_STATEMENT - 100  # (the block's own words)
    return [block(sqls)] if fits else list(sqls)


def stopped(exc: BaseException, message: str = STOPPED) -> bool:
    """Whether `exc` is a script's stop by `stop_unless_one_row` (or by a `stop_if` with `message`)."""
    orig = getattr(exc, "orig", None)
    return isinstance(exc, DBAPIError) and orig is not None and tuple(orig.args[:2]) == (SIGNALLED, message)


def padded(values: Sequence[T]) -> list[T]:
    """`values` (not empty) padded to the next power of two by repeating the last one: an
    `IN (...)` list of that length gives the same rows, and a statement prepared per length
    then comes in a dozen shapes instead of one per batch size (each shape is compiled once,
    about a millisecond for a long list)."""
    size = 1 << (len(values) - 1).bit_length()
    return [*values, *[values[-1]] * (size - len(values))]


_statements: weakref.WeakKeyDictionary[AsyncEngine, Statements] = weakref.WeakKeyDictionary()


def literal(value: Any) -> str:
    """`value` as a SQL literal for a statement built here (what the driver's `mogrify` makes
    of it, but for strings and datetimes, which are most of a job's values).

    A string is quoted with its `\\` and its `'` doubled: the server reads it back as it was
    (utf8mb4, where no character's bytes hold a quote or a backslash; a request is sent with
    its length, so other bytes, NUL included, stand for themselves; `NO_BACKSLASH_ESCAPES` off,
    as the driver's own escaping assumes: with it on, backslashes would come back doubled, but
    a quote still could not end the literal). asyncmy's escaping looks at every character in
    compiled code that calls back into Python: 15 us for an event's 700-byte body, against
    0.2 us here, where `str.replace` runs only for a character that is there (4.8% of serve's
    CPU in a burst went to it, bench/PROFILE.md). A naive datetime is its ISO form (what the
    driver sends too); anything else (numbers, None, bytes, dates, aware datetimes) is the
    driver's literal."""
    kind = type(value)
    if kind is str:
        text: str = value
        if "\\" in text:
            text = text.replace("\\", "\\\\")
        if "'" in text:
            text = text.replace("'", "''")
        return "'" + text + "'"
    if kind is datetime and value.tzinfo is None:
        moment: datetime = value
        return "'" + moment.isoformat(" ") + "'"
    return str(escape_item(value, "utf8mb4"))


def statements_of(engine: AsyncEngine) -> Statements:
    found = _statements.get(engine)
    if found is None:
        found = _statements[engine] = Statements(engine.sync_engine.dialect)
    return found


def multi_statements(engine: AsyncEngine) -> None:
    """Let `engine`'s connections (those it makes from now on: call this before the first)
    take several statements in one request, for `Transaction.script`. (It lets an injected
    `; DROP ...` run too: nothing here sends text it did not build, every value is a
    `literal` or escaped by the driver.)"""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connecting(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["client_flag"] = int(cparams.get("client_flag", 0)) | CLIENT.MULTI_STATEMENTS

    statements_of(engine).scripts = True


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[Transaction]:
    """One transaction on a connection of `engine`'s pool, committed when the block ends, rolled
    back when it raises. A connection whose state is unknown after an error (gone, or a cancel
    mid-statement) is closed and dropped from the pool rather than handed to the next user."""
    try:
        fairy = await engine.raw_connection()
    except driver_errors.Error as exc:  # the pool's connect: SQLAlchemy leaves its error bare here
        raise DBAPIError.instance(None, None, exc, driver_errors.Error, hide_parameters=True,
                                  dialect=engine.sync_engine.dialect) from exc
    driver = fairy.driver_connection
    assert driver is not None  # (typed Optional for a pool without one)
    tx = Transaction(driver, statements_of(engine))
    try:
        try:
            yield tx
            await tx.commit()
        except BaseException:
            if not tx.broken:
                try:
                    await driver.rollback()
                except BaseException:
                    tx.broken = True
            if tx.broken:
                await greenlet_spawn(fairy.invalidate)
            raise
    finally:
        await greenlet_spawn(fairy.close)
