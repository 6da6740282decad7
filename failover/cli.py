"""`failoverctl`: run the service, manage its database, and drive failovers as a client would.

Exit codes of the job commands: 0 success (the job completed; for `cancel`, it ended cancelled;
for `rollback`, it rolled back), 1 failed, 2 cancelled, 3 rejected (or no such job), 4 no answer
in time, 5 bad usage or settings (or the broker or database unreachable at the configured URL).
`--json` prints machine-readable output on stdout (one event per line when following); reasons
always go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .settings import ConnectionSettings, Settings, redact_url

if TYPE_CHECKING:  # only a type here: like the rest, schemas is imported by the commands that use it
    from schemas.common import DriverInjection

console = Console(stderr=False)
OK, FAILED, CANCELLED, REJECTED, NO_ANSWER, BAD_SETTINGS = 0, 1, 2, 3, 4, 5
ANSWER_SECONDS = 30.0  # without --follow: how long to wait for the service's answer to a command


class Exit(Exception):
    """Stop a client command with an exit code and a message for stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _loop_factory() -> Any:
    """uvloop when installed (libuv's event loop: the service spends most of its time in
    socket I/O, where it is much cheaper than asyncio's default), else asyncio's own."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def _run(coro: Coroutine[Any, Any, int | None]) -> None:
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(coro)
    except KeyboardInterrupt:
        code = 130
    except Exit as exc:
        click.echo(f"failoverctl: {exc}", err=True)
        code = exc.code
    sys.exit(code or 0)


def _settings(cls: type[ConnectionSettings] = ConnectionSettings) -> Any:
    try:
        return cls()
    except ValidationError as exc:
        # (a check of several settings together has no field of its own: its message names them)
        problems = "; ".join((f"FAILOVER_{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "")
                             + e["msg"] for e in exc.errors())
        click.echo(f"failoverctl: settings are incomplete or wrong: {problems}. Set them in the environment "
                   "or in a .env file (README.md, Configuration).", err=True)
        sys.exit(BAD_SETTINGS)


class _Group(click.Group):
    """Usage errors exit 5 (click's own 2 would read as "cancelled")."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            exc.show()
            sys.exit(BAD_SETTINGS)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Failover orchestration for VMware-to-CloudStack migrations."""


# --------------------------------------------------------------------------- service

@main.command()
@click.option("--roles", default="orchestrator,relay,projector", show_default=True,
              help="Which parts to run in this process (comma separated), to scale them separately.")
def serve(roles: str) -> None:
    """Run the orchestrator, the outbox relay and the projectors until SIGTERM."""
    from adapters.db.migrate import SchemaBehind

    from .logs import configure
    from .service import ROLES, roles_problem, run_service

    settings = _settings(Settings)
    configure(settings.log_level, settings.log_format)
    wanted = tuple(r.strip() for r in roles.split(",") if r.strip())
    unknown = set(wanted) - set(ROLES)
    if unknown:
        raise click.BadParameter(f"unknown role(s) {', '.join(sorted(unknown))}; choose from {', '.join(ROLES)}")
    if (problem := roles_problem(settings, wanted)) is not None:
        raise click.BadParameter(problem)

    async def go() -> int:
        try:
            await run_service(settings, wanted)
        except SchemaBehind as exc:
            raise Exit(3, str(exc)) from None
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


_AGE_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400}
MIN_RETENTION_SECONDS = 86400


def retention_age(value: str) -> float:
    """`--older-than`'s value in seconds: a whole number and a unit, h, d or w (30d); at least a
    day, since a request redelivered after its job is pruned starts a new failover."""
    text = value.strip().lower()
    number, unit = text[:-1], text[-1:]
    if unit not in _AGE_UNITS or not number.isdigit():
        raise click.BadParameter(f"{value!r} is not an age: give a whole number and a unit, h, d or w (e.g. 30d)")
    seconds = int(number) * _AGE_UNITS[unit]
    if seconds > 100 * 365 * 86400:
        raise click.BadParameter(f"{value} is more than a hundred years: nothing would be pruned")
    if seconds < MIN_RETENTION_SECONDS:
        raise click.BadParameter(
            f"{value} is less than a day: a client's request redelivered after its job is pruned is taken "
            "as a new one (the inbox row that recognised it is gone), so keep at least 1d; 30d is usual")
    return seconds


@db.command()
@click.option("--older-than", "older_than", required=True,
              help="Prune the jobs that ended longer ago than this: a number and h, d or w (e.g. 30d); at least 1d.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--batch-size", default=200, show_default=True, type=click.IntRange(1, 5000),
              help="Jobs deleted per transaction (smaller holds fewer locks at a time).")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
def prune(older_than: str, dry_run: bool, batch_size: int, as_json: bool) -> None:
    """Delete every row about the jobs that ended before --older-than: their outbox events, log
    lines, steps, tracking, ledger, inbox rows and VM name claims, and old rejected requests. A
    job that still holds its VM (a completed live failover for good), a test failover whose
    cleanup is recent, a job whose events are not yet published or projected and one that still
    holds its VM's name are kept (the report says how many, and why). Safe while serve runs."""
    from datetime import timedelta

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from adapters.db.engine import is_connection_error, utcnow
    from adapters.db.retention import KEPT_REASONS, TABLES, PruneReport
    from adapters.db.retention import prune as do_prune

    try:
        seconds = retention_age(older_than)
    except click.BadParameter as exc:
        exc.param_hint = "'--older-than'"
        raise
    cutoff = utcnow() - timedelta(seconds=seconds)

    async def go() -> int:
        bar = Progress(TextColumn("pruning jobs"), BarColumn(), MofNCompleteColumn(),
                       console=Console(stderr=True), transient=True,
                       disable=as_json or not sys.stderr.isatty())
        task = bar.add_task("prune", total=None)

        def shown(report: PruneReport) -> None:
            bar.update(task, total=report.candidates, completed=min(report.scanned, report.candidates))

        async with _db() as engine:
            try:
                with bar:
                    report = await do_prune(engine, cutoff, batch=batch_size, dry_run=dry_run, progress=shown)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                url = redact_url(_settings().database_url.get_secret_value())
                raise Exit(BAD_SETTINGS, f"cannot reach the database at {url} (FAILOVER_DATABASE_URL): "
                                         f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}; "
                                         "what was pruned before stays pruned: run the same command again") from exc
        if as_json:
            _json(report.as_dict())
            return OK
        verb = "would delete" if dry_run else "deleted"
        console.print(f"{verb} {report.jobs:,} job(s) that ended before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
                      + (" (dry run: nothing was deleted)" if dry_run else ""), highlight=False)
        table = Table("table", "rows")
        for name in TABLES:
            table.add_row(name, f"{report.rows.get(name, 0):,}")
        console.print(table)
        for reason, count in report.kept.items():
            if count:
                console.print(f"kept {count:,} failover(s) that {KEPT_REASONS[reason]}", highlight=False, markup=False)
        return OK

    _run(go())


