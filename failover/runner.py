"""The job runner: owns jobs through leases and drives them on the shared machine.

Jobs this process accepted start at once (it already holds their lease); others are claimed
when their lease is free or expired, or when this process owns them but does not run them
(its hand-over was lost, or its run stopped), without waiting on another process's locks.
Every commit of a job leaves at least five sixths of its lease (the store fences commits: this
process's lease, not expired; it renews the lease once a sixth has run); while a job waits on
the outside world the runner renews its lease. A job whose lease this process can no longer
vouch for (renewals failing or late: the database is unreachable, the event loop starved) is
stopped a fifth of the lease before the lease could run out, so no other process ever acts on
it at the same time; a job whose lease another
process took is stopped at once. A job's first action after it is taken is a fenced commit,
so a process that lost the race for it does nothing. At most `max_concurrent_jobs` run at
once; the rest wait in the database, none is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import aiohttp
from sqlalchemy.exc import DBAPIError
from transitions.extensions.asyncio import AsyncMachine

from adapters.db.engine import is_connection_error
from adapters.db.store import JobStore
from statemachine.context import JobContext
from statemachine.engine import drive, is_ended
from statemachine.ports import JobRow

log = logging.getLogger("failover.runner")


# a renewal asks again this soon about the jobs it passed by (their rows were locked), then
# after twice as long each time
RENEWAL_RETRY_SECONDS = 0.05
# how late a renewal round may wake (a busy event loop) for the jobs it passed by to stay safe
RENEWAL_LAG_ALLOWANCE = 0.5


def _outside_trouble(exc: BaseException) -> bool:
    """A crash the database or the network may have caused (and may stop causing): never
    counted towards giving a job up. The rest are the engine's own: a bug, or data it cannot
    read."""
    return isinstance(exc, (DBAPIError, OSError, aiohttp.ClientError))


_OURS = ("statemachine", "adapters", "failover", "consumers", "publishers", "schemas")


def _where(exc: BaseException) -> str:
    """The innermost frame of the project's own code in the traceback: package/file:line (no
    values, so no secret can ride into an event)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if any(part in _OURS for part in Path(f.filename).parts[-3:-1])] or frames
    if not ours:
        return "?"
    path = Path(ours[-1].filename)
    return f"{path.parent.name}/{path.name}:{ours[-1].lineno}"


