"""`serve` with CloudStack's event bus (FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE), end to end: the
emulated CloudStack publishes its async jobs' ends on the real broker as CloudStack's RabbitMQ
event bus does, and a test failover whose CloudStack jobs take 0.3 s each finishes long before
the 30 s poll rounds would have ended its waits. With the event bus unreachable, `serve` starts
all the same, says so, and its waits poll."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from emulators.client import EmulatorControl
from emulators.events import EventBus
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import seed_vm
from schemas.commands import FailoverRequested

from .helpers import ServeProcess, emulated_event_bus, metric, service_env


@pytest.fixture
async def event_bus(emulators: EmulatorHandle, amqp_url: str) -> AsyncIterator[EventBus]:
    async with emulated_event_bus(emulators, amqp_url) as published:
        yield published


async def _test_failover(amqp_url: str, vm_id: str, timeout: float) -> list[str]:
    job = uuid.uuid4()
    async with BusClient.connect(amqp_url) as bus:
        queue = await bus.bind(f"job.{job}.#")
        await bus.publish(FailoverRequested(request_id=job, vm_id=vm_id, failover_type="test",
                                            requested_by="cloudstack-events-tests"))
        return [e.type async for e in bus.events(queue, timeout=timeout)]


async def test_waits_on_cloudstack_end_with_its_events(
        database_url: str, amqp_url: str, emulators: EmulatorHandle, control: EmulatorControl, db: Any,
        event_bus: EventBus, tmp_path: Path) -> None:
    env = service_env(database_url, amqp_url, emulators, FAILOVER_POLL_INTERVAL_SECONDS="30",
                      FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE=event_bus.exchange_name)
    serve = ServeProcess(env, tmp_path / "serve.log")
    await serve.start()
    try:
        vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="events e2e", os_type="ubuntu64Guest",
                           test_network_id=emulators.test_network_id)
        await control.set_latency(async_job_seconds=0.3)
        began = time.monotonic()
        kinds = await _test_failover(amqp_url, vm.vm_id, timeout=60)
        took = time.monotonic() - began
        assert kinds and kinds[0] == "JobAccepted" and kinds[-1] == "JobCompleted", kinds
        # three CloudStack jobs waited on (the snapshot, the deploy, the start): at the rounds,
        # each would have ended 30 s after it began
        assert took < 20, f"the test failover took {took:.1f} s: its waits ended at the poll rounds"
        assert await metric(serve, "failover_cloudstack_job_events_total", {"outcome": "read"}) >= 3
        assert "listening for CloudStack's async job events" in serve.log_path.read_text()
    finally:
        await control.set_latency(async_job_seconds=0)
        await serve.stop()


async def test_serve_runs_without_an_unreachable_event_bus(
        database_url: str, amqp_url: str, emulators: EmulatorHandle, control: EmulatorControl, db: Any,
        tmp_path: Path) -> None:
    env = service_env(database_url, amqp_url, emulators, FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE="cloudstack-events",
                      FAILOVER_CLOUDSTACK_EVENTS_AMQP_URL="amqp://guest:events-Pw-DO-NOT-LEAK@127.0.0.1:1/")
    serve = ServeProcess(env, tmp_path / "serve.log")
    await serve.start()  # ready although the event bus cannot be reached
    try:
        vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="events down", os_type="ubuntu64Guest",
                           test_network_id=emulators.test_network_id)
        kinds = await _test_failover(amqp_url, vm.vm_id, timeout=60)
        assert kinds and kinds[-1] == "JobCompleted", kinds
        log = serve.log_path.read_text()
        assert "cannot listen to CloudStack's event bus" in log and "FAILOVER_CLOUDSTACK_EVENTS_AMQP_URL" in log
        assert "events-Pw-DO-NOT-LEAK" not in log
    finally:
        await serve.stop()
