"""The job store: lease-fenced transactions of a job (state + outbox + ledger together),
and the leases by which one process owns a running job."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import (
    ColumnClause,
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    column,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.expression import Update

from statemachine.errors import LeaseLost
from statemachine.ports import Commit, JobRow, LedgerEntry, NameHolder

from . import raw
from .engine import Hinted, db_now_plus, from_db_time, index_hint, to_db_time, utcnow
from .outbox import OUTBOX_INSERT, outbox_row
from .tables import failover_jobs, resource_ledger, vm_name_claims, vm_replication_contexts

T = TypeVar("T")
log = logging.getLogger("failover.db")
_JOB_TYPES = {"test": "test-failover", "live": "live-failover", "cleanup": "cleanup"}
SEED_JOB_TYPES = {v: k for k, v in _JOB_TYPES.items()}  # contract job type -> seed column value
_TIME_COLUMNS = {"started_at", "completed_at", "lease_expires_at"}


def _ledger_row(job_id: str, e: LedgerEntry) -> dict[str, Any]:
    now = utcnow()
    return {
        "job_id": job_id, "resource_key": e.key, "resource_type": e.resource_type, "action": e.action,
        "resource_id": e.resource_id, "name": e.name, "status": e.status, "cs_job_id": e.cs_job_id,
        "operation_id": e.operation_id, "data": e.data, "created_at": now, "updated_at": now,
    }


def _entry_of(r: Any) -> LedgerEntry:
    return LedgerEntry(key=r.resource_key, resource_type=r.resource_type, action=r.action, status=r.status,
                       resource_id=r.resource_id, name=r.name, cs_job_id=r.cs_job_id,
                       operation_id=r.operation_id, data=r.data or {})


def row_to_job(r: Any) -> JobRow:
    return JobRow(
        job_id=r.job_id, request_id=r.request_id, job_type=_JOB_TYPES.get(r.job_type, r.job_type),
        vm_id=r.vm_id, vm_name=r.source_vm_name, correlation_id=r.correlation_id,
        parent_job_id=r.parent_job_id, requested_by=r.requested_by, status=r.status,
        last_sequence=r.last_sequence, resume_state=r.resume_state, options=r.options or {},
        plan=r.plan or {}, cancel_requested=bool(r.cancel_requested),
        rollback_requested=bool(r.rollback_requested), failed_step=r.failed_step,
        error_code=r.error_code, error_message=r.error_message,
        created_at=from_db_time(r.created_at) or 0.0, started_at=from_db_time(r.started_at),
        rolled_back=None if r.rolled_back is None else bool(r.rolled_back),
    )


_RETRYABLE = (1205, 1213)  # lock wait timeout, deadlock: the transaction was rolled back


def _retryable(exc: BaseException) -> bool:
    code = getattr(getattr(exc, "orig", None), "args", (None,))
    return isinstance(exc, DBAPIError) and bool(code) and code[0] in _RETRYABLE


async def again_if_deadlocked(what: Callable[[], Awaitable[T]], tries: int = 4) -> T:
    """Run a transaction again when MariaDB rolled it back for a deadlock or a lock wait
    timeout (nothing of it was written)."""
    for attempt in range(1, tries + 1):
        try:
            return await what()
        except DBAPIError as exc:
            if attempt == tries or not _retryable(exc):
                raise
            await asyncio.sleep(0.01 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


# The statements of a job's commit, built once: SQLAlchemy then only binds parameters and finds
# the compiled form in its cache. Built per call they were a fifth of serve's CPU in the
# benchmark's profile (the ledger upsert's `inserted` proxies alone 13%: bench/PROFILE.md).
_LEDGER_INSERT = mysql_insert(resource_ledger)
LEDGER_UPSERT = _LEDGER_INSERT.on_duplicate_key_update(
    resource_id=_LEDGER_INSERT.inserted.resource_id, name=_LEDGER_INSERT.inserted.name,
    status=_LEDGER_INSERT.inserted.status, cs_job_id=_LEDGER_INSERT.inserted.cs_job_id,
    operation_id=_LEDGER_INSERT.inserted.operation_id, data=_LEDGER_INSERT.inserted.data,
    updated_at=_LEDGER_INSERT.inserted.updated_at)


# A claim on a VM name is released by its job's end with nothing of its own left under the
# name: completed (its VM the platform's now, found by any later job's look-up) or rolled back.
NAME_RELEASED_BY = ("completed", "cleaned_up")
_HELD = ("SELECT 1 FROM failover_jobs AS holder WHERE holder.job_id = vm_name_claims.job_id AND NOT "
         f"(holder.ended AND (holder.status IN ({', '.join(map(repr, NAME_RELEASED_BY))}) "
         "OR holder.rolled_back IS TRUE))")
_TAKE = f"vm_name_claims.job_id = VALUES(job_id) OR NOT EXISTS ({_HELD})"
_CLAIM_NAME = text(
    "INSERT INTO vm_name_claims (name, job_id, claimed_at) VALUES (:name, :job_id, :now) "
    f"ON DUPLICATE KEY UPDATE claimed_at = IF({_TAKE}, VALUES(claimed_at), vm_name_claims.claimed_at), "
    f"job_id = IF({_TAKE}, VALUES(job_id), vm_name_claims.job_id)")  # (after claimed_at: it reads job_id)
_NAME_HOLDER = select(vm_name_claims.c.job_id).where(vm_name_claims.c.name == bindparam("name"))
_CLAIM_RESET = "SET @failover_claim_job = NULL, @failover_claim_status = NULL, @failover_claim_ended = NULL"
_CLAIM_HOLDER = text(
    "SELECT c.job_id, j.status, j.ended INTO @failover_claim_job, @failover_claim_status, @failover_claim_ended "
    "FROM vm_name_claims AS c LEFT JOIN failover_jobs AS j ON j.job_id = c.job_id WHERE c.name = :name")
_CLAIM_READ = "SELECT @failover_claim_job, @failover_claim_status, @failover_claim_ended"


def _bare(name: str) -> ColumnClause[Any]:
    """A column of `failover_jobs` named without its table: a job's ~30 commit UPDATEs name a
    handful each, and the server parses every word of every one (`failover_jobs.x` is three)."""
    return column(name, failover_jobs.c[name].type)


# the fence: this process's lease, not expired (an expired lease may have been taken by another
# process already), and nobody else committed meanwhile
_FENCE = and_(_bare("job_id") == bindparam("f_job_id"), _bare("lease_owner") == bindparam("f_owner"),
              _bare("lease_expires_at") > func.now(6), _bare("last_sequence") == bindparam("f_sequence"))
# ... and no cancel asked for: the commit's UPDATE tells with its row count whether a cancel
# came, instead of a SELECT after every commit (44 round trips of a job's ~300)
_FENCE_NOT_CANCELLED = and_(_FENCE, _bare("cancel_requested").is_(False))
# A commit pushes the job's lease out only once a sixth of it has run (every 5 s at 30 s)
# instead of at each of a job's ~30 commits: moving `lease_expires_at` moves the row in the
# claim index (ended, lease_expires_at), 8% of the UPDATE's instructions in MariaDB
# (bench/PROFILE.md, thirteenth session). After any commit at least this share of a lease is
# left, which the runner counts on: a sixth less than before, so a job whose row a renewal round
# skips (locked by its commit) still has 9 s of the round's 10 s interval to spare.
LEASE_LEFT_AFTER_COMMIT = 5 / 6
_fenced_updates: dict[tuple[tuple[str, ...], int | None, bool], Update] = {}


def fenced_update(columns: tuple[str, ...], extend_lease_us: int | None, *, unless_cancelled: bool) -> Update:
    """The fenced UPDATE of `failover_jobs` that sets `columns` (bound as `v_<column>`) and, with
    `extend_lease_us`, renews the lease to now + that many microseconds where less than
    `LEASE_LEFT_AFTER_COMMIT` of it is left (else it stays: never earlier); with
    `unless_cancelled`, only while no cancel is asked for. One statement per shape (a job's
    commits use a dozen), kept."""
    key = (columns, extend_lease_us, unless_cancelled)
    stmt = _fenced_updates.get(key)
    if stmt is None:
        values: dict[str, Any] = {c: bindparam(f"v_{c}", type_=failover_jobs.c[c].type) for c in columns}
        if extend_lease_us is not None:
            lease = _bare("lease_expires_at")
            values["lease_expires_at"] = func.if_(
                lease < db_now_plus(int(extend_lease_us * LEASE_LEFT_AFTER_COMMIT)), db_now_plus(extend_lease_us), lease)
        fence = _FENCE_NOT_CANCELLED if unless_cancelled else _FENCE
        # the job's row by its key alone: without the hint MariaDB weighs every index the
        # fence names (owner, claim) for each commit, a twentieth of the UPDATE's cost
        # (bench/lease_update.py under callgrind)
        stmt = _fenced_updates[key] = index_hint(update(failover_jobs).where(fence).values(**values),
                                                 "USE INDEX (job_id)")
    return stmt


# unended jobs, as a condition the claim index (ended, lease_expires_at) can use: `ended = false`.
# `ended IS FALSE` cannot: MariaDB then reads every row of the table in id order, the whole
# history of finished jobs on every claim (tests/test_history_scaling.py)
_UNENDED = failover_jobs.c.ended == False  # noqa: E712 (an SQL comparison, not Python's)
_VM_STATUS = (update(vm_replication_contexts).where(vm_replication_contexts.c.vmware_vm_id == bindparam("vm_id"))
              .values(current_status=bindparam("v_status"), updated_at=bindparam("v_updated_at")))
_parent_updates: dict[tuple[str, ...], Update] = {}
# The plans of the recurring reads are named (`FORCE INDEX`), not left to the server's statistics:
# statistics taken while a table was small (a fresh install's first wave of jobs, before the
# server's background recalculation catches up) made MariaDB read a job's ledger by walking the
# whole table in id order, 665 rows per read in a 400-job burst on fresh tables; the claim's
# candidates and the relay's unsent events, likewise (bench/PROFILE.md, eighteenth session).
# tests/test_query_plans.py checks each plan on a fresh install's tables.
LEDGER_OF_JOB = index_hint(select(resource_ledger).where(resource_ledger.c.job_id == bindparam("job_id"))
                     .order_by(resource_ledger.c.id), "FORCE INDEX (uq_ledger_job_key)", resource_ledger)
_OWNED_ROWS: dict[int, Select[Any]] = {}


def by_job_key(statement: Hinted) -> Hinted:
    """`statement`, which takes or keeps jobs' leases, reaching their rows by the jobs' key
    alone, so that it locks the rows it names and no others. Left to its estimates, MariaDB
    chose the claim index (ended, lease_expires_at) for the claim's UPDATE on a fresh install's
    tables where few jobs were unended, and the owner index for a renewal of two jobs; a
    locking statement locks every row it walks, and a walk of the claim index locks every
    unended job, other processes' running ones included, until it commits: their renewals
    (`SKIP LOCKED`) pass those jobs by meanwhile (tests/test_lease_locks.py)."""
    return index_hint(statement, "FORCE INDEX (job_id)", failover_jobs)


def _candidates(claimable: ColumnElement[bool], limit: int) -> Select[Any]:
    """Up to `limit` jobs meeting `claimable`, through the claim index: the live failovers first
    (a disaster's do not wait behind a DR test's wave), then the oldest first."""
    live_first = case((failover_jobs.c.job_type == SEED_JOB_TYPES["live-failover"], 0), else_=1)
    return index_hint(select(failover_jobs.c.job_id).where(claimable)
                      .order_by(live_first, failover_jobs.c.id).limit(limit),
                      "FORCE INDEX (ix_failover_jobs_claim)", failover_jobs)


def intake_owner(owner: str) -> str:
    """The lease owner of the jobs `owner`'s intake process (failover/intake.py) recorded and
    `owner` has not yet taken: none of `owner`'s claims starts them before that."""
    return f"{owner[:184]}/intake"  # (lease_owner holds 191 characters)


