"""Live progress of a job from its events: a bar per step (rich), or JSON lines for scripts.

On a terminal the bars redraw in place; into a pipe or a file each change is one plain line
(a redrawn bar would be noise there). The outcome's summary goes to stdout on success and to
stderr otherwise, so a script that keeps stderr keeps the reason.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from aio_pika.abc import AbstractQueue
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from schemas.events import Event

from .client import BusClient

__all__ = ["EXIT", "action_text", "exit_code", "follow", "summary"]

EXIT = {"completed": 0, "failed": 1, "cancelled": 2, "rejected": 3, "no_answer": 4, "bad_settings": 5}

_MARK = {"completed": "[green]done", "skipped": "[yellow]skipped", "failed": "[red]failed",
         "running": "[cyan]running", "pending": "[dim]pending"}
_ENDS = ("JobCompleted", "JobFailed", "JobCancelled", "JobRejected")


def exit_code(last: Event | None) -> int:
    """0 for a completed job; 1 failed, 2 cancelled, 3 rejected, 4 no answer."""
    if last is None:
        return EXIT["no_answer"]
    return {"JobCompleted": 0, "JobFailed": 1, "JobCancelled": 2, "JobRejected": 3}.get(last.type, 1)


def summary(event: Event) -> str:
    """One line for a job's last event (or any other event: its type)."""
    d: dict[str, Any] = event.model_dump(mode="json")
    if event.type == "JobRejected":
        return f"rejected ({d['reason']}): {d['detail']}"
    if event.type == "JobFailed":
        return (f"failed at {d['failed_step']}: {d['error']['code']}: {d['error']['message']} "
                f"(rolled back: {str(d['rolled_back']).lower()})")
    if event.type == "JobCancelled":
        return f"cancelled (rolled back: {str(d['rolled_back']).lower()})"
    if event.type == "JobCompleted":
        return f"completed in {d['duration_seconds']:.1f} s: {json.dumps(d['outputs'])}"
    return event.type


def action_text(action: dict[str, Any]) -> str:
    """A ledger action (of RollbackStarted / RollbackFailed) in one plain line."""
    text = f"{action['action']} {action['resource_type']} {action['resource_id']}"
    return text + (f" ({action['detail']})" if action.get("detail") else "")


def _action(action: dict[str, Any]) -> str:
    return escape(action_text(action))


