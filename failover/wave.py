"""Many jobs at once from `failoverctl` (a wave): `request VM_ID VM_ID ...` or `--vms-file`, and
`cleanup JOB_ID ...`, `--vm` or `--vms-file` to undo the wave's test failovers.

A wave publishes one command per job on one connection, each job's events bound before its
command goes (so nothing is missed), then either waits for every job's answer (accepted or
rejected) or follows them all to their ends: on a terminal, one bar for the wave, its counts and
a table of the jobs running now, redrawn in place, with a line above it as each job ends; into a
pipe, one line per step and per end, each led by the VM's name; with `--json`, every event, one
per line on stdout. Reasons always go to stderr. The exit code is 0 when every job completed
(or, without `--follow`, was accepted), else the first of 1 (a job failed), 2 (cancelled), 3
(rejected), 4 (no answer or end in time) that any job had.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractQueue
from pydantic import BaseModel
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from schemas.events import Event

from .client import TERMINAL, BusClient
from .progress import EXIT, action_text, exit_code, summary

__all__ = ["WaveInputError", "WaveJob", "answers", "end_line", "follow_wave", "publish_all", "read_ids",
           "wave_exit_code"]

PUBLISH_AT_ONCE = 32  # commands (each with its binding) in flight on the connection at once
ANSWER_SECONDS = 30.0  # no answer from any job this long: say once that serve may not be running
_ROLLBACK_STEPS = ("rolling_back", "rolled_back", "rollback_failed")
_ORDER = (EXIT["failed"], EXIT["cancelled"], EXIT["rejected"], EXIT["no_answer"])


class WaveInputError(ValueError):
    """The list of VMs or jobs cannot make a wave (nothing was published)."""


def read_ids(given: Sequence[str], path: str | None, what: str, *, given_as: str = "argument") -> list[str]:
    """The ids given (`given_as` 1, 2, ...), then those of `path` (one per line: the first word;
    blank lines and `#` comments skipped; `-` is stdin), in order. A repeated id is an error: one
    job per VM (or per failover) at a time."""
    items: list[tuple[str, str]] = [(value.strip(), f"{given_as} {n}") for n, value in enumerate(given, 1)]
    if path is not None:
        try:  # (utf-8-sig: a file saved with a byte-order mark, as Excel and PowerShell do, reads the same)
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise WaveInputError(f"cannot read {path}: it is not UTF-8 ({exc}); save it as UTF-8 (PowerShell: "
                                 "Out-File -Encoding utf8) and run again") from exc
        except OSError as exc:
            raise WaveInputError(f"cannot read {path}: {exc}") from exc
        for number, line in enumerate(text.lstrip("\ufeff").splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if words:
                items.append((words[0], f"{path} line {number}"))
    seen: dict[str, tuple[str, str]] = {}  # (ids compare without case, as the database's columns do)
    for value, where in items:
        if not value:
            raise WaveInputError(f"{where} is empty: give a {what} id there")
        if value.casefold() in seen:
            first, at = seen[value.casefold()]
            raise WaveInputError(f"{what} {value} is given twice ({at}" + (f", as {first}," if first != value else "")
                                 + f" and {where}): a wave has one job each; remove one and run again (nothing "
                                 "was done)")
        seen[value.casefold()] = (value, where)
    if not seen:
        how = "as arguments" if given_as == "argument" else f"with {given_as} {what.upper()}_ID"
        raise WaveInputError(f"no {what} given" + (f" ({path} lists none)" if path is not None else "")
                             + f": give {what} ids {how}, or a file of them with --vms-file")
    return [value for value, _ in seen.values()]


def wave_exit_code(codes: Iterable[int]) -> int:
    """0 when every job's code is 0; else the first of failed, cancelled, rejected, no answer."""
    present = set(codes)
    return next((code for code in _ORDER if code in present), EXIT["completed"])


