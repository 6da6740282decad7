"""The job store's commit against the real MariaDB: the fenced UPDATE and what goes with it (the
job's events, its ledger) are one transaction, sent in one round trip; should the fence fail,
none of it stays. Each test runs three ways: MariaDB's (UPDATE, a stop unless it matched, the
writes and the COMMIT in one script), MySQL's (no stop statement: the COMMIT once the UPDATE's
count is read) and one statement per request (an engine whose connections take one)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from adapters.db import raw
from adapters.db.engine import make_engine, utcnow
from adapters.db.outbox import outbox_row
from adapters.db.store import JobStore
from adapters.db.tables import failover_jobs, outbox, resource_ledger, vm_replication_contexts
from schemas.events import StepCompleted, StepStarted
from statemachine.errors import LeaseLost
from statemachine.ports import Commit, JobRow, LedgerEntry
from tests.crash.support import SQL_WAYS, database_of_its_own, engine_speaking
from tests.helpers import holds, wait_until

OWNER = "store-test"


@pytest.fixture(scope="module")
async def store_db(database_url: str) -> AsyncIterator[str]:
    async with database_of_its_own(database_url, "store") as engine:
        yield engine.url.render_as_string(hide_password=False)


@pytest.fixture(params=SQL_WAYS)
async def db(request: pytest.FixtureRequest, store_db: str) -> AsyncIterator[AsyncEngine]:
    async with engine_speaking(request.param, store_db) as engine:
        yield engine


async def _a_job(db: AsyncEngine, **columns: Any) -> JobRow:
    job_id = str(uuid.uuid4())
    now = utcnow()
    async with db.begin() as conn:
        await conn.execute(failover_jobs.insert().values(
            job_id=job_id, vm_id=f"vm-{job_id[:8]}", job_type="test", source_vm_name="web", created_at=now,
            updated_at=now, request_id=job_id, correlation_id=job_id, options={}, lease_owner=OWNER,
            lease_expires_at=now + timedelta(seconds=60), **columns))
    row = await JobStore(db, OWNER).load(job_id)
    assert row is not None
    return row


def _event(cls: type, job: JobRow, sequence: int, **fields: Any) -> Any:
    return cls(event_id=uuid.uuid4(), job_id=job.job_id, job_type="test-failover", vm_id=job.vm_id,
               sequence=sequence, correlation_id=job.job_id, causation_id=job.job_id,
               occurred_at=datetime.now(UTC), step="cloudstack-snapshot", step_order=2, **fields)


def _commit(job: JobRow, *, tail: bool = False) -> Commit:
    head = Commit(events=[_event(StepCompleted, job, job.last_sequence + 1, percent_complete=33)],
                  job={"status": "running"},
                  ledger=[LedgerEntry(key="snapshot:vol-1", resource_type="snapshot", action="create",
                                      status="done", resource_id="snap-1", data={"volume": "vol-1"})])
    if tail:
        head.tail = Commit(events=[_event(StepStarted, job, job.last_sequence + 2, total_steps=6, percent_complete=40)],
                           job={"resume_state": "vm-creation"})
    return head


async def _written(db: AsyncEngine, job: JobRow) -> tuple[list[str], list[str], Any]:
    async with db.connect() as conn:
        events = (await conn.execute(select(outbox.c.event_type).where(outbox.c.job_id == job.job_id)
                                     .order_by(outbox.c.sequence))).scalars().all()
        ledger = (await conn.execute(select(resource_ledger.c.resource_key)
                                     .where(resource_ledger.c.job_id == job.job_id))).scalars().all()
        row = (await conn.execute(select(failover_jobs.c.status, failover_jobs.c.resume_state,
                                         failover_jobs.c.last_sequence)
                                  .where(failover_jobs.c.job_id == job.job_id))).one()
    return list(events), list(ledger), row


async def test_a_commit_writes_the_job_its_events_and_its_ledger_together(db: AsyncEngine) -> None:
    job = await _a_job(db)
    store = JobStore(db, OWNER, lease_seconds=30)
    assert await store.commit(job, _commit(job, tail=True)) is False
    events, ledger, row = await _written(db, job)
    assert events == ["StepCompleted", "StepStarted"]
    assert ledger == ["snapshot:vol-1"]
    assert (row.status, row.resume_state, row.last_sequence) == ("running", "vm-creation", 2)


async def test_a_commit_whose_lease_is_gone_writes_nothing(db: AsyncEngine) -> None:
    job = await _a_job(db)
    async with db.begin() as conn:  # another process took the job over
        await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == job.job_id)
                           .values(lease_owner="someone-else"))
    with pytest.raises(LeaseLost):
        await JobStore(db, OWNER, lease_seconds=30).commit(job, _commit(job, tail=True))
    events, ledger, row = await _written(db, job)
    assert (events, ledger) == ([], [])
    assert (row.status, row.last_sequence) == ("pending", 0)


async def test_a_commit_after_the_new_owner_wrote_is_a_lost_lease_not_a_conflict(db: AsyncEngine) -> None:
    """Another process took the job over and already committed its next event: our commit's
    outbox row would collide with it (the same job and sequence), but the fence is read first,
    and the job learns that its lease is gone, not that a row was a duplicate."""
    job = await _a_job(db)
    theirs = _event(StepCompleted, job, job.last_sequence + 1, percent_complete=33)
    async with db.begin() as conn:
        await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == job.job_id)
                           .values(lease_owner="someone-else", last_sequence=1))
        await conn.execute(outbox.insert().values(**outbox_row(theirs)))
    with pytest.raises(LeaseLost):
        await JobStore(db, OWNER, lease_seconds=30).commit(job, _commit(job))
    events, ledger, row = await _written(db, job)
    assert (events, ledger, row.last_sequence) == (["StepCompleted"], [], 1)  # theirs alone


async def test_a_commit_whose_lease_expired_writes_nothing(db: AsyncEngine) -> None:
    job = await _a_job(db)
    async with db.begin() as conn:
        await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == job.job_id)
                           .values(lease_expires_at=func.now(6)))
    with pytest.raises(LeaseLost):
        await JobStore(db, OWNER).commit(job, _commit(job))
    assert (await _written(db, job))[:2] == ([], [])


async def _lease_left(db: AsyncEngine, job: JobRow) -> tuple[Any, float]:
    async with db.connect() as conn:
        row = (await conn.execute(select(
            failover_jobs.c.lease_expires_at,
            func.timestampdiff(text("MICROSECOND"), func.now(6), failover_jobs.c.lease_expires_at))
            .where(failover_jobs.c.job_id == job.job_id))).one()
    return row[0], row[1] / 1e6


async def test_a_commit_renews_the_lease_only_once_a_sixth_of_it_has_run(db: AsyncEngine) -> None:
    """Moving the lease moves the row in the claim index: a commit leaves it where it is while
    more than five sixths of a lease is left, else renews it in full; and it tells the runner
    the least it may count on (five sixths of a lease from when it asked)."""
    job = await _a_job(db)
    async with db.begin() as conn:  # 28 s left, more than five sixths of 30
        await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == job.job_id)
                           .values(lease_expires_at=func.date_add(func.now(6), text("INTERVAL 28 SECOND"))))
    store = JobStore(db, OWNER, lease_seconds=30)
    told: list[float] = []
    store.on_lease = lambda job_id, until: told.append(until)
    before, _ = await _lease_left(db, job)
    asked = time.monotonic()
    await store.commit(job, _commit(job))
    after, left = await _lease_left(db, job)
    assert after == before and left > 25  # untouched
    assert asked + 25 <= told[-1] <= time.monotonic() + 25

    async with db.begin() as conn:  # 20 s left, less than five sixths of 30
        await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == job.job_id)
                           .values(lease_expires_at=func.date_add(func.now(6), text("INTERVAL 20 SECOND"))))
    job = await store.load(job.job_id)
    assert job is not None
    await store.commit(job, _commit(job))
    _, left = await _lease_left(db, job)
    assert 28 < left <= 30  # renewed in full


async def test_a_cancel_asked_for_keeps_the_head_and_drops_the_tail(db: AsyncEngine) -> None:
    """The step's end is written, the next step's start is not: the job stops there."""
    job = await _a_job(db, cancel_requested=True)
    assert await JobStore(db, OWNER, lease_seconds=30).commit(job, _commit(job, tail=True)) is True
    events, ledger, row = await _written(db, job)
    assert events == ["StepCompleted"]
    assert ledger == ["snapshot:vol-1"]
    assert (row.status, row.resume_state, row.last_sequence) == ("running", None, 1)


async def test_the_events_outbox_time_is_their_commits_not_when_it_began_to_wait(store_db: str) -> None:
    """The relay's lag and the backlog's age count from `outbox.created_at`: a commit that waited
    for a connection (a busy pool) stamps its events when it gets one."""
    engine = make_engine(store_db, pool_size=1, max_overflow=0)
    try:
        job = await _a_job(engine)
        async with engine.connect() as held:  # the pool's only connection, busy
            await held.execute(select(1))
            commit = asyncio.create_task(JobStore(engine, OWNER).commit(job, _commit(job)))
            # (SQLAlchemy's pool queue is an asyncio.Queue underneath)
            waiting = engine.sync_engine.pool._pool._queue._getters  # type: ignore[attr-defined]
            await wait_until(holds(lambda: len(waiting) > 0), 5, "the commit to wait for the pool's connection",
                             interval=0.01)
            released = utcnow()
        assert await commit is False
        async with engine.connect() as conn:
            stamped = (await conn.execute(select(outbox.c.created_at).where(outbox.c.job_id == job.job_id))).scalar_one()
        assert stamped >= released
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- group commit


async def _taken_over(db: AsyncEngine) -> JobRow:
    """A job of ours, as we loaded it, that another process has taken over since."""
    return await _taken_over_now(db, await _a_job(db))


async def _taken_over_now(db: AsyncEngine, job: JobRow) -> JobRow:
    """`job`, which another process takes over now."""
    async with db.begin() as conn:
        await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == job.job_id)
                           .values(lease_owner="someone-else"))
    return job


@asynccontextmanager
async def _row_held(db: AsyncEngine, job: JobRow) -> AsyncIterator[AsyncConnection]:
    """`job`'s row locked by another transaction while the block runs (SELECT ... FOR UPDATE)."""
    async with db.connect() as holder, holder.begin():
        await holder.execute(select(failover_jobs.c.id).where(failover_jobs.c.job_id == job.job_id)
                             .with_for_update())
        yield holder


