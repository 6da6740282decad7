"""The outbox relay's side of the database: unsent events in commit order, marking them sent,
and the leader lease that lets one relay at a time publish (so each job's events leave in
sequence order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, bindparam, func, select, text, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.expression import Update

from schemas.events import Event

from . import raw
from .engine import db_now_plus, from_db_time, index_hint, utcnow
from .tables import leases, outbox

OUTBOX_INSERT = outbox.insert()


@dataclass(frozen=True)
class OutboxEvent:
    id: int
    event_id: str
    job_id: str
    event_type: str
    correlation_id: str
    body: str
    created_at_epoch: float


def outbox_row(event: Event) -> dict[str, object]:
    return {
        "event_id": str(event.event_id),
        "job_id": str(event.job_id),
        "sequence": event.sequence,
        "event_type": event.type,
        "correlation_id": str(event.correlation_id),
        "body": event.model_dump_json(),
        "created_at": utcnow(),
    }


async def insert_event(tx: raw.Transaction, event: Event) -> OutboxEvent:
    """Write one event to the outbox in `tx`; the row as the relay reads it."""
    row = outbox_row(event)
    return outbox_event(await tx.insert(OUTBOX_INSERT, [row]), row)


def outbox_event(key: int, row: dict[str, object]) -> OutboxEvent:
    """The outbox row `row` (from `outbox_row`), written with id `key`, as the relay reads it."""
    return OutboxEvent(key, str(row["event_id"]), str(row["job_id"]), str(row["event_type"]),
                       str(row["correlation_id"]), str(row["body"]),
                       from_db_time(row["created_at"]) or 0.0)  # type: ignore[arg-type]


# The relay's two statements, built once per shape and run on the driver (adapters/db/raw.py):
# it reads and marks a batch after every few commits of every running job.
_UNSENT: dict[int, Select[Any]] = {}
_MARKING: dict[int, Update] = {}
_MARK_CHUNK = 512  # ids per UPDATE (a power of two: raw.padded)


# the relay's backlog (a gauge, read every few seconds): the unsent index, not the published history
BACKLOG = text("SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(created_at), UTC_TIMESTAMP(6)) "
               "FROM outbox FORCE INDEX (ix_outbox_unsent) WHERE published_at IS NULL")


def _unsent(limit: int) -> Select[Any]:
    stmt = _UNSENT.get(limit)
    if stmt is None:
        columns = (outbox.c.id, outbox.c.event_id, outbox.c.job_id, outbox.c.event_type, outbox.c.correlation_id,
                   outbox.c.body, outbox.c.created_at)
        # the unsent index, whatever the statistics say (adapters/db/store.py, `LEDGER_OF_JOB`)
        stmt = _UNSENT[limit] = index_hint(select(*columns).where(outbox.c.published_at.is_(None))
                                           .order_by(outbox.c.id).limit(limit), "FORCE INDEX (ix_outbox_unsent)", outbox)
    return stmt


def _marking(count: int) -> Update:
    stmt = _MARKING.get(count)
    if stmt is None:
        stmt = _MARKING[count] = (update(outbox).where(outbox.c.id.in_([bindparam(f"id_{i}") for i in range(count)]))
                                  .values(published_at=bindparam("published_at")))
    return stmt


class OutboxStore:
    def __init__(self, engine: AsyncEngine, owner: str, *, lease_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        self.lease_engine = lease_engine or engine  # the leader lease never waits for a busy pool
        self.owner = owner

    async def acquire_leadership(self, name: str, lease_seconds: float) -> bool:
        """Take or keep the named lease; True while this process holds it."""
        expiry = db_now_plus(int(lease_seconds * 1e6))
        async with self.lease_engine.begin() as conn:
            stmt = mysql_insert(leases).values(name=name, owner=self.owner, expires_at=expiry)
            free = (leases.c.owner == self.owner) | (leases.c.expires_at < func.now(6))
            await conn.execute(stmt.on_duplicate_key_update(
                owner=func.if_(free, self.owner, leases.c.owner),
                expires_at=func.if_(free, stmt.inserted.expires_at, leases.c.expires_at)))
            owner = (await conn.execute(select(leases.c.owner).where(leases.c.name == name))).scalar_one()
        return bool(owner == self.owner)

    async def release_leadership(self, name: str) -> None:
        async with self.lease_engine.begin() as conn:
            await conn.execute(update(leases).where(leases.c.name == name, leases.c.owner == self.owner)
                               .values(expires_at=func.now(6)))

    async def unsent(self, limit: int) -> list[OutboxEvent]:
        async with raw.transaction(self.engine) as tx:
            rows = await tx.rows(_unsent(limit))
        return [OutboxEvent(r[0], r[1], r[2], r[3], r[4], r[5], from_db_time(r[6]) or 0.0) for r in rows]

    async def mark_sent(self, ids: list[int]) -> None:
        if not ids:
            return
        async with raw.transaction(self.engine) as tx:
            for start in range(0, len(ids), _MARK_CHUNK):
                chunk = raw.padded(ids[start:start + _MARK_CHUNK])
                await tx.execute(_marking(len(chunk)), {"published_at": utcnow(),
                                                        **{f"id_{i}": v for i, v in enumerate(chunk)}})

    async def backlog(self) -> tuple[int, float]:
        """(unsent events, age in seconds of the oldest one)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(BACKLOG)).first()
        count, age = (row[0], row[1]) if row else (0, None)
        return int(count or 0), float(age or 0) / 1e6