@main.command()
@click.option("--vm", "vm_ids", multiple=True, metavar="VM_ID",
              help="Also validate this VM as a test failover's first step would (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per check.")
def check(vm_ids: tuple[str, ...], as_json: bool) -> None:
    """Look at everything a failover needs before one is asked for: the database, RabbitMQ,
    CloudStack and each id the settings name, the Volume Daemon, the driver injection, and
    with --vm the VMs to fail over. Exit 0 when every check passed, 1 when one failed (notes
    do not fail)."""
    from .preflight import run_checks

    settings = _settings(Settings)
    for noisy in ("aiormq", "aio_pika"):  # (their connection errors come back in the check's line)
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    async def go() -> int:
        checks = await run_checks(settings, vm_ids)
        if as_json:
            for c in checks:
                _json(c.as_dict())
        else:
            table = Table("check", "", "found / what to do")
            for c in checks:
                mark = {True: "[green]ok[/]", False: "[red]FAILED[/]", None: "[yellow]note[/]"}[c.ok]
                table.add_row(c.name, mark, escape(c.detail))
            console.print(table)
            failed = [c.name for c in checks if c.ok is False]
            console.print(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed
                          else "every check passed: a failover can run with these settings", highlight=False)
        return 1 if any(c.ok is False for c in checks) else 0

    _run(go())


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
@click.option("--directory", default="docs", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def docs(directory: Path) -> None:
    """Regenerate docs/state-machine.md and docs/asyncapi.yaml from the code."""
    from .docs import write_docs

    for path in write_docs(directory):
        click.echo(path)


# --------------------------------------------------------------------------- client commands

@asynccontextmanager
async def _bus() -> AsyncIterator[Any]:
    """A `BusClient` on FAILOVER_AMQP_URL; an unreachable broker is exit code 5, named."""
    from .client import BusClient

    url = _settings().amqp_url.get_secret_value()
    for noisy in ("aiormq", "aio_pika"):  # their connection errors come back as one message below
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    async with AsyncExitStack() as stack:
        try:
            async with asyncio.timeout(20):
                client = await stack.enter_async_context(BusClient.connect(url))
        except Exception as exc:
            raise Exit(BAD_SETTINGS, f"cannot reach RabbitMQ at {redact_url(url)} (FAILOVER_AMQP_URL): "
                                     f"{type(exc).__name__}: {exc}") from exc
        yield client


def _not_taken(exc: Exception) -> str:
    """Why RabbitMQ did not take a command (a DeliveryError), and what to do."""
    from pamqp.commands import Basic

    url = redact_url(_settings().amqp_url.get_secret_value())
    if isinstance(getattr(exc, "frame", None), Basic.Return):
        return (f"RabbitMQ at {url} (FAILOVER_AMQP_URL) returned the command: no queue is bound to the exchange "
                "failover.commands there, so `failoverctl serve` has never started on this broker and vhost: "
                "start it there, or fix FAILOVER_AMQP_URL")
    return (f"RabbitMQ at {url} (FAILOVER_AMQP_URL) did not take the command ({exc}): see its log (a disk or "
            "memory alarm?), then send the command again")


async def _publish(client: Any, command: Any) -> None:
    """Publish one command; one that RabbitMQ did not take is exit code 4, with the reason."""
    from aiormq.exceptions import DeliveryError

    try:
        await client.publish(command)
    except DeliveryError as exc:
        raise Exit(NO_ANSWER, _not_taken(exc)) from None


@asynccontextmanager
async def _db() -> AsyncIterator[Any]:
    from adapters.db.engine import make_engine

    engine = make_engine(_settings().database_url.get_secret_value(), pool_size=2)
    try:
        yield engine
    finally:
        await engine.dispose()


_UNREADABLE = object()


async def _read(call: Coroutine[Any, Any, Any], *, required: bool = True) -> Any:
    """A read from the database; an unreachable one is exit code 5 (or `_UNREADABLE`)."""
    try:
        async with asyncio.timeout(20 if required else 5):  # an optional read must not hold things up
            return await call
    except Exception as exc:
        if not required:
            return _UNREADABLE
        url = redact_url(_settings().database_url.get_secret_value())
        reason = getattr(exc, "orig", None) or exc
        raise Exit(BAD_SETTINGS, f"cannot read the database at {url} (FAILOVER_DATABASE_URL): "
                                 f"{type(reason).__name__}: {reason}") from exc


def _json(value: Any) -> None:
    click.echo(json.dumps(value, default=str))


def _answer(command: Any, job_id: str, status: str, as_json: bool, *, reason: str | None = None,
            detail: str | None = None) -> int:
    """Report how the service answered a command (without --follow). An accepted command's
    `detail` is the service's note on it (a cancel of a job already rolling back: what happens
    instead)."""
    rid = str(command.request_id)
    if as_json:
        _json({"request_id": rid, "type": command.type, "job_id": job_id, "status": status,
               **({"reason": reason} if status == "rejected" else {}), **({"detail": detail} if detail else {})})
    if status == "rejected":
        click.echo(f"{command.type} rejected ({reason}): {detail}", err=True)
        return REJECTED
    if not as_json:
        what = {"CancelRequested": "cancel recorded: the job stops at its next safe point and rolls back",
                "RollbackRequested": "rollback retry started"}.get(command.type, "accepted")
        if detail:
            what = f"{command.type} recorded, but {detail}"
        console.print(f"{what}: job {job_id}; follow it with: failoverctl watch {job_id}", highlight=False)
    return OK


async def _signal_answers(client: Any, queue: Any, wanted: dict[str, str], started: tuple[str, ...],
                          idle: float) -> dict[str, tuple[str, str | None, str | None]]:
    """How the service answered each command about an existing job (request id -> that job's
    id): request id -> (accepted or rejected, reason, detail). From the bus, a JobRejected under
    the request id, or the job's own `started` events; and the service's record of the command
    whenever the database is reachable (a client with the broker alone goes by the bus), which
    also carries its note on an accepted one. Until all are answered, or none came for `idle` s."""
    from .reads import command_outcomes

    out: dict[str, tuple[str, str | None, str | None]] = {}
    by_job = {job_id: rid for rid, job_id in wanted.items()}
    news = asyncio.Event()

    def got(rid: str, answer: tuple[str, str | None, str | None], *, record: bool = False) -> None:
        # the service's record of the command always wins: a job's RollbackStarted on the bus may
        # have another cause (its own failed step, another client's retry) than this command
        if rid not in out or record:
            out[rid] = answer
            news.set()

    async def on_bus() -> None:
        async with aclosing(client.events(queue, until_terminal=False)) as events:
            async for event in events:
                key = str(event.job_id)
                if event.type == "JobRejected" and key in wanted:
                    got(key, ("rejected", event.reason, event.detail))
                elif event.type in started and key in by_job:
                    got(by_job[key], ("accepted", None, None))

    async def in_database() -> None:
        recorded: set[str] = set()
        async with _db() as engine:
            while left := [rid for rid in wanted if rid not in recorded]:
                found = await _read(command_outcomes(engine, left), required=False)
                if found is _UNREADABLE:
                    return  # no database here: the bus answers alone
                for rid, record in found.items():
                    recorded.add(rid)
                    outcome = record["outcome"]
                    got(rid, ("rejected", outcome.removeprefix("rejected_"), record["detail"])
                        if outcome.startswith("rejected_") else ("accepted", None, record["detail"]), record=True)
                await asyncio.sleep(0.2)  # the service records a command within milliseconds

    bus, database = asyncio.create_task(on_bus()), asyncio.create_task(in_database())
    try:
        while len(out) < len(wanted):
            news.clear()
            try:
                await asyncio.wait_for(news.wait(), idle)
            except TimeoutError:
                break
        else:  # all answered: the records (with their notes) a moment more at most
            await asyncio.wait([database], timeout=2)
    finally:
        for task in (bus, database):
            task.cancel()
        await asyncio.gather(bus, database, return_exceptions=True)
    return out


async def _new_job(command: Any, *, follow: bool, as_json: bool, timeout: float) -> int:
    """FailoverRequested / CleanupRequested: the new job's id is the request id."""
    from .progress import follow as follow_events

    job_id = str(command.request_id)
    async with _bus() as client:
        queue = await client.bind(f"job.{job_id}.#")  # before publishing: nothing is missed
        await _publish(client, command)
        if follow:
            if not as_json:
                console.print(f"published {command.type} {job_id}", highlight=False)
            return await follow_events(client, queue, as_json=as_json, timeout=timeout)
        try:  # (the events closed before the connection is: their consumer ends cleanly)
            async with asyncio.timeout(min(timeout, ANSWER_SECONDS)), \
                    aclosing(client.events(queue, until_terminal=False)) as events:
                first = await anext(events)
        except TimeoutError:
            raise Exit(NO_ANSWER, f"{command.type} {job_id} was published, but the service did not answer "
                                  f"within {min(timeout, ANSWER_SECONDS):g} s: is `failoverctl serve` running?") from None
    d = first.model_dump(mode="json")
    if first.type == "JobRejected":
        return _answer(command, job_id, "rejected", as_json, reason=d["reason"], detail=d["detail"])
    return _answer(command, job_id, "accepted", as_json)


async def _signal_job(command: Any, job_id: str, *, follow: bool, as_json: bool, timeout: float,
                      started: tuple[str, ...], succeeded: Callable[[Any], bool]) -> int:
    """CancelRequested / RollbackRequested: they act on an existing job. A refusal is a
    `JobRejected` with the request's id; an acceptance shows in the job's own stream (at once for
    a rollback, at the job's next safe point for a cancel) and in the service's record of the
    command, which is read too when the database is reachable."""
    from adapters.bus import EVENTS_EXCHANGE

    from .progress import follow as follow_events

    rid = str(command.request_id)

    def outcome(last: Any) -> int:
        if last is None:
            return NO_ANSWER
        if last.type == "JobRejected":
            return REJECTED
        return OK if succeeded(last) else FAILED

    async with _bus() as client:
        queue = await client.bind(f"job.{rid}.JobRejected")
        await queue.bind(EVENTS_EXCHANGE, routing_key=f"job.{job_id}.#")
        await _publish(client, command)
        if follow:
            if not as_json:
                console.print(f"published {command.type} {rid} for job {job_id}", highlight=False)
            noted = asyncio.create_task(_say_note(command, as_json))
            try:
                code = await follow_events(client, queue, as_json=as_json, timeout=timeout, outcome=outcome,
                                           console=console)
                await asyncio.wait([noted], timeout=2)  # a job that ended at once: its note a moment more
                return code
            finally:
                noted.cancel()
                await asyncio.gather(noted, return_exceptions=True)

        answers = await _signal_answers(client, queue, {rid: job_id}, started, min(timeout, ANSWER_SECONDS))
        if rid not in answers:
            raise Exit(NO_ANSWER, f"{command.type} {rid} was published, but the service did not answer "
                                  f"within {min(timeout, ANSWER_SECONDS):g} s: is `failoverctl serve` running?")
        status, reason, detail = answers[rid]
    return _answer(command, job_id, status, as_json, reason=reason, detail=detail)


async def _say_note(command: Any, as_json: bool) -> None:
    """While a command about an existing job is followed: the service's note on it, once it has
    recorded the command (a cancel of a job rolling back already changes nothing, and says so;
    its job's stream shows nothing of it). Nothing without the database, or without a note."""
    from .reads import command_outcome

    began = time.monotonic()
    async with _db() as engine:
        while True:
            record = await _read(command_outcome(engine, str(command.request_id)), required=False)
            if record is not None:
                break
            # the service records a command within milliseconds once it runs (not running: seldom)
            await asyncio.sleep(0.2 if time.monotonic() - began < 30 else 2.0)
    if record is _UNREADABLE or record["outcome"].startswith("rejected_") or not record["detail"]:
        return  # (a refusal comes as a JobRejected, in the stream)
    line = f"{command.type} recorded, but {record['detail']}"
    if as_json:
        click.echo(line, err=True)
    else:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _follow_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--timeout", default=7200.0, show_default=True,
                     help="Seconds to wait for the end of the job with --follow (for a wave: of all its jobs).")(f)
    f = click.option("--json", "as_json", is_flag=True,
                     help="JSON on stdout (one event per line with --follow).")(f)
    return click.option("--follow", "-f", is_flag=True, help="Show live progress until the job ends.")(f)


