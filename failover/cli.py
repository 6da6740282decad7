"""`failoverctl`: run the service, manage its database, and drive failovers as a client would.

Exit codes of the job commands: 0 completed, 1 failed, 2 cancelled, 3 rejected, 4 no answer in
time, 5 bad usage or settings.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from .settings import ConnectionSettings, Settings, redact_url

console = Console(stderr=False)


def _run(coro: Coroutine[Any, Any, int | None]) -> None:
    try:
        code = asyncio.run(coro)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code or 0)


def _settings(cls: type[ConnectionSettings] = ConnectionSettings) -> Any:
    try:
        return cls()
    except ValidationError as exc:
        problems = "; ".join(f"FAILOVER_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors())
        click.echo(f"failoverctl: settings are incomplete or wrong: {problems}. Set them in the environment "
                   "or in a .env file (README.md, Configuration).", err=True)
        sys.exit(5)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Failover orchestration for VMware-to-CloudStack migrations."""


# --------------------------------------------------------------------------- service

@main.command()
@click.option("--roles", default="orchestrator,relay,projector", show_default=True,
              help="Which parts to run in this process (comma separated), to scale them separately.")
def serve(roles: str) -> None:
    """Run the orchestrator, the outbox relay and the projectors until SIGTERM."""
    from .logs import configure
    from .service import ROLES, run_service

    settings = _settings(Settings)
    configure(settings.log_level, settings.log_format)
    wanted = tuple(r.strip() for r in roles.split(",") if r.strip())
    unknown = set(wanted) - set(ROLES)
    if unknown:
        raise click.BadParameter(f"unknown role(s) {', '.join(sorted(unknown))}; choose from {', '.join(ROLES)}")

    async def go() -> int:
        await run_service(settings, wanted)
        return 0

    _run(go())


@main.group()
def db() -> None:
    """The database schema."""