def _owned_rows(count: int) -> Select[Any]:
    """The unended rows of `count` jobs (bound as id_<i>) that `owner` holds."""
    stmt = _OWNED_ROWS.get(count)
    if stmt is None:
        stmt = _OWNED_ROWS[count] = cast(Select[Any], select(failover_jobs).where(
            failover_jobs.c.job_id.in_([bindparam(f"id_{i}") for i in range(count)]),
            failover_jobs.c.lease_owner == bindparam("owner"), _UNENDED))
    return stmt


def _parent_update(columns: tuple[str, ...]) -> Update:
    """The UPDATE of a cleanup's parent failover that sets `columns` (bound as `v_<column>`)."""
    stmt = _parent_updates.get(columns)
    if stmt is None:
        values: dict[str, Any] = {c: bindparam(f"v_{c}", type_=failover_jobs.c[c].type) for c in columns}
        values["updated_at"] = bindparam("v_updated_at", type_=failover_jobs.c.updated_at.type)
        stmt = _parent_updates[columns] = (update(failover_jobs).where(failover_jobs.c.job_id == bindparam("parent_id"))
                                           .values(**values))
    return stmt


# a commit's (guarded UPDATE, unguarded UPDATE, their parameters, outbox rows, ledger rows)
_Prepared = tuple[Update, Update, dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]
# group commit: commits in flight before the next ones wait to go together, and at most how many
# go in one transaction (bench/PROFILE.md)
GROUP_LIMIT = 4
GROUP_MOST = 64
_NOT_WRITTEN = "@failover_not_written"  # a group's list of the commits whose fence failed
_GROUP_STOPPED = "stopped: a fence of the group matched no row"
# a group's UPDATE waits this long for a row locked elsewhere (then each of its jobs goes alone),
# not the server's innodb_lock_wait_timeout (50 s by default) with the other jobs' rows held; with
# a lease, a tenth of it in whole seconds, 1 to this (3 s at the default 30 s lease; 1 s below a
# 20 s lease), since meanwhile those jobs' renewals pass their rows by
GROUP_LOCK_WAIT = 5


