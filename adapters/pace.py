"""The pace of calls to one endpoint: at most so many a second, and none while the endpoint
asked us to wait.

CloudStack's API throttling (the rate-limit plugin, `api.throttling.enabled`) allows an account
`api.throttling.max` calls in each window of `api.throttling.interval` seconds and refuses the
rest with 429 until the window ends ("please retry after [N] ms"). A refused call did nothing,
so it is always safe to make again; but hundreds of jobs at once must neither fail on it nor
hammer CloudStack while the window lasts. `CallPace` holds every call of the process until
then (`hold`), and can keep the process's own rate under a limit so the account's other users
(the platform's GUI, scripts) keep their share (`rate`).
"""

from __future__ import annotations

import asyncio
import time


class CallPace:
    """Turns for calls to one endpoint: `await turn()` before each call.

    With a `rate` (calls a second, 0: none), the turns are spaced 1/rate apart, first come first
    served; after `hold(seconds)` no turn is given until that time has passed, and the turns
    then resume spaced again (the ones waiting meanwhile take new places, in their order)."""

    def __init__(self, rate: float = 0.0) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._spacing = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0  # (monotonic) the earliest the next turn may be given
        self._held_until = 0.0

    @property
    def held_for(self) -> float:
        """Seconds until a hold ends (0: none)."""
        return max(0.0, self._held_until - time.monotonic())

    def hold(self, seconds: float) -> None:
        """No turn for `seconds` from now (a longer hold already given stays)."""
        self._held_until = max(self._held_until, time.monotonic() + seconds)

    async def turn(self) -> None:
        while True:
            now = time.monotonic()
            at = max(now, self._held_until, self._next)
            self._next = at + self._spacing
            if at > now:
                await asyncio.sleep(at - now)
            if self._held_until <= time.monotonic():
                return