def _grouped(db: AsyncEngine) -> bool:
    """Whether `db`'s commits can go together (MariaDB's IF; the fixture's "mariadb" way)."""
    return raw.statements_of(db).compound


async def _all_at_once(store: JobStore, jobs: list[JobRow], commits: list[Commit]) -> list[Any]:
    return await asyncio.gather(*(store.commit(j, c) for j, c in zip(jobs, commits, strict=True)),
                                return_exceptions=True)


async def test_commits_under_load_go_together_in_one_transaction(db: AsyncEngine) -> None:
    """With the commits in flight at the limit, the next ones wait and go as one transaction,
    each job's writes as if alone."""
    jobs = [await _a_job(db) for _ in range(8)]
    store = JobStore(db, OWNER, lease_seconds=30, group_limit=1)
    carried: list[int] = []
    store.on_transaction = carried.append
    assert await _all_at_once(store, jobs, [_commit(j, tail=True) for j in jobs]) == [False] * 8
    for job in jobs:
        events, ledger, row = await _written(db, job)
        assert events == ["StepCompleted", "StepStarted"]
        assert ledger == ["snapshot:vol-1"]
        assert (row.status, row.resume_state, row.last_sequence) == ("running", "vm-creation", 2)
    # the first alone, the seven that waited for it together (MariaDB); else each alone
    assert (store.transactions, store.groups) == ((2, 1) if _grouped(db) else (8, 0))
    assert carried == ([1, 7] if _grouped(db) else [1] * 8)


