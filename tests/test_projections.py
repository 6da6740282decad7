"""Guarantee 6: job_tracking, job_steps and log_events equal a fold of the event stream,
whatever the redeliveries, duplicates, batching and order of arrival (real MariaDB)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import bindparam, select, text

from adapters.db.projections import Projections
from adapters.db.tables import job_steps, job_tracking, log_events
from schemas.events import Event
from statemachine.engine import drive
from statemachine.machine import build_machine
from tests.fakes import Harness

_MACHINE = build_machine()
_CACHE: list[Event] = []


async def _streams() -> list[Event]:
    """Real event streams from the engine (with the fake ports): a completed Windows test
    failover, a failed-and-rolled-back one, and a cleanup."""
    h = Harness()
    ok = h.seed_vm("WIN-OK")
    ctx = h.new_job(ok, "test-failover")
    assert await drive(_MACHINE, ctx) == "completed"
    await drive(_MACHINE, h.new_cleanup(ctx.row.job_id))
    bad = h.seed_vm("WIN-BAD")
    h.faults.add("deployVirtualMachine", "refused", times=None)
    assert await drive(_MACHINE, h.new_job(bad, "live-failover")) == "failed"
    return list(h.store.events)


async def _rows(db: Any, job_ids: list[str]) -> dict[str, Any]:
    async with db.connect() as conn:
        tracking = (await conn.execute(
            select(job_tracking.c.id, job_tracking.c.job_type, job_tracking.c.status,
                   job_tracking.c.percent_complete, job_tracking.c.current_step, job_tracking.c.error_message,
                   job_tracking.c.rolled_back, job_tracking.c.last_sequence, job_tracking.c.vm_name,
                   job_tracking.c.started_at, job_tracking.c.completed_at)
            .where(job_tracking.c.id.in_(job_ids)).order_by(job_tracking.c.id))).all()
        steps = (await conn.execute(
            select(job_steps.c.job_id, job_steps.c.step_name, job_steps.c.step_order, job_steps.c.status,
                   job_steps.c.started_at, job_steps.c.completed_at, job_steps.c.error_code, job_steps.c.outputs)
            .where(job_steps.c.job_id.in_(job_ids)).order_by(job_steps.c.job_id, job_steps.c.step_order))).all()
        logs = (await conn.execute(
            select(log_events.c.job_id, log_events.c.sequence, log_events.c.level, log_events.c.message,
                   log_events.c.step_name, log_events.c.step_id.isnot(None))
            .where(log_events.c.job_id.in_(job_ids)).order_by(log_events.c.job_id, log_events.c.sequence))).all()
    return {"tracking": [tuple(r) for r in tracking], "steps": [tuple(r) for r in steps],
            "logs": [tuple(r) for r in logs]}


async def _clear(db: Any, job_ids: list[str]) -> None:
    async with db.begin() as conn:
        for table in ("job_tracking", "job_steps", "log_events", "projected_events"):
            column = "id" if table == "job_tracking" else "job_id"
            await conn.execute(text(f"DELETE FROM {table} WHERE {column} IN :ids").bindparams(
                bindparam("ids", expanding=True)), {"ids": job_ids})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 40), duplicates=st.floats(0, 0.5))
async def test_any_order_any_batching_any_duplicates_gives_the_same_rows(
        db: Any, seed: int, batch: int, duplicates: float) -> None:
    if not _CACHE:
        _CACHE.extend(await _streams())
    events = list(_CACHE)
    job_ids = sorted({str(e.job_id) for e in events})
    projections = Projections(db)
    # the reference: every event once, in order, one at a time
    for e in events:
        await projections.apply([e])
    expected = await _rows(db, job_ids)
    assert [r[2] for r in expected["tracking"]].count("completed") == 2  # the failover and its cleanup
    assert [r[2] for r in expected["tracking"]].count("failed") == 1
    await _clear(db, job_ids)

    rng = random.Random(seed)
    shuffled = events + [e for e in events if rng.random() < duplicates]
    rng.shuffle(shuffled)
    applied = 0
    for i in range(0, len(shuffled), batch):
        done, _ = await projections.apply(shuffled[i:i + batch])
        applied += done
    assert applied == len(events)  # each event applied exactly once
    # and a full redelivery changes nothing
    assert await projections.apply(events) == (0, len(events))
    assert await _rows(db, job_ids) == expected
    await _clear(db, job_ids)
