"""Many waits at once, against the emulators over real HTTP: the adapters' shared poller asks
about all of them with one listing per round (CloudStack's listAsyncJobs, the Volume Daemon's
GET /operations?status=) instead of one request per wait, and each wait still ends as its own
poll would have ended it: its result, its failure, its timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from adapters.poller import PROBE_EVERY, SharedPoller
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from statemachine.errors import StepError, TransientError

from .conftest import CloudStackFactory, DaemonFactory

N = 12
LATENCY = 0.4
ROUND = 0.05


async def _volumes(control: EmulatorControl, emu: EmulatorHandle, n: int = N) -> list[str]:
    return [str((await control.create_volume(f"disk-{i}", 10, vm_id=emu.appliance_vm_id))["id"]) for i in range(n)]


async def test_many_cloudstack_waits_share_one_listing_per_round(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    cs = make_cloudstack(poll_interval=ROUND, batch_from=1)  # listing from the first wait: exact counts below
    volumes = await _volumes(control, emu)
    await control.set_latency(async_job_seconds=LATENCY)
    started = [await cs.create_snapshot(v, f"snap-{i}") for i, v in enumerate(volumes)]
    results = await asyncio.gather(*(cs.wait_job(s.job_id, timeout=10) for s in started))

    # each wait got its own job's result
    assert [r["snapshot"]["id"] for r in results] == [s.resource_id for s in started]
    assert all(r["snapshot"]["state"] == "BackedUp" for r in results)
    queries = await control.calls(api="cloudstack", command="queryAsyncJobResult")
    listings = await control.calls(api="cloudstack", command="listAsyncJobs")
    # one own query per wait (at once, before it joins the rounds), then listings only: a count
    # and a page per round, rounds twice per interval, so far fewer requests than the waits
    # polling alone would have made (each about once per interval)
    assert len(queries) == N
    alone = N * LATENCY / ROUND
    assert 1 <= len(listings) <= alone / 2, (len(listings), alone)
    assert all(call["params"].get("startdate") for call in listings)


async def test_few_cloudstack_waits_are_polled_on_their_own(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    """Below `batch_from` a listing of the account's jobs costs more than it saves."""
    cs = make_cloudstack(poll_interval=ROUND, batch_from=8)
    volumes = await _volumes(control, emu, 2)
    await control.set_latency(async_job_seconds=LATENCY)
    started = [await cs.create_snapshot(v, f"snap-{i}") for i, v in enumerate(volumes)]
    await asyncio.gather(*(cs.wait_job(s.job_id, timeout=10) for s in started))
    assert await control.calls(api="cloudstack", command="listAsyncJobs") == []
    assert len(await control.calls(api="cloudstack", command="queryAsyncJobResult")) > 2 * 2


