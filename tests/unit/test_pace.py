"""`adapters.pace.CallPace`: turns spaced to a rate, none during a hold, in order."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from adapters.pace import CallPace


async def _turns(pace: CallPace, n: int, on_first: object = None) -> list[float]:
    times: list[float] = []

    async def one(i: int) -> None:
        await pace.turn()
        times.append(time.monotonic())
        if i == 0 and callable(on_first):
            on_first()

    await asyncio.gather(*(one(i) for i in range(n)))
    return times


async def test_without_a_rate_or_a_hold_every_turn_is_given_at_once() -> None:
    began = time.monotonic()
    times = await _turns(CallPace(), 50)
    assert max(times) - began < 0.5  # (no wait: well under a second even on a busy machine)


async def test_turns_are_spaced_to_the_rate_first_come_first_served() -> None:
    times = await _turns(CallPace(rate=50.0), 6)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.02 - 0.003 for g in gaps), gaps  # 1/50 s apart (the clock's slack allowed)
    assert times == sorted(times)


async def test_a_hold_stops_every_turn_until_it_ends_and_the_waiting_ones_go_spaced_after_it() -> None:
    pace = CallPace(rate=50.0)
    held_at: list[float] = []

    def hold() -> None:
        held_at.append(time.monotonic())
        pace.hold(0.3)

    times = await _turns(pace, 5, on_first=hold)
    later = sorted(times)[1:]
    assert later[0] >= held_at[0] + 0.3 - 0.003, (held_at, later)  # none during the hold
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert all(g >= 0.02 - 0.003 for g in gaps), gaps  # and spaced again after it
    assert pace.held_for == 0.0


def test_a_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError):
        CallPace(rate=-1)


async def test_a_refusal_teaches_the_spacing_that_got_through_and_a_quiet_spell_relaxes_it() -> None:
    """Ten calls got through, then the eleventh was refused for 0.5 s: the window let ten
    through in about half a second, so the calls after the hold go about 0.05 s apart (with a
    margin), not all at once; after `relax_after` without a refusal the spacing halves."""
    pace = CallPace(relax_after=0.4)
    for _ in range(10):
        await pace.turn()
        pace.ok()
    pace.hold(0.5)
    assert 0.05 <= pace.spacing <= 0.05 * 1.1 * 1.2, pace.spacing  # (0.5 s + the calls' own time) / 10, +10 %
    learned = pace.spacing
    times = await _turns(pace, 4)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= learned - 0.003 for g in gaps), (gaps, learned)
    await asyncio.sleep(0.45)  # (the quiet spell the pace is told to wait for: nothing to wait on)
    await pace.turn()
    assert pace.spacing == learned / 2


async def test_a_refusal_with_nothing_through_since_the_last_widens_the_spacing() -> None:
    pace = CallPace()
    pace.ok()
    pace.hold(0.1)
    first = pace.spacing
    await pace.turn()  # (after the hold)
    pace.hold(0.1)  # refused again before any call got through
    assert pace.spacing >= 2 * first