_VMS_FILE_HELP = "Also the VMs listed in FILE: one per line (the line's first word), # comments; - reads stdin."


def _wave_ids(given: tuple[str, ...], path: str | None, what: str, given_as: str = "argument") -> list[str]:
    from .wave import WaveInputError, read_ids

    try:
        return read_ids(given, path, what, given_as=given_as)
    except WaveInputError as exc:
        raise click.UsageError(str(exc)) from None


async def _note_records(jobs: list[Any]) -> None:
    """While a wave of cancels is followed: the service's record of each (`job.recorded`: its
    outcome and note), read every second while the database is reachable."""
    from .reads import command_outcomes

    rids = {job.request_id: job for job in jobs}
    async with _db() as engine:
        while left := [rid for rid, job in rids.items() if job.recorded is None]:
            found = await _read(command_outcomes(engine, left), required=False)
            if found is _UNREADABLE:
                return
            for rid, record in found.items():
                rids[rid].recorded = (record["outcome"], record["detail"])
            await asyncio.sleep(1.0)


PUBLISH_SECONDS = 60.0  # a wave's commands all confirmed by RabbitMQ within this, or it says why not


async def _wave(jobs: list[Any], *, title: str, follow: bool, as_json: bool, timeout: float,
                refused: list[tuple[str, str]] | None = None, outcome: Callable[[Any], int] | None = None,
                success: str = "completed", started: tuple[str, ...] = ()) -> int:
    """Publish the wave's commands, then follow them all (or wait for their answers). `refused`:
    (label, reason) of what never became a command (counted as rejected, named at the end).
    Commands about existing jobs (cancels: `job.request_id` set) are answered by a JobRejected
    under their own id, the service's record of them, or their job's `started` events, and
    followed to their jobs' ends with `outcome` (0: `success`). Interrupted (Ctrl-C), it says
    which commands went out: the service acts on them without this client."""
    from .progress import exit_code
    from .wave import answers, follow_wave, publish_all, wave_exit_code

    refused = list(refused or [])
    signals = any(job.request_id for job in jobs)
    answered: dict[str, tuple[str, str | None, str | None]] = {}
    lost: list[tuple[str, str]] = []
    try:
        async with _bus() as client:
            queue = await client.private_queue()
            if not as_json:
                console.print(f"publishing {len(jobs)} {jobs[0].command.type} ...", highlight=False)
            try:
                async with asyncio.timeout(PUBLISH_SECONDS):
                    await publish_all(client, jobs, queue, _not_taken)
            except TimeoutError:
                sent = [job for job in jobs if job.published]
                for job in sent:
                    click.echo(f"confirmed: {job.label} {job.job_id}", err=True)
                raise Exit(NO_ANSWER, f"RabbitMQ did not confirm the commands within {PUBLISH_SECONDS:g} s ({len(sent)} "
                                      f"of {len(jobs)} confirmed, listed above): a memory or disk alarm blocks "
                                      "publishers (rabbitmqctl status; its log). Those confirmed go ahead; send the "
                                      "others again once it is resolved") from None
            taken = [job for job in jobs if job.not_taken is None]
            lost = [(job.label, str(job.not_taken)) for job in jobs if job.not_taken is not None]
            if not taken:
                raise Exit(NO_ANSWER, f"none of the {len(jobs)} commands was taken: {jobs[0].not_taken}")
            if follow:
                if as_json:  # (a refused command's JobRejected comes under its own id: which job it was for)
                    for job in taken:
                        if job.request_id is not None:
                            _json({"request_id": job.request_id, "type": job.command.type, "job_id": job.job_id,
                                   "status": "published"})
                records = asyncio.create_task(_note_records(taken)) if signals else None
                try:
                    return await follow_wave(client, queue, taken, title=title, as_json=as_json, timeout=timeout,
                                             refused=refused, lost=lost, outcome=outcome or exit_code,
                                             success=success)
                finally:
                    if records is not None:
                        records.cancel()
                        await asyncio.gather(records, return_exceptions=True)
            if signals:
                by_rid = await _signal_answers(client, queue, {job.request_id: job.job_id for job in taken}, started,
                                               min(timeout, ANSWER_SECONDS))
                answered = {job.job_id: by_rid[job.request_id] for job in taken if job.request_id in by_rid}
            else:
                await answers(client, queue, taken, min(timeout, ANSWER_SECONDS))
                for job in taken:
                    if job.first is not None:
                        d = job.first.model_dump(mode="json")
                        answered[job.job_id] = (("rejected", d["reason"], d["detail"]) if d["type"] == "JobRejected"
                                                else ("accepted", None, None))
    except asyncio.CancelledError:  # Ctrl-C: what went out goes on
        sent_jobs = [job for job in jobs if job.published]
        click.echo(f"interrupted: at least {len(sent_jobs)} of {len(jobs)} commands were published; the service "
                   "acts on them without this client (failoverctl watch JOB_ID follows a job):", err=True)
        for job in sent_jobs:
            click.echo(f"  {job.label} {job.job_id}", err=True)
        raise
    for label, why in [*refused, *lost]:
        if as_json:
            _json({"label": label, "status": "refused" if (label, why) in refused else "not_taken", "detail": why})
        click.echo(f"{label}: {why}", err=True)
    if not answered:
        raise Exit(NO_ANSWER, f"the {len(taken)} commands were published, but the service answered none within "
                              f"{min(timeout, ANSWER_SECONDS):g} s: is `failoverctl serve` running? (the commands "
                              "wait in RabbitMQ for it)")
    codes = []
    for job in taken:
        status, reason, detail = answered.get(job.job_id, ("no_answer", None, None))
        codes.append({"accepted": OK, "rejected": REJECTED}.get(status, NO_ANSWER))
        d = job.first.model_dump(mode="json") if job.first is not None and not signals else {}
        if as_json:
            asked = job.command.model_dump(mode="json", include={"vm_id", "failover_job_id", "job_id"})
            _json({"request_id": job.request_id or job.job_id, "type": job.command.type, "job_id": job.job_id,
                   "status": status, "vm_id": d.get("vm_id") or job.vm_id, "vm_name": d.get("vm_name"), **asked,
                   **({"reason": reason} if status == "rejected" else {}), **({"detail": detail} if detail else {})})
        named = job.label if job.label == f"job {job.job_id}" else f"{job.label}: job {job.job_id}"
        if status == "rejected":
            click.echo(f"{named}: rejected ({reason}): {detail}", err=True)
        elif status != "accepted":
            click.echo(f"{named}: no answer to its {job.command.type} within {min(timeout, ANSWER_SECONDS):g} s of "
                       f"the last answer; it may still be taken (failoverctl watch {job.job_id})", err=True)
        elif detail:  # (a cancel of a job rolling back already: what happens instead)
            click.echo(f"{named}: {job.command.type} recorded, but {detail}", err=True)
        elif not as_json:
            console.print(f"{'recorded' if signals else 'accepted'}: {escape(named)}", highlight=False)
    if not as_json:
        console.print(f"{codes.count(OK)} of {len(jobs) + len(refused)} {'recorded' if signals else 'accepted'}; "
                      "failoverctl watch JOB_ID follows one", highlight=False)
    return wave_exit_code([*codes, *(REJECTED for _ in refused), *(NO_ANSWER for _ in lost)])


