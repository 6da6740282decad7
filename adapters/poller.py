"""One poll for many waits: the rounds of an adapter's shared poller.

A job waiting on CloudStack or the Volume Daemon used to poll its own async job or operation
every `FAILOVER_POLL_INTERVAL_SECONDS`: with a thousand jobs waiting at once, a thousand
requests per interval, most answering "still running", and the orchestrator's one core spent
on them. Here every wait registers with its adapter's poller, which runs one round per
interval for all of them: while few waits are pending, each is asked about on its own, as
before; from `min_batch` on, one listing (CloudStack's `listAsyncJobs`, the Volume Daemon's
`GET /operations?status=`) answers for all, and only what the listing does not settle is asked
about on its own.

A new wait is asked about at once, before it joins the rounds, while that pays: while the
rounds poll each wait on its own anyway, or while recent first asks mostly found the work
already done (a quick CloudStack call, an idle daemon). Once the rounds list for many waits and
first asks mostly find the work still running (CloudStack's async jobs take seconds to
minutes), a new wait joins the next round instead: one request fewer per wait, for up to a
round more before its end is seen. One new wait in `PROBE_EVERY` still asks at once, so the
poller notices when the work gets quick again.

A system that can say when its work is done (CloudStack's event bus: adapters/cloudstack_events.py)
`poke`s the poller: that key is asked about at once, on its own, instead of at the next round,
so a wait ends as its work does. A poke is a hint: its ask settles the wait only with the
work's result; an ask that raises (the work failed, or the ask did) or finds the work still
running leaves the wait to the rounds, which settle it as before. A poke for a key nobody waits
on yet is kept for a while: its wait, when it begins, asks at once.

A listing that fails is replaced, for that round, by each wait's own poll, whose error (the
system unreachable, an answer of the wrong shape) is that wait's, as before; a listing refused
as such (not allowed, no such route) turns batching off for good. A wait that is cancelled
(its job's lease is gone) leaves the round at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from statemachine.errors import TransientError

T = TypeVar("T")
log = logging.getLogger("failover.adapters")

# what a poll learns of one wait: its outcome (done), None (still running), or its error
Outcome: TypeAlias = T | BaseException | None

PROBE_EVERY = 8  # while new waits join the rounds without asking, one in this many still asks
POKE_KEPT = 120.0  # seconds a poke for a key nobody waits on yet is kept (its wait may begin later)
POKES_KEPT = 10_000  # at most this many such pokes are kept (the oldest go first)
_PAYS_WEIGHT = 1 / 8  # weight of the latest first ask in the running share that found work done


@dataclass(slots=True)
class _Wait(Generic[T]):
    future: asyncio.Future[T]
    deadline: float
    timed_out: Callable[[], BaseException]


class SharedPoller(Generic[T]):
    """`wait(key, ...)` resolves when a round finds `key` done (or failed, or past its deadline).

    `poll_one(key)`: the outcome of one key (raises on failure). `poll_many(keys)`: outcomes of
    many keys at once, by key; a key it leaves out is polled with `poll_one` in the same round.
    `note` is whatever the wait's first (own) poll learned that `poll_many` can use."""

    def __init__(self, interval: float, min_batch: int, poll_one: Callable[[str], Awaitable[T | None]],
                 poll_many: Callable[[Mapping[str, object]], Awaitable[dict[str, Outcome[T]]]], *,
                 unsupported: Callable[[BaseException], bool] = lambda exc: False,
                 asked_to_wait: Callable[[BaseException], bool] = lambda exc: False,
                 listing: str = "the listing") -> None:
        self.interval = interval
        self.min_batch = min_batch
        # a refusal of the listing itself (an API the key's role may not call, a daemon without
        # the route) is for good: from then on every wait is polled on its own
        self._unsupported = unsupported
        # the listing failed because the endpoint asked us to wait (CloudStack's API limit): the
        # round asks nothing more (one ask per wait would be many calls where one was too many)
        self._asked_to_wait = asked_to_wait
        self._listing = listing
        self._poll_one = poll_one
        self._poll_many = poll_many
        self._waits: dict[str, list[_Wait[T]]] = {}
        self._notes: dict[str, object] = {}
        self._task: asyncio.Task[None] | None = None
        # the running share of first asks that found the work done (starts as if they all did)
        self._pays = 1.0
        self._passed = 0  # new waits that could have skipped their first ask
        self._poked: dict[str, float] = {}  # pokes for keys nobody waited on yet: monotonic time
        self._asking: dict[str, asyncio.Task[None]] = {}  # the asks pokes started, by key
        self.pokes_settled = 0  # waits a poke's ask ended (the rest were ended by the rounds)

    @property
    def pending(self) -> int:
        return len(self._waits)

    def ask_first(self) -> bool:
        """Whether a new wait should ask about its key at once (then tell `asked_first` what it
        found) rather than leave its first look to the next round."""
        if len(self._waits) < self.min_batch or self._pays >= 0.5:
            return True
        self._passed += 1
        return self._passed % PROBE_EVERY == 0

    def renote(self, key: str, note: object) -> None:
        """What a round learned about a pending wait that `poll_many` can use better (a job's
        own start, in place of the lower bound it joined with)."""
        if key in self._waits:
            self._notes[key] = note

    def asked_first(self, done: bool) -> None:
        """A first ask found the work done (`done`) or still running."""
        self._pays += ((1.0 if done else 0.0) - self._pays) * _PAYS_WEIGHT

    def poke(self, key: str) -> None:
        """`key`'s work is said to be done: ask about it now, on its own (kept for its wait
        if none has begun)."""
        if key in self._waits:
            self._ask_now(key)
            return
        self._poked.pop(key, None)  # (kept in the order of the pokes: a dict keeps its insertions')
        self._poked[key] = time.monotonic()
        while len(self._poked) > POKES_KEPT:  # the oldest go first
            del self._poked[next(iter(self._poked))]

    def _ask_now(self, key: str) -> None:
        if key not in self._asking:
            self._asking[key] = asyncio.get_running_loop().create_task(self._ask(key), name="shared-poller-poke")

    async def _ask(self, key: str) -> None:
        try:
            outcome = await self._poll_one(key)
        except Exception as exc:  # a hint's ask: its failure is not the wait's (the rounds go on)
            log.debug("asking about %s after a push failed (%s: %s); the poll rounds go on", key,
                      type(exc).__name__, exc)
            return
        finally:
            self._asking.pop(key, None)
        if outcome is not None and key in self._waits:
            self.pokes_settled += 1
            self._settle({key: outcome})

    async def wait(self, key: str, timeout: float, timed_out: Callable[[], BaseException],
                   note: object = None) -> T:
        loop = asyncio.get_running_loop()
        w = _Wait[T](loop.create_future(), time.monotonic() + timeout, timed_out)
        self._waits.setdefault(key, []).append(w)
        if note is not None:
            self._notes[key] = note
        poked = self._poked.pop(key, None)
        if poked is not None and time.monotonic() - poked < POKE_KEPT:
            self._ask_now(key)  # said done before its wait began
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="shared-poller")
        try:
            return await w.future
        finally:
            waits = self._waits.get(key)
            if waits is not None:
                if w in waits:
                    waits.remove(w)
                if not waits:
                    del self._waits[key]
                    self._notes.pop(key, None)

    async def _run(self) -> None:
        took = 0.0
        try:
            while self._waits:
                # a round per interval, counted from the start of the last (a slow listing does
                # not stretch it); twice as often while a listing answers for many waits (a few
                # requests a round, however many waits): a finished job is seen sooner
                batched = len(self._waits) >= self.min_batch
                await asyncio.sleep(max(0.0, (self.interval / 2 if batched else self.interval) - took))
                began = time.monotonic()
                try:
                    await self._round()
                except Exception as exc:  # never leave a wait hanging on a bug of the round
                    log.exception("shared poller: a round failed")
                    self._settle({k: exc for k in self._waits})
                took = time.monotonic() - began
        finally:  # stopped (the loop is closing): no wait may be left without anyone polling for it
            gone = TransientError("POLLER_STOPPED", "the adapter's poller stopped; the wait is tried again")
            self._settle({k: gone for k in self._waits})

    async def _round(self) -> None:
        keys = list(self._waits)
        if not keys:
            return
        outcomes: dict[str, Outcome[T]] = {}
        if len(keys) >= self.min_batch:
            try:
                outcomes = await self._poll_many({k: self._notes.get(k) for k in keys})
            except Exception as exc:  # this round, each wait is polled on its own instead
                if self._asked_to_wait(exc):
                    log.warning("%s failed (%s); this round asks nothing more, the next one lists again",
                                self._listing, exc)
                    self._settle({k: None for k in keys})  # (only the waits past their deadline end)
                    return
                if self._unsupported(exc):
                    self.min_batch = 2**62
                    log.warning("%s was refused (%s); every wait is polled on its own from now on: allow it "
                                "to poll many waits with one request", self._listing, exc)
                else:
                    log.warning("%s failed (%s: %s); this round polls each wait on its own", self._listing,
                                type(exc).__name__, exc)
        alone = [k for k in keys if k not in outcomes]
        if alone:
            got = await asyncio.gather(*(self._poll_one(k) for k in alone), return_exceptions=True)
            outcomes.update(zip(alone, got, strict=True))
        self._settle(outcomes)

    def _settle(self, outcomes: Mapping[str, Outcome[T]]) -> None:
        now = time.monotonic()
        for key, outcome in outcomes.items():
            for w in list(self._waits.get(key, ())):
                if w.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    # a copy per wait: the engine notes its attempts on the error it catches
                    w.future.set_exception(_own(outcome))
                elif outcome is not None:
                    w.future.set_result(outcome)
                elif now >= w.deadline:
                    w.future.set_exception(w.timed_out())


def _own(exc: BaseException) -> BaseException:
    """A copy of an error for one wait (its attributes, args and cause), without calling its
    `__init__`, whose signature is the error class's own."""
    clone = exc.__class__.__new__(exc.__class__)
    clone.__dict__.update(getattr(exc, "__dict__", {}))
    clone.args = exc.args
    clone.__cause__ = exc.__cause__
    return clone