class _Group:
    """Group commit: while `limit` commits are in flight, the next ones queue, and when one of
    those in flight ends, the queue (up to `most`) goes as one transaction (`flush`, which says
    of each whether it was written: True; its fence failed: False; not sent, to go alone: None).
    Nothing waits for company: a commit that finds room goes at once, alone; only under load do
    commits share a round trip, a COMMIT and its log flush."""

    def __init__(self, flush: Callable[[list[Any]], Awaitable[list[bool | None]]], limit: int, most: int) -> None:
        self._flush, self.limit, self.most = flush, max(1, limit), max(1, most)
        self.busy = 0
        self._queue: list[tuple[Any, asyncio.Future[bool | None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def alone(self) -> bool:
        """Whether a commit may go alone now; if so it counts as in flight until `done()`."""
        if self.busy < self.limit and not self._queue:
            self.busy += 1
            return True
        return False

    def done(self) -> None:
        self.busy -= 1
        self._next()

    async def join(self, item: Any) -> bool | None:
        """Queue `item` for the next group: True once written, False if its fence failed (it is
        to go the long way), None if it was not sent (it is to go alone). The group's
        transaction failing for a lost connection raises that here."""
        future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._next()
        return await future

    def _next(self) -> None:
        while self._queue and self.busy < self.limit:
            batch, self._queue = self._queue[:self.most], self._queue[self.most:]
            self.busy += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(lambda t, b=batch: self._ended(t, b))  # type: ignore[misc]

    async def _run(self, batch: list[tuple[Any, asyncio.Future[bool | None]]]) -> None:
        # a commit whose caller is gone (cancelled) before its group went is not sent
        live = [(item, future) for item, future in batch if not future.done()]
        try:
            written = await self._flush([item for item, _ in live]) if live else []
        except Exception as exc:
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), ok in zip(live, written, strict=True):
            if not future.done():
                future.set_result(ok)

    def _ended(self, task: asyncio.Task[None], batch: list[tuple[Any, asyncio.Future[bool | None]]]) -> None:
        """A group's task ended, however (cancelled before it began, at shutdown, too): its room
        is free again, and a commit still waiting on it learns it was cancelled."""
        self._tasks.discard(task)
        self.busy -= 1
        for _, future in batch:
            if not future.done():
                future.cancel()
        try:
            self._next()
        except RuntimeError:  # the loop is closing: nothing more goes
            pass

    async def drain(self) -> None:
        """Wait for the groups in flight (shutting down); never cancels them."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))


class Renewal(NamedTuple):
    """What a renewal found: the jobs renewed; for each job no longer this process's, its owner
    now (None: nobody); the jobs still this process's whose rows were locked (passed by). A job
    in none of them has ended."""
    renewed: set[str]
    others: dict[str, str | None]
    locked: set[str]


class JobStore:
    """`statemachine.ports.JobStorePort` on MariaDB, fenced by `owner`'s lease."""

    def __init__(self, engine: AsyncEngine, owner: str, on_outbox: Callable[[], None] = lambda: None, *,
                 lease_engine: AsyncEngine | None = None, lease_seconds: float | None = None,
                 group_limit: int = GROUP_LIMIT, group_most: int = GROUP_MOST,
                 group_lock_wait: int | None = None) -> None:
        self.engine = engine
        # group commit (MariaDB): with `group_limit` commits in flight, the next ones wait and
        # go together, at most `group_most` of them, as one transaction (0: every one alone)
        self.group_limit, self.group_most = group_limit, group_most
        if group_lock_wait is None:  # a tenth of the lease, 1 to 5 s: see GROUP_LOCK_WAIT
            group_lock_wait = GROUP_LOCK_WAIT if lease_seconds is None else \
                max(1, min(GROUP_LOCK_WAIT, int(lease_seconds / 10)))
        self._lock_wait = f"SET STATEMENT innodb_lock_wait_timeout = {int(group_lock_wait)} FOR "
        self._group: _Group | bool | None = None  # made at the first commit (the server is known)
        self.groups = 0  # transactions that carried more than one job's commit (the benchmark's)
        # renewals get their own small pool: they must never wait behind the jobs' commits
        self.lease_engine = lease_engine or engine
        self.owner = owner
        self.lease_seconds = lease_seconds
        # told (job id, monotonic time until which the lease is surely valid) after a commit
        self.on_lease: Callable[[str, float], None] = lambda job_id, until: None
        self.on_commit: Callable[[str], None] = lambda job_id: None  # after every successful commit
        # told how many jobs' commits each transaction carried (the group commit's metric)
        self.on_transaction: Callable[[int], None] = lambda commits: None
        self.on_outbox = on_outbox
        self.transactions = 0  # counted for the benchmark's transactions-per-job figure
        self._takes: dict[tuple[int, float], Update] = {}  # take's UPDATE, per (jobs, lease length)

    def _prepare(self, job: JobRow, commit: Commit, *, head_of: _Prepared | None = None) -> _Prepared:
        """(guarded UPDATE, unguarded UPDATE, their parameters, outbox rows, ledger rows).
        `head_of`: the prepared form of the commit with its tail, whose first rows are this
        one's (an event's JSON is made once)."""
        values: dict[str, Any] = {}
        for key, value in commit.job.items():
            if key in _TIME_COLUMNS:
                value = to_db_time(value)
            values[key] = value
        if "plan" in values and values["plan"] is not None:
            values["network_mappings"] = json.dumps(values["plan"].get("networks"))
            values["source_vm_spec"] = json.dumps({k: values["plan"].get(k) for k in (
                "cpu_count", "memory_mb", "os_type", "volumes")})
        values["last_sequence"] = job.last_sequence + len(commit.events)
        values["updated_at"] = utcnow()
        extend = (int(self.lease_seconds * 1_000_000)
                  if self.lease_seconds and "lease_expires_at" not in values else None)
        # (a commit of a job whose lease is valid renews it once a sixth has run: the lease
        # then runs out only while the job waits, when the runner renews it, or when this
        # process is gone)
        columns = tuple(sorted(values))
        params: dict[str, Any] = {f"v_{c}": values[c] for c in columns}
        params.update(f_job_id=job.job_id, f_owner=self.owner, f_sequence=job.last_sequence)
        if head_of is None:
            events = [outbox_row(e) for e in commit.events]
            ledger = [_ledger_row(job.job_id, entry) for entry in commit.ledger]
        else:
            events, ledger = head_of[3][:len(commit.events)], head_of[4][:len(commit.ledger)]
        return (fenced_update(columns, extend, unless_cancelled=True),
                fenced_update(columns, extend, unless_cancelled=False), params, events, ledger)

    async def commit(self, job: JobRow, commit: Commit) -> bool:
        # with a tail: all of it unless a cancel is asked for, else the head alone
        whole = commit.with_tail()
        full = self._prepare(job, whole)
        head = self._prepare(job, commit, head_of=full) if commit.tail is not None else full
        asked = time.monotonic()
        group = self._group_of()
        if group is None or group.alone():
            try:
                cancel = await again_if_deadlocked(lambda: self._write(job, commit, whole, full, head, quick=True))
            finally:
                if group is not None:
                    group.done()
        elif (written := await group.join((job, whole, full))) is True:
            cancel = False  # written with others in one transaction
        else:  # its fence failed (False: the long way), or it was not sent (None): alone
            cancel = await again_if_deadlocked(lambda: self._write(job, commit, whole, full, head, quick=written is None))
        self.on_commit(job.job_id)
        if whole.events:
            self.on_outbox()
        if self.lease_seconds and "lease_expires_at" not in whole.job:
            self.on_lease(job.job_id, asked + self.lease_seconds * LEASE_LEFT_AFTER_COMMIT)
        return cancel

    @property
    def waiting(self) -> int:
        """Commits queued for the next group."""
        return self._group.waiting if isinstance(self._group, _Group) else 0

    async def drain(self) -> None:
        """Wait for the group commits in flight (shutting down)."""
        if isinstance(self._group, _Group):
            await self._group.drain()

    def _group_of(self) -> _Group | None:
        if self._group is None:
            dialect = self.engine.sync_engine.dialect
            if dialect.server_version_info is None:  # not connected yet: which server is unknown
                return None
            # MariaDB's compound statements: a group's UPDATEs and the SETs reading their row
            # counts in one block, and a stop (an IF outside stored programs) if a fence failed
            supported = self.group_limit > 0 and raw.statements_of(self.engine).compound
            self._group = _Group(self._commit_group, self.group_limit, self.group_most) if supported else False
        return self._group if isinstance(self._group, _Group) else None

    async def _commit_group(self, batch: list[tuple[JobRow, Commit, _Prepared]]) -> list[bool | None]:
        """The commits of several jobs as one transaction in one request: in one block
        (`raw.block`) the jobs' fenced UPDATEs, each followed by a SET that adds the job to the
        list of those whose fence failed unless it matched one row, and their side updates; a
        stop if any fence failed; the events of all in one INSERT, their ledger rows in one
        upsert; the COMMIT. Of each: True written, False its fence failed, None not sent (it
        goes alone: the group's request was full, its statements could not be built, or the
        server refused the group, which then wrote nothing). When a fence fails (a cancel, a
        lost lease: rare) nothing of the group is written, and the others go again as a group.
        A lost connection is raised to all. The rows are locked in the order of the jobs' ids
        (as the lease renewal's UPDATE ... IN takes them), and a row locked elsewhere fails the
        group after `group_lock_wait` seconds instead of holding the others' rows for the
        server's lock wait timeout. A job's UPDATE and the SET that reads its row count are in
        one statement, the block (between two requests the driver may ask for the UPDATE's
        warnings, which resets the count), and the whole goes in one request. One INSERT per
        table for the group, not one per job: each statement costs the server its parse and its
        set-up whatever it carries (bench/PROFILE.md, fourteenth session)."""
        out: list[bool | None] = [None] * len(batch)
        sent: list[int] = []
        found: list[tuple[Any, ...]] = []
        stop = raw.stop_if(f"{_NOT_WRITTEN} <> ''", _GROUP_STOPPED)
        try:
            async with raw.transaction(self.engine) as tx:
                now = utcnow()
                units: list[str] = []
                # per statement (and its column list): the head, the rows, the tail of its INSERT
                inserts: dict[tuple[Any, str], tuple[str, list[str], str]] = {}
                sides: list[str] = []
                # what the script holds besides the jobs' statements, and a margin
                room = raw.MAX_STATEMENT - 3 * len(self._lock_wait) - len(stop) - 200
                for i in sorted(range(len(batch)), key=lambda i: batch[i][0].job_id):
                    job, whole, (guarded, _, params, out_rows, led) = batch[i]
                    try:
                        for row in out_rows:
                            row["created_at"] = now
                        rows = [(st, tx.insert_rows(st, r)) for st, r in ((OUTBOX_INSERT, out_rows),
                                                                         (LEDGER_UPSERT, led)) if r]
                        side = [tx.sql(st, values) for st, values in self._side_updates(job, whole)]
                        fenced = tx.sql(guarded, params)
                    except Exception:  # alone, it raises its own error to its own job
                        log.debug("job %s's commit could not be built for a group; it goes alone", job.job_id,
                                  exc_info=True)
                        continue
                    unit = [fenced,
                            f"SET {_NOT_WRITTEN} = CONCAT({_NOT_WRITTEN}, IF(ROW_COUNT() = 1, '', ',{i}'))"]
                    size = (sum(len(u) + 2 for u in (*unit, *side))
                            + sum(sum(len(v) + 1 for v in values)
                                  + (0 if (st, head) in inserts else len(head) + len(tail) + 2)
                                  for st, (head, values, tail) in rows))
                    if size > room:
                        continue  # the request is full: this one goes alone
                    room -= size
                    units += unit
                    sides += side
                    for st, (head, values, tail) in rows:
                        inserts.setdefault((st, head), (head, [], tail))[1].extend(values)
                    sent.append(i)
                if not sent:
                    return out
                self.transactions += 1
                # the UPDATEs (and their SETs) as one block: the server answers once, not twice a
                # job; the INSERTs after it on their own (in a block the server copies each
                # literal, an event's body too, into the block's UTF-8 text, character by
                # character: bench/PROFILE.md); all under the group's lock wait timeout
                script = [f"SET {_NOT_WRITTEN} = ''", self._lock_wait + raw.block(units + sides), stop,
                          *(self._lock_wait + head + ",".join(values) + tail for head, values, tail in inserts.values())]
                try:
                    _, found = await tx.script_select(script, f"SELECT {_NOT_WRITTEN}", commit=True)
                except DBAPIError as exc:
                    if not raw.stopped(exc, _GROUP_STOPPED):
                        raise
                    await tx.rollback()  # a fence failed: nothing of the group stays
                    _, found = await tx.script_select([], f"SELECT {_NOT_WRITTEN}")  # (a session's variable)
                else:
                    self.groups += 1
                    self.on_transaction(len(sent))
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise
            log.info("a group commit of %d jobs failed (%s); each goes alone", len(sent), exc.orig)
            return [None] * len(batch)  # rolled back: nothing of it was written
        listed = found[0][0] if found else None
        missed = {int(x) for x in (listed.decode() if isinstance(listed, bytes) else str(listed or "")).split(",") if x}
        if not missed:
            for i in sent:
                out[i] = True
            return out
        again = [i for i in sent if i not in missed]  # the others, once more as a group
        for i, written in zip(again, await self._commit_group([batch[i] for i in again]) if again else [], strict=True):
            out[i] = written
        for i in missed:
            out[i] = False
        return out

    async def _write(self, job: JobRow, commit: Commit, whole: Commit, full: _Prepared, head: _Prepared, *,
                     quick: bool) -> bool:
        # the job's fixed statements straight on the driver (adapters/db/raw.py)
        async with raw.transaction(self.engine) as tx:
            self.transactions += 1
            self.on_transaction(1)
            cancel, written, (guarded, _, params, out, led) = False, whole, full
            # the events' outbox time is their commit's, not when the commit began to wait
            # for a connection (the relay's lag, and the backlog's age, are counted from it)
            now = utcnow()
            for row in (*full[3], *head[3]):
                row["created_at"] = now
            if quick and tx.scripts:
                # the usual case in one round trip: the fenced UPDATE, a stop unless it
                # matched, everything after it and the COMMIT (MariaDB); on MySQL, which has
                # no such stop, the fenced UPDATE alone, then the rest with the COMMIT once
                # its count says the fence held. Should the fence fail, nothing was written
                # and it is done the long way below (which tells a cancel from a lost lease)
                stop = tx.stop_unless_one_row()
                rest = self._writes(tx, job, whole, out, led)
                fenced = tx.sql(guarded, params)
                try:
                    if stop is not None:
                        await tx.script(raw.as_block([fenced, stop, *rest]), commit=True)
                        return False
                    if (await tx.script([fenced]))[0] == 1:
                        await tx.script(rest, commit=True)
                        return False
                except DBAPIError as exc:
                    if not raw.stopped(exc):
                        raise
                    await tx.rollback()
            if await tx.execute(guarded, params) != 1:
                # the fence failed, or a cancel was asked for: the row is locked now (the
                # UPDATE read it by its key), so the unguarded UPDATE tells which (and
                # writes the head alone when there is a tail)
                cancel, written, (_, unguarded, params, out, led) = True, commit, head
                if await tx.execute(unguarded, params) != 1:
                    raise LeaseLost(job.job_id)
            if out:
                await tx.insert(OUTBOX_INSERT, out)
            if led:
                await tx.insert(LEDGER_UPSERT, led)
            for statement, values in self._side_updates(job, written):
                await tx.execute(statement, values)
        return cancel

    def _writes(self, tx: raw.Transaction, job: JobRow, written: Commit, out: list[dict[str, Any]],
                led: list[dict[str, Any]]) -> list[str]:
        """What a commit writes after its fenced UPDATE, as statements for a script: its events,
        its ledger rows, its side updates."""
        return [*(tx.insert_sqls(OUTBOX_INSERT, out) if out else []),
                *(tx.insert_sqls(LEDGER_UPSERT, led) if led else []),
                *(tx.sql(st, values) for st, values in self._side_updates(job, written))]

    @staticmethod
    def _side_updates(job: JobRow, written: Commit) -> list[tuple[Update, dict[str, Any]]]:
        """A commit's writes beyond the job's row, the outbox and the ledger: the VM's status,
        the parent job's columns."""
        out: list[tuple[Update, dict[str, Any]]] = []
        if written.vm_status:
            out.append((_VM_STATUS, {"vm_id": job.vm_id, "v_status": written.vm_status, "v_updated_at": utcnow()}))
        if written.parent and job.parent_job_id:
            out.append((_parent_update(tuple(sorted(written.parent))), {
                "parent_id": job.parent_job_id, "v_updated_at": utcnow(),
                **{f"v_{c}": to_db_time(v) if c in _TIME_COLUMNS else v for c, v in written.parent.items()}}))
        return out

    async def ledger(self, job_id: str) -> list[LedgerEntry]:
        async with raw.transaction(self.engine) as tx:  # the SELECT and its COMMIT in one request
            (rows,) = await tx.fetch_all([(LEDGER_OF_JOB, {"job_id": job_id})], commit=True)
        return [_entry_of(r) for r in rows]

    async def cleanup_ledgers(self, parent_job_id: str, vm_id: str) -> list[LedgerEntry]:
        # (by the VM's index: a VM has a few jobs, the table a history)
        cleanups = select(failover_jobs.c.job_id).where(
            failover_jobs.c.vm_id == vm_id, failover_jobs.c.parent_job_id == parent_job_id,
            failover_jobs.c.job_type == SEED_JOB_TYPES["cleanup"])
        stmt = select(resource_ledger).where(resource_ledger.c.job_id.in_(cleanups)).order_by(resource_ledger.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [_entry_of(r) for r in rows]

    async def load(self, job_id: str) -> JobRow | None:
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(failover_jobs).where(failover_jobs.c.job_id == job_id))).first()
        return row_to_job(r) if r is not None else None

    async def claim_vm_name(self, job_id: str, name: str) -> NameHolder | None:
        """`JobStorePort.claim_vm_name`, in one round trip: the claim's row is inserted, or
        taken over when its job is gone or ended with nothing of its own left under the name
        (MariaDB's row lock on the key orders two jobs that ask at once), then read back; again
        where MariaDB rolled it back for a deadlock or a lock wait."""
        return await again_if_deadlocked(lambda: self._claim_vm_name(job_id, name))

    async def vm_name_holder(self, name: str) -> str | None:
        async with raw.transaction(self.engine) as tx:  # the SELECT and its COMMIT in one request
            (rows,) = await tx.fetch_all([(_NAME_HOLDER, {"name": name})], commit=True)
        return str(rows[0].job_id) if rows else None

    async def _claim_vm_name(self, job_id: str, name: str) -> NameHolder | None:
        async with raw.transaction(self.engine) as tx:
            claim = tx.sql(_CLAIM_NAME, {"name": name, "job_id": job_id, "now": utcnow()})
            look = tx.sql(_CLAIM_HOLDER, {"name": name})
            # (the holder read into variables before the COMMIT, and they are read after it: a
            # SELECT of a table after the COMMIT would begin a transaction, and leave its view of
            # the tables open on the pooled connection for its next user)
            _, rows = await tx.script_select([_CLAIM_RESET, claim, look], _CLAIM_READ, commit=True)
        holder, status, ended = rows[0]
        if holder is None:  # (the row was just written: only a DELETE by hand takes it away)
            raise RuntimeError(f"the claim on VM name {name!r} vanished as it was written; claim it again")
        return None if holder == job_id else NameHolder(job_id=holder, status=status, ended=bool(ended))

    # ------------------------------------------------------------------ leases

    def _expiry(self, seconds: float) -> Any:
        return db_now_plus(int(seconds * 1_000_000))

    async def claim(self, limit: int, lease_seconds: float, running: Collection[str] = ()) -> list[JobRow]:
        """Take up to `limit` unended jobs that nobody owns, whose lease expired, or that this
        process owns but does not run (recorded here, but the hand-over to the runner was
        lost, or a run that stopped). Holds no lock while it looks: the candidates come from a
        plain (non-locking) read; a locking read then re-checks each one against its latest
        committed version, so of two processes racing for a job exactly one gets it, and passes
        by a row locked elsewhere instead of waiting for it (up to the server's 50 s lock wait,
        with this process's claims stopped meanwhile).

        (A locking look, `SELECT ... FOR UPDATE SKIP LOCKED` over the claim index, would lock,
        under REPEATABLE READ, every unended row the scan passes, running jobs of other
        processes included, until the claim commits: their lease renewals and commits would
        wait for it. The locking read here is of the candidates alone, by their key.)"""
        if limit <= 0:
            return []
        claimable = self._claimable(running)
        async with self.engine.connect() as conn:
            candidates = (await conn.execute(_candidates(claimable, limit))).scalars().all()
            await conn.rollback()
        if not candidates:
            return []
        async def take_them() -> list[Any]:
            async with self.engine.begin() as conn:
                rows = list((await conn.execute(self.claim_lock(candidates, claimable))).all())
                if rows:
                    await conn.execute(self.claim_take([r.job_id for r in rows], lease_seconds))
                return rows

        rows = await again_if_deadlocked(take_them)
        return [row_to_job(r) for r in rows if r.job_id not in running]

    def claim_lock(self, candidates: Sequence[str], claimable: ColumnElement[bool]) -> Select[Any]:
        """The claim's locking read of its candidates: those still claimable in their latest
        committed version, a row locked elsewhere passed by (its writer is alive: the next
        claim looks again) rather than waited for, with every other candidate's row held."""
        return by_job_key(select(failover_jobs).where(failover_jobs.c.job_id.in_(candidates), claimable)
                          .with_for_update(skip_locked=True))

    def claim_take(self, job_ids: Sequence[str], lease_seconds: float) -> Update:
        """The claim's UPDATE of the rows its locking read holds."""
        return by_job_key(update(failover_jobs).where(failover_jobs.c.job_id.in_(job_ids))
                          .values(lease_owner=self.owner, lease_expires_at=self._expiry(lease_seconds),
                                  attempts=failover_jobs.c.attempts + 1))

    def _claimable(self, running: Collection[str]) -> ColumnElement[bool]:
        free = or_(failover_jobs.c.lease_expires_at.is_(None), failover_jobs.c.lease_expires_at < func.now(6))
        mine = failover_jobs.c.lease_owner == self.owner
        if running:
            mine = and_(mine, failover_jobs.c.job_id.not_in(list(running)))
        return and_(_UNENDED, or_(free, mine))

    def claim_candidates(self, limit: int, running: Collection[str] = ()) -> Select[Any]:
        """The claim's look: up to `limit` claimable jobs, live failovers first, then the oldest
        first, through the claim index (the unended jobs), never the whole history in id order."""
        return _candidates(self._claimable(running), limit)

    async def take(self, job_ids: Sequence[str], lease_seconds: float) -> list[JobRow]:
        """Take (or refresh) the leases of jobs this process recorded, except those another
        process has taken meanwhile; the rows of the jobs this process owns now."""
        if not job_ids:
            return []
        asked = raw.padded(list(job_ids))
        ids = {f"id_{i}": job_id for i, job_id in enumerate(asked)}

        async def take_them() -> list[Any]:
            async with raw.transaction(self.engine) as tx:
                await tx.execute(self._take_statement(len(asked), lease_seconds),
                                 {"owner": self.owner, "intake_owner": intake_owner(self.owner), **ids})
                return await tx.fetch(_owned_rows(len(asked)), {"owner": self.owner, **ids})

        return [row_to_job(r) for r in await again_if_deadlocked(take_them)]

    def _take_statement(self, count: int, lease_seconds: float) -> Update:
        stmt = self._takes.get((count, lease_seconds))
        if stmt is None:
            free = or_(failover_jobs.c.lease_expires_at.is_(None), failover_jobs.c.lease_expires_at < func.now(6))
            owner: Any = bindparam("owner")
            stmt = self._takes[(count, lease_seconds)] = by_job_key(
                update(failover_jobs)
                .where(failover_jobs.c.job_id.in_([bindparam(f"id_{i}") for i in range(count)]),
                       _UNENDED,
                       or_(failover_jobs.c.lease_owner.in_([owner, bindparam("intake_owner")]),
                           failover_jobs.c.lease_owner.is_(None), free))
                .values(lease_owner=owner, lease_expires_at=self._expiry(lease_seconds)))
        return stmt

    async def renew(self, job_ids: Collection[str], lease_seconds: float) -> Renewal:
        """Extend the leases of these jobs where this process still owns them. A job whose row
        is locked right now is being committed by this process, as a rule, and that commit
        renews its lease: it is skipped rather than waited for (a renewal must not queue behind
        every running job's commit)."""
        ids = sorted(job_ids)
        if not ids:
            return Renewal(set(), {}, set())

        async def extend() -> set[str]:
            async with self.lease_engine.begin() as conn:
                mine = (await conn.execute(self.renewal_lock(ids))).scalars().all()
                if mine:
                    await conn.execute(by_job_key(
                        update(failover_jobs).where(failover_jobs.c.job_id.in_(mine))
                        .values(lease_expires_at=self._expiry(lease_seconds))))
            return set(mine)

        renewed = await again_if_deadlocked(extend)
        if len(renewed) == len(ids):  # the usual round: no second look, no connection for it
            return Renewal(renewed, {}, set())
        async with self.lease_engine.connect() as conn:
            rows = (await conn.execute(by_job_key(
                select(failover_jobs.c.job_id, failover_jobs.c.lease_owner)
                .where(failover_jobs.c.job_id.in_([i for i in ids if i not in renewed]), _UNENDED))
            )).all()
        return Renewal(renewed, {r.job_id: r.lease_owner for r in rows if r.lease_owner != self.owner},
                       {r.job_id for r in rows if r.lease_owner == self.owner})

    def renewal_lock(self, job_ids: Sequence[str]) -> Select[Any]:
        """The renewal's locking read: which of these jobs this process still owns, skipping
        those whose row is locked right now."""
        return by_job_key(select(failover_jobs.c.job_id)
                          .where(failover_jobs.c.job_id.in_(job_ids), failover_jobs.c.lease_owner == self.owner,
                                 _UNENDED)
                          .with_for_update(skip_locked=True))

    async def release(self, job_id: str, delay_seconds: float = 0.0) -> bool:
        """Hand one job back (it may be claimed again after `delay_seconds`); False if it was not
        this process's (taken over, or ended)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(failover_jobs)
                .where(failover_jobs.c.job_id == job_id, failover_jobs.c.lease_owner == self.owner,
                       _UNENDED)
                .values(lease_owner=None,
                        lease_expires_at=self._expiry(delay_seconds) if delay_seconds > 0 else None))
        return bool(result.rowcount)

    async def release_all(self) -> int:
        """Hand every unended job of this process back (SIGTERM), and those its intake process
        recorded but did not hand over (it has stopped by then): another may take them at once."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(failover_jobs)
                .where(failover_jobs.c.lease_owner.in_([self.owner, intake_owner(self.owner)]), _UNENDED)
                .values(lease_owner=None, lease_expires_at=None))
        return int(result.rowcount)