@main.command()
@click.argument("vm_ids", nargs=-1, metavar="[VM_ID]...")
@click.option("--vms-file", metavar="FILE", help=_VMS_FILE_HELP)
@click.option("--live", is_flag=True, help="A live (permanent) failover instead of a test failover.")
@click.option("--driver-injection", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True)
@click.option("--requested-by", default="failoverctl", show_default=True)
@_follow_options
def request(vm_ids: tuple[str, ...], vms_file: str | None, live: bool, driver_injection: DriverInjection,
            requested_by: str, follow: bool, as_json: bool, timeout: float) -> None:
    """Request a failover of each VM_ID (the source VM's vmware_vm_id).

    Several VMs, or any --vms-file, make a wave: one job each, all followed together with
    --follow (--timeout then covers the whole wave).

    Exit code: 0 accepted (with --follow: completed); else, of any job, the first of 1 failed,
    2 cancelled, 3 rejected (the reasons on stderr), 4 no answer (or end) in time."""
    from schemas.commands import FailoverRequested, FailoverRequestedOptions

    from .wave import WaveJob

    ids = _wave_ids(vm_ids, vms_file, "VM")
    kind: Literal["test", "live"] = "live" if live else "test"
    commands = [FailoverRequested(request_id=uuid.uuid4(), vm_id=vm_id, failover_type=kind, requested_by=requested_by,
                                  options=FailoverRequestedOptions(driver_injection=driver_injection))
                for vm_id in ids]

    async def go() -> int:
        if len(commands) == 1 and vms_file is None:
            return await _new_job(commands[0], follow=follow, as_json=as_json, timeout=timeout)
        jobs = [WaveJob(job_id=str(c.request_id), label=c.vm_id, command=c, vm_id=c.vm_id) for c in commands]
        code = await _wave(jobs, title=f"{kind} failover of {_count(len(jobs), 'VM')}", follow=follow,
                           as_json=as_json, timeout=timeout)
        done = [str(job.last.vm_id) for job in jobs if job.last is not None and job.last.type == "JobCompleted"]
        if follow and not as_json and kind == "test" and done:
            whole_file = vms_file not in (None, "-") and not vm_ids and len(done) == len(jobs)
            how = (f"--vms-file {shlex.quote(str(vms_file))}" if whole_file
                   else " ".join(f"--vm {shlex.quote(vm)}" for vm in done))
            console.print(f"undo the {len(done)} test failover(s) with: failoverctl cleanup {how}", highlight=False,
                          markup=False, soft_wrap=True)  # (one line, to copy)
        return code

    _run(go())


