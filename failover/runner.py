"""The job runner: owns jobs through leases and drives them on the shared machine.

Jobs this process accepted start at once (it already holds their lease); others are claimed
when their lease is free or expired (`SKIP LOCKED`, never waiting on another process). A lease
is renewed while the job runs; a commit from a process that lost its lease writes nothing.
At most `max_concurrent_jobs` run at once; the rest wait in the database, none is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from transitions.extensions.asyncio import AsyncMachine

from adapters.db.store import JobStore
from statemachine.context import JobContext
from statemachine.engine import drive
from statemachine.ports import JobRow

log = logging.getLogger("failover.runner")


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
        self._adopted: deque[str] = deque()
        self._wake = asyncio.Event()
        self._stopping = False

    def adopt(self, job_id: str) -> None:
        """A job this process just accepted (and holds the lease of): run it soon."""
        self._adopted.append(job_id)
        self._wake.set()

    def state_changed(self, job_id: str, old: str | None, new: str | None) -> None:
        if new is None:
            self.entered.pop(job_id, None)
        else:
            self.entered[job_id] = (new, time.time())

    async def run(self) -> None:
        renew = asyncio.create_task(self._renew_loop(), name="lease-renewal")
        try:
            while not self._stopping:
                try:
                    await self._fill()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("claiming jobs failed (database unreachable?); retrying")
                    await asyncio.sleep(1.0)
                self._wake.clear()
                if self._adopted and len(self.running) < self.capacity:
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), self.claim_interval)
                except TimeoutError:
                    pass
        finally:
            renew.cancel()
            await asyncio.gather(renew, return_exceptions=True)

    async def _fill(self) -> None:
        while self._adopted and len(self.running) < self.capacity and not self._stopping:
            job_id = self._adopted.popleft()
            row = await self.store.load(job_id)
            if row is not None and row.job_id not in self.running:
                self._start(row)
        free = self.capacity - len(self.running)
        if free > 0 and not self._stopping:
            for row in await self.store.claim(free, self.lease_seconds):
                if row.job_id not in self.running:
                    self._start(row)

    def _start(self, row: JobRow) -> None:
        ctx = self.make_context(row)
        self.contexts[row.job_id] = ctx
        task = asyncio.create_task(self._drive(ctx), name=f"job-{row.job_id}")
        self.running[row.job_id] = task

    async def _drive(self, ctx: JobContext) -> None:
        job_id = ctx.row.job_id
        try:
            state = await drive(self.machine, ctx)
            log.debug("job %s stopped in state %s", job_id, state)
        except asyncio.CancelledError:
            log.warning("job %s interrupted mid-step; its lease will be released", job_id)
            raise
        except Exception:
            log.exception("job %s crashed in the engine; another attempt will resume it after its lease "
                          "expires", job_id)
        finally:
            self.running.pop(job_id, None)
            self.contexts.pop(job_id, None)
            self.entered.pop(job_id, None)
            self._wake.set()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if not self.running:
                continue
            try:
                await self.store.renew(self.lease_seconds)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("lease renewal failed (database unreachable?); retrying", exc_info=True)

    async def drain(self, timeout: float) -> None:
        """SIGTERM: stop claiming, let running jobs reach their next safe point, hand them back."""
        self._stopping = True
        self._wake.set()
        for ctx in self.contexts.values():
            ctx.draining = True
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=timeout)
        for task in list(self.running.values()):
            task.cancel()  # still mid-step after the drain time: the next owner looks up first
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=5)
        try:
            await self.store.release_all()
        except Exception:
            log.warning("could not release leases at shutdown; they expire in %.0f s", self.lease_seconds)
