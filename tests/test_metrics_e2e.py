"""What Prometheus sees: `/metrics` of a real `failoverctl serve` process, read with
prometheus-client's own parser, before and after real jobs (a test failover that completes, one
that fails and rolls back), a rejected command, an invalid one and a dead-lettered delivery.

The session's `serve` process is the only one consuming commands while these tests run, so
every counter must move by exactly what these jobs did."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.metrics import ALL_METRIC_NAMES, HISTOGRAM_METRIC_NAMES
from failover.seed import seed_vm
from schemas.common import FAILOVER_STEPS
from schemas.events import Event

from .helpers import ServeProcess, failover, projected, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(serve: ServeProcess) -> tuple[Samples, dict[str, str]]:
    """Every sample of /metrics, and each family's type."""
    async with aiohttp.ClientSession() as http, http.get(serve.metrics_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        body = await resp.text()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(body):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def present(samples: Samples, name: str, **labels: str) -> bool:
    wanted = set(labels.items())
    return any(n == name and wanted <= ls for (n, ls) in samples)


Expectation = tuple[str, dict[str, str], float]


async def settle(serve: ServeProcess, before: Samples, expected: Iterable[Expectation],
                 timeout: float = 20.0) -> Samples:
    """Wait until every expected delta is reached (the relay and the projector count a little
    after the client sees an event), then check none went past it."""
    expected = list(expected)
    after: Samples = {}

    async def reached() -> bool:
        nonlocal after
        after, _ = await scrape(serve)
        return all(value(after, n, **ls) - value(before, n, **ls) >= d for n, ls, d in expected)

    try:
        await wait_until(reached, timeout, "the metrics to move", interval=0.1)
    except AssertionError:
        pass  # the comparison below names what is missing
    wrong = [(n, ls, d, value(after, n, **ls) - value(before, n, **ls)) for n, ls, d in expected
             if value(after, n, **ls) - value(before, n, **ls) != d]
    assert not wrong, "metric deltas (name, labels, expected, got):\n" + "\n".join(map(str, wrong))
    return after


def _count(name: str) -> str:
    return name + "_count"


_MOVING = ("failover_events_published_total", "failover_projector_events_total", "failover_commands_total",
           "failover_jobs_ended_total", "failover_adapter_calls_total")


async def quiet(serve: ServeProcess) -> tuple[Samples, dict[str, str]]:
    """The metrics once the work of earlier tests has settled (the projector may still be
    applying their last events when they end): two scrapes in a row that agree."""
    last: list[tuple[float, ...]] = []
    scraped: tuple[Samples, dict[str, str]] = ({}, {})

    async def unchanged() -> bool:
        nonlocal scraped
        scraped = await scrape(serve)
        now = tuple(value(scraped[0], name) for name in
                    (*_MOVING, "failover_jobs_in_progress", "failover_outbox_backlog"))
        steady = bool(last) and now == last[-1] and now[-2:] == (0, 0)
        last.append(now)
        return steady

    await wait_until(unchanged, 20, "earlier tests' work to settle", interval=0.5)
    return scraped


async def test_metrics_move_with_real_jobs(serve: ServeProcess, bus: BusClient, db: Any,
                                           control: EmulatorControl, emulators: EmulatorHandle) -> None:
    before, types = await quiet(serve)
    # every metric the code defines is exported, with its type, before any job ran here
    exported = {n for n, _ in before} | set(types)
    missing = {n for n in ALL_METRIC_NAMES if n not in exported and n.removesuffix("_total") not in exported}
    assert not missing, f"defined but not exported: {missing}"
    for name in HISTOGRAM_METRIC_NAMES:
        assert types[name] == "histogram", name
    assert value(before, "failover_build_info") == 1
    # closed label sets are exported at 0 from the start (an alert's increase() needs them)
    assert present(before, "failover_rollbacks_total", outcome="failed")
    assert present(before, "failover_commands_total", type="unknown", outcome="dead_lettered")
    assert present(before, "failover_events_published_total", type="JobFailed")
    assert present(before, "failover_outbox_backlog") and present(before, "failover_outbox_oldest_unsent_age_seconds")
    for state in FAILOVER_STEPS:  # exported at 0 before any job enters the state
        assert present(before, "failover_jobs_in_progress", state=state)
        assert present(before, "failover_job_state_oldest_seconds", state=state)

    # 1. a test failover that completes; slow enough that the state gauges can be seen
    good = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="metrics ok",
                         test_network_id=emulators.test_network_id)
    await control.set_latency(async_job_seconds=0.3, operation_seconds=0.3)
    seen_states: set[str] = set()

    async def watch_gauges() -> None:
        while True:
            samples, _ = await scrape(serve)
            seen_states.update(dict(ls)["state"] for (n, ls), v in samples.items()
                               if n == "failover_jobs_in_progress" and v >= 1)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_gauges())
    try:
        ok_events = await failover(bus, good.vm_id, timeout=90)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
    assert ok_events[-1].type == "JobCompleted"
    assert {"cloudstack-snapshot", "vm-creation", "vm-startup-validation"} <= seen_states, seen_states

    # 2. one that fails at vm-creation (CloudStack refuses the deploy) and rolls back
    bad = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="metrics failing",
                        test_network_id=emulators.test_network_id)
    await control.add_fault(api="cloudstack", command="deployVirtualMachine", kind="refuse")
    failed_events = await failover(bus, bad.vm_id, timeout=90)
    await control.clear_faults()
    assert [e.type for e in failed_events if e.type != "LogRecorded"][-3:] == [
        "RollbackStarted", "RollbackCompleted", "JobFailed"]

    # 3. refused: an unknown VM; invalid: no vm_id; unreadable: not JSON (dead-lettered)
    rejected = await failover(bus, f"no-such-vm-{uuid.uuid4()}")
    assert rejected[0].type == "JobRejected" and rejected[0].reason == "not_found"
    invalid_id = uuid.uuid4()
    queue = await bus.bind(f"job.{invalid_id}.#")
    await bus.publish_raw(json.dumps({"type": "FailoverRequested", "schema_version": 1,
                                      "request_id": str(invalid_id), "failover_type": "test"}).encode(),
                          routing_key="FailoverRequested")
    invalid = [e async for e in bus.events(queue, timeout=20)]
    assert [(e.type, e.reason) for e in invalid] == [("JobRejected", "invalid")]
    await bus.publish_raw(b"\xff not json", routing_key="FailoverRequested")

    all_events: list[Event] = ok_events + failed_events + rejected + invalid
    by_type = Counter(e.type for e in all_events)
    ok_steps = [e.step for e in ok_events if e.type == "StepCompleted"]
    assert ok_steps == list(FAILOVER_STEPS)
    failed_ok_steps = [e.step for e in failed_events if e.type == "StepCompleted"]
    assert failed_ok_steps == list(FAILOVER_STEPS[:3])  # validation, snapshot, injection (Windows)

    jt = {"job_type": "test-failover"}
    expected: list[Expectation] = [
        ("failover_jobs_started_total", jt, 2),
        ("failover_jobs_ended_total", {**jt, "outcome": "completed"}, 1),
        ("failover_jobs_ended_total", {**jt, "outcome": "failed"}, 1),
        ("failover_jobs_ended_total", {**jt, "outcome": "cancelled"}, 0),
        (_count("failover_job_duration_seconds"), {**jt, "outcome": "completed"}, 1),
        (_count("failover_job_duration_seconds"), {**jt, "outcome": "failed"}, 1),
        ("failover_rollbacks_total", {"outcome": "completed"}, 1),
        ("failover_rollbacks_total", {"outcome": "failed"}, 0),
        ("failover_commands_total", {"type": "FailoverRequested", "outcome": "accepted"}, 2),
        ("failover_commands_total", {"type": "FailoverRequested", "outcome": "rejected_not_found"}, 1),
        ("failover_commands_total", {"type": "FailoverRequested", "outcome": "rejected_invalid"}, 1),
        ("failover_commands_total", {"type": "unknown", "outcome": "dead_lettered"}, 1),
        ("failover_commands_total", {}, 5),
        # every step of each job: its duration observed once, with its outcome
        *[(_count("failover_step_duration_seconds"), {**jt, "step": s, "outcome": "completed"},
           ok_steps.count(s) + failed_ok_steps.count(s)) for s in FAILOVER_STEPS],
        (_count("failover_step_duration_seconds"), {**jt, "step": "vm-creation", "outcome": "failed"}, 1),
        (_count("failover_step_duration_seconds"), {}, len(ok_steps) + len(failed_ok_steps) + 1),
        # the outside world: CloudStack's answers, each call timed
        ("failover_adapter_calls_total", {"adapter": "cloudstack", "operation": "deployVirtualMachine",
                                          "outcome": "ok"}, 1),
        ("failover_adapter_calls_total", {"adapter": "cloudstack", "operation": "deployVirtualMachine",
                                          "outcome": "error"}, 1),
        (_count("failover_adapter_call_duration_seconds"), {"adapter": "cloudstack",
                                                            "operation": "deployVirtualMachine"}, 2),
        ("failover_adapter_calls_total", {"adapter": "cloudstack", "operation": "createSnapshot",
                                          "outcome": "ok"}, 4),
        ("failover_adapter_calls_total", {"adapter": "cloudstack", "operation": "startVirtualMachine",
                                          "outcome": "ok"}, 1),
        ("failover_adapter_calls_total", {"adapter": "injection", "operation": "inject", "outcome": "ok"}, 2),
        ("failover_adapter_calls_total", {"adapter": "platform_db", "operation": "source",
                                          "outcome": "ok"}, 2),
        # every event of these jobs was published once, by type
        *[("failover_events_published_total", {"type": t}, n) for t, n in by_type.items()],
        ("failover_events_published_total", {}, len(all_events)),
        # and projected once
        ("failover_projector_events_total", {"outcome": "applied"}, len(all_events)),
        (_count("failover_projector_lag_seconds"), {}, len(all_events)),
    ]
    after = await settle(serve, before, expected)

    # the Volume Daemon was called for the attachments, and each call was timed
    attach_ok = value(after, "failover_adapter_calls_total", adapter="volume_daemon", outcome="ok") - value(
        before, "failover_adapter_calls_total", adapter="volume_daemon", outcome="ok")
    assert attach_ok >= 4  # at least: detach and attach-root/attach of two volumes
    timed = value(after, _count("failover_adapter_call_duration_seconds"), adapter="volume_daemon") - value(
        before, _count("failover_adapter_call_duration_seconds"), adapter="volume_daemon")
    all_calls = sum(value(after, "failover_adapter_calls_total", adapter="volume_daemon", outcome=o)
                    - value(before, "failover_adapter_calls_total", adapter="volume_daemon", outcome=o)
                    for o in ("ok", "error", "retry"))
    assert timed == all_calls
    # the job and step durations add up to something real
    job_seconds = value(after, "failover_job_duration_seconds_sum", **jt) - value(
        before, "failover_job_duration_seconds_sum", **jt)
    assert job_seconds > 0

    # nothing runs any more: the state gauges say so; the outbox drains
    async def idle() -> bool:
        samples, _ = await scrape(serve)
        return (value(samples, "failover_jobs_in_progress") == 0
                and value(samples, "failover_outbox_backlog") == 0)

    await wait_until(idle, 15, "the state gauges and the outbox backlog to return to 0")
    await projected(db, str(ok_events[0].job_id))
