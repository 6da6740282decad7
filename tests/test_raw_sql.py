"""adapters/db/raw.py against the real MariaDB: statements compiled once and run on the pooled
connection's driver write what SQLAlchemy writes, count rows as it does, raise its errors, and
never hand a connection in an unknown state to the next user."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import pytest
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from adapters.db import raw
from adapters.db.engine import is_connection_error, make_engine
from adapters.db.store import LEDGER_UPSERT
from adapters.db.tables import failover_jobs, resource_ledger
from tests.crash.support import database_of_its_own
from tests.helpers import wait_until

CONNECTION_ID = text("SELECT CONNECTION_ID()")
_LEDGER_DATA = update(resource_ledger).where(resource_ledger.c.id == bindparam("row_id")).values(
    status=bindparam("v_status"))


@pytest.fixture(scope="module")
async def raw_database(database_url: str) -> AsyncIterator[str]:
    async with database_of_its_own(database_url, "raw") as made:
        yield made.url.render_as_string(hide_password=False)


@asynccontextmanager
async def raw_engine(url: str) -> AsyncIterator[AsyncEngine]:
    made = make_engine(url, pool_size=1)
    try:
        yield made
    finally:
        await made.dispose()


@pytest.fixture
async def engine(raw_database: str) -> AsyncIterator[AsyncEngine]:
    async with raw_engine(raw_database) as made:  # one connection in the pool: reuse shows as the same id
        yield made


def _ledger_row(job_id: str, key: str, **changes: object) -> dict[str, object]:
    when = datetime(2026, 12, 5, 14, 1, 2, 345678)
    row: dict[str, object] = {
        "job_id": job_id, "resource_key": key, "resource_type": "volume", "action": "attach",
        "resource_id": "vol-1", "name": None, "status": "intended", "cs_job_id": None,
        "operation_id": "op-1", "data": {"device": "/dev/vdb", "nested": [1, "two", None]},
        "created_at": when, "updated_at": when}
    row.update(changes)
    return row


async def _connection_id(engine: AsyncEngine) -> int:
    async with raw.transaction(engine) as tx:
        return int((await tx.rows(CONNECTION_ID))[0][0])


async def test_rows_read_back_as_sqlalchemys_own(engine: AsyncEngine) -> None:
    job = str(uuid.uuid4())
    async with raw.transaction(engine) as tx:
        first = await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "raw:1"), _ledger_row(job, "raw:2", data=None)])
    async with engine.begin() as conn:
        await conn.execute(LEDGER_UPSERT, [_ledger_row(job, "sa:1"), _ledger_row(job, "sa:2", data=None)])
    async with engine.connect() as conn:
        rows = {r.resource_key: r._asdict() for r in (await conn.execute(
            select(resource_ledger).where(resource_ledger.c.job_id == job))).all()}
    assert first == rows["raw:1"]["id"]
    for ours, theirs in (("raw:1", "sa:1"), ("raw:2", "sa:2")):
        mine = {k: v for k, v in rows[ours].items() if k not in ("id", "resource_key")}
        sa = {k: v for k, v in rows[theirs].items() if k not in ("id", "resource_key")}
        assert mine == sa
    assert rows["raw:1"]["data"] == {"device": "/dev/vdb", "nested": [1, "two", None]}
    assert rows["raw:1"]["created_at"] == datetime(2026, 12, 5, 14, 1, 2, 345678)  # microseconds kept


async def test_an_upsert_of_many_rows_updates_the_existing_ones(engine: AsyncEngine) -> None:
    job = str(uuid.uuid4())
    async with raw.transaction(engine) as tx:
        await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "k:1")])
    async with raw.transaction(engine) as tx:
        await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "k:1", status="done", resource_id="vol-9"),
                                        _ledger_row(job, "k:2")])
    async with engine.connect() as conn:
        rows = (await conn.execute(select(resource_ledger.c.resource_key, resource_ledger.c.status,
                                          resource_ledger.c.resource_id)
                                   .where(resource_ledger.c.job_id == job).order_by(resource_ledger.c.id))).all()
    assert [tuple(r) for r in rows] == [("k:1", "done", "vol-9"), ("k:2", "intended", "vol-1")]


async def test_the_row_count_is_of_rows_matched_not_changed(engine: AsyncEngine) -> None:
    """The job store reads its fence from the row count: an UPDATE that changes nothing in a row
    it found must still count it (the pool's connections are made with FOUND_ROWS)."""
    job = str(uuid.uuid4())
    async with raw.transaction(engine) as tx:
        row_id = await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "k")])
    async with raw.transaction(engine) as tx:
        assert await tx.execute(_LEDGER_DATA, {"row_id": row_id, "v_status": "intended"}) == 1  # unchanged
        assert await tx.execute(_LEDGER_DATA, {"row_id": row_id, "v_status": "done"}) == 1
        assert await tx.execute(_LEDGER_DATA, {"row_id": -1, "v_status": "done"}) == 0