class _View:
    """The bars of one job, fed with events (and, for a job joined mid-way, its read model)."""

    def __init__(self, progress: Progress, console: Console, show_logs: bool) -> None:
        self.progress = progress
        self.console = console
        self.plain = not console.is_terminal
        self.show_logs = show_logs
        self.overall = progress.add_task("job", total=100, order=" ", state="[dim]waiting")
        self.tasks: dict[str, TaskID] = {}
        self.orders: dict[str, int] = {}

    def say(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def add_steps(self, steps: list[tuple[str, int, str]]) -> None:
        for name, order, status in steps:
            if name in self.tasks:
                continue
            done = status in ("completed", "skipped")
            self.orders[name] = order
            self.tasks[name] = self.progress.add_task(name, total=1, completed=1 if done else 0, order=order,
                                                      state=_MARK.get(status, status), start=status != "pending")

    def seed(self, detail: dict[str, Any]) -> None:
        """Start from what the read model knows of a job that is already running."""
        job = detail["job"]
        self.progress.update(self.overall, description=escape(f"{job['job_type']} of {job['vm_name'] or job['vm_id']}"[:34]),
                             completed=job["percent_complete"], state=f"[cyan]{escape(job['current_step'] or job['status'])}")
        self.add_steps([(s["step_name"], s["step_order"], s["status"]) for s in detail["steps"]])
        if self.plain:
            self.say(f"joined {job['id']} at {job['percent_complete']}% ({escape(job['current_step'] or job['status'])})")

    def step(self, name: str, status: str, percent: int | None = None, note: str = "") -> None:
        task = self.tasks.get(name)
        if task is not None:
            if status == "running":
                self.progress.start_task(task)
            if status in ("completed", "skipped"):
                self.progress.update(task, completed=1)
            self.progress.update(task, state=_MARK[status])
            if status in ("completed", "skipped", "failed"):
                self.progress.stop_task(task)
        if percent is not None:
            self.progress.update(self.overall, completed=percent)
        if self.plain:
            self.say(f"{self.orders.get(name, '?')}/{len(self.tasks) or '?'} {name}: {status}"
                     + (f" ({percent}%)" if percent is not None else "") + (f" {escape(note)}" if note else ""))

    def event(self, event: Event) -> None:
        d = event.model_dump(mode="json")
        if event.type == "JobAccepted":
            self.progress.update(self.overall, description=escape(f"{d['job_type']} of {d['vm_name']}"[:34]),
                                 state="[cyan]accepted")
            self.add_steps([(s["name"], s["order"], "pending") for s in d["steps"]])
            if self.plain:
                self.say(f"accepted: {d['job_type']} of {escape(d['vm_name'])}, {len(d['steps'])} steps")
        elif event.type == "StepStarted":
            self.progress.update(self.overall, state=f"[cyan]{d['step']}")
            self.step(d["step"], "running", d["percent_complete"])
        elif event.type in ("StepCompleted", "StepSkipped"):
            skipped = event.type == "StepSkipped"
            self.step(d["step"], "skipped" if skipped else "completed", d["percent_complete"],
                      d["reason"] if skipped else "")
        elif event.type == "StepFailed":
            self.step(d["step"], "failed")
            self.say(f"[red]step {d['step']} failed: {escape(d['error']['code'])}: {escape(d['error']['message'])}")
        elif event.type == "LogRecorded" and self.show_logs:
            style = {"ERROR": "red", "WARN": "yellow"}.get(d["level"], "dim")
            self.say(f"[{style}]  {d['level']:<5} {d['step'] or 'job'}: {escape(d['message'])}")
        elif event.type == "RollbackStarted":
            self.say(f"[yellow]rolling back ({escape(d['reason'])}): {len(d['actions'])} action(s)")
            for action in d["actions"]:
                self.say(f"[yellow]  - {_action(action)}")
            self.progress.update(self.overall, state="[yellow]rolling back")
        elif event.type == "RollbackCompleted":
            self.say(f"[green]rolled back: {len(d['actions'])} action(s) undone")
            self.progress.update(self.overall, state="[yellow]rolled back")
        elif event.type == "RollbackFailed":
            self.say(f"[red]rollback failed: {escape(d['error']['code'])}: {escape(d['error']['message'])}")
            self.say("[red]an operator must still:")
            for action in d["manual_actions"]:
                self.say(f"[red]  - {_action(action)}")
            self.progress.update(self.overall, state="[red]rollback failed")
        elif event.type in _ENDS:
            ok = event.type == "JobCompleted"
            if ok:
                self.progress.update(self.overall, completed=100)
            self.progress.update(self.overall, state=f"[{'green' if ok else 'red'}]{event.type}")


async def follow(client: BusClient, queue: AbstractQueue, *, as_json: bool, console: Console | None = None,
                 timeout: float | None = None, show_logs: bool = True, initial: dict[str, Any] | None = None,
                 outcome: Callable[[Event | None], int] = exit_code) -> int:
    """Show the events from `queue` until a job's last one; return `outcome(last event)`.

    `initial` is the job's read model (`reads.job_detail`) when joining a running job, so its
    earlier steps show. After `timeout` seconds in all, give up with exit code 4."""
    last: Event | None = None
    console = console or Console()
    err = Console(stderr=True, highlight=False)
    view: _View | None = None
    try:
        async with asyncio.timeout(timeout):
            if as_json:
                async for event in client.events(queue):
                    sys.stdout.write(event.model_dump_json() + "\n")
                    sys.stdout.flush()
                    last = event
            else:
                columns = (TextColumn("{task.fields[order]}. {task.description:<34}"), BarColumn(bar_width=30),
                           TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[state]}"),
                           TimeElapsedColumn())
                with Progress(*columns, console=console, transient=False, redirect_stdout=False,
                              redirect_stderr=False) as progress:
                    view = _View(progress, console, show_logs)
                    if initial is not None:
                        view.seed(initial)
                    async for event in client.events(queue):
                        last = event
                        view.event(event)
    except TimeoutError:
        err.print(f"no end of the job within {timeout:g} s; it goes on (failoverctl watch to follow it again)",
                  markup=False)
        return EXIT["no_answer"]
    code = outcome(last)
    if last is not None and last.type in _ENDS:
        line = summary(last)
        if code == 0:
            if not as_json:
                console.print(f"[green]{escape(line)}", highlight=False)
        else:
            err.print(line, markup=False)
    return code