@dataclass
class WaveJob:
    """One job of the wave: its command, the label it shows under, and what is known of it."""

    job_id: str
    label: str  # the VM's id (its name once the job is accepted), or for a cleanup its failover's
    command: BaseModel | None  # (None: a job watched, not asked for)
    # a cancel's own id (its JobRejected comes under it); None for a new job's command, whose id
    # is the job's
    request_id: str | None = None
    vm_id: str | None = None  # the VM it was asked for, when it was asked for by VM
    recorded: tuple[str, str | None] | None = None  # a cancel's record: its outcome and the service's note
    first: Event | None = None  # JobAccepted or JobRejected
    last: Event | None = None
    step: str = ""
    step_order: int = 0
    total_steps: int = 0
    percent: int = 0
    state: str = "waiting"  # waiting | running | rolling back | the end event's type
    started: float | None = None
    published: bool = False
    not_taken: str | None = None  # why RabbitMQ did not take its command (then it has no job)
    manual: list[str] = field(default_factory=list)  # what an operator must still undo (RollbackFailed)

    @property
    def ended(self) -> bool:
        return self.last is not None and self.last.type in TERMINAL

    def seed(self, detail: dict[str, Any]) -> None:
        """Start from the read model (`reads.job_detail`) of a job joined while it runs."""
        job = detail["job"]
        self.label = job.get("vm_name") or self.label
        self.percent = job.get("percent_complete") or 0
        self.state = {"running": "running", "pending": "waiting"}.get(job.get("status"), self.state)
        current = job.get("current_step")
        if current in _ROLLBACK_STEPS:  # (the read model's step while a job rolls back)
            self.state = "rolling back"
        elif current:
            self.step = current
            self.step_order = next((s["step_order"] for s in detail["steps"] if s["step_name"] == current), 0)
            self.total_steps = len(detail["steps"])
        self.manual = [action_text(a) for a in detail.get("manual_actions") or []]
        began = min((s["started_at"] for s in detail["steps"] if s.get("started_at")), default=None)
        if began:  # (its first step's start: the wait for its turn is not its run)
            at = datetime.fromisoformat(began)
            ran = (datetime.now(UTC) - (at if at.tzinfo else at.replace(tzinfo=UTC))).total_seconds()
            self.started = time.monotonic() - max(0.0, ran)

    def see(self, event: Event) -> None:
        d: dict[str, Any] = event.model_dump(mode="json")
        if self.first is None:
            self.first = event
        if event.type == "JobAccepted" and d.get("vm_name"):
            self.label = d["vm_name"]
        elif event.type == "StepStarted":
            self.step, self.step_order, self.total_steps = d["step"], d["step_order"], d["total_steps"]
            self.percent = d["percent_complete"]
            self.state = "running"
            self.started = self.started or time.monotonic()
        elif event.type in ("StepCompleted", "StepSkipped"):
            self.percent = d["percent_complete"]
        elif event.type == "RollbackStarted":
            self.state = "rolling back"
        elif event.type == "RollbackFailed":
            self.manual = [action_text(a) for a in d["manual_actions"]]
        elif event.type == "RollbackCompleted":
            self.manual = []
        if event.type in TERMINAL:
            self.state = event.type
        self.last = event


async def publish_all(client: BusClient, jobs: Sequence[WaveJob], queue: AbstractQueue,
                      why: Callable[[Exception], str]) -> None:
    """Bind each job's events to `queue`, then publish its command (a few jobs at a time). A
    command RabbitMQ did not take (returned unroutable, or refused) is `not_taken`: `why(error)`."""
    from aiormq.exceptions import DeliveryError

    from adapters.bus import EVENTS_EXCHANGE

    gate = asyncio.Semaphore(PUBLISH_AT_ONCE)

    async def one(job: WaveJob) -> None:
        async with gate:
            await queue.bind(EVENTS_EXCHANGE, routing_key=f"job.{job.job_id}.#")
            if job.request_id is not None:  # (a refusal of a command about an existing job)
                await queue.bind(EVENTS_EXCHANGE, routing_key=f"job.{job.request_id}.JobRejected")
            assert job.command is not None
            try:
                await client.publish(job.command)
            except DeliveryError as exc:
                job.not_taken = why(exc)
            else:
                job.published = True

    await asyncio.gather(*(one(job) for job in jobs))