async def test_a_server_error_is_sqlalchemys_the_transaction_rolled_back_the_connection_kept(
        engine: AsyncEngine) -> None:
    job = str(uuid.uuid4())
    before = await _connection_id(engine)
    with pytest.raises(IntegrityError) as caught:
        async with raw.transaction(engine) as tx:
            await tx.insert(failover_jobs.insert(), [_job_row(job)])
            await tx.insert(failover_jobs.insert(), [_job_row(job)])  # the same job_id
    assert caught.value.orig.args[0] == 1062  # type: ignore[union-attr]
    assert "INSERT INTO failover_jobs" in str(caught.value)
    async with engine.connect() as conn:
        assert (await conn.execute(select(failover_jobs.c.id).where(failover_jobs.c.job_id == job))).first() is None
    assert await _connection_id(engine) == before  # rolled back and reused, not dropped


async def test_the_callers_own_error_rolls_back_and_keeps_the_connection(engine: AsyncEngine) -> None:
    job = str(uuid.uuid4())
    before = await _connection_id(engine)
    with pytest.raises(LookupError):
        async with raw.transaction(engine) as tx:
            await tx.insert(failover_jobs.insert(), [_job_row(job)])
            raise LookupError("the caller changed its mind")
    async with engine.connect() as conn:
        assert (await conn.execute(select(failover_jobs.c.id).where(failover_jobs.c.job_id == job))).first() is None
    assert await _connection_id(engine) == before


async def test_a_cancel_mid_statement_drops_the_connection(engine: AsyncEngine, raw_database: str) -> None:
    """Cancelled while MariaDB still owes an answer, the connection would hand that answer to
    its next user's statement: it is closed instead, and the next transaction gets a new one."""
    query = f"SELECT SLEEP(30), '{uuid.uuid4()}'"
    used: list[int] = []

    async def sleeper() -> None:
        async with raw.transaction(engine) as tx:
            used.append(int((await tx.rows(CONNECTION_ID))[0][0]))
            await tx.rows(text(query))

    task = asyncio.create_task(sleeper())
    await _until_running(raw_database, query)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _connection_id(engine) != used[0]
    async with raw.transaction(engine) as tx:
        assert await tx.rows(text("SELECT 41 + 1")) == [(42,)]  # no stale answer in the way


async def test_a_connection_killed_by_the_server_is_an_outage_and_is_replaced(engine: AsyncEngine,
                                                                              raw_database: str) -> None:
    before = await _connection_id(engine)
    async with raw_engine(raw_database) as killer, killer.connect() as conn:
        await conn.execute(text(f"KILL CONNECTION {before}"))
    with pytest.raises(OperationalError) as caught:
        async with raw.transaction(engine) as tx:
            await tx.rows(CONNECTION_ID)
    assert is_connection_error(caught.value)
    assert caught.value.connection_invalidated
    assert await _connection_id(engine) != before


def _job_row(job_id: str) -> dict[str, object]:
    now = datetime(2026, 12, 5, 14, 0, 0)
    return {"job_id": job_id, "vm_id": f"vm-{job_id}", "job_type": "test", "source_vm_name": "web",
            "created_at": now, "updated_at": now, "request_id": job_id, "correlation_id": job_id,
            "options": {"power_off_source": False}, "cancel_requested": True}