async def test_in_a_group_a_lost_lease_and_a_cancel_are_each_their_own(db: AsyncEngine) -> None:
    """A job whose fence fails writes nothing in the group and is then done alone: its lease
    lost raises, a cancel keeps its head; the jobs beside it are written in full."""
    first, ok, taken, cancelled, last = [await _a_job(db) for _ in range(2)] + [
        await _taken_over(db), await _a_job(db, cancel_requested=True), await _a_job(db)]
    store = JobStore(db, OWNER, lease_seconds=30, group_limit=1)
    carried: list[int] = []
    store.on_transaction = carried.append
    jobs = [first, ok, taken, cancelled, last]
    out = await _all_at_once(store, jobs, [_commit(j, tail=True) for j in jobs])
    assert out[:2] == [False, False] and isinstance(out[2], LeaseLost) and out[3:] == [True, False]
    for job in (first, ok, last):
        assert (await _written(db, job))[0] == ["StepCompleted", "StepStarted"]
    assert (await _written(db, taken))[:2] == ([], [])
    events, ledger, row = await _written(db, cancelled)
    assert (events, ledger, row.resume_state, row.last_sequence) == (["StepCompleted"], ["snapshot:vol-1"], None, 1)
    if _grouped(db):
        # the first alone; the four together, stopped by the two fences and undone; the two
        # others again as a group; the lost lease and the cancel each alone, the long way
        assert (store.transactions, store.groups) == (5, 1)
        assert sorted(carried) == [1, 1, 1, 2]