class JobRunner:
    def __init__(self, store: JobStore, machine: AsyncMachine, make_context: Callable[[JobRow], JobContext], *,
                 capacity: int, lease_seconds: float, claim_interval: float) -> None:
        self.store = store
        self.machine = machine
        self.make_context = make_context
        self.capacity = capacity
        self.lease_seconds = lease_seconds
        self.claim_interval = claim_interval
        self.running: dict[str, asyncio.Task[None]] = {}
        self.contexts: dict[str, JobContext] = {}
        self.entered: dict[str, tuple[str, float]] = {}  # job -> (state, since) for the gauges
        # told (state before, state after) whenever a job of this process changes state, starts
        # or stops here: the in-progress gauge moves by one instead of being recounted
        self.on_state: Callable[[str | None, str | None], None] = lambda before, after: None
        self._adopted: deque[str] = deque()
        # of the adopted, the live failovers: started before the others (a disaster's failovers do
        # not wait behind a DR test's wave for this process's room)
        self._first: deque[str] = deque()
        # jobs being recorded whose first event is not yet confirmed by the broker: not claimed
        # (the job's next events would go out before it), started once adopted. Counted: two
        # deliveries of one request (a client's retry) each hold it until each is done
        self._held: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._stopping = False
        # until when (monotonic) this process can vouch for each running job's lease: the
        # lease was set no earlier than the moment we asked for it
        self._valid_until: dict[str, float] = {}
        self._crashes: dict[str, int] = {}
        # job -> (where it was: its recorded state and failed step, crashes in a row there, the
        # last one's exception): the engine's own crashes, not the database's or the network's
        # (statemachine.engine.ENGINE_CRASH_LIMIT)
        self._engine_crashes: dict[str, tuple[tuple[str, str | None], int, str]] = {}
        self._lost: set[str] = set()  # stopped because the lease is (or may be) gone
        self._stopped_at: dict[str, float] = {}  # when each of those was (last) stopped (monotonic)
        self._recancelled: set[str] = set()  # of those, the ones cancelled again
        # a job is stopped this long before its lease could run out (event-loop lag, a slow
        # database): a fifth of the lease
        self.margin = lease_seconds / 5
        store.on_lease = self._extended  # a commit extends the job's lease
        store.on_commit = self._committed
        self._active: set[str] = set()  # jobs this process has committed for since taking them
        self._loop_done: asyncio.Event | None = None  # set when the claiming loop has exited
        self._renew_task: asyncio.Task[None] | None = None

    @property
    def owner(self) -> str:
        return self.store.owner

    def hold(self, job_id: str) -> None:
        """A command that may create job `job_id` is being recorded: until `adopt` or `unhold`,
        this process's claims pass it by. (The recorder gives this process the job's lease as
        it commits; a claim in between, taking a job this process owns but does not run, would
        start it while its `JobAccepted` is still on its way to the broker.)"""
        self._held[job_id] += 1

    def unhold(self, job_id: str) -> None:
        """The delivery that held `job_id` is done (adopted, a duplicate, failed)."""
        left = self._held[job_id] - 1
        if left > 0:
            self._held[job_id] = left
        else:  # (pop: an unhold with no hold left, from an intake whose holds were released, is no error)
            self._held.pop(job_id, None)

    def adopt(self, job_id: str, first: bool = False) -> None:
        """A job this process just accepted (and holds the lease of): run it soon, in its turn;
        `first` (a live failover) before every job adopted without it."""
        (self._first if first else self._adopted).append(job_id)
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Adopted jobs waiting for this process's room."""
        return len(self._first) + len(self._adopted)

    @property
    def waiting_first(self) -> int:
        """Of those, the ones that go first (live failovers)."""
        return len(self._first)

    def state_changed(self, job_id: str, old: str | None, new: str | None) -> None:
        before = self.entered.pop(job_id, None)
        if new is not None:
            self.entered[job_id] = (new, time.time())
        self.on_state(before[0] if before else None, new)

    async def run(self) -> None:
        self._loop_done = asyncio.Event()
        renew = asyncio.create_task(self._renew_loop(), name="lease-renewal")
        try:
            while not self._stopping:
                try:
                    await self._fill()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if is_connection_error(exc):
                        log.warning("claiming jobs failed: the database is unreachable (%s); retrying",
                                    type(exc).__name__)
                    else:
                        log.exception("claiming jobs failed; retrying")
                    await asyncio.sleep(1.0)
                self._wake.clear()
                if self.waiting and len(self.running) < self.capacity:
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), self.claim_interval)
                except TimeoutError:
                    pass
        finally:
            self._loop_done.set()
            if not self._stopping:
                renew.cancel()
                await asyncio.gather(renew, return_exceptions=True)
            else:  # keep renewing the jobs still finishing their steps until the drain ends
                self._renew_task = renew  # cancelled by drain()

    async def _fill(self) -> None:
        while self.waiting and len(self.running) < self.capacity and not self._stopping:
            # all the adopted jobs there is room for, in one transaction: one at a time, a
            # thousand accepted at once took 20 s to start while the first ones ran
            room = self.capacity - len(self.running)
            batch: list[str] = []
            firsts = 0  # of the batch, those from `_first` (they lead it)
            while self.waiting and len(batch) < room:
                first = bool(self._first)
                job_id = (self._first or self._adopted).popleft()
                if job_id not in self.running and job_id not in batch:
                    batch.append(job_id)
                    firsts += first
            if not batch:
                continue
            asked = time.monotonic()
            # the recorder gave this process the leases; take them afresh (a job may have waited
            # here for capacity), except those another process has claimed meanwhile
            try:
                rows = await self.store.take(batch, self.lease_seconds)
            except BaseException:  # tried again by the next round, each in its place
                self._first.extendleft(reversed(batch[:firsts]))
                self._adopted.extendleft(reversed(batch[firsts:]))
                raise
            by_id = {row.job_id: row for row in rows}
            for job_id in batch:  # (in the batch's order: the live failovers first)
                row = by_id.get(job_id)
                if row is not None and row.job_id not in self.running and not is_ended(row.status):
                    self._start(row, asked, taken_over=False)
        free = self.capacity - len(self.running)
        if free > 0 and not self._stopping:
            asked = time.monotonic()
            busy = [*self.running, *self._held]
            for row in await self.store.claim(free, self.lease_seconds, running=busy):
                if row.job_id in self._held:  # held while the claim ran: adopted or claimed later
                    continue
                if row.job_id not in self.running and not self._stopping:
                    self._start(row, asked, taken_over=True)

    def _start(self, row: JobRow, lease_from: float, *, taken_over: bool) -> None:
        ctx = self.make_context(row)
        ctx.owner = self.owner
        ctx.taken_over = taken_over and (row.status != "pending" or row.last_sequence > 1)
        job_id = row.job_id
        crashed = self._engine_crashes.get(job_id)
        if crashed is not None and crashed[0] == (row.status, row.failed_step):
            ctx.engine_crashes = crashed[1:]
        self.contexts[job_id] = ctx
        self._valid_until[job_id] = lease_from + self.lease_seconds
        task = asyncio.create_task(self._drive(ctx), name=f"job-{job_id}")
        self.running[job_id] = task
        # also when the task is cancelled before it ever ran (then _drive's finally never runs)
        task.add_done_callback(lambda t, job_id=job_id: self._forget(job_id, t))  # type: ignore[misc]

    def _forget(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self.running.get(job_id) is task:
            del self.running[job_id]
            self.contexts.pop(job_id, None)
            self.state_changed(job_id, None, None)  # it no longer runs here
            self._valid_until.pop(job_id, None)
            self._active.discard(job_id)
            self._lost.discard(job_id)
            self._stopped_at.pop(job_id, None)
            self._recancelled.discard(job_id)
            self._wake.set()

    def _committed(self, job_id: str) -> None:
        """A commit of the job succeeded: from the first one on, this process acts on the job
        (every drive begins with a fenced commit: what came before it did nothing)."""
        if job_id in self.running and job_id not in self._active:
            self._active.add(job_id)
            log.info("acting on job %s", job_id,
                     extra={"job_id": job_id, "fields": {"drive": "active", "owner": self.owner}})

    async def _drive(self, ctx: JobContext) -> None:
        job_id = ctx.row.job_id
        state: str | None = None
        crashed = False
        log.info("driving job %s from state %s", job_id, ctx.row.status,
                 extra={"job_id": job_id, "fields": {"drive": "start", "owner": self.owner,
                                                     "state": ctx.row.status}})
        try:
            try:
                state = await drive(self.machine, ctx)
                log.debug("job %s stopped in state %s", job_id, state)
            except asyncio.CancelledError:
                if job_id not in self._lost:
                    log.warning("job %s interrupted mid-step; its lease will be released", job_id)
                    raise
                log.warning("job %s stopped mid-step: its lease is gone or could not be renewed; the "
                            "next owner looks up what this run did", job_id)
            except Exception as exc:
                crashed = True
                if is_connection_error(exc):  # a commit failed: its outcome is unknown, so stop here
                    log.warning("job %s stopped: the database is unreachable (%s); it will be resumed from "
                                "its recorded state", job_id, type(exc).__name__)
                else:
                    log.exception("job %s crashed in the engine; it will be resumed from its recorded state",
                                  job_id)
                    if not _outside_trouble(exc):
                        at = (ctx.row.status, ctx.row.failed_step)  # (as last committed)
                        last = self._engine_crashes.get(job_id)
                        n = last[1] + 1 if last is not None and last[0] == at else 1
                        self._engine_crashes[job_id] = (at, n, f"{type(exc).__name__} in {_where(exc)}")
            if not crashed:
                self._engine_crashes.pop(job_id, None)
            if state is not None and is_ended(state):
                self._crashes.pop(job_id, None)
            elif not self._stopping and job_id not in self._lost and not ctx.draining:
                # a crash (database gone mid-commit?) or a lease lost at a commit: hand the job
                # back (while it still counts as running here, so that this process's own claim
                # does not take it in between) for whoever can to resume it, after a growing
                # pause when it keeps crashing
                n = self._crashes.get(job_id, 0) + 1 if crashed else 0
                self._crashes[job_id] = n
                delay = min(self.lease_seconds, 0.5 * 2 ** n) if crashed else 0.0
                try:
                    if await self.store.release(job_id, delay):
                        log.info("handed job %s back in state %s: claimable again in %.1f s", job_id, state,
                                 delay, extra={"job_id": job_id, "fields": {"drive": "release", "owner": self.owner}})
                    else:
                        log.info("job %s, stopped in state %s, is no longer this process's (taken over, or "
                                 "ended)", job_id, state,
                                 extra={"job_id": job_id, "fields": {"drive": "release", "owner": self.owner}})
                except Exception:
                    log.warning("could not hand job %s back (database unreachable?); its lease expires "
                                "in at most %.0f s", job_id, self.lease_seconds)
        finally:
            log.info("stopped driving job %s", job_id,
                     extra={"job_id": job_id, "fields": {"drive": "end", "owner": self.owner, "state": state}})
            task = asyncio.current_task()
            if task is not None:
                self._forget(job_id, task)

    # ------------------------------------------------------------------ leases

    def _extended(self, job_id: str, until: float) -> None:
        if job_id in self._valid_until and job_id not in self._lost:
            self._valid_until[job_id] = max(self._valid_until[job_id], until)

    def _stop_job(self, job_id: str, why: str) -> None:
        task = self.running.get(job_id)
        if task is None or task.done() or job_id in self._lost:
            return
        self._lost.add(job_id)
        self._stopped_at[job_id] = time.monotonic()
        # from here on the job's task does nothing more: it is cancelled at its current await
        log.warning("stopping job %s: %s", job_id, why,
                    extra={"job_id": job_id, "fields": {"drive": "stop", "owner": self.owner}})
        task.cancel()

    def _enforce(self) -> None:
        """Stop every job whose lease may expire before we could renew it; cancel again a job
        stopped a margin ago whose task still runs (a step that swallowed the cancel)."""
        now = time.monotonic()
        for job_id, since in list(self._stopped_at.items()):
            task = self.running.get(job_id)
            if task is None or task.done():
                del self._stopped_at[job_id]
                self._recancelled.discard(job_id)
            elif now - since > self.margin:
                # warned once per stop; then quietly again, every margin, until it ends
                level = logging.WARNING if job_id not in self._recancelled else logging.DEBUG
                self._recancelled.add(job_id)
                log.log(level, "job %s is still running %.1f s after it was stopped (a step that ignores "
                        "cancellation?); cancelling it again (this process takes it up again only once it "
                        "has stopped)", job_id, now - since, extra={"job_id": job_id})
                self._stopped_at[job_id] = now
                task.cancel()
        for job_id, until in list(self._valid_until.items()):
            if now >= until - self.margin:
                self._stop_job(job_id, f"its lease runs out in {until - now:.1f} s and was not renewed in time "
                                       "(database unreachable or slow?), so another process may take it over")

    async def _renew_loop(self) -> None:
        enforcer = asyncio.create_task(self._enforce_loop(), name="lease-enforcement")
        try:
            await self._renewals()
        finally:
            enforcer.cancel()
            await asyncio.gather(enforcer, return_exceptions=True)

    async def _enforce_loop(self) -> None:
        """Independent of the renewals (which may hang on a dead database): stop in time."""
        tick = self.margin / 2
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            lag = time.monotonic() - before - tick
            if lag > self.margin:
                log.warning("the event loop lagged %.1f s (CPU starved?): leases may run out before they "
                            "are renewed", lag)
            self._enforce()

    async def _renewals(self) -> None:
        interval = self.lease_seconds / 3
        due = time.monotonic()
        while True:  # at a fixed rate: a round that took long does not push the next one back
            due = max(due + interval, time.monotonic())
            await asyncio.sleep(due - time.monotonic())
            await self.renew_due(interval, scheduled=due)

    async def renew_due(self, interval: float, scheduled: float | None = None) -> None:
        """One renewal round: the leases of the running jobs that are due, in one UPDATE. A job
        whose row was locked is passed by (by its own commit, as a rule, which renews its lease
        itself); one whose lease that commit did not renew is asked about again within the
        round, for up to half the interval, not a round later: two rounds passed by in a row
        stop it."""
        began = time.monotonic()
        scheduled = began if scheduled is None else scheduled
        ids = self._to_renew(scheduled, interval)
        pause = RENEWAL_RETRY_SECONDS
        while ids:
            asked = time.monotonic()
            try:
                renewed, others, locked = await asyncio.wait_for(self.store.renew(ids, self.lease_seconds),
                                                                 self.lease_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease renewal failed (%s); retrying", type(exc).__name__)
                return
            for job_id in ids:
                if job_id in others:
                    owner = others[job_id]
                    self._stop_job(job_id, f"its lease was taken over by {owner}" if owner
                                   else "its lease was released")
                elif job_id in renewed and job_id in self._valid_until:
                    self._valid_until[job_id] = max(self._valid_until[job_id], asked + self.lease_seconds)
            if not locked:
                return
            if time.monotonic() + pause - began > interval / 2:
                for job_id in sorted(locked & set(self._to_renew(scheduled, interval))):
                    log.warning("the lease of job %s was not renewed: its row stayed locked for %.1f s (a long "
                                "transaction on failover_jobs?); the next round, in under %.1f s, asks again",
                                job_id, time.monotonic() - began, interval, extra={"job_id": job_id})
                return
            await asyncio.sleep(pause)
            pause *= 2
            ids = [j for j in self._to_renew(scheduled, interval) if j in locked]

    def _to_renew(self, scheduled: float, interval: float) -> list[str]:
        """The running jobs whose leases are due at the round scheduled for `scheduled`: all but
        those that, passed by now, would still be renewed in time by the next round, scheduled
        `interval` later, waking up to `RENEWAL_LAG_ALLOWANCE` late and retrying for half an
        interval, before the enforcer stops them a margin before their leases could run out. At
        the default 30 s lease a job whose lease a commit renewed in the last 3.5 s is passed by
        (each commit leaves at least five sixths of it, adapters/db/store.py)."""
        deadline = scheduled + 1.5 * interval + RENEWAL_LAG_ALLOWANCE + self.margin
        return [j for j in self.running if j not in self._lost and self._valid_until.get(j, 0.0) < deadline]

    async def drain(self, timeout: float) -> None:
        """SIGTERM: stop claiming, let running jobs reach their next safe point, hand them back."""
        self._stopping = True
        self._wake.set()
        began = time.monotonic()
        loop_done = self._loop_done
        if loop_done is not None:  # let a claim in progress finish: what it took is released below
            try:
                await asyncio.wait_for(loop_done.wait(), timeout)
            except TimeoutError:
                pass
        for ctx in self.contexts.values():
            ctx.draining = True
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=max(0.1, timeout - (time.monotonic() - began)))
        for task in list(self.running.values()):
            task.cancel()  # still mid-step after the drain time: the next owner looks up first
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=5)
        renew = self._renew_task
        if renew is not None:
            renew.cancel()
            await asyncio.gather(renew, return_exceptions=True)
        try:  # a group commit already sent ends before the leases go (its fences are ours)
            await asyncio.wait_for(self.store.drain(), 5)
        except TimeoutError:
            pass
        try:
            released = await asyncio.wait_for(self.store.release_all(), 5)
            log.info("handed %d job(s) back", released)
        except Exception:
            log.warning("could not release leases at shutdown; they expire in %.0f s", self.lease_seconds)