async def _until_running(url: str, query: str, deadline: float = 10.0) -> None:
    """Wait until MariaDB shows `query` running (seen from a connection of its own)."""
    async with raw_engine(url) as watcher:

        async def running() -> int:
            async with watcher.connect() as conn:
                return int((await conn.execute(text("SELECT COUNT(*) FROM information_schema.processlist "
                                                    "WHERE info = :q"), {"q": query})).scalar_one())

        await wait_until(running, deadline, f"{query!r} to be running", interval=0.02)


async def test_fetched_rows_are_named_and_converted_as_sqlalchemys(engine: AsyncEngine) -> None:
    job = str(uuid.uuid4())
    async with raw.transaction(engine) as tx:
        await tx.insert(failover_jobs.insert(), [_job_row(job)])
    query = select(failover_jobs).where(failover_jobs.c.job_id == bindparam("job_id"))
    async with raw.transaction(engine) as tx:
        mine = (await tx.fetch(query, {"job_id": job}))[0]
        assert await tx.fetch(query, {"job_id": "no such job"}) == []
    async with engine.connect() as conn:
        theirs = (await conn.execute(query, {"job_id": job})).one()
    assert mine._asdict() == theirs._asdict()
    assert mine.options == {"power_off_source": False} and mine.cancel_requested is True and mine.ended is False


def test_lists_are_padded_to_a_power_of_two_with_their_last_value() -> None:
    assert raw.padded([7]) == [7]
    assert raw.padded([1, 2]) == [1, 2]
    assert raw.padded([1, 2, 3]) == [1, 2, 3, 3]
    assert raw.padded(list(range(5))) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert len(raw.padded(list(range(257)))) == 512


async def test_no_database_to_connect_to_is_an_outage() -> None:
    """The pool's connect fails bare in SQLAlchemy's raw_connection(): it must read as an
    outage (the command consumer then waits for the database instead of dead-lettering)."""
    nowhere = make_engine("mysql+asyncmy://root@127.0.0.1:1/nothing", pool_size=1)
    try:
        with pytest.raises(OperationalError) as caught:
            async with raw.transaction(nowhere) as tx:
                await tx.rows(CONNECTION_ID)
        assert is_connection_error(caught.value)
    finally:
        await nowhere.dispose()


async def test_a_script_writes_what_its_statements_write_one_at_a_time(engine: AsyncEngine) -> None:
    """Statements sent together (one round trip) write what SQLAlchemy's executions write, with
    the values the driver escapes (quotes, `%`, JSON, non-ASCII), and count each one's rows."""
    assert raw.statements_of(engine).scripts  # make_engine's connections take several statements
    job = str(uuid.uuid4())
    odd = {"note": "it's 100% \"done\"; DROP TABLE x; -- \\ é 日本", "n": [1, None]}
    async with raw.transaction(engine) as tx:
        first_id = await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "first")])
        counts = await tx.script([
            *tx.insert_sqls(LEDGER_UPSERT, [_ledger_row(job, "raw:1", data=odd), _ledger_row(job, "raw:2", name="50%")]),
            tx.sql(_LEDGER_DATA, {"row_id": first_id, "v_status": "intended"}),  # matched, unchanged
            tx.sql(_LEDGER_DATA, {"row_id": -1, "v_status": "done"}),  # no such row
            *tx.insert_sqls(LEDGER_UPSERT, [_ledger_row(job, "first", status="done")]),  # an update
        ])
    async with engine.begin() as conn:
        await conn.execute(LEDGER_UPSERT, [_ledger_row(job, "sa:1", data=odd), _ledger_row(job, "sa:2", name="50%")])
    assert counts[:3] == [2, 1, 0]
    assert counts[3] == 2  # MariaDB's count for an upsert that updated its row
    async with engine.connect() as conn:
        rows = {r.resource_key: r._asdict() for r in (await conn.execute(
            select(resource_ledger).where(resource_ledger.c.job_id == job))).all()}
    assert rows["first"]["status"] == "done"
    for ours, theirs in (("raw:1", "sa:1"), ("raw:2", "sa:2")):
        mine = {k: v for k, v in rows[ours].items() if k not in ("id", "resource_key")}
        sa = {k: v for k, v in rows[theirs].items() if k not in ("id", "resource_key")}
        assert mine == sa
    assert rows["raw:1"]["data"] == odd


