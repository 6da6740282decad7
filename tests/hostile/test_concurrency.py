"""Commands arriving faster than jobs can run: with FAILOVER_MAX_CONCURRENT_JOBS=2 and slow
outside systems, a burst of 20 failovers all complete, none dropped, and never more than two
run at once (by the events' times, by the emulators' call log, and by the process's
`failover_jobs_in_progress` gauge). In a vhost and database of its own, so this `serve` process
is the only one taking those commands and claiming those jobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from adapters.db.engine import make_engine
from adapters.db.tables import failover_jobs, job_commands
from emulators.client import EmulatorControl
from emulators.runner import start_emulators
from failover.seed import seed_vm
from tests.helpers import ServeProcess, metric, service_env

from .helpers import Watcher, command, private_stack, publish_raw, rabbitmqctl_available, serving

pytestmark = pytest.mark.skipif(not rabbitmqctl_available(), reason="needs rabbitmqctl for a private vhost")

JOBS = 20
CAPACITY = 2
SIZE_LIMIT = 4096  # FAILOVER_MAX_MESSAGE_BYTES of this test's serve process


async def _the_size_limit_is_the_setting(watcher: Watcher) -> None:
    for size, answered in ((SIZE_LIMIT, True), (SIZE_LIMIT + 1, False)):
        body = command(vm_id="no-such-vm", padding="")
        body["padding"] = "x" * (size - len(json.dumps(body).encode()))
        raw = json.dumps(body).encode()
        assert len(raw) == size
        message_id = await publish_raw(watcher.channel, raw)
        kind, answer = await watcher.outcome(message_id, body["request_id"])
        if answered:
            assert kind == "event" and answer.reason == "not_found", answer
        else:
            assert kind == "dead" and f"over the limit of {SIZE_LIMIT} bytes" in answer.reason, answer


def most_at_once(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of the (start, end) intervals that overlap at one instant."""
    spans = list(intervals)
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda p: (p[0], p[1]))  # an end before a start at the same instant
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def test_most_at_once() -> None:
    assert most_at_once([(0, 1), (1, 2), (2, 3)]) == 1
    assert most_at_once([(0, 2), (1, 3), (1.5, 4)]) == 3
    assert most_at_once([(0, 5), (1, 2), (3, 4)]) == 2
    assert most_at_once(iter([(0, 2), (1, 3)])) == 2


async def test_a_burst_waits_its_turn_and_nothing_is_dropped(
        database_url: str, amqp_url: str, tmp_path: Path) -> None:
    async with private_stack(database_url, amqp_url, "burst") as stack:
        emu = await start_emulators()
        engine = make_engine(stack.database_url, pool_size=2)
        serve = ServeProcess(service_env(stack.database_url, stack.amqp_url, emu,
                                         FAILOVER_MAX_CONCURRENT_JOBS=str(CAPACITY),
                                         FAILOVER_MAX_MESSAGE_BYTES=str(SIZE_LIMIT)), tmp_path / "serve.log")
        watcher: Watcher | None = None
        sampling = True
        samples: list[float] = []
        try:
            async with EmulatorControl(emu.control_url) as control:
                vms = [await seed_vm(engine, control, emu.appliance_vm_id, vm_name=f"burst {i}",
                                     os_type="ubuntu64Guest", disks=1) for i in range(JOBS)]
                await control.set_latency(async_job_seconds=0.2, operation_seconds=0.1)
                try:
                    await serve.start()
                    await serving(serve)
                except BaseException:
                    await serve.kill()
                    raise
                watcher = await Watcher.start(stack.amqp_url)
                await _the_size_limit_is_the_setting(watcher)

                async def sample() -> None:
                    while sampling:
                        samples.append(await metric(serve, "failover_jobs_in_progress"))
                        await asyncio.sleep(0.1)

                sampler = asyncio.create_task(sample())
                bodies = [command(vm_id=vm.vm_id) for vm in vms]
                await asyncio.gather(*(publish_raw(watcher.channel, json.dumps(b).encode()) for b in bodies))
                streams = [await watcher.until_ended(b["request_id"], timeout=180) for b in bodies]
                sampling = False
                await sampler
                calls = await control.calls()

            # all of them ran, to the end
            assert [s[-1].type for s in streams] == ["JobCompleted"] * JOBS
            async with engine.connect() as conn:
                recorded = (await conn.execute(select(func.count()).select_from(job_commands).where(
                    job_commands.c.outcome == "accepted"))).scalar_one()
                completed = (await conn.execute(select(func.count()).select_from(failover_jobs).where(
                    failover_jobs.c.status == "completed"))).scalar_one()
            assert recorded == JOBS and completed == JOBS

            # never more than CAPACITY at once, by the events: first step started .. job ended
            spans = []
            for events in streams:
                began = next(e for e in events if e.type == "StepStarted").occurred_at.timestamp()
                spans.append((began, events[-1].occurred_at.timestamp()))
            assert most_at_once(spans) == CAPACITY, sorted(spans)

            # ... by what the outside systems saw: each job's first to last call on its volume
            by_volume = {vm.volume_ids[0]: i for i, vm in enumerate(vms)}
            seen: dict[int, list[float]] = {}
            for call in calls:
                params: dict[str, Any] = call["params"]
                volume = params.get("volume_id") or params.get("volumeid")
                if volume in by_volume:
                    seen.setdefault(by_volume[volume], []).append(call["time"])
            assert len(seen) == JOBS
            assert most_at_once((min(t), max(t)) for t in seen.values()) <= CAPACITY

            # ... and by the process's own gauge, sampled all along
            assert samples and max(samples) <= CAPACITY
        finally:
            sampling = False
            if watcher is not None:
                await watcher.close()
            await serve.stop()
            await engine.dispose()
            await emu.close()
