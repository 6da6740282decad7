"""The health server over real HTTP: liveness, readiness and the metrics it exposes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from failover import metrics
from failover.health import (
    READINESS_CALL_TIMEOUT_SECONDS,
    READINESS_TIMEOUT_SECONDS,
    HealthServer,
    named_checks,
    start_health_server,
)
from tests.helpers import wait_until

Checks = dict[str, bool]


def _ready(result: Checks) -> Callable[[], Awaitable[Checks]]:
    """A readiness callable that reports ``result``."""

    async def readiness() -> Checks:
        return dict(result)

    return readiness


async def _never() -> Checks:
    """A readiness callable that never answers (until cancelled)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client with a deadline on every request."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    """A health server on an ephemeral loopback port whose checks all pass."""
    srv = await start_health_server("127.0.0.1", 0, _ready({"broker": True, "database": True}))
    try:
        yield srv
    finally:
        await srv.close()


def _url(srv: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.port}{path}"


async def _scrape(http: aiohttp.ClientSession, srv: HealthServer) -> dict[str, list[Sample]]:
    """GET /metrics and return every sample, keyed by sample name."""
    async with http.get(_url(srv, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await response.text()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The value of the one sample ``name`` whose labels include ``labels`` (0 if absent)."""
    found = [s.value for s in samples.get(name, []) if labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else 0.0


async def test_healthz_is_alive(http: aiohttp.ClientSession, server: HealthServer) -> None:
    async with http.get(_url(server, "/healthz")) as response:
        assert response.status == 200
        assert await response.json() == {"status": "alive"}


async def test_port_zero_binds_distinct_ephemeral_ports_and_close_frees_them(
    http: aiohttp.ClientSession,
) -> None:
    first = await start_health_server("127.0.0.1", 0, _ready({}))
    second = await start_health_server("127.0.0.1", 0, _ready({}))
    try:
        assert first.port > 0
        assert second.port > 0
        assert first.port != second.port
    finally:
        await second.close()
    async with http.get(_url(first, "/healthz")) as response:
        assert response.status == 200
    await first.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(_url(first, "/healthz")):
            pass


async def test_readyz_200_when_every_check_passes(
    http: aiohttp.ClientSession, server: HealthServer
) -> None:
    async with http.get(_url(server, "/readyz")) as response:
        assert response.status == 200
        assert await response.json() == {
            "status": "ready",
            "checks": {"broker": True, "database": True},
        }


async def test_readyz_503_names_the_failing_check(http: aiohttp.ClientSession) -> None:
    srv = await start_health_server("127.0.0.1", 0, _ready({"broker": True, "database": False}))
    try:
        async with http.get(_url(srv, "/readyz")) as response:
            assert response.status == 503
            assert await response.json() == {
                "status": "not ready",
                "checks": {"broker": True, "database": False},
            }
    finally:
        await srv.close()


async def test_readyz_503_when_readiness_raises(http: aiohttp.ClientSession) -> None:
    async def broken() -> Checks:
        raise ConnectionError("amqp://user:secret@broker/ refused")

    srv = await start_health_server("127.0.0.1", 0, broken)
    try:
        async with http.get(_url(srv, "/readyz")) as response:
            assert response.status == 503
            body = await response.json()
    finally:
        await srv.close()
    assert body["status"] == "not ready"
    assert body["checks"] == {"readiness": False}
    assert "ConnectionError" in body["error"]
    assert "secret" not in body["error"], "an exception's text may carry credentials"


async def test_readyz_503_when_readiness_returns_garbage(http: aiohttp.ClientSession) -> None:
    async def garbage() -> Checks:
        return None  # type: ignore[return-value]  # what a buggy check might do

    srv = await start_health_server("127.0.0.1", 0, garbage)
    try:
        async with http.get(_url(srv, "/readyz")) as response:
            assert response.status == 503
            assert (await response.json())["checks"] == {"readiness": False}
    finally:
        await srv.close()


async def test_readyz_503_when_readiness_is_too_slow(http: aiohttp.ClientSession) -> None:
    srv = await start_health_server("127.0.0.1", 0, _never, readiness_timeout=0.2)
    try:
        async with http.get(_url(srv, "/readyz")) as response:
            assert response.status == 503
            body = await response.json()
    finally:
        await srv.close()
    assert body["checks"] == {"readiness": False}
    assert "0.2 s" in body["error"]


async def test_named_checks_default_to_two_seconds_per_check(
    http: aiohttp.ClientSession,
) -> None:
    async def ok() -> bool:
        return True

    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    # Both defaults: 2 s per check, 2.5 s for the whole call, so the slow check is named.
    srv = await start_health_server("127.0.0.1", 0, named_checks({"broker": ok, "database": hangs}))
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        async with http.get(_url(srv, "/readyz")) as response:
            assert response.status == 503
            body = await response.json()
        elapsed = loop.time() - started
    finally:
        await srv.close()
    assert body["checks"] == {"broker": True, "database": False}
    assert READINESS_TIMEOUT_SECONDS <= elapsed < READINESS_CALL_TIMEOUT_SECONDS
    assert READINESS_TIMEOUT_SECONDS == 2.0


async def test_named_checks_mark_the_slow_and_the_raising_check_false(
    http: aiohttp.ClientSession,
) -> None:
    async def ok() -> bool:
        return True

    async def slow() -> bool:
        await asyncio.Event().wait()
        return True

    async def raises() -> bool:
        raise OSError("database unreachable")

    readiness = named_checks({"broker": ok, "database": slow, "cloudstack": raises}, timeout=0.2)
    srv = await start_health_server("127.0.0.1", 0, readiness, readiness_timeout=1.0)
    try:
        async with http.get(_url(srv, "/readyz")) as response:
            assert response.status == 503
            body = await response.json()
    finally:
        await srv.close()
    assert body == {
        "status": "not ready",
        "checks": {"broker": True, "database": False, "cloudstack": False},
    }


async def test_metrics_exposes_every_defined_metric(
    http: aiohttp.ClientSession, server: HealthServer
) -> None:
    async with http.get(_url(server, "/metrics")) as response:
        text = await response.text()
    exposed: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            exposed.add(family.name + "_total")
        elif family.type == "info":
            exposed.add(family.name + "_info")
        else:
            exposed.add(family.name)
    assert metrics.ALL_METRIC_NAMES <= exposed
    assert metrics.HISTOGRAM_METRIC_NAMES <= metrics.ALL_METRIC_NAMES
    failover_names = {name for name in exposed if name.startswith("failover_")}
    # ``*_created`` are prometheus-client's creation timestamps of counters and histograms.
    assert {n for n in failover_names if not n.endswith("_created")} == metrics.ALL_METRIC_NAMES


async def test_metrics_types_and_labels(http: aiohttp.ClientSession, server: HealthServer) -> None:
    async with http.get(_url(server, "/metrics")) as response:
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    expected_types = {
        "failover_jobs_started": "counter",
        "failover_jobs_ended": "counter",
        "failover_job_duration_seconds": "histogram",
        "failover_step_duration_seconds": "histogram",
        "failover_jobs_in_progress": "gauge",
        "failover_jobs_waiting": "gauge",
        "failover_job_state_oldest_seconds": "gauge",
        "failover_adapter_calls": "counter",
        "failover_adapter_call_duration_seconds": "histogram",
        "failover_rollbacks": "counter",
        "failover_commands": "counter",
        "failover_events_published": "counter",
        "failover_outbox_backlog": "gauge",
        "failover_outbox_oldest_unsent_age_seconds": "gauge",
        "failover_projector_lag_seconds": "histogram",
        "failover_projector_events": "counter",
        "failover_job_commits_per_transaction": "histogram",
        "failover_build_info": "gauge",
    }
    for name, kind in expected_types.items():
        assert families[name].type == kind, name
    build = families["failover_build_info"].samples
    assert len(build) == 1
    assert build[0].labels["version"]
    assert build[0].value == 1.0


async def test_alerted_counters_are_exported_at_zero_before_they_move(
    http: aiohttp.ClientSession, server: HealthServer
) -> None:
    samples = await _scrape(http, server)
    rollbacks = {s.labels["outcome"] for s in samples["failover_rollbacks_total"]}
    assert rollbacks == {"completed", "failed"}
    dead = {
        s.labels["type"]
        for s in samples["failover_commands_total"]
        if s.labels["outcome"] == "dead_lettered"
    }
    assert dead == set(metrics.COMMAND_TYPES)
    ended = {
        (s.labels["job_type"], s.labels["outcome"]) for s in samples["failover_jobs_ended_total"]
    }
    assert ended == {(t, o) for t in metrics.JOB_TYPES for o in metrics.JOB_OUTCOMES}


async def test_histogram_buckets_match_the_definitions(
    http: aiohttp.ClientSession, server: HealthServer
) -> None:
    metrics.STEP_DURATION.labels(
        job_type="test-failover", step="cloudstack-snapshot", outcome="completed"
    ).observe(42)
    metrics.observe_adapter_call("cloudstack", "listZones", "ok", 0.03)
    metrics.PROJECTOR_LAG.observe(0.02)
    samples = await _scrape(http, server)
    expected: dict[str, list[float]] = {
        "failover_job_duration_seconds": [1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200],
        "failover_step_duration_seconds": [
            0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600,
        ],
        "failover_adapter_call_duration_seconds": [
            0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600,
        ],
        "failover_projector_lag_seconds": [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
        ],
    }  # fmt: skip
    for name, bounds in expected.items():
        les: list[float] = []
        for sample in samples[name + "_bucket"]:
            le = float(sample.labels["le"])
            if le not in les:
                les.append(le)
        assert sorted(les) == [float(b) for b in bounds] + [float("inf")], name


async def test_updates_show_up_in_the_scrape(
    http: aiohttp.ClientSession, server: HealthServer
) -> None:
    before = await _scrape(http, server)
    metrics.JOBS_STARTED.labels(job_type="live-failover").inc()
    metrics.JOBS_ENDED.labels(job_type="live-failover", outcome="failed").inc()
    metrics.ROLLBACKS.labels(outcome="failed").inc()
    metrics.COMMANDS.labels(type="unknown", outcome="dead_lettered").inc()
    metrics.observe_adapter_call("volume_daemon", "attach", "error", 1.5)
    metrics.OUTBOX_BACKLOG.set(7)
    after = await _scrape(http, server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("failover_jobs_started_total", job_type="live-failover") == 1
    assert delta("failover_jobs_ended_total", job_type="live-failover", outcome="failed") == 1
    assert delta("failover_rollbacks_total", outcome="failed") == 1
    assert delta("failover_commands_total", type="unknown", outcome="dead_lettered") == 1
    assert (
        delta(
            "failover_adapter_calls_total",
            adapter="volume_daemon",
            operation="attach",
            outcome="error",
        )
        == 1
    )
    assert (
        delta(
            "failover_adapter_call_duration_seconds_count",
            adapter="volume_daemon",
            operation="attach",
        )
        == 1
    )
    assert _value(after, "failover_outbox_backlog") == 7
    metrics.OUTBOX_BACKLOG.set(0)


async def test_job_state_gauges_count_and_age_and_drop_to_zero(
    http: aiohttp.ClientSession, server: HealthServer
) -> None:
    metrics.set_job_state_gauges(
        [("vm-creation", 100.0), ("vm-creation", 40.0), ("rolling_back", 90.0)],
        now=130.0,
        known_states=["pending"],
    )
    samples = await _scrape(http, server)
    assert _value(samples, "failover_jobs_in_progress", state="vm-creation") == 2
    assert _value(samples, "failover_job_state_oldest_seconds", state="vm-creation") == 90
    assert _value(samples, "failover_jobs_in_progress", state="rolling_back") == 1
    assert _value(samples, "failover_job_state_oldest_seconds", state="rolling_back") == 40
    assert _value(samples, "failover_jobs_in_progress", state="pending") == 0

    metrics.set_job_state_gauges([], now=200.0)
    samples = await _scrape(http, server)
    for state in ("vm-creation", "rolling_back", "pending"):
        assert _value(samples, "failover_jobs_in_progress", state=state) == 0
        assert _value(samples, "failover_job_state_oldest_seconds", state=state) == 0
        assert any(s.labels["state"] == state for s in samples["failover_jobs_in_progress"])


async def test_a_state_change_moves_the_in_progress_gauge_by_one(
    http: aiohttp.ClientSession, server: HealthServer
) -> None:
    """Between the periodic recounts the gauge moves with each transition (no recount of every
    job per transition), and it agrees with the recount."""
    metrics.set_job_state_gauges([("vm-creation", 1.0), ("vm-creation", 2.0)], now=3.0)
    metrics.move_job_state(None, "pre-failover-validation")  # a job starts here
    metrics.move_job_state("vm-creation", "volume-attachment")
    metrics.move_job_state("vm-creation", None)  # a job stops running here
    metrics.move_job_state("volume-attachment", "volume-attachment")  # not a move
    samples = await _scrape(http, server)
    moved = {s: _value(samples, "failover_jobs_in_progress", state=s)
             for s in ("pre-failover-validation", "vm-creation", "volume-attachment")}
    assert moved == {"pre-failover-validation": 1, "vm-creation": 0, "volume-attachment": 1}
    metrics.set_job_state_gauges([("pre-failover-validation", 1.0), ("volume-attachment", 2.0)], now=3.0)
    samples = await _scrape(http, server)
    assert {s: _value(samples, "failover_jobs_in_progress", state=s) for s in moved} == moved
    metrics.set_job_state_gauges([], now=4.0)


async def test_garbage_collector_pauses_are_timed(http: aiohttp.ClientSession, server: HealthServer) -> None:
    """`serve` watches the collector (and freezes its start-up heap): each collection shows up
    in failover_gc_pause_seconds under its generation, with its duration."""
    import gc

    metrics.watch_gc()
    metrics.watch_gc()  # idempotent: one timer, not two
    assert sum(getattr(cb, "__name__", "") == "_gc_timer" for cb in gc.callbacks) == 1
    before = await _scrape(http, server)
    gc.collect()
    gc.collect(0)
    after = await _scrape(http, server)

    def delta(name: str, generation: str) -> float:
        return _value(after, name, generation=generation) - _value(before, name, generation=generation)

    assert delta("failover_gc_pause_seconds_count", "2") >= 1
    assert delta("failover_gc_pause_seconds_count", "0") >= 1
    assert delta("failover_gc_pause_seconds_sum", "2") > 0


async def test_a_busy_event_loop_shows_as_lag(http: aiohttp.ClientSession, server: HealthServer) -> None:
    """`serve` samples how late its event loop wakes a timer: a loop kept busy for 0.3 s (a
    callback that does not yield) shows up as one late wake in failover_event_loop_lag_seconds,
    above the 0.25 s bucket."""
    watcher = asyncio.create_task(metrics.watch_event_loop(interval=0.01))
    try:
        before = await _scrape(http, server)
        late = _value(before, "failover_event_loop_lag_seconds_count") - _value(
            before, "failover_event_loop_lag_seconds_bucket", le="0.25")
        await asyncio.sleep(0)  # the watcher's first timer is set
        busy_until = time.monotonic() + 0.3
        while time.monotonic() < busy_until:  # the loop is held: nothing else runs
            pass

        async def seen() -> bool:
            after = await _scrape(http, server)
            return _value(after, "failover_event_loop_lag_seconds_count") - _value(
                after, "failover_event_loop_lag_seconds_bucket", le="0.25") > late

        await wait_until(seen, 5.0, "the held loop's late wake in failover_event_loop_lag_seconds")
    finally:
        watcher.cancel()


def test_collections_wait_for_the_configured_numbers() -> None:
    """`serve` sets the collector's first threshold from FAILOVER_GC_YOUNG_COLLECTION_AFTER, its
    third from FAILOVER_GC_FULL_COLLECTION_AFTER, and keeps Python's middle one."""
    import gc

    from failover.service import tune_gc
    from failover.settings import Settings

    before = gc.get_threshold()
    try:
        tune_gc(Settings.model_fields["gc_young_collection_after"].default,
                Settings.model_fields["gc_full_collection_after"].default)
        assert gc.get_threshold() == (10_000, before[1], 100)
        tune_gc(500, 7)
        assert gc.get_threshold() == (500, before[1], 7)
    finally:
        gc.set_threshold(*before)