async def test_a_statement_failing_mid_script_stops_it_and_rolls_back(engine: AsyncEngine) -> None:
    job, other = str(uuid.uuid4()), str(uuid.uuid4())
    before = await _connection_id(engine)
    with pytest.raises(IntegrityError) as caught:
        async with raw.transaction(engine) as tx:
            await tx.script([*tx.insert_sqls(failover_jobs.insert(), [_job_row(job)]),
                             *tx.insert_sqls(failover_jobs.insert(), [_job_row(job)]),  # the same job_id
                             *tx.insert_sqls(failover_jobs.insert(), [_job_row(other)])])
    assert caught.value.orig.args[0] == 1062  # type: ignore[union-attr]
    # the failing statement is named, its values are not
    assert "statement 2 of 3 of a script: INSERT INTO failover_jobs" in str(caught.value)
    assert job not in str(caught.value.statement)
    async with engine.connect() as conn:
        found = (await conn.execute(select(failover_jobs.c.job_id).where(
            failover_jobs.c.job_id.in_([job, other])))).all()
    assert found == []  # the first rolled back, the third never ran
    assert await _connection_id(engine) == before  # nothing left unread: the connection is reused


async def test_a_script_runs_one_statement_at_a_time_where_the_connection_takes_one(raw_database: str) -> None:
    """An engine not made by make_engine (its connections take one statement per request)."""
    plain = create_async_engine(raw_database, pool_size=1)
    job = str(uuid.uuid4())
    try:
        async with raw.transaction(plain) as tx:
            assert not tx.scripts
            first_id = await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "k")])
            counts = await tx.script([tx.sql(_LEDGER_DATA, {"row_id": first_id, "v_status": "done"}),
                                      *tx.insert_sqls(LEDGER_UPSERT, [_ledger_row(job, "k2"), _ledger_row(job, "k3")])])
        assert counts == [1, 2]
        async with plain.connect() as conn:
            assert (await conn.execute(text("SELECT COUNT(*) FROM resource_ledger WHERE job_id = :j"),
                                       {"j": job})).scalar_one() == 3
    finally:
        await plain.dispose()


async def test_a_script_stopped_unless_one_row_matched_writes_nothing(engine: AsyncEngine, raw_database: str) -> None:
    """MariaDB: the statements after the stop (a COMMIT included) run only if the one before it
    matched a row."""
    job = str(uuid.uuid4())
    async with raw.transaction(engine) as tx:
        row_id = await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "k")])
    before = await _connection_id(engine)
    with pytest.raises(OperationalError) as caught:
        async with raw.transaction(engine) as tx:
            stop = tx.stop_unless_one_row()
            assert stop is not None
            await tx.script([tx.sql(_LEDGER_DATA, {"row_id": -1, "v_status": "done"}), stop,
                             *tx.insert_sqls(LEDGER_UPSERT, [_ledger_row(job, "after")])], commit=True)
    assert raw.stopped(caught.value)
    async with raw.transaction(engine) as tx:  # matched: the rest runs and is committed
        stop = tx.stop_unless_one_row()
        assert stop is not None
        counts = await tx.script([tx.sql(_LEDGER_DATA, {"row_id": row_id, "v_status": "done"}), stop,
                                  *tx.insert_sqls(LEDGER_UPSERT, [_ledger_row(job, "later")])], commit=True)
        assert counts == [1, 0, 1]
        # a statement after the script's COMMIT is a transaction of its own, committed at the end
        await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "last")])
    async with raw_engine(raw_database) as other, other.connect() as conn:  # committed: seen from elsewhere
        keys = set((await conn.execute(select(resource_ledger.c.resource_key)
                                       .where(resource_ledger.c.job_id == job))).scalars())
    assert keys == {"k", "later", "last"}
    assert await _connection_id(engine) == before