async def answers(client: BusClient, queue: AbstractQueue, jobs: Sequence[WaveJob], idle: float) -> None:
    """Wait until every job has its first event (accepted or rejected), or no new answer came
    for `idle` s (a big wave is answered for as long as answers keep coming)."""
    by_id = {job.job_id: job for job in jobs}
    left = len(jobs)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(idle) as within, \
                aclosing(client.events(queue, until_terminal=False)) as events:
            async for event in events:  # (closed before the connection is: its consumer ends cleanly)
                job = by_id.get(str(event.job_id))
                if job is None or job.first is not None:
                    continue
                job.see(event)
                within.reschedule(loop.time() + idle)
                left -= 1
                if not left:
                    return
    except TimeoutError:
        pass


def _middle(label: str, width: int = 40) -> str:
    """A long name cut in its middle: VMs named alike differ at their ends."""
    return label if len(label) <= width else label[: width // 2 - 1] + "…" + label[-(width - width // 2):]


class _Board:
    """The terminal's view of a wave: a bar and the counts, the jobs running now (rolling back
    first), one line each, and a line printed above as each job ends."""

    def __init__(self, jobs: Sequence[WaveJob], title: str, console: Console) -> None:
        self.jobs = jobs
        self.title = title
        self.console = console
        self.began = time.monotonic()

    def counts(self) -> dict[str, int]:
        out = {"completed": 0, "failed": 0, "cancelled": 0, "rejected": 0, "rolling back": 0, "running": 0,
               "waiting": 0}
        for job in self.jobs:
            key = {"JobCompleted": "completed", "JobFailed": "failed", "JobCancelled": "cancelled",
                   "JobRejected": "rejected"}.get(job.state, job.state)
            out[key] = out.get(key, 0) + 1
        return out

    def percent(self) -> float:
        return sum(100 if job.ended else job.percent for job in self.jobs) / max(1, len(self.jobs))

    def __rich__(self) -> Group:
        percent = self.percent()
        head = Table.grid(padding=(0, 1))
        head.add_row(Text(self.title, style="bold", no_wrap=True, overflow="ellipsis"),
                     ProgressBar(total=100, completed=percent, width=max(10, min(40, self.console.width - 40))),
                     f"{percent:3.0f}%", _clock(time.monotonic() - self.began))
        counts = ", ".join(f"{n} {what}" for what, n in self.counts().items() if n)
        parts: list[Any] = [head, Text(counts, no_wrap=True, overflow="ellipsis")]
        active = sorted((job for job in self.jobs if job.state in ("running", "rolling back")),
                        key=lambda job: job.state != "rolling back")
        if active:
            room = max(1, self.console.height - 6)  # the two lines above, the header, "... more", a spare
            named = max(12, min(40, self.console.width // 3))  # the VM column; the step's gives way first
            table = Table(box=None, pad_edge=False, show_edge=False)
            table.add_column("VM", no_wrap=True, min_width=named, max_width=named)
            table.add_column("step", no_wrap=True, overflow="ellipsis",  # (what the other columns leave)
                             max_width=max(8, self.console.width - named - 3 - 11 - 6))
            table.add_column("%", no_wrap=True, justify="right", min_width=3)
            table.add_column("running for", no_wrap=True, min_width=11)
            now = time.monotonic()
            for job in active[:room]:
                step = escape(f"{job.step} ({job.step_order}/{job.total_steps})" if job.step else "-")
                if job.state == "rolling back":
                    step = "[yellow]rolling back[/]" + (f" after {step}" if job.step else "")
                table.add_row(escape(_middle(job.label, named)), step, str(job.percent) if job.step else "-",
                              _clock(now - job.started) if job.started is not None else "-")
            parts.append(table)
            if len(active) > room:
                parts.append(Text(f"... and {len(active) - room} more running", no_wrap=True))
        return Group(*parts)


def _outcome(job: WaveJob) -> str:
    """How a job ended, in one line (a completed failover: its CloudStack VM, not all its outputs)."""
    assert job.last is not None
    d = job.last.model_dump(mode="json")
    if job.last.type != "JobCompleted":
        return summary(job.last)
    outputs = d["outputs"]
    made = (f": VM {outputs['vm_name']} ({outputs['destination_vm_id']})"
            if outputs.get("destination_vm_id") and outputs.get("vm_name") else "")
    return f"completed in {d['duration_seconds']:.1f} s{made}"


def end_line(job: WaveJob) -> str:
    return f"{job.label} ({job.job_id}): {_outcome(job)}"


def _clock(seconds: float) -> str:
    s = max(0, int(seconds))  # (another machine's clock may run ahead)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


async def follow_wave(client: BusClient, queue: AbstractQueue, jobs: Sequence[WaveJob], *, title: str,
                      as_json: bool, timeout: float, refused: Sequence[tuple[str, str]] = (),
                      lost: Sequence[tuple[str, str]] = (), outcome: Callable[[Event | None], int] = exit_code,
                      success: str = "completed", watched: bool = False, console: Console | None = None) -> int:
    """Show the wave's events until every job has ended (or `timeout` s); return the exit code
    (each job's by `outcome` of its last event; 0 is `success`). `refused`: (label, reason) of
    what never became a command (counted as rejected); `lost`: of commands RabbitMQ did not take
    (counted as no answer); both named in the summary. `watched`: jobs joined, not asked for
    (nothing to answer; some may have ended already)."""
    console = console or Console()
    err = Console(stderr=True, highlight=False, soft_wrap=True)  # (a reason is one line, however long)
    by_id = {job.job_id: job for job in jobs} | {job.request_id: job for job in jobs if job.request_id}
    left = sum(1 for job in jobs if not job.ended)
    board = _Board(jobs, title, console)
    plain = not as_json and not console.is_terminal
    width = max(len(job.label) for job in jobs)

    def note(job: WaveJob, event: Event) -> list[str]:
        """The plain lines of an event worth a line."""
        d = event.model_dump(mode="json")
        if event.type == "JobAccepted":
            return [f"accepted ({job.job_id}), {len(d['steps'])} steps"]
        if event.type == "StepStarted":
            return [f"{d['step_order']}/{d['total_steps']} {d['step']}: running ({d['percent_complete']}%)"]
        if event.type == "StepFailed":
            return [f"step {d['step']} failed: {d['error']['code']}: {d['error']['message']}"]
        if event.type == "RollbackStarted":
            return [f"rolling back ({d['reason']}): {len(d['actions'])} action(s)"]
        if event.type == "RollbackFailed":
            return [f"rollback failed: {d['error']['code']}: {d['error']['message']}; an operator must still:",
                    *(f"  - {line}" for line in job.manual)]
        if event.type in TERMINAL:
            return [_outcome(job)]
        return []

    async def no_answer_yet() -> None:
        wait = min(ANSWER_SECONDS, timeout)
        await asyncio.sleep(wait)
        if not any(job.first is not None or job.recorded is not None for job in jobs):
            err.print(f"no answer from the service for any of the {len(jobs)} jobs after {wait:g} s: is "
                      "`failoverctl serve` running? (still waiting; the commands wait in RabbitMQ for it"
                      + ("; a cancel shows in its job's events only at the job's next safe point, and without "
                         "the database nothing confirms it sooner)" if any(j.request_id for j in jobs) else ")"),
                      markup=False)

    live: Live | None = None
    watchdog = None if watched else asyncio.create_task(no_answer_yet())  # (watched: nothing to answer)
    try:
        async with asyncio.timeout(timeout), aclosing(client.events(queue, until_terminal=False)) as events:
            if not as_json and not plain:
                live = Live(board, console=console, refresh_per_second=4, transient=False)
                live.start()
            if left:  # (else every job watched has ended already)
                async for event in events:
                    job = by_id.get(str(event.job_id))
                    if job is None or job.ended:
                        continue
                    job.see(event)
                    if as_json:
                        sys.stdout.write(event.model_dump_json() + "\n")
                        sys.stdout.flush()
                    elif plain:
                        for line in note(job, event):
                            console.print(f"{job.label:<{width}}  {line}", highlight=False, markup=False, soft_wrap=True)
                    elif event.type == "RollbackFailed":
                        console.print(Text(f"       {job.label}: rollback failed; an operator must still: "
                                           + "; ".join(job.manual), style="red"))
                    elif job.ended:
                        ok = outcome(job.last) == 0
                        console.print(Text(("done   " if ok else "ENDED  ") + end_line(job),
                                           style="green" if ok else "red"))
                    if job.ended:
                        left -= 1
                        if not left:
                            break
    except TimeoutError:
        pass
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if live is not None:
            live.stop()
    codes = [outcome(job.last) if job.ended else EXIT["no_answer"] for job in jobs]
    _wave_summary(jobs, codes, [*refused, *lost], console if not as_json else None, err, timeout, success, watched)
    return wave_exit_code([*codes, *(EXIT["rejected"] for _ in refused), *(EXIT["no_answer"] for _ in lost)])


def _wave_summary(jobs: Sequence[WaveJob], codes: Sequence[int], refused: Sequence[tuple[str, str]],
                  console: Console | None, err: Console, timeout: float, success: str = "completed",
                  watched: bool = False) -> None:
    """The wave's end: each job that did not end as asked (and each item refused before the
    wave) on stderr with its reason and what to do; "all completed" on stdout (`console`) otherwise."""
    done = sum(1 for code in codes if code == 0)
    if done == len(jobs) and not refused:
        if console is not None:
            console.print(f"[green]all {len(jobs)} jobs {success}", highlight=False)
        return
    err.print(f"{done} of {len(jobs) + len(refused)} {success}; the others:", markup=False)
    for label, why in refused:
        err.print(f"  {label}: {why}", markup=False)
    for job, code in zip(jobs, codes, strict=True):
        if code == 0:
            continue
        # the service's note on a cancel it recorded (one of a job rolling back already)
        note = job.recorded[1] if job.recorded is not None and not job.recorded[0].startswith("rejected_") else None
        if job.ended:
            err.print(f"  {end_line(job)}", markup=False)
            if job.manual:
                err.print(f"    an operator must still: {'; '.join(job.manual)}; then: failoverctl rollback "
                          f"{job.job_id} (failoverctl show {job.job_id} has the details)", markup=False)
            if note:  # (a cancel of a job rolling back already: why it did not end cancelled)
                err.print(f"    its cancel was recorded, but {note}", markup=False)
            elif job.request_id and job.last is not None and job.last.type == "JobCompleted":
                err.print("    it completed before the cancel took effect" + (
                    f"; undo a test failover with: failoverctl cleanup {job.job_id}"
                    if job.last.job_type == "test-failover" else ""), markup=False)
        elif job.recorded is not None and not job.recorded[0].startswith("rejected_"):
            what = getattr(job.command, "type", "command")
            err.print(f"  {job.label} ({job.job_id}): its {what} was recorded; no end within {timeout:g} s: the "
                      f"job acts on it at its next safe point (failoverctl watch {job.job_id})"
                      + (f"; note: {note}" if note else ""), markup=False)
        elif job.first is not None or watched:
            err.print(f"  {job.label} ({job.job_id}): no end within {timeout:g} s; it goes on "
                      f"(failoverctl watch {job.job_id})", markup=False)
        else:
            err.print(f"  {job.label} ({job.job_id}): no answer within {timeout:g} s: is `failoverctl serve` "
                      "running? (the command waits in RabbitMQ for it)", markup=False)