async def test_a_group_that_fails_on_the_server_leaves_each_commit_to_go_alone(db: AsyncEngine) -> None:
    """One commit the server refuses (a ledger key longer than its column) fails the group's
    transaction, which writes nothing; each then goes alone: that one fails, the others land."""
    jobs = [await _a_job(db) for _ in range(4)]
    commits = [_commit(j) for j in jobs]
    commits[2].ledger[0].key = "x" * 1000  # resource_key is a VARCHAR(255): strict mode refuses it
    store = JobStore(db, OWNER, lease_seconds=30, group_limit=1)
    out = await _all_at_once(store, jobs, commits)
    assert out[:2] == [False, False] and out[3] is False
    assert "resource_key" in str(out[2]) or "Data too long" in str(out[2])
    for i, job in enumerate(jobs):
        events, ledger, row = await _written(db, job)
        assert (events, ledger, row.last_sequence) == (([], [], 0) if i == 2 else (["StepCompleted"], ["snapshot:vol-1"], 1))
    assert (store.transactions, store.groups) == ((5, 0) if _grouped(db) else (4, 0))  # (the group undone)


async def test_a_group_writes_each_commit_as_it_is_events_ledger_rows_and_side_updates_or_none(
        db: AsyncEngine) -> None:
    """One group, commits of every shape: the job's row alone, events without ledger rows,
    ledger rows without events, the VM's status beside them; each written as it is."""
    jobs = [await _a_job(db) for _ in range(5)]
    vm_id, now = jobs[4].vm_id, utcnow()
    async with db.begin() as conn:
        await conn.execute(vm_replication_contexts.insert().values(
            context_id=f"ctx-{uuid.uuid4().hex[:12]}", vm_name="web", vmware_vm_id=vm_id,
            current_status="ready_for_failover", created_at=now, updated_at=now))
    commits = [_commit(j) for j in jobs]
    commits[1] = Commit(job={"status": "running"})  # the row alone
    commits[2].ledger = []  # an event, no ledger row
    commits[3].events = []  # a ledger row, no event
    commits[4].vm_status = "failing_over"
    store = JobStore(db, OWNER, lease_seconds=30, group_limit=1)
    carried: list[int] = []
    store.on_transaction = carried.append
    assert await _all_at_once(store, jobs, commits) == [False] * 5
    written = [await _written(db, job) for job in jobs]
    assert [(e, led, row.status, row.last_sequence) for e, led, row in written] == [
        (["StepCompleted"], ["snapshot:vol-1"], "running", 1), ([], [], "running", 0),
        (["StepCompleted"], [], "running", 1), ([], ["snapshot:vol-1"], "running", 0),
        (["StepCompleted"], ["snapshot:vol-1"], "running", 1)]
    async with db.connect() as conn:
        status = (await conn.execute(select(vm_replication_contexts.c.current_status)
                                     .where(vm_replication_contexts.c.vmware_vm_id == vm_id))).scalar_one()
    assert status == "failing_over"
    assert carried == ([1, 4] if _grouped(db) else [1] * 5)


async def test_a_commit_that_cannot_be_built_fails_alone_not_its_group(db: AsyncEngine) -> None:
    """A commit whose rows cannot be turned into SQL (a ledger value JSON cannot hold) raises to
    its own job only; the jobs it would have gone with land."""
    jobs = [await _a_job(db) for _ in range(4)]
    commits = [_commit(j) for j in jobs]
    commits[2].ledger[0].data["bad"] = object()
    store = JobStore(db, OWNER, lease_seconds=30, group_limit=1)
    out = await _all_at_once(store, jobs, commits)
    assert out[:2] == [False, False] and out[3] is False and isinstance(out[2], TypeError)
    for i, job in enumerate(jobs):
        assert (await _written(db, job))[0] == ([] if i == 2 else ["StepCompleted"])
    if _grouped(db):
        assert store.groups == 1