async def test_a_long_script_goes_in_several_requests_of_bounded_size(engine: AsyncEngine, raw_database: str) -> None:
    """A projector batch of large events must not become one request beyond the server's
    max_allowed_packet: multi-row INSERTs are split, and requests stay under MAX_STATEMENT
    characters, one after the other, with a count for each statement."""
    job = str(uuid.uuid4())
    rows = [_ledger_row(job, f"big:{i}", data={"blob": "x" * (raw.MAX_STATEMENT // 4)}) for i in range(12)]
    async with raw.transaction(engine) as tx:
        inserts = tx.insert_sqls(LEDGER_UPSERT, rows)
        assert len(inserts) > 3 and all(len(one) <= raw.MAX_STATEMENT for one in inserts)
        assert len(raw._bounded(inserts, raw.MAX_STATEMENT)) > 1
        counts = await tx.script([*inserts, tx.sql(_LEDGER_DATA, {"row_id": -1, "v_status": "done"})], commit=True)
    assert sum(counts[:-1]) == 12 and counts[-1] == 0
    async with raw_engine(raw_database) as other, other.connect() as conn:
        assert (await conn.execute(text("SELECT COUNT(*) FROM resource_ledger WHERE job_id = :j"),
                                   {"j": job})).scalar_one() == 12


# strings that trip an escaper: every character of the first 256 (NUL, Ctrl-Z, line ends,
# quotes, `%`, backslashes), backslashes before and after quotes, a trailing backslash, an
# escape that looks already done, and characters of two, three and four bytes
_TRICKY = [
    "".join(map(chr, range(256))), "\\", "'", "\\'", "'\\", "\\\\'", "''", "a\\", "\\0", "\0", "\\\0",
    "it's 100% \"done\"; DROP TABLE x; -- ", "%s %% %(x)s", "é 日本 🚒", "\x1a\r\n\t\b", "",
    '{"message": "vol \\"a\\" at C:\\\\disk", "n": 1}',
]


def _fits(value: str) -> str:
    """`value` cut to the ledger's `name` column (191 characters), from both ends."""
    return value if len(value) <= 191 else value[:96] + value[-95:]


async def test_literals_read_back_as_the_values_they_were(engine: AsyncEngine) -> None:
    """What `literal` makes of a value, the server reads back as that value: the strings an
    escaper gets wrong, and the datetimes and other types of a job's rows."""
    values: list[object] = [*_TRICKY, None, 42, -7, 2.5]
    moments = [datetime(2026, 12, 5, 14, 1, 2, 345678), datetime(2026, 12, 5, 14, 1, 2)]
    async with raw.transaction(engine) as tx:
        _, rows = await tx.script_select([], "SELECT " + ", ".join(
            [*map(raw.literal, values), *(f"CAST({raw.literal(m)} AS DATETIME(6))" for m in moments)]))
    assert list(rows[0]) == [*values, *moments]
    # and in the statements built for a script: an insert of rows, and a statement with values
    job = str(uuid.uuid4())
    async with raw.transaction(engine) as tx:
        await tx.script([
            *tx.insert_sqls(LEDGER_UPSERT, [_ledger_row(job, f"k{i}", name=_fits(v), data={"v": v})
                                            for i, v in enumerate(_TRICKY)]),
            tx.sql(_LEDGER_DATA, {"row_id": -1, "v_status": _TRICKY[0]}),
        ])
    async with engine.connect() as conn:
        got = {r.resource_key: (r.name, r.data) for r in (await conn.execute(
            select(resource_ledger).where(resource_ledger.c.job_id == job))).all()}
    assert got == {f"k{i}": (_fits(v), {"v": v}) for i, v in enumerate(_TRICKY)}


async def test_a_quote_cannot_end_a_literal_even_without_backslash_escapes(raw_database: str) -> None:
    """With the server's NO_BACKSLASH_ESCAPES on (a DBA's choice), a backslash no longer
    escapes: a value built to end its literal there (`\\'`) still stays one value."""
    async with raw_engine(raw_database) as own, raw.transaction(own) as tx:
        await tx.script(["SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')"])
        attack = "x\\'; SELECT 'injected"
        _, rows = await tx.script_select([], f"SELECT {raw.literal(attack)}, 2")
        assert len(rows) == 1 and rows[0][1] == 2
        assert rows[0][0] == attack.replace("\\", "\\\\")  # backslashes doubled, nothing run


async def test_reads_in_one_request_are_converted_and_end_their_transaction(engine: AsyncEngine,
                                                                             raw_database: str) -> None:
    job = str(uuid.uuid4())
    async with raw.transaction(engine) as tx:
        await tx.insert(failover_jobs.insert(), [_job_row(job)])
        await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "a"), _ledger_row(job, "b")])
    jobs = select(failover_jobs).where(failover_jobs.c.job_id == bindparam("job_id"))
    ledger = select(resource_ledger).where(resource_ledger.c.job_id == bindparam("job_id")).order_by(
        resource_ledger.c.id)
    async with raw.transaction(engine) as tx:
        rows, entries, none = await tx.fetch_all(
            [(jobs, {"job_id": job}), (ledger, {"job_id": job}), (jobs, {"job_id": "no such job"})], commit=True)
        assert tx.scripts  # (one request: the engine's connections take several statements)
    async with engine.connect() as conn:
        assert [r._asdict() for r in rows] == [(await conn.execute(jobs, {"job_id": job})).one()._asdict()]
    assert [e.resource_key for e in entries] == ["a", "b"] and none == []
    assert entries[0].data == {"device": "/dev/vdb", "nested": [1, "two", None]}  # JSON, as SQLAlchemy's
    # the COMMIT ran: the pool's one connection, read again, sees what another committed since
    # (under REPEATABLE READ an open transaction would still show its first view)
    async with raw.transaction(engine) as tx:
        await tx.fetch_all([(ledger, {"job_id": job})], commit=True)
    async with raw_engine(raw_database) as other, raw.transaction(other) as tx:
        await tx.insert(LEDGER_UPSERT, [_ledger_row(job, "c")])
    async with raw.transaction(engine) as tx:
        (entries,) = await tx.fetch_all([(ledger, {"job_id": job})], commit=True)
    assert [e.resource_key for e in entries] == ["a", "b", "c"]


async def test_reads_in_one_request_go_one_by_one_where_the_connection_takes_one(raw_database: str) -> None:
    plain = create_async_engine(raw_database, pool_size=1)
    job = str(uuid.uuid4())
    query = select(failover_jobs.c.job_id, failover_jobs.c.options).where(failover_jobs.c.job_id == bindparam("j"))
    try:
        async with raw.transaction(plain) as tx:
            await tx.insert(failover_jobs.insert(), [_job_row(job)])
        async with raw.transaction(plain) as tx:
            assert not tx.scripts
            first, second = await tx.fetch_all([(query, {"j": job}), (query, {"j": "none"})], commit=True)
        assert [(r.job_id, r.options) for r in first] == [(job, {"power_off_source": False})] and second == []
    finally:
        await plain.dispose()


async def test_a_read_failing_mid_request_names_its_statement(engine: AsyncEngine) -> None:
    query = select(failover_jobs.c.job_id).where(failover_jobs.c.job_id == bindparam("j"))
    broken = text("SELECT no_such_column FROM failover_jobs")
    with pytest.raises(OperationalError, match="statement 2 of 3 of a script: SELECT no_such_column"):
        async with raw.transaction(engine) as tx:
            await tx.fetch_all([(query, {"j": "x"}), (broken, {})], commit=True)
    async with raw.transaction(engine) as tx:  # the connection is still good
        assert await tx.fetch_all([(query, {"j": "x"})], commit=True) == [[]]