async def test_a_failed_job_in_a_listing_fails_its_own_wait_only(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    cs = make_cloudstack(poll_interval=ROUND, batch_from=8)
    volumes = await _volumes(control, emu)
    await control.set_latency(async_job_seconds=LATENCY)
    await control.add_fault("cloudstack", "async_fail", command="createSnapshot", nth=5)
    started = [await cs.create_snapshot(v, f"snap-{i}") for i, v in enumerate(volumes)]
    results: list[Any] = await asyncio.gather(*(cs.wait_job(s.job_id, timeout=10) for s in started),
                                              return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [4]
    error = results[4]
    assert isinstance(error, TransientError) and error.code == "CLOUDSTACK_JOB_FAILED"
    assert started[4].job_id in error.message
    assert await control.calls(api="cloudstack", command="listAsyncJobs")


async def test_waits_in_a_listing_time_out_each_after_its_own_timeout(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    cs = make_cloudstack(poll_interval=ROUND, batch_from=8)
    volumes = await _volumes(control, emu)
    await control.add_fault("cloudstack", "timeout", command="createSnapshot", times=0)  # never finish
    started = [await cs.create_snapshot(v, f"snap-{i}") for i, v in enumerate(volumes)]
    loop = asyncio.get_running_loop()
    began = loop.time()
    results = await asyncio.gather(*(cs.wait_job(s.job_id, timeout=0.3) for s in started), return_exceptions=True)
    assert loop.time() - began < 2.0
    assert all(isinstance(r, StepError) and r.code == "CLOUDSTACK_JOB_TIMEOUT" for r in results), results
    assert await control.calls(api="cloudstack", command="listAsyncJobs")


async def test_a_listing_that_fails_is_replaced_by_each_waits_own_poll_that_round(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl,
        caplog: pytest.LogCaptureFixture) -> None:
    """CloudStack answers one listing with a 530: no wait fails for it (each costs a job one of
    its retries otherwise); that round asks about each wait on its own, and the next rounds
    list again."""
    cs = make_cloudstack(poll_interval=ROUND, batch_from=1)  # listing from the first wait: the count below
    volumes = await _volumes(control, emu)
    await control.set_latency(async_job_seconds=LATENCY)
    await control.add_fault("cloudstack", "server_error", command="listAsyncJobs")
    started = [await cs.create_snapshot(v, f"snap-{i}") for i, v in enumerate(volumes)]
    results = await asyncio.gather(*(cs.wait_job(s.job_id, timeout=10) for s in started))
    assert [r["snapshot"]["id"] for r in results] == [s.resource_id for s in started]
    queries = await control.calls(api="cloudstack", command="queryAsyncJobResult")
    # the first look of each, and each wait of the round whose listing failed (the first round,
    # which may have begun before every wait had joined)
    assert N < len(queries) <= 2 * N
    assert len(await control.calls(api="cloudstack", command="listAsyncJobs")) > 2  # listing went on
    assert any("this round polls each wait on its own" in r.getMessage() for r in caplog.records)


async def test_a_cancelled_wait_leaves_the_rounds(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    """A job whose lease is gone is cancelled mid-wait: the poller stops asking about it."""
    cs = make_cloudstack(poll_interval=ROUND, batch_from=1)
    [volume] = await _volumes(control, emu, 1)
    await control.add_fault("cloudstack", "timeout", command="createSnapshot", times=0)
    started = await cs.create_snapshot(volume, "abandoned")
    task = asyncio.create_task(cs.wait_job(started.job_id, timeout=60))
    deadline = asyncio.get_running_loop().time() + 5
    while not await control.calls(api="cloudstack", command="listAsyncJobs"):
        assert asyncio.get_running_loop().time() < deadline, "the wait never joined a listing"
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cs._poller.pending == 0


async def test_many_daemon_waits_share_the_listing_of_running_operations(
        make_daemon: DaemonFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    daemon = make_daemon(poll_interval=ROUND, batch_from=1)  # listing from the first wait: exact counts below
    volumes = await _volumes(control, emu)
    await control.set_latency(operation_seconds=LATENCY)
    operations = [await daemon.detach(v) for v in volumes]
    results = await asyncio.gather(*(daemon.wait_operation(op, timeout=10) for op in operations))
    assert [r.id for r in results] == operations and all(r.status == "completed" for r in results)

    gets = await control.calls(api="volume-daemon", command="get-operation")
    listings = await control.calls(api="volume-daemon", command="list-operations")
    # one own look at the start, one when the listing no longer shows it running
    assert len(gets) == 2 * N, len(gets)
    assert listings and {call["params"].get("status") for call in listings} == {"pending", "executing"}
    state = {v["id"]: v for v in (await control.state())["volumes"]}
    assert all(state[v]["vm_id"] is None for v in volumes), "an operation was reported done before it was"


async def test_a_refused_listing_falls_back_to_one_poll_per_wait_for_good(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl,
        caplog: pytest.LogCaptureFixture) -> None:
    """The API key's role may not be allowed listAsyncJobs: the waits are not failed for it,
    each is polled on its own from then on, and the log says what to allow."""
    cs = make_cloudstack(poll_interval=ROUND, batch_from=8)
    volumes = await _volumes(control, emu)
    await control.set_latency(async_job_seconds=LATENCY)
    await control.add_fault("cloudstack", "unavailable", command="listAsyncJobs", times=0)
    started = [await cs.create_snapshot(v, f"snap-{i}") for i, v in enumerate(volumes)]
    results = await asyncio.gather(*(cs.wait_job(s.job_id, timeout=10) for s in started))
    assert [r["snapshot"]["id"] for r in results] == [s.resource_id for s in started]
    assert len(await control.calls(api="cloudstack", command="listAsyncJobs")) == 1
    assert len(await control.calls(api="cloudstack", command="queryAsyncJobResult")) > 2 * N
    assert any("listAsyncJobs" in r.getMessage() and "polled on its own" in r.getMessage() for r in caplog.records)


async def test_the_listing_reads_the_newest_pages_of_the_day_first(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    """CloudStack filters listAsyncJobs by the day of `startdate` only and lists oldest first:
    with the day's earlier jobs ahead of ours (pages of 16 for 12 waits), the poller counts,
    then reads pages from the last one back, and finds every wait there."""
    cs = make_cloudstack(poll_interval=ROUND, batch_from=1)  # listing from the first wait: exact counts below
    earlier = 40
    volumes = await _volumes(control, emu, N + earlier)
    for i, v in enumerate(volumes[N:]):  # earlier jobs of the same day, finished
        await cs.create_snapshot(v, f"earlier-{i}")
    await control.set_latency(async_job_seconds=LATENCY)
    started = [await cs.create_snapshot(v, f"snap-{i}") for i, v in enumerate(volumes[:N])]
    results = await asyncio.gather(*(cs.wait_job(s.job_id, timeout=10) for s in started))
    assert [r["snapshot"]["id"] for r in results] == [s.resource_id for s in started]
    assert len(await control.calls(api="cloudstack", command="queryAsyncJobResult")) == N  # all found listed
    listings = await control.calls(api="cloudstack", command="listAsyncJobs")
    pages = {int(c["params"]["page"]) for c in listings if c["params"].get("pagesize") == "16"}
    assert pages == {3, 4}  # 52 jobs: ours are the newest 12, on page 4 (4 jobs) and page 3, not 1 or 2
    assert all(len(c["params"]["startdate"]) == 10 for c in listings)  # a day: all CloudStack reads


def _asked(calls: list[dict[str, Any]], key: str, ids: list[str]) -> list[str]:
    """The ids among `ids` that the adapter asked about on their own, in the order asked."""
    wanted = set(ids)
    return [str(c["params"][key]) for c in calls if c["params"].get(key) in wanted]


async def _joined(poller: SharedPoller[Any], count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while poller.pending < count:
        assert asyncio.get_running_loop().time() < deadline, f"{poller.pending} of {count} waits joined the rounds"
        await asyncio.sleep(0.01)


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_new_cloudstack_waits_join_the_rounds_once_first_asks_find_jobs_still_running(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    """While the rounds list for many waits and the first asks of recent waits found their jobs
    still running, a new wait joins the next round without asking (one in PROBE_EVERY still
    asks); the listing finds it from the start CloudStack showed before it was started. A job
    this adapter did not start (a job resumed after a restart) is always asked about at once."""
    cs = make_cloudstack(poll_interval=ROUND, batch_from=1)
    volumes = await _volumes(control, emu, 1 + N + 2 * PROBE_EVERY + 1)
    await control.add_fault("cloudstack", "timeout", command="createSnapshot")  # the first never ends:
    stuck = await cs.create_snapshot(volumes[0], "stuck")  # the rounds list until the end
    holding = asyncio.create_task(cs.wait_job(stuck.job_id, timeout=60))
    await control.set_latency(async_job_seconds=2.0)
    first = [await cs.create_snapshot(v, f"first-{i}") for i, v in enumerate(volumes[1:N + 1])]
    waits = [asyncio.create_task(cs.wait_job(s.job_id, timeout=30)) for s in first]
    await _joined(cs._poller, N + 1)  # every first ask answered "still running"

    later = [await cs.create_snapshot(v, f"later-{i}") for i, v in enumerate(volumes[N + 1:-1])]
    elsewhere = await make_cloudstack().create_snapshot(volumes[-1], "resumed")  # started by another process
    waits += [asyncio.create_task(cs.wait_job(s.job_id, timeout=30)) for s in [*later, elsewhere]]
    results = await asyncio.gather(*waits)
    await _cancelled(holding)

    assert [r["snapshot"]["id"] for r in results] == [s.resource_id for s in [*first, *later, elsewhere]]
    queries = await control.calls(api="cloudstack", command="queryAsyncJobResult")
    assert sorted(_asked(queries, "jobid", [s.job_id for s in first])) == sorted(s.job_id for s in first)
    asked_later = _asked(queries, "jobid", [s.job_id for s in later])
    assert len(asked_later) == len(later) // PROBE_EVERY, asked_later  # the probes only
    assert _asked(queries, "jobid", [elsewhere.job_id]) == [elsewhere.job_id]
    listings = await control.calls(api="cloudstack", command="listAsyncJobs")
    assert all(len(c["params"]["startdate"]) == 10 for c in listings)


async def test_quick_cloudstack_jobs_are_still_asked_about_at_once(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    """With the rounds listing (one job that never ends), jobs that are done by the time they
    are asked about keep being asked at once, each exactly once: none waits for a round (a
    round's listing would have found it, and it would not have been asked about at all)."""
    cs = make_cloudstack(poll_interval=1.0, batch_from=1)
    volumes = await _volumes(control, emu, N + 1)
    await control.add_fault("cloudstack", "timeout", command="createSnapshot")  # the first never ends
    stuck = await cs.create_snapshot(volumes[0], "stuck")
    holding = asyncio.create_task(cs.wait_job(stuck.job_id, timeout=60))
    await _joined(cs._poller, 1)
    quick = []
    for i, v in enumerate(volumes[1:]):
        started = await cs.create_snapshot(v, f"quick-{i}")
        assert (await cs.wait_job(started.job_id, timeout=10))["snapshot"]["id"] == started.resource_id
        quick.append(started.job_id)
    await _cancelled(holding)
    queries = await control.calls(api="cloudstack", command="queryAsyncJobResult")
    assert _asked(queries, "jobid", quick) == quick


async def test_new_daemon_waits_join_the_rounds_once_first_asks_find_operations_still_running(
        make_daemon: DaemonFactory, emu: EmulatorHandle, control: EmulatorControl) -> None:
    daemon = make_daemon(poll_interval=ROUND, batch_from=1)
    volumes = await _volumes(control, emu, 1 + N + 2 * PROBE_EVERY)
    await control.add_fault("volume-daemon", "timeout", command="detach")  # the first never ends
    holding = asyncio.create_task(daemon.wait_operation(await daemon.detach(volumes[0]), timeout=60))
    await control.set_latency(operation_seconds=2.0)
    first = [await daemon.detach(v) for v in volumes[1:N + 1]]
    waits = [asyncio.create_task(daemon.wait_operation(op, timeout=30)) for op in first]
    await _joined(daemon._poller, N + 1)
    later = [await daemon.detach(v) for v in volumes[N + 1:]]
    waits += [asyncio.create_task(daemon.wait_operation(op, timeout=30)) for op in later]
    results = await asyncio.gather(*waits)
    await _cancelled(holding)

    assert [r.id for r in results] == first + later and all(r.status == "completed" for r in results)
    gets = await control.calls(api="volume-daemon", command="get-operation")
    # each: its first ask (if it asked), then one when the listing no longer shows it running
    assert len(_asked(gets, "operation_id", first)) == 2 * N
    assert len(_asked(gets, "operation_id", later)) == len(later) + len(later) // PROBE_EVERY


async def test_the_first_ask_follows_the_rounds_and_what_recent_asks_found() -> None:
    """The poller's rule on its own: below `min_batch` waits (no listing) a new wait always
    asks; with the rounds listing it asks while at least half of the recent first asks found
    the work done, else one in PROBE_EVERY asks; the share climbs back as probes find work done."""

    async def never(key: str) -> None:
        return None

    async def none_listed(keys: Mapping[str, object]) -> dict[str, Any]:
        return {k: None for k in keys}

    poller: SharedPoller[Any] = SharedPoller(3600.0, 3, never, none_listed)
    assert poller.ask_first()  # nothing pending
    for _ in range(12):
        poller.asked_first(False)  # the work was still running each time
    held = [asyncio.create_task(poller.wait(f"k{i}", 3600, lambda: TimeoutError())) for i in range(2)]
    await _joined(poller, 2)
    assert [poller.ask_first() for _ in range(PROBE_EVERY)] == [True] * PROBE_EVERY  # 2 < min_batch
    held.append(asyncio.create_task(poller.wait("k2", 3600, lambda: TimeoutError())))
    await _joined(poller, 3)
    asks = [poller.ask_first() for _ in range(2 * PROBE_EVERY)]
    assert asks.count(True) == 2 and asks[PROBE_EVERY - 1] and asks[-1]  # the probes only
    for _ in range(12):
        poller.asked_first(True)  # the probes find the work done again
    assert [poller.ask_first() for _ in range(PROBE_EVERY)] == [True] * PROBE_EVERY
    for task in held:
        await _cancelled(task)


async def test_a_round_whose_listing_was_asked_to_wait_asks_nothing_more() -> None:
    """CloudStack's API limit refused the round's listing for longer than a call may wait: the
    round does not fall back to one ask per wait (many calls where one was too many); the next
    round lists again and ends the waits."""
    asked_alone: list[str] = []
    listings: list[int] = []

    class Throttled(Exception):
        pass

    async def one(key: str) -> str:
        asked_alone.append(key)
        return "done"

    async def listing(keys: Mapping[str, object]) -> dict[str, Any]:
        listings.append(len(keys))
        if len(listings) == 1:
            raise Throttled
        return {k: "done" for k in keys}

    poller: SharedPoller[Any] = SharedPoller(0.01, 2, one, listing,
                                             asked_to_wait=lambda exc: isinstance(exc, Throttled))
    for _ in range(12):
        poller.asked_first(False)  # (the waits join the rounds without a first ask of their own)
    done = await asyncio.gather(*(poller.wait(f"k{i}", 30, lambda: TimeoutError()) for i in range(3)))
    assert done == ["done"] * 3
    assert asked_alone == [] and len(listings) >= 2
