"""Throughput with 1, 2 and 3 `serve` processes side by side: jobs per second.

    .venv/bin/python -m bench.throughput_processes [--jobs 100] [--processes 1,2,3]

Needs RabbitMQ and MariaDB (BENCH_DATABASE_URL, default the local server's
`failover_bench_procs`; BENCH_AMQP_URL, default the local broker, vhost
`failover-bench-procs`). The emulators run in their own process with zero latency, so the
figure is the service's own cost (and the machine's: everything shares its cores). For each
count of processes: a fresh database, N serve processes, `--jobs` Linux test failovers (two
disks) published at once; the time from the first publish to the last `JobCompleted` seen on
the bus. Not a test: it prints the numbers (and the CPU seconds each part used).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from adapters.db.engine import make_engine
from emulators.client import EmulatorControl
from failover.seed import seed_vm
from schemas.commands import FailoverRequested
from tests.crash.support import EventLog, fresh_database
from tests.helpers import ServeProcess, free_port, service_env

DB = os.environ.get("BENCH_DATABASE_URL", "mysql+asyncmy://root@127.0.0.1:3306/failover_bench_procs")
AMQP = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/failover-bench-procs")


class Emulators:
    """`python -m emulators` in its own process (its CPU is not the service's)."""

    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "emulators.json"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> Any:
        self.state.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "emulators", "--cloudstack-port", str(free_port()),
                "--volume-daemon-port", str(free_port()), "--state-file", str(self.state)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 30
        while not self.state.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the emulators did not start")
            await asyncio.sleep(0.1)
        data = json.loads(self.state.read_text())

        class Handle:  # what service_env reads
            pass

        handle = Handle()
        for key, value in data.items():
            setattr(handle, key, value)
        handle.zone_name = data["zone_name"]  # type: ignore[attr-defined]
        return handle

    def stop(self) -> float:
        cpu = _cpu(self.proc.pid) if self.proc else 0.0
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        return cpu


def _machine() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def run(processes: int, jobs: int, tmp: Path) -> dict[str, float]:
    await fresh_database(DB)
    emulators = Emulators(tmp)
    emu = await emulators.start()
    engine = make_engine(DB, pool_size=4)
    log = EventLog(AMQP)
    await log.start()
    serves = [ServeProcess(service_env(DB, AMQP, emu, FAILOVER_PROCESS_NAME=f"bench-{processes}-{i}",
                                      FAILOVER_LOG_LEVEL="WARNING", FAILOVER_OUTBOX_POLL_SECONDS="0.1"),
                           tmp / f"serve-{processes}-{i}.log") for i in range(processes)]
    try:
        await asyncio.gather(*(s.start(timeout=60) for s in serves))
        async with EmulatorControl(emu.control_url) as control:
            vms = [await seed_vm(engine, control, emu.appliance_vm_id, vm_name=f"bench {i}", os_type="ubuntu64Guest",
                                 disks=2) for i in range(jobs)]
            ids = [uuid.uuid4() for _ in vms]
            from failover.client import BusClient

            async with BusClient.connect(AMQP) as bus:
                cpu0 = {s.proc.pid: _cpu(s.proc.pid) for s in serves if s.proc}
                emu0, me0, (busy0, total0) = _cpu(emulators.proc.pid), _cpu(os.getpid()), _machine()  # type: ignore[union-attr]
                began = time.monotonic()
                for vm, job_id in zip(vms, ids, strict=True):
                    await bus.publish(FailoverRequested(request_id=job_id, vm_id=vm.vm_id, failover_type="test",
                                                        requested_by="bench"))
                await log.wait_ended([str(j) for j in ids], 600)
                elapsed = time.monotonic() - began
                cpu = sum(_cpu(pid) - c for pid, c in cpu0.items())
                emu_cpu = _cpu(emulators.proc.pid) - emu0  # type: ignore[union-attr]
                me_cpu = _cpu(os.getpid()) - me0
                busy1, total1 = _machine()
                machine = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        failed = [j for j in ids if log.ended(str(j)).type != "JobCompleted"]  # type: ignore[union-attr]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs did not complete")
        return {"seconds": elapsed, "jobs_per_second": jobs / elapsed, "serve_cpu_seconds": cpu,
                "emulators_cpu_seconds": emu_cpu, "client_cpu_seconds": me_cpu, "machine_busy": machine}
    finally:
        for s in serves:
            await s.stop()
        await log.close()
        await engine.dispose()
        emulators.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--processes", default="1,2,3")
    args = parser.parse_args()
    if shutil.which("rabbitmqctl"):
        from urllib.parse import urlsplit

        vhost = urlsplit(AMQP).path.lstrip("/")
        subprocess.run(["rabbitmqctl", "add_vhost", vhost], capture_output=True)
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], capture_output=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.processes.split(",")):
            results[n] = await run(n, args.jobs, Path(tmp))
            r = results[n]
            print(f"{n} serve process(es), {args.jobs} jobs: {r['seconds']:.1f} s, {r['jobs_per_second']:.1f} jobs/s "
                  f"(CPU seconds: serve {r['serve_cpu_seconds']:.0f}, emulators {r['emulators_cpu_seconds']:.0f}, "
                  f"client {r['client_cpu_seconds']:.0f}; the machine's {os.cpu_count()} cores "
                  f"{100 * r['machine_busy']:.0f}% busy)", flush=True)
    print(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
