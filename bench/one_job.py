"""One test failover end to end, measured: wall time, events, and database transactions.

    .venv/bin/python -m bench.one_job        (needs RabbitMQ and MariaDB; uses failover_bench1)

Starts the emulators (zero latency) and one `failoverctl serve`, seeds a two-disk Windows VM,
runs a warm-up failover, then measures one more: request -> JobCompleted as a client sees it,
the events of the job, and the transactions MariaDB committed meanwhile (Com_commit delta, so
it counts every transaction of every part of the service: command, steps, relay, projector).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

from adapters.db.engine import make_engine
from adapters.db.migrate import ensure_database, upgrade
from emulators.client import EmulatorControl
from emulators.runner import start_emulators
from failover.client import BusClient
from failover.seed import seed_vm
from schemas.commands import FailoverRequested
from tests.helpers import ServeProcess, service_env

DB = os.environ.get("BENCH_DATABASE_URL", "mysql+asyncmy://root@127.0.0.1:3306/failover_bench1")
VHOST = "failover-bench1"


async def _commits(engine: Any) -> int:
    async with engine.connect() as conn:
        row = (await conn.execute(text("SHOW GLOBAL STATUS LIKE 'Com_commit'"))).first()
    return int(row[1])


async def main() -> None:
    if shutil.which("rabbitmqctl"):
        subprocess.run(["rabbitmqctl", "add_vhost", VHOST], capture_output=True)
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"], capture_output=True)
    amqp = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
    await ensure_database(DB)
    await asyncio.to_thread(upgrade, DB)
    emu = await start_emulators()
    serve = ServeProcess(service_env(DB, amqp, emu), Path("/tmp/one_job_serve.log"))
    await serve.start()
    engine = make_engine(DB, pool_size=2)
    try:
        async with EmulatorControl(emu.control_url) as control, BusClient.connect(amqp) as bus:
            results = []
            for _ in range(2):  # a warm-up, then the measured one
                vm = await seed_vm(engine, control, emu.appliance_vm_id, test_network_id=emu.test_network_id)
                job = uuid.uuid4()
                queue = await bus.bind(f"job.{job}.#")
                before = await _commits(engine)
                began = time.perf_counter()
                await bus.publish(FailoverRequested(request_id=job, vm_id=vm.vm_id, failover_type="test"))
                events = [e async for e in bus.events(queue, timeout=60)]
                elapsed = time.perf_counter() - began
                # wait for the projector to finish with this job before reading the commit count
                for _ in range(200):
                    async with engine.connect() as conn:
                        status = (await conn.execute(text("SELECT status FROM job_tracking WHERE id=:i"),
                                                     {"i": str(job)})).scalar()
                    if status == "completed":
                        break
                    await asyncio.sleep(0.05)
                commits = await _commits(engine) - before
                results.append((elapsed, events, commits))
            elapsed, events, commits = results[-1]
            kinds: dict[str, int] = {}
            for e in events:
                kinds[e.type] = kinds.get(e.type, 0) + 1
            print(f"request -> JobCompleted: {elapsed * 1000:.0f} ms (JobCompleted.duration_seconds="
                  f"{events[-1].model_dump()['duration_seconds']})")
            print(f"events: {len(events)} {kinds}")
            print(f"database transactions committed while it ran (service-wide): {commits}")
    finally:
        await engine.dispose()
        await serve.stop()
        await emu.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