@db.command()
@click.option("--revision", default="head", show_default=True)
def upgrade(revision: str) -> None:
    """Apply the migrations (creates the database if it does not exist)."""
    from adapters.db.migrate import ensure_database
    from adapters.db.migrate import upgrade as do_upgrade

    settings = _settings()
    url = settings.database_url.get_secret_value()
    asyncio.run(ensure_database(url))
    do_upgrade(url, revision)
    click.echo(f"database {redact_url(url)} is at revision {revision}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def emulate(ctx: click.Context) -> None:
    """Run the CloudStack and Volume Daemon emulators (see `failoverctl emulate --help`)."""
    from emulators.runner import main as emulators_main

    sys.exit(emulators_main(ctx.args))


@main.group()
def schemas() -> None:
    """The message contract."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schemas_export(directory: Path) -> None:
    """Write the JSON Schema of every command and event into DIRECTORY."""
    from schemas.export import write_json_schemas

    for path in write_json_schemas(directory):
        click.echo(path)


@main.command()
def docs() -> None:
    """Regenerate docs/state-machine.md and docs/asyncapi.yaml from the code."""
    from .docs import write_docs

    for path in write_docs(Path("docs")):
        click.echo(path)


# --------------------------------------------------------------------------- client commands

async def _send(command: Any, job_id: str, follow: bool, as_json: bool, timeout: float) -> int:
    from .client import BusClient
    from .progress import follow as follow_events

    settings = _settings()
    async with BusClient.connect(settings.amqp_url.get_secret_value()) as client:
        queue = await client.bind(f"job.{job_id}.#") if follow else None
        if queue is None and not isinstance(command, str):
            rejected = await client.bind(f"job.{command.request_id}.JobRejected")
        else:
            rejected = None
        await client.publish(command)
        if not as_json:
            console.print(f"published {command.type} {command.request_id} (job {job_id})")
        if queue is not None:
            return await follow_events(client, queue, as_json=as_json, timeout=timeout)
        if rejected is not None:  # without --follow, still say so when it is refused at once
            from .progress import summary

            try:
                async for event in client.events(rejected, timeout=3):
                    click.echo(summary(event), err=True)
                    return 3
            except TimeoutError:
                pass
        if as_json:
            click.echo(json.dumps({"request_id": str(command.request_id), "job_id": job_id}))
        return 0


@main.command()
@click.argument("vm_id")
@click.option("--live", is_flag=True, help="A live (permanent) failover instead of a test failover.")
@click.option("--driver-injection", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True)
@click.option("--requested-by", default="failoverctl", show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Show live progress until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="JSON output (one event per line with --follow).")
@click.option("--timeout", default=7200.0, show_default=True, help="Seconds to wait with --follow.")
def request(vm_id: str, live: bool, driver_injection: str, requested_by: str, follow: bool, as_json: bool,
            timeout: float) -> None:
    """Request a failover of VM_ID (the source VM's vmware_vm_id)."""
    from schemas.commands import FailoverRequested

    rid = uuid.uuid4()
    cmd = FailoverRequested(request_id=rid, vm_id=vm_id, failover_type="live" if live else "test",
                            requested_by=requested_by, options={"driver_injection": driver_injection})
    _run(_send(cmd, str(rid), follow, as_json, timeout))


@main.command()
@click.argument("job_id", type=click.UUID)
@click.option("--follow", "-f", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", default=7200.0, show_default=True)
def cleanup(job_id: uuid.UUID, follow: bool, as_json: bool, timeout: float) -> None:
    """Undo the completed test failover JOB_ID."""
    from schemas.commands import CleanupRequested

    rid = uuid.uuid4()
    _run(_send(CleanupRequested(request_id=rid, failover_job_id=job_id, requested_by="failoverctl"),
               str(rid), follow, as_json, timeout))


@main.command()
@click.argument("job_id", type=click.UUID)
@click.option("--follow", "-f", is_flag=True, help="Follow the job until it ends.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", default=7200.0, show_default=True)
def cancel(job_id: uuid.UUID, follow: bool, as_json: bool, timeout: float) -> None:
    """Stop the running job JOB_ID at its next safe point and roll it back."""
    from schemas.commands import CancelRequested

    _run(_send(CancelRequested(request_id=uuid.uuid4(), job_id=job_id), str(job_id), follow, as_json, timeout))


@main.command()
@click.argument("job_id", type=click.UUID)
@click.option("--follow", "-f", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", default=7200.0, show_default=True)
def rollback(job_id: uuid.UUID, follow: bool, as_json: bool, timeout: float) -> None:
    """Retry the rollback of the failed job JOB_ID (after RollbackFailed)."""
    from schemas.commands import RollbackRequested

    _run(_send(RollbackRequested(request_id=uuid.uuid4(), job_id=job_id), str(job_id), follow, as_json, timeout))


@main.command()
@click.argument("job_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", default=7200.0, show_default=True)
def watch(job_id: uuid.UUID, as_json: bool, timeout: float) -> None:
    """Follow a job's events live (from now on) until it ends."""
    from .client import BusClient
    from .progress import follow as follow_events

    async def go() -> int:
        settings = _settings()
        async with BusClient.connect(settings.amqp_url.get_secret_value()) as client:
            queue = await client.bind(f"job.{job_id}.#")
            return await follow_events(client, queue, as_json=as_json, timeout=timeout)

    _run(go())


# --------------------------------------------------------------------------- reads

def _engine() -> Any:
    from adapters.db.engine import make_engine

    return make_engine(_settings().database_url.get_secret_value(), pool_size=2)


def _age(iso: str | None) -> str:
    if not iso:
        return "-"
    from datetime import datetime

    seconds = time.time() - datetime.fromisoformat(iso).replace(tzinfo=__import__("datetime").UTC).timestamp()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def jobs(limit: int, as_json: bool) -> None:
    """Recent jobs: VM, type, state, percent, age, duration."""
    from .reads import recent_jobs

    async def go() -> int:
        engine = _engine()
        try:
            rows = await recent_jobs(engine, limit)
        finally:
            await engine.dispose()
        if as_json:
            click.echo(json.dumps(rows, default=str))
            return 0
        table = Table("job", "vm", "type", "state", "%", "step", "age", "duration")
        for r in rows:
            duration = "-"
            if r["completed_at"] and r["created_at"]:
                from datetime import datetime

                duration = f"{(datetime.fromisoformat(r['completed_at']) - datetime.fromisoformat(r['created_at'])).total_seconds():.1f}s"
            table.add_row(r["id"], r["vm_name"] or r["vm_id"] or "-", r["job_type"], r["status"],
                          str(r["percent_complete"]), r["current_step"] or "-", _age(r["created_at"]), duration)
        console.print(table)
        return 0

    _run(go())


@main.command()
@click.argument("job_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True)
def show(job_id: uuid.UUID, as_json: bool) -> None:
    """A job's steps (with times, outputs, errors) and its resource ledger."""
    from .reads import job_detail

    async def go() -> int:
        engine = _engine()
        try:
            detail = await job_detail(engine, str(job_id))
        finally:
            await engine.dispose()
        if detail is None:
            click.echo(f"no job {job_id} in job_tracking", err=True)
            return 1
        if as_json:
            click.echo(json.dumps(detail, default=str))
            return 0
        print_job(detail)
        return 0

    _run(go())


def print_job(detail: dict[str, Any]) -> None:
    job = detail["job"]
    console.print(f"[bold]{job['id']}[/] {job['job_type']} of {job['vm_name'] or job['vm_id']}: "
                  f"[bold]{job['status']}[/] {job['percent_complete']}%"
                  + (f"  error: {job['error_message']}" if job.get("error_message") else ""))
    steps = Table("#", "step", "status", "started", "completed", "outputs / error", title="job_steps")
    for s in detail["steps"]:
        info = s["error_message"] or (json.dumps(s["outputs"]) if s["outputs"] else "")
        steps.add_row(str(s["step_order"]), s["step_name"], s["status"], s["started_at"] or "-",
                      s["completed_at"] or "-", info[:120])
    console.print(steps)
    if detail["ledger"]:
        ledger = Table("resource", "action", "id", "status", title="resource ledger")
        for e in detail["ledger"]:
            ledger.add_row(e["resource_key"], e["action"], e["resource_id"] or "-", e["status"])
        console.print(ledger)


@main.command()
@click.argument("job_id", type=click.UUID)
@click.option("--level", type=click.Choice(["DEBUG", "INFO", "WARN", "ERROR"], case_sensitive=False), default="DEBUG")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--json", "as_json", is_flag=True)
def logs(job_id: uuid.UUID, level: str, follow: bool, as_json: bool) -> None:
    """A job's log lines (log_events)."""
    from .reads import job_detail, job_logs

    async def go() -> int:
        engine = _engine()
        after = 0
        try:
            while True:
                for line in await job_logs(engine, str(job_id), level=level, after=after):
                    after = line["sequence"]
                    if as_json:
                        click.echo(json.dumps(line, default=str))
                    else:
                        console.print(f"{line['timestamp']} {line['level']:<5} {line['step_name'] or '-'}: "
                                      f"{line['message']}", highlight=False, markup=False)
                if not follow:
                    return 0
                detail = await job_detail(engine, str(job_id))
                if detail and detail["job"]["status"] in ("completed", "failed", "cancelled"):
                    return 0
                await asyncio.sleep(1.0)  # polling the read model for new lines
        finally:
            await engine.dispose()

    _run(go())


@main.command()
@click.option("--keep", is_flag=True, help="Leave the emulators and the service running afterwards.")
@click.option("--driver-injection", type=click.Choice(["auto", "always", "never"]), default="auto")
def demo(keep: bool, driver_injection: str) -> None:
    """Run a test failover end to end on this machine (emulated CloudStack and Volume Daemon)."""
    from .demo import run_demo

    _run(run_demo(keep=keep, driver_injection=driver_injection))


if __name__ == "__main__":  # pragma: no cover
    main()