async def _resolve_cleanups(vm_ids: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Each VM's test failover to clean up (the job that holds the VM), as (VM, job), and the VMs
    without one, as (VM, the reason)."""
    from .reads import holders

    async with _db() as engine:
        held = await _read(holders(engine, vm_ids))
    found, missing = [], []
    for vm_id in vm_ids:
        job = held.get(vm_id.casefold())
        if job is not None and job["job_type"] == "test":
            found.append((vm_id, job["job_id"]))  # (the service says whether its state allows a cleanup)
        elif job is None:
            missing.append((vm_id, "no test failover to clean up: no job holds the VM (it was cleaned up, its "
                                    "failover rolled back, or it never had one; failoverctl jobs lists the recent)"))
        else:
            missing.append((vm_id, f"no test failover to clean up: the VM is held by a {job['job_type']} failover, "
                                   f"job {job['job_id']} ({job['status']})"))
    return found, missing


@main.command()
@click.argument("job_ids", nargs=-1, type=click.UUID, metavar="[JOB_ID]...")
@click.option("--vm", "vms", multiple=True, metavar="VM_ID",
              help="The test failover of this VM (the job that holds it); repeatable.")
@click.option("--vms-file", metavar="FILE", help=_VMS_FILE_HELP)
@click.option("--requested-by", default="failoverctl", show_default=True)
@_follow_options
def cleanup(job_ids: tuple[uuid.UUID, ...], vms: tuple[str, ...], vms_file: str | None, requested_by: str,
            follow: bool, as_json: bool, timeout: float) -> None:
    """Undo the completed test failover JOB_ID (a new cleanup job), or that of each VM given.

    Several, or any --vm or --vms-file, make a wave, as for `request`; the same exit codes (3 also
    for a VM that no test failover holds)."""
    from schemas.commands import CleanupRequested

    from .wave import WaveJob

    if not (job_ids or vms or vms_file):
        raise click.UsageError("give the test failovers to clean up: JOB_ID ..., --vm VM_ID or --vms-file FILE")
    by_vm = bool(vms or vms_file)
    vm_ids = _wave_ids(vms, vms_file, "VM", given_as="--vm") if by_vm else []

    async def go() -> int:
        found, missing = await _resolve_cleanups(vm_ids) if by_vm else ([], [])
        labels, vm_of = _targets(job_ids, found, "failover")
        commands = [CleanupRequested(request_id=uuid.uuid4(), failover_job_id=uuid.UUID(p), requested_by=requested_by)
                    for p in labels]
        if not commands:
            for vm_id, why in missing:
                click.echo(f"{vm_id}: {why}", err=True)
            return REJECTED
        if len(commands) == 1 and not by_vm:
            return await _new_job(commands[0], follow=follow, as_json=as_json, timeout=timeout)
        jobs = [WaveJob(job_id=str(c.request_id), label=labels[str(c.failover_job_id)], command=c,
                        vm_id=vm_of.get(str(c.failover_job_id))) for c in commands]
        return await _wave(jobs, title=f"cleanup of {_count(len(jobs), 'test failover')}", follow=follow,
                           as_json=as_json, timeout=timeout, refused=missing)

    _run(go())


async def _resolve_running(vm_ids: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Each VM's running failover, as (VM, job), and the VMs without one, as (VM, the reason and
    what to do). A running cleanup is not taken by VM (a cancelled cleanup stops between its steps
    and is not rolled back: a wave's file must not stop its undo by mistake); it is named."""
    from .reads import holders, running_jobs

    async with _db() as engine:
        running = await _read(running_jobs(engine, vm_ids))
        held = await _read(holders(engine, [v for v in vm_ids if v.casefold() not in running]))
    found, missing = [], []
    for vm_id in vm_ids:
        job = running.get(vm_id.casefold())
        holder = held.get(vm_id.casefold())
        if job is not None and job["job_type"] != "cleanup":
            found.append((vm_id, job["job_id"]))
            continue
        if job is not None:
            why = (f"its running job is cleanup {job['job_id']}, which is not cancelled by VM (a cancelled cleanup "
                   f"is not rolled back); to stop it anyway: failoverctl cancel {job['job_id']}")
        elif holder is None:
            why = "no job is running for the VM (check the id; failoverctl jobs lists the recent ones)"
        elif holder["status"] == "completed" and holder["job_type"] == "test":
            why = (f"no job is running for the VM: its test failover {holder['job_id']} completed (undo it with "
                   f"failoverctl cleanup --vm {shlex.quote(vm_id)})")
        elif holder["status"] == "completed":
            why = f"no job is running for the VM: its live failover {holder['job_id']} completed, for good"
        else:
            why = (f"no job is running for the VM: its {holder['job_type']} failover {holder['job_id']} is "
                   f"{holder['status']} and its rollback did not complete (failoverctl rollback {holder['job_id']})")
        missing.append((vm_id, why))
    return found, missing


def _targets(job_ids: tuple[uuid.UUID, ...], found: list[tuple[str, str]], what: str
             ) -> tuple[dict[str, str], dict[str, str]]:
    """The jobs a wave acts on, given by id and found by VM (one named both ways: once): job id ->
    its label (`what JOB_ID`, or the VM it was found by); and job id -> that VM."""
    labels = {str(j): f"{what} {j}" for j in job_ids}
    labels.update({job: vm for vm, job in found if job not in labels})
    return labels, {job: vm for vm, job in found}


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


@main.command()
@click.argument("job_ids", nargs=-1, type=click.UUID, metavar="[JOB_ID]...")
@click.option("--vm", "vms", multiple=True, metavar="VM_ID", help="The job running for this VM; repeatable.")
@click.option("--vms-file", metavar="FILE", help=_VMS_FILE_HELP)
@_follow_options
def cancel(job_ids: tuple[uuid.UUID, ...], vms: tuple[str, ...], vms_file: str | None, follow: bool, as_json: bool,
           timeout: float) -> None:
    """Stop the running job JOB_ID at its next safe point and roll it back; or the job running
    for each VM given (a wave: to stop a whole wave, give its --vms-file).

    Exit code: 0 the cancel was recorded (with --follow: the job ended cancelled), 1 the job
    ended otherwise, 3 rejected (e.g. the job is not running, or a VM runs none); for a wave, the
    first of 1, 3, 4 that any job had."""
    from schemas.commands import CancelRequested

    from .wave import WaveJob

    if not (job_ids or vms or vms_file):
        raise click.UsageError("give the jobs to cancel: JOB_ID ..., --vm VM_ID or --vms-file FILE")
    by_vm = bool(vms or vms_file)
    vm_ids = _wave_ids(vms, vms_file, "VM", given_as="--vm") if by_vm else []

    def cancelled(last: Any) -> int:
        if last is None:
            return NO_ANSWER
        if last.type == "JobRejected":
            return REJECTED
        return OK if last.type == "JobCancelled" else FAILED

    async def go() -> int:
        if not by_vm and len(job_ids) == 1:
            return await _signal_job(CancelRequested(request_id=uuid.uuid4(), job_id=job_ids[0]), str(job_ids[0]),
                                     follow=follow, as_json=as_json, timeout=timeout,
                                     started=("RollbackStarted", "JobCancelled"), succeeded=lambda last: cancelled(last) == OK)
        found, missing = await _resolve_running(vm_ids) if by_vm else ([], [])
        labels, vm_of = _targets(job_ids, found, "job")
        if not labels:
            for vm_id, why in missing:
                click.echo(f"{vm_id}: {why}", err=True)
            return REJECTED
        jobs = []
        for job_id, label in labels.items():
            cmd = CancelRequested(request_id=uuid.uuid4(), job_id=uuid.UUID(job_id))
            jobs.append(WaveJob(job_id=job_id, label=label, command=cmd, request_id=str(cmd.request_id),
                                state="cancel sent", vm_id=vm_of.get(job_id)))
        return await _wave(jobs, title=f"cancel of {_count(len(jobs), 'job')}", follow=follow, as_json=as_json,
                           timeout=timeout, refused=missing, outcome=cancelled, success="cancelled",
                           started=("RollbackStarted", "JobCancelled"))

    _run(go())


@main.command()
@click.argument("job_id", type=click.UUID)
@_follow_options
def rollback(job_id: uuid.UUID, follow: bool, as_json: bool, timeout: float) -> None:
    """Retry the rollback of the failed job JOB_ID (after RollbackFailed).

    Exit code: 0 the retry started (with --follow: the job rolled back completely), 1 the
    rollback failed again, 3 rejected."""
    from schemas.commands import RollbackRequested

    _run(_signal_job(RollbackRequested(request_id=uuid.uuid4(), job_id=job_id), str(job_id), follow=follow,
                     as_json=as_json, timeout=timeout, started=("RollbackStarted",),
                     succeeded=lambda last: last.type == "JobFailed" and last.rolled_back))


@main.command()
@click.argument("job_ids", nargs=-1, type=click.UUID, metavar="[JOB_ID]...")
@click.option("--vm", "vms", multiple=True, metavar="VM_ID", help="The newest job of this VM; repeatable.")
@click.option("--vms-file", metavar="FILE", help=_VMS_FILE_HELP)
@click.option("--json", "as_json", is_flag=True, help="One event per line on stdout.")
@click.option("--timeout", default=7200.0, show_default=True,
              help="Seconds to wait for the end of the job (for several: of all of them).")
def watch(job_ids: tuple[uuid.UUID, ...], vms: tuple[str, ...], vms_file: str | None, as_json: bool,
          timeout: float) -> None:
    """Follow a job until it ends: its steps so far (from the read model), then its events. Or
    several (a wave): JOB_IDs, or the newest job of each VM given (--vm, --vms-file), on one board.

    Exit code: 0 completed, 1 failed, 2 cancelled, 3 no such job, 4 not ended in time; for
    several, the first of 1, 2, 3, 4 that any had."""
    from schemas.parsing import parse_event

    from .progress import exit_code, summary
    from .progress import follow as follow_events
    from .reads import job_detail, job_details

    if not (job_ids or vms or vms_file):
        raise click.UsageError("give the jobs to watch: JOB_ID ..., --vm VM_ID or --vms-file FILE")
    by_vm = bool(vms or vms_file)
    vm_ids = _wave_ids(vms, vms_file, "VM", given_as="--vm") if by_vm else []

    async def one(jid: str) -> int:
        async with _bus() as client:
            queue = await client.bind(f"job.{jid}.#")  # first: what happens from now on is not missed
            async with _db() as engine:
                detail = await _read(job_detail(engine, jid), required=False)
            if detail is None:
                raise Exit(REJECTED, f"no job {jid} (the read model and the service know none)")
            ends = [] if detail is _UNREADABLE else detail["ends"]
            if ends and ends[-1]["type"] != "RollbackStarted":
                last = parse_event(json.dumps(ends[-1]).encode())
                if as_json:
                    _json(ends[-1])
                code = exit_code(last)
                message = f"job {jid} has already ended: {summary(last)}"
                if code:
                    click.echo(message, err=True)
                elif not as_json:
                    console.print(message, highlight=False, markup=False)
                return code
            initial = None if detail is _UNREADABLE else detail
            return await follow_events(client, queue, as_json=as_json, timeout=timeout, initial=initial)

    async def several() -> int:
        from adapters.bus import EVENTS_EXCHANGE

        from .reads import newest_jobs
        from .wave import WaveJob, end_line, follow_wave

        labels = {str(j): f"job {j}" for j in job_ids}
        refused: list[tuple[str, str]] = []
        if by_vm:
            async with _db() as engine:
                newest = await _read(newest_jobs(engine, vm_ids))
            for vm_id in vm_ids:
                if vm_id.casefold() in newest:
                    labels.setdefault(newest[vm_id.casefold()], vm_id)
                else:
                    refused.append((vm_id, "the VM has no job (check the id; failoverctl jobs lists the recent ones)"))
        async with _bus() as client:
            queue = await client.private_queue()
            for jid in labels:  # first: what happens from now on is not missed
                await queue.bind(EVENTS_EXCHANGE, routing_key=f"job.{jid}.#")
            async with _db() as engine:
                details = await _read(job_details(engine, list(labels)))
            jobs = []
            for jid, label in labels.items():
                if (detail := details.get(jid)) is None:
                    refused.append((label, f"no job {jid} (the read model and the service know none): check the "
                                           "id; failoverctl jobs lists the recent ones"))
                    continue
                job = WaveJob(job_id=jid, label=label, command=None)
                job.seed(detail)
                if ends := detail["ends"]:  # ended already; or rolling back (a retry of its rollback, too)
                    job.see(parse_event(json.dumps(ends[-1]).encode()))
                if job.ended:
                    if as_json:
                        _json(ends[-1])
                    else:  # (when: the newest job of a VM may be an older one than the wave's)
                        when = detail["job"].get("completed_at") or ends[-1].get("occurred_at") or "?"
                        line = f"ended already ({str(when)[:19]} UTC): {end_line(job)}"
                        if job.manual:
                            line += f"; an operator must still: {'; '.join(job.manual)}"
                        console.print(line, highlight=False, markup=False, soft_wrap=True)
                jobs.append(job)
            if not jobs:
                for label, why in refused:
                    click.echo(f"{label}: {why}", err=True)
                return REJECTED
            return await follow_wave(client, queue, jobs, title=f"watching {_count(len(jobs), 'job')}",
                                     as_json=as_json, timeout=timeout, refused=refused, watched=True)

    _run(one(str(job_ids[0])) if len(job_ids) == 1 and not by_vm else several())


# --------------------------------------------------------------------------- reads

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


_STATE_STYLE = {"completed": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON array of the jobs.")
def jobs(limit: int, as_json: bool) -> None:
    """Recent jobs, newest first: VM, type, state, percent, age, duration."""
    from .reads import recent_jobs

    async def go() -> int:
        async with _db() as engine:
            rows = await _read(recent_jobs(engine, limit))
        if as_json:
            _json(rows)
            return OK
        table = Table("job", "vm", "type", "state", "%", "step", "age", "duration")
        for r in rows:
            state = r["status"]
            table.add_row(r["id"], escape(r["vm_name"] or r["vm_id"] or "-"), r["job_type"],
                          f"[{_STATE_STYLE.get(state, 'white')}]{state}", str(r["percent_complete"]),
                          escape(r["current_step"] or "-"), _duration(r["age_seconds"]),
                          _duration(r["duration_seconds"]))
        console.print(table)
        return OK

    _run(go())


@main.command()
@click.argument("job_ids", nargs=-1, type=click.UUID, metavar="[JOB_ID]...")
@click.option("--vm", "vms", multiple=True, metavar="VM_ID", help="The newest failover of this VM; repeatable.")
@click.option("--vms-file", metavar="FILE", help=_VMS_FILE_HELP)
@click.option("--since", metavar="WHEN",
              help="Only failovers requested since WHEN: a time ago (90m, 2h, 1d) or a time (2026-12-08T02:00, UTC).")
@click.option("--json", "as_json", is_flag=True, help="The rows and the summary as one JSON object.")
@click.option("--csv", "as_csv", is_flag=True, help="One CSV row per VM, with a header.")
def report(job_ids: tuple[uuid.UUID, ...], vms: tuple[str, ...], vms_file: str | None, since: str | None,
           as_json: bool, as_csv: bool) -> None:
    """A DR test's evidence: for each VM (--vm, --vms-file: the wave's file) its newest failover
    (since WHEN), or each failover JOB_ID: whether its VM came up (started, and Running in
    CloudStack), the time from the request to Running (the job's completion) and of the start
    itself, where and why it failed, and whether the test VM was cleaned up; then the counts and
    the times of the whole.

    Exit code: 0 every VM's failover completed, else the first of 1 failed (rolling back, too),
    2 cancelled, 3 a VM with no failover (since WHEN) or no such failover job, 4 still running."""
    from datetime import UTC, datetime

    from .reads import failover_runs
    from .report import (
        SinceError,
        cleanup_text,
        csv_text,
        exit_code,
        note,
        parse_since,
        run_row,
        summary,
    )

    if not (job_ids or vms or vms_file):
        raise click.UsageError("give what to report on: --vms-file FILE (the wave's), --vm VM_ID or JOB_ID ...")
    if as_json and as_csv:
        raise click.UsageError("--json and --csv: choose one")
    try:
        after = parse_since(since, datetime.now(UTC)) if since else None
    except SinceError as exc:
        raise click.UsageError(str(exc)) from None
    vm_ids = _wave_ids(vms, vms_file, "VM", given_as="--vm") if (vms or vms_file) else []
    jobs = list(dict.fromkeys(str(j) for j in job_ids))

    async def go() -> int:
        async with _db() as engine:
            by_vm, by_job = await _read(failover_runs(engine, vm_ids=vm_ids, job_ids=jobs, since=after))
        none = "no failover" + (f" requested since {after.isoformat(sep=' ', timespec='seconds')} UTC" if after else "")
        rows = [run_row(vm, by_vm.get(vm.casefold()), f"{none} (check the id; failoverctl jobs lists the recent)")
                for vm in vm_ids]
        reported = {r["job_id"] for r in rows if r["job_id"]}
        for job_id in jobs:  # (--since is for VMs: a job named is the one wanted)
            run = by_job.get(job_id.casefold())
            if run is not None and run["job_id"] in reported:
                continue  # (named by its VM too: one row)
            if run is not None and run["job_type"] == "cleanup":
                rows.append(run_row(job_id, None, f"job {job_id} is a cleanup; report its failover "
                                                  f"{run['parent_job_id']}"))
            else:
                rows.append(run_row(job_id, run, f"no job {job_id} (failoverctl jobs lists the recent ones)"))
        total = summary(rows)
        if as_json:
            _json({"since": after.isoformat() + "+00:00" if after else None, "vms": rows, "summary": total})
        elif as_csv:
            click.echo(csv_text(rows), nl=False)
        else:
            table = Table("VM", "job", "requested UTC", "outcome", "to Running", "start took", "note")
            for r in rows:
                style = _STATE_STYLE.get(r["outcome"], "red" if r["outcome"] == "none" else "white")
                table.add_row(escape(r["vm_name"] or r["given"]), (r["job_id"] or "-")[:8],
                              (r["requested_at"] or "-")[:16].replace("T", " "), f"[{style}]{r['outcome']}",
                              _duration(r["seconds_to_running"]), _duration(r["startup_seconds"]), escape(note(r)))
            # (into a file or a pipe: wide enough for its rows, not the 80 columns rich assumes there)
            (console if console.is_terminal else Console(width=160)).print(table)
            console.print(_report_line(total), highlight=False, markup=False, soft_wrap=True)
            failed_cleanup = ("cleanup failed", "cleanup cancelled")
            for r in rows:  # in full: why each did not come up (or its test VM was not undone), what to do
                if r["outcome"] != "completed" or cleanup_text(r, short=True) in failed_cleanup:
                    job = f" (job {r['job_id']})" if r["job_id"] else ""
                    why = r["detail"] if r["outcome"] != "completed" else cleanup_text(r)
                    console.print(f"  {r['vm_name'] or r['given']}{job}: {why}", highlight=False,
                                  markup=False, soft_wrap=True)
            left = [r["job_id"] for r in rows if cleanup_text(r, short=True) in ("not cleaned up", *failed_cleanup)]
            if left:
                console.print(f"undo the {_count(len(left), 'test failover')} not cleaned up with: failoverctl "
                              f"cleanup {' '.join(left)}", highlight=False, markup=False, soft_wrap=True)
            if vm_ids and after is None:  # (an older test's run is no evidence of this one)
                click.echo("each VM's newest failover ever was reported: give --since the test's start (2h, or a "
                           "UTC time) so that an older run cannot stand in for a VM this test did not fail over",
                           err=True)
        return exit_code(rows)

    _run(go())


def _report_line(total: dict[str, Any]) -> str:
    counts = ", ".join(f"{total[k]} {label}" for k, label in (
        ("completed", "came up"), ("failed", "failed"), ("cancelled", "cancelled"), ("running", "still running"),
        ("none", "with no failover")) if total[k])
    line = f"{_count(total['vms'], 'VM')}: {counts}"
    if total["seconds_to_running_median"] is not None:
        line += (f"; request -> Running median {_duration(total['seconds_to_running_median'])}, "
                 f"max {_duration(total['seconds_to_running_max'])}")
    if total["wave_seconds"] is not None:
        line += (f"; first request {total['first_request'][:19]} UTC, last VM Running {total['last_running'][:19]} "
                 f"UTC ({_duration(total['wave_seconds'])})")
    return line


@main.command()
@click.argument("job_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="The job, steps, ledger, outputs and errors as one JSON object.")
def show(job_id: uuid.UUID, as_json: bool) -> None:
    """A job: its steps (with times, outputs, errors), its resource ledger, what it produced,
    and what an operator must still do when its rollback did not complete."""
    from .reads import job_detail

    async def go() -> int:
        async with _db() as engine:
            detail = await _read(job_detail(engine, str(job_id)))
        if detail is None:
            raise Exit(REJECTED, f"no job {job_id}")
        detail.pop("ends")  # (its end events: for watch; the outputs and errors carry what they say)
        if as_json:
            _json(detail)
        else:
            print_job(detail)
        return OK

    _run(go())


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def print_job(detail: dict[str, Any]) -> None:
    """`failoverctl show` for people."""
    job = detail["job"]
    state = job["status"]
    console.print(f"[bold]{job['id']}[/] {job['job_type']} of {escape(job['vm_name'] or job['vm_id'] or '-')}: "
                  f"[bold {_STATE_STYLE.get(state, 'white')}]{state}[/] {job['percent_complete']}%"
                  + (f"  (rolled back: {str(job['rolled_back']).lower()})" if job.get("rolled_back") is not None else ""))
    steps = Table("#", "step", "status", "started", "completed", "took", "outputs / error", title="steps")
    for s in detail["steps"]:
        info = (f"[red]{escape(s['error_code'] or '')}: {_short(s['error_message'])}" if s["error_message"]
                else _short(s["outputs"]) if s["outputs"] else "")
        steps.add_row(str(s["step_order"]), s["step_name"], f"[{_STATE_STYLE.get(s['status'], 'white')}]{s['status']}",
                      (s["started_at"] or "-")[:23], (s["completed_at"] or "-")[:23], _duration(s["duration_seconds"]),
                      info)
    console.print(steps)
    if detail["outputs"]:
        console.print("[bold]outputs[/]: " + escape(json.dumps(detail["outputs"])), highlight=False)
    for error in detail["errors"]:
        console.print(f"[red]error[/] in {error['step']}: {escape(error['code'])}: {escape(error['message'])}",
                      highlight=False)
    if detail["ledger"]:
        ledger = Table("resource", "type", "action", "id", "status", title="resource ledger")
        for e in detail["ledger"]:
            ledger.add_row(escape(e["resource_key"]), e["resource_type"], e["action"], e["resource_id"] or "-",
                           e["status"])
        console.print(ledger)
    if detail["manual_actions"]:
        manual = Table("action", "type", "id", "detail", title="[red]manual actions (the rollback did not complete)")
        for a in detail["manual_actions"]:
            manual.add_row(a["action"], a["resource_type"], a["resource_id"], escape(a.get("detail") or ""))
        console.print(manual)
        console.print(f"then: failoverctl rollback {job['id']}", highlight=False)


@main.command()
@click.argument("job_id", type=click.UUID)
@click.option("--level", type=click.Choice(["DEBUG", "INFO", "WARN", "ERROR"], case_sensitive=False), default="DEBUG",
              show_default=True, help="The lowest level shown.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def logs(job_id: uuid.UUID, level: str, follow: bool, as_json: bool) -> None:
    """A job's log lines (log_events), oldest first."""
    from .reads import ENDED, job_detail, job_logs

    async def go() -> int:
        jid, after = str(job_id), 0
        async with _db() as engine:
            if await _read(job_detail(engine, jid)) is None:
                raise Exit(REJECTED, f"no job {jid}")
            while True:
                # the state first, then the lines: a line projected in between is not lost
                detail = await _read(job_detail(engine, jid)) if follow else None
                for line in await _read(job_logs(engine, jid, level=level, after=after)):
                    after = line["sequence"]
                    if as_json:
                        _json(line)
                    else:
                        style = {"ERROR": "red", "WARN": "yellow"}.get(line["level"], "")
                        text = (f"{line['timestamp'][:23]} {line['level']:<5} {line['step_name'] or '-'}: "
                                f"{line['message']}")
                        console.print(f"[{style}]{escape(text)}" if style else escape(text), highlight=False)
                if not follow or (detail and detail["job"]["status"] in ENDED):
                    return OK
                await asyncio.sleep(0.5)  # polling the read model for new lines

    _run(go())


@main.command()
@click.option("--keep", is_flag=True, help="Leave the emulators and the service running afterwards.")
@click.option("--driver-injection", type=click.Choice(["auto", "always", "never"]), default="auto")
def demo(keep: bool, driver_injection: DriverInjection) -> None:
    """Run a test failover end to end on this machine (emulated CloudStack and Volume Daemon)."""
    from .demo import run_demo

    _run(run_demo(keep=keep, driver_injection=driver_injection))


if __name__ == "__main__":  # pragma: no cover
    main()
