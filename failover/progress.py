"""Live progress of a job from its events: a bar per step (rich), or JSON lines for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from aio_pika.abc import AbstractQueue
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from schemas.events import Event

from .client import BusClient

_MARK = {"completed": "[green]done", "skipped": "[yellow]skipped", "failed": "[red]failed",
         "running": "[cyan]running", "pending": "[dim]pending"}


def exit_code(last: Event | None) -> int:
    """0 for a completed job; 1 failed, 2 cancelled, 3 rejected, 4 no answer."""
    if last is None:
        return 4
    return {"JobCompleted": 0, "JobFailed": 1, "JobCancelled": 2, "JobRejected": 3}.get(last.type, 1)


def summary(event: Event) -> str:
    d: dict[str, Any] = event.model_dump(mode="json")
    if event.type == "JobRejected":
        return f"rejected ({d['reason']}): {d['detail']}"
    if event.type == "JobFailed":
        return (f"failed at {d['failed_step']}: {d['error']['code']}: {d['error']['message']} "
                f"(rolled back: {d['rolled_back']})")
    if event.type == "JobCancelled":
        return f"cancelled (rolled back: {d['rolled_back']})"
    if event.type == "JobCompleted":
        return f"completed in {d['duration_seconds']:.1f} s: {json.dumps(d['outputs'])}"
    return event.type


async def follow(client: BusClient, queue: AbstractQueue, *, as_json: bool, console: Console | None = None,
                 timeout: float | None = None, show_logs: bool = True) -> int:
    """Show the job's events until its last one; return the exit code."""
    last: Event | None = None
    if as_json:
        async for event in client.events(queue, timeout=timeout):
            sys.stdout.write(event.model_dump_json() + "\n")
            sys.stdout.flush()
            last = event
        return exit_code(last)
    console = console or Console()
    columns = (TextColumn("{task.fields[order]}. {task.description:<26}"), BarColumn(bar_width=30),
               TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[state]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("job", total=100, order=" ", state="[dim]waiting")
        tasks: dict[str, Any] = {}
        async for event in client.events(queue, timeout=timeout):
            last = event
            d = event.model_dump(mode="json")
            if event.type == "JobAccepted":
                progress.update(overall, description=f"{d['job_type']} of {d['vm_name']}"[:26], state="[cyan]accepted")
                for step in d["steps"]:
                    tasks[step["name"]] = progress.add_task(step["name"], total=1, order=step["order"],
                                                            state=_MARK["pending"], start=False)
            elif event.type == "StepStarted":
                t = tasks.get(d["step"])
                if t is not None:
                    progress.start_task(t)
                    progress.update(t, state=_MARK["running"])
                progress.update(overall, completed=d["percent_complete"], state=f"[cyan]{d['step']}")
            elif event.type in ("StepCompleted", "StepSkipped"):
                t = tasks.get(d["step"])
                if t is not None:
                    progress.update(t, completed=1, state=_MARK["completed" if event.type == "StepCompleted" else "skipped"])
                    progress.stop_task(t)
                progress.update(overall, completed=d["percent_complete"])
            elif event.type == "StepFailed":
                t = tasks.get(d["step"])
                if t is not None:
                    progress.update(t, state=_MARK["failed"])
                    progress.stop_task(t)
                progress.console.print(f"[red]step {d['step']} failed: {d['error']['code']}: {d['error']['message']}")
            elif event.type == "LogRecorded" and show_logs:
                style = {"ERROR": "red", "WARN": "yellow"}.get(d["level"], "dim")
                progress.console.print(f"[{style}]  {d['level']:<5} {d['step'] or '-'}: {d['message']}", markup=True,
                                       highlight=False)
            elif event.type.startswith("Rollback"):
                progress.console.print(f"[yellow]{event.type}: {json.dumps({k: v for k, v in d.items() if k in ('reason', 'actions', 'error', 'manual_actions')})}")
                progress.update(overall, state=f"[yellow]{event.type}")
            if event.type in ("JobCompleted", "JobFailed", "JobCancelled", "JobRejected"):
                colour = "green" if event.type == "JobCompleted" else "red"
                if event.type == "JobCompleted":
                    progress.update(overall, completed=100)
                progress.update(overall, state=f"[{colour}]{event.type}")
                progress.console.print(f"[{colour}]{summary(event)}")
    return exit_code(last)
