"""`adapters.pace.CallPace`: turns spaced to a rate, none during a hold, in order."""

from __future__ import annotations

import asyncio
import time

import pytest

from adapters.pace import CallPace, PaceTimeout


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


def _no_earlier_than(times: list[float], start: float, spacing: float) -> None:
    """The i-th turn came no earlier than its place: `start` + i spacings (a turn woken late
    does not move the places of the others; the clock's slack allowed)."""
    late = [(i, t - start) for i, t in enumerate(sorted(times)) if t < start + i * spacing - 0.003]
    assert not late, (late, spacing)


async def test_turns_are_spaced_to_the_rate_first_come_first_served() -> None:
    start = time.monotonic()
    times = await _turns(CallPace(rate=50.0), 6)
    _no_earlier_than(times, start, 0.02)  # 1/50 s apart
    assert times == sorted(times)


async def test_a_hold_stops_every_turn_until_it_ends_and_the_waiting_ones_go_spaced_after_it() -> None:
    pace = CallPace(rate=50.0)
    held_at: list[float] = []

    def hold() -> None:
        held_at.append(time.monotonic())
        pace.hold(0.3)

    times = await _turns(pace, 5, on_first=hold)
    _no_earlier_than(sorted(times)[1:], held_at[0] + 0.3, 0.02)  # none during the hold, spaced after it
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
    held = time.monotonic()
    pace.hold(0.5)
    assert 0.05 <= pace.spacing <= 0.05 * 1.1 * 1.2, pace.spacing  # (0.5 s + the calls' own time) / 10, +10 %
    learned = pace.spacing
    times = await _turns(pace, 4)
    _no_earlier_than(times, held + 0.5, learned)
    await asyncio.sleep(0.45)  # (the quiet spell the pace is told to wait for: nothing to wait on)
    await pace.turn()
    spells = int((time.monotonic() - held) // 0.4)  # (0.4 s each since the refusal: halved for each)
    assert learned / 2 ** (spells + 1) <= pace.spacing <= learned / 2 ** max(spells - 1, 1), (pace.spacing, spells)


async def test_a_refusal_with_nothing_through_since_the_last_widens_the_spacing() -> None:
    pace = CallPace()
    pace.ok()
    pace.hold(0.1)
    first = pace.spacing
    await pace.turn()  # (after the hold)
    pace.hold(0.1)  # refused again before any call got through
    assert pace.spacing >= 2 * first


async def test_a_learned_spacing_is_never_wider_than_the_window_and_a_stale_refusal_teaches_nothing() -> None:
    pace = CallPace()
    for _ in range(8):  # refused again and again with nothing through: each doubles it, up to the window
        await pace.turn()  # (once the last hold ended)
        sent = time.monotonic()
        pace.hold(0.02, sent)
    assert 0.5 < pace.spacing <= 1.0, pace.spacing
    learned = pace.spacing
    pace.hold(0.2, sent_at=sent - 10)  # sent before the last hold ended: an old window's
    assert pace.spacing == learned


async def test_no_turn_is_given_past_the_callers_deadline() -> None:
    pace = CallPace()
    pace.hold(5.0)
    with pytest.raises(PaceTimeout):
        await pace.turn(deadline=time.monotonic() + 0.1)
