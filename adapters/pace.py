"""The pace of calls to one endpoint: at most so many a second, and none while the endpoint
asked us to wait.

CloudStack's API throttling (the rate-limit plugin, `api.throttling.enabled`) allows an account
`api.throttling.max` calls in each window of `api.throttling.interval` seconds and refuses the
rest with 429 until the window ends ("please retry after [N] ms"). A refused call did nothing,
so it is always safe to make again; but hundreds of jobs at once must neither fail on it nor
hammer CloudStack while the window lasts. `CallPace` holds every call of the process until
then (`hold`), can keep the process's own rate under a limit so the account's other users (the
platform's GUI, scripts) keep their share (`rate`), and learns from a refusal the rate that got
through, so that the calls held meanwhile do not all go at once when the window ends (where all
but the limit's number would be refused again, at random, the unlucky ones again and again).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

_MARGIN = 1.1  # a learned spacing is this much wider than the one that met the limit
_MIN_SPACING = 0.001  # a learned spacing relaxed below this is dropped


class PaceTimeout(Exception):
    """No turn could be given before the caller's deadline."""


class CallPace:
    """Turns for calls to one endpoint: `await turn()` before each call, `ok()` after each that
    was not refused, `hold(seconds)` after one that was.

    Turns are spaced `spacing` apart, first come first served: 1/rate with a `rate` (calls a
    second, 0: none), or wider, as learned from a refusal: the calls that got through in the
    refused window (since the last hold's end, where CloudStack's next window begins; the first
    time, since a second or the refusal's wait before it), over the time from the first of them
    to the end of the window the refusal named. After
    `relax_after` seconds without a refusal, a learned spacing is halved (then halved again), so
    a limit raised meanwhile is found. During a hold no turn is given; the turns waiting then
    take new places after it, spaced, in their order."""

    def __init__(self, rate: float = 0.0, *, relax_after: float = 30.0) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._spacing = 1.0 / rate if rate > 0 else 0.0
        self._learned = 0.0
        self._relax_after = relax_after
        self._refused_at = 0.0  # (monotonic) the last refusal, or relaxation
        self._next = 0.0  # (monotonic) the earliest the next turn may be given
        self._held_until = 0.0
        self._since = 0.0  # (monotonic) the last hold's end
        self._oks: deque[float] = deque(maxlen=10_000)  # when the latest calls got through

    @property
    def spacing(self) -> float:
        """Seconds between two turns now (0: none)."""
        return max(self._spacing, self._learned)

    @property
    def held_for(self) -> float:
        """Seconds until a hold ends (0: none)."""
        return max(0.0, self._held_until - time.monotonic())

    def ok(self) -> None:
        """A call got through (was not refused for the limit)."""
        self._oks.append(time.monotonic())

    def hold(self, seconds: float, sent_at: float | None = None) -> None:
        """A call (sent at `sent_at`, monotonic) was refused until `seconds` from now: no turn
        until then (a longer hold already given stays). The first refusal of a window learns the
        spacing that keeps under it (at most the window's length, as far as it is known); one
        of a call sent before the last hold ended belongs to a window already learned from."""
        now = time.monotonic()
        stale = sent_at is not None and sent_at < self._since
        if now >= self._held_until and not stale:  # (the others of the same window say the same)
            began, through = now, 0  # the window's first call that got through, and how many did
            look_from = max(self._since, now - max(seconds, 1.0))
            for at in reversed(self._oks):
                if at < look_from:
                    break
                began, through = at, through + 1
            span = now - began + seconds
            if through:
                learned = span / through * _MARGIN
            else:  # not one got through at the spacing learned: twice as wide
                learned = max(self._learned * 2, span / 2)
            self._learned = min(learned, max(seconds, 1.0))
            self._since, self._refused_at = now + seconds, now
        self._held_until = max(self._held_until, now + seconds)

    async def turn(self, deadline: float | None = None) -> None:
        """Wait for a turn; `PaceTimeout` if it would come after `deadline` (monotonic)."""
        while True:
            now = time.monotonic()
            if self._learned and (quiet := int((now - self._refused_at) // self._relax_after)) > 0:
                self._learned /= 2 ** min(quiet, 60)  # (halved for each quiet spell gone by)
                self._learned = self._learned if self._learned >= _MIN_SPACING else 0.0
                self._refused_at += quiet * self._relax_after
            at = max(now, self._held_until, self._next)
            if deadline is not None and at > deadline:
                raise PaceTimeout
            self._next = at + self.spacing
            if at > now:
                await asyncio.sleep(at - now)
            if self._held_until <= time.monotonic():
                return
