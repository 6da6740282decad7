"""`failoverctl demo`: one test failover end to end on this machine.

It applies the migrations, starts the emulators and `failoverctl serve` as their own processes
(as a user would), seeds a two-disk Windows VM, publishes a `FailoverRequested` as any client
would, shows the progress from the events, and prints the job's read-model rows and log lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiormq.exceptions import DeliveryError
from rich.console import Console
from rich.table import Table

from adapters.db.engine import make_engine
from adapters.db.migrate import ensure_database, upgrade
from emulators.client import EmulatorControl
from schemas.commands import FailoverRequested, FailoverRequestedOptions
from schemas.common import DriverInjection

from .client import BusClient
from .progress import follow
from .reads import job_detail, job_logs
from .seed import seed_vm
from .settings import ConnectionSettings

OUT = Path("demo-output")
console = Console()


async def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    handle = log.open("wb")
    return await asyncio.create_subprocess_exec(*argv, stdout=handle, stderr=asyncio.subprocess.STDOUT,
                                                env=env, start_new_session=True)


async def _wait_file(path: Path, proc: asyncio.subprocess.Process, deadline: float) -> dict[str, Any]:
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if proc.returncode is not None:
            raise RuntimeError(f"the emulators exited with status {proc.returncode}; see {OUT}/emulators.log")
        await asyncio.sleep(0.05)
    raise TimeoutError("the emulators did not start within 30 s")


async def _publish_when_served(client: BusClient, command: FailoverRequested, deadline: float) -> None:
    """Publish once the service has declared its queue (a mandatory publish is returned until then)."""
    while True:
        try:
            await client.publish(command)
            return
        except DeliveryError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service did not start within 60 s; see {OUT}/service.log") from None
            await asyncio.sleep(0.2)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 40)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)


async def run_demo(*, keep: bool = False, driver_injection: DriverInjection = "auto") -> int:
    settings = ConnectionSettings()
    OUT.mkdir(exist_ok=True)
    db_url = settings.database_url.get_secret_value()
    console.rule("[bold]1. database")
    await ensure_database(db_url)
    await asyncio.to_thread(upgrade, db_url)
    console.print("migrations applied")

    console.rule("[bold]2. emulated CloudStack and Volume Daemon")
    state_file = OUT / "emulators.json"
    state_file.unlink(missing_ok=True)
    env = dict(os.environ)
    emulators = await _spawn([sys.executable, "-m", "emulators", "--cloudstack-port", "0", "--volume-daemon-port", "0",
                              "--state-file", str(state_file)], OUT / "emulators.log", env)
    procs = [emulators]
    code = 4
    try:
        emu = await _wait_file(state_file, emulators, time.monotonic() + 30)
        console.print(f"CloudStack API {emu['cloudstack_url']}, Volume Daemon {emu['volume_daemon_url']}")

        console.rule("[bold]3. the service (failoverctl serve)")
        service_env = {
            **env,
            "FAILOVER_CLOUDSTACK_URL": emu["cloudstack_url"],
            "FAILOVER_CLOUDSTACK_API_KEY": emu["api_key"],
            "FAILOVER_CLOUDSTACK_SECRET_KEY": emu["secret_key"],
            "FAILOVER_ZONE": emu["zone_name"],
            "FAILOVER_TEMPLATE_ID": emu["template_id"],
            "FAILOVER_SERVICE_OFFERING_ID": emu["service_offering_id"],
            "FAILOVER_NETWORK_ID": emu["network_id"],
            "FAILOVER_APPLIANCE_VM_ID": emu["appliance_vm_id"],
            "FAILOVER_VOLUME_DAEMON_URL": emu["volume_daemon_url"],
            "FAILOVER_VIRTIO_INJECT_COMMAND": f"{sys.executable} -m emulators.inject --control-url {emu['control_url']}",
            "FAILOVER_METRICS_PORT": env.get("FAILOVER_METRICS_PORT", "0"),
            "FAILOVER_POLL_INTERVAL_SECONDS": env.get("FAILOVER_POLL_INTERVAL_SECONDS", "0.2"),
            "FAILOVER_LOG_FORMAT": "json",
        }
        service = await _spawn([sys.executable, "-m", "failover.cli", "serve"], OUT / "service.log", service_env)
        procs.append(service)
        console.print(f"started (pid {service.pid}); its log is {OUT}/service.log")

        console.rule("[bold]4. a replicated two-disk Windows VM")
        engine = make_engine(db_url, pool_size=2)
        try:
            async with EmulatorControl(emu["control_url"]) as control:
                vm = await seed_vm(engine, control, emu["appliance_vm_id"], test_network_id=emu["test_network_id"])
                console.print(f"VM {vm.vm_name!r} (vm_id {vm.vm_id}), volumes {', '.join(vm.volume_ids)} on the "
                              f"appliance {emu['appliance_vm_id']}")

                console.rule("[bold]5. FailoverRequested (test), progress from the events")
                job_id = uuid.uuid4()
                command = FailoverRequested(request_id=job_id, vm_id=vm.vm_id, failover_type="test",
                                            requested_by="demo",
                                            options=FailoverRequestedOptions(driver_injection=driver_injection))
                async with BusClient.connect(settings.amqp_url.get_secret_value()) as client:
                    queue = await client.bind(f"job.{job_id}.#")
                    await _publish_when_served(client, command, time.monotonic() + 60)
                    code = await follow(client, queue, as_json=False, console=console, timeout=300)

                console.rule("[bold]6. the read models")
                detail = await _projected(engine, str(job_id), time.monotonic() + 30)
                _print_detail(detail)
                table = Table("seq", "level", "step", "message", title="log_events")
                for line in await job_logs(engine, str(job_id)):
                    table.add_row(str(line["sequence"]), line["level"], line["step_name"] or "-", line["message"])
                console.print(table)

                console.rule("[bold]7. the emulated CloudStack afterwards")
                world = await control.state()
                _print_world(world, vm.volume_ids)
        finally:
            await engine.dispose()
    finally:
        if not keep:
            for proc in reversed(procs):
                await _stop(proc)
    return code


async def _projected(engine: Any, job_id: str, deadline: float) -> dict[str, Any]:
    while True:
        detail = await job_detail(engine, job_id)
        if detail and detail["job"]["status"] in ("completed", "failed", "cancelled"):
            return detail
        if time.monotonic() > deadline:
            raise TimeoutError("the projector did not record the job's end within 30 s")
        await asyncio.sleep(0.1)


def _print_detail(detail: dict[str, Any]) -> None:
    from .cli import print_job

    print_job(detail)


def _print_world(world: dict[str, Any], volume_ids: list[str]) -> None:
    vms = world.get("vms", [])
    vms = vms.values() if isinstance(vms, dict) else vms
    volumes = world.get("volumes", [])
    volumes = list(volumes.values()) if isinstance(volumes, dict) else list(volumes)
    table = Table("VM", "state", "volumes (device: id)", title="virtual machines")
    for vm in vms:
        attached = sorted((v.get("deviceid", -1), v["id"]) for v in volumes
                          if v.get("virtualmachineid") == vm["id"] and not v.get("destroyed"))
        table.add_row(vm.get("name", ""), vm.get("state", ""), ", ".join(f"{d}: {i[:8]}" for d, i in attached))
    console.print(table)
    snaps = world.get("snapshots", [])
    snaps = list(snaps.values()) if isinstance(snaps, dict) else list(snaps)
    console.print(f"snapshots of the replicated volumes: "
                  f"{[(s['id'][:8], s.get('state')) for s in snaps if s.get('volumeid') in volume_ids]}")