async def test_a_group_never_splits_its_request_the_commits_that_do_not_fit_go_alone(
        db: AsyncEngine) -> None:
    """A job's UPDATE and the SET that reads its row count must travel in one request (between
    two, the driver may ask for the UPDATE's warnings, which resets the count): a group takes
    what fits in one request, the rest go alone, and every commit lands once."""
    # the one taken over last in the order a group takes them (the jobs' ids), so that the first
    # group is two of the others (with it, the group is undone and its neighbour goes again)
    jobs = sorted([await _a_job(db) for _ in range(8)], key=lambda j: j.job_id)
    jobs[6], jobs[7] = await _taken_over_now(db, jobs[7]), jobs[6]
    commits = [_commit(j, tail=True) for j in jobs]
    for c in commits:
        c.ledger[0].data["notes"] = "x" * (raw.MAX_STATEMENT * 2 // 5)  # two fit in a request, three do not
    store = JobStore(db, OWNER, lease_seconds=30, group_limit=1)
    carried: list[int] = []
    store.on_transaction = carried.append
    out = await _all_at_once(store, jobs, commits)
    assert out[:6] == [False] * 6 and isinstance(out[6], LeaseLost) and out[7] is False
    for job in jobs[:6] + jobs[7:]:
        assert (await _written(db, job))[0] == ["StepCompleted", "StepStarted"]
    assert (await _written(db, jobs[6]))[:2] == ([], [])
    assert max(carried) == (2 if _grouped(db) else 1)  # no transaction carried more than fit
    if _grouped(db):
        assert store.groups >= 1


async def test_a_group_whose_connection_is_lost_raises_to_every_commit_in_it(store_db: str) -> None:
    """A group waiting on a row lock (another transaction holds one of its jobs) whose connection
    is then killed: each of its commits raises the lost connection, none hangs, none is written
    (the COMMIT never ran). (MariaDB's way: the others have no groups.)"""
    db = make_engine(store_db, pool_size=3)
    try:
        await _lost_group(db)
    finally:
        await db.dispose()


async def _lost_group(db: AsyncEngine) -> None:
    jobs = [await _a_job(db) for _ in range(4)]
    assert _grouped(db)
    store = JobStore(db, OWNER, lease_seconds=30, group_limit=1)
    async with _row_held(db, jobs[2]) as holder:
        # the first goes alone (the limit is 1), the three after it queue and go together
        # once it has ended: a group that waits on the third job's row
        commits = [asyncio.create_task(store.commit(j, _commit(j))) for j in jobs]

        async def waiting_group() -> Any:
            found = (await holder.execute(text(
                "SELECT id FROM information_schema.processlist WHERE info LIKE :f AND id <> CONNECTION_ID()"),
                {"f": "%UPDATE%failover_jobs%"})).scalars().all()
            return found[0] if len(found) == 1 else None

        victim = await wait_until(waiting_group, 10, "the group to wait on the locked row", interval=0.02)
        await holder.execute(text(f"KILL CONNECTION {int(victim)}"))
        out = await asyncio.wait_for(asyncio.gather(*commits, return_exceptions=True), 10)
    assert out[0] is False
    assert all(isinstance(o, DBAPIError) and o.connection_invalidated for o in out[1:]), out
    assert (store.transactions, store.groups) == (2, 0)  # the group sent, never written
    assert (await _written(db, jobs[0]))[0] == ["StepCompleted"]
    for job in jobs[1:]:
        assert (await _written(db, job))[:2] == ([], [])


async def test_a_commit_cancelled_while_it_waits_for_its_group_is_not_sent(store_db: str) -> None:
    """A job's task cancelled (its lease lost, the process stopping) while its commit waits for
    the group: the group goes without it, and nothing of it is written."""
    db = make_engine(store_db, pool_size=3)
    try:
        jobs = [await _a_job(db) for _ in range(3)]
        store = JobStore(db, OWNER, lease_seconds=30, group_limit=1)
        async with _row_held(db, jobs[0]):  # the first (alone) waits on its row, the others queue
            commits = [asyncio.create_task(store.commit(j, _commit(j))) for j in jobs]
            await wait_until(holds(lambda: store.waiting == 2), 5, "two commits to queue behind the first",
                             interval=0.01)
            commits[1].cancel()
        assert await asyncio.wait_for(asyncio.gather(commits[0], commits[2]), 10) == [False, False]
        assert commits[1].cancelled()
        assert (await _written(db, jobs[1]))[:2] == ([], [])
        assert (await _written(db, jobs[2]))[0] == ["StepCompleted"]
        assert (store.transactions, store.groups) == (2, 1)
    finally:
        await db.dispose()


async def test_a_group_waiting_on_a_row_locked_elsewhere_lets_the_others_go_alone(
        store_db: str) -> None:
    """A group whose UPDATE waits on a job's row that another transaction holds gives up after
    its own short lock wait instead of holding the other jobs' rows for the server's (50 s):
    the others go alone and land while that row is still held; the held one lands once it is
    free. (MariaDB's way: the others have no groups.) That wait is a tenth of the lease, 1 to
    5 s (1 s of 10 here): meanwhile the other jobs' renewals pass their rows by."""
    db = make_engine(store_db, pool_size=4)
    try:
        jobs = [await _a_job(db) for _ in range(4)]
        store = JobStore(db, OWNER, lease_seconds=10, group_limit=1)
        async with _row_held(db, jobs[2]):
            commits = [asyncio.create_task(store.commit(j, _commit(j))) for j in jobs]

            async def others_landed() -> bool | None:
                return all([(await _written(db, j))[0] == ["StepCompleted"] for j in (jobs[0], jobs[1], jobs[3])]) or None

            await wait_until(others_landed, 4, "the jobs beside the locked one to land")
            assert not commits[2].done()
        assert await asyncio.wait_for(asyncio.gather(*commits), 15) == [False] * 4
        assert (await _written(db, jobs[2]))[0] == ["StepCompleted"]
        assert (store.transactions, store.groups) == (5, 0)  # the first, the group given up, three alone
    finally:
        await db.dispose()


async def test_a_vm_name_is_held_by_one_job_until_it_ended_with_nothing_left_under_it(db: AsyncEngine) -> None:
    """`claim_vm_name`: the first job to ask holds the name, and holds it again when it asks
    again; another job is told who holds it while that job runs, and after it ended failed
    without its rollback (its VM may be left under the name); once the holder completed, rolled
    back, or is gone, the next job to ask takes the name over."""
    store = JobStore(db, OWNER)
    name = f"twin-{uuid.uuid4().hex[:8]}"
    first, second = await _a_job(db, status="vm-creation"), await _a_job(db)
    assert await store.claim_vm_name(first.job_id, name) is None
    assert await store.claim_vm_name(first.job_id, name) is None  # (a resume asks again)
    held = await store.claim_vm_name(second.job_id, name)
    assert held is not None and (held.job_id, held.status, held.ended) == (first.job_id, "vm-creation", False)

    async def end(job: JobRow, **columns: Any) -> None:
        async with db.begin() as conn:
            await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id == job.job_id)
                               .values(ended=True, **columns))

    await end(first, status="failed", rolled_back=False)
    held = await store.claim_vm_name(second.job_id, name)
    assert held is not None and (held.job_id, held.status, held.ended) == (first.job_id, "failed", True)
    await end(first, status="failed", rolled_back=True)
    assert await store.claim_vm_name(second.job_id, name) is None
    held = await store.claim_vm_name(first.job_id, name)
    assert held is not None and held.job_id == second.job_id
    await end(second, status="completed")
    third = await _a_job(db)
    assert await store.claim_vm_name(third.job_id, name) is None
    async with db.begin() as conn:
        await conn.execute(failover_jobs.delete().where(failover_jobs.c.job_id == third.job_id))
    assert await store.claim_vm_name(first.job_id, name) is None  # its holder is gone
    async with db.connect() as conn:
        rows = (await conn.execute(text("SELECT job_id FROM vm_name_claims WHERE name = :n"), {"n": name})).all()
    assert [r[0] for r in rows] == [first.job_id]


async def test_two_jobs_asking_for_one_vm_name_at_once_get_one_holder(db: AsyncEngine) -> None:
    store = JobStore(db, OWNER)
    for _ in range(5):
        name = f"race-{uuid.uuid4().hex[:8]}"
        jobs = [await _a_job(db, status="vm-creation") for _ in range(4)]
        answers = await asyncio.gather(*(store.claim_vm_name(j.job_id, name) for j in jobs))
        winners = [j.job_id for j, a in zip(jobs, answers, strict=True) if a is None]
        assert len(winners) == 1, answers
        assert all(a.job_id == winners[0] for a in answers if a is not None), answers
