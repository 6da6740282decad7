"""`failoverctl report`: a DR test's evidence, VM by VM.

For each VM of a wave (or each failover job given), its newest failover: whether it came up
(the job completed: its VM was started in CloudStack and reported Running), how long from the
request until then, how long the start itself took, where it failed and why, and whether the
test VM was cleaned up afterwards; then the wave's counts and times. As a table, as JSON, or
as CSV (one row per VM) for the auditor's spreadsheet.

The exit code says whether the test passed: 0 when every VM's failover completed, else the first
of 1 (one failed), 2 (cancelled), 3 (a VM with no failover, or no such job), 4 (still running).
"""

from __future__ import annotations

import csv
import io
import re
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from .progress import EXIT
from .wave import wave_exit_code

__all__ = ["CSV_COLUMNS", "SinceError", "cleanup_text", "csv_text", "exit_code", "note", "parse_since", "run_row",
           "summary"]

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ENDED_AS = {"completed": "completed", "cleaned_up": "completed", "failed": "failed", "cancelled": "cancelled"}
_CODES = {"completed": EXIT["completed"], "failed": EXIT["failed"], "cancelled": EXIT["cancelled"],
          "none": EXIT["rejected"], "running": EXIT["no_answer"]}


class SinceError(ValueError):
    """A --since that is neither a time nor a time ago."""


def parse_since(text: str, now: datetime) -> datetime:
    """`--since`: a time ago (`90m`, `2h`, `1d`, `30s`) or an ISO 8601 time (UTC unless it says
    otherwise); returned as naive UTC, as the tables hold their times."""
    if match := _AGO.match(text):
        return (now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])).astimezone(UTC).replace(tzinfo=None)
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SinceError(f"--since {text!r} is neither a time ago (90m, 2h, 1d) nor a time "
                         "(2026-12-08T02:00, UTC unless it names its zone)") from None
    return (at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)).replace(tzinfo=None)


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


def run_row(given: str, run: dict[str, Any] | None, why_none: str = "") -> dict[str, Any]:
    """The report's row of one VM (or job) `given`: from its failover's run (`reads.failover_runs`),
    or, with none, `why_none`."""
    if run is None:
        return {"given": given, "vm_id": None, "vm_name": None, "job_id": None, "failover_type": None,
                "outcome": "none", "status": None, "failed_step": None, "error_code": None, "detail": why_none,
                "requested_at": None, "running_at": None, "seconds_to_running": None, "startup_seconds": None,
                "queued_seconds": None, "destination_vm_id": None, "rolled_back": None, "cleanup": None}
    outcome = _ENDED_AS.get(run["status"], "running")
    running_at = run["completed_at"] if outcome == "completed" else None
    detail = ""
    if outcome == "failed":
        detail = f"failed at {run['failed_step'] or '?'}: {run['error_code'] or '?'}: {run['error_message'] or ''}".strip()
        if run["rolled_back"] is False:
            detail += f"; its rollback did not complete (failoverctl show {run['job_id']})"
    elif outcome == "cancelled":
        detail = "cancelled" + ("" if run["rolled_back"] is not False else
                                f"; its rollback did not complete (failoverctl show {run['job_id']})")
    elif outcome == "running":
        detail = f"still running ({run['status']})"
    cleanup = run["cleanup"]
    return {
        "given": given, "vm_id": run["vm_id"], "vm_name": run["source_vm_name"], "job_id": run["job_id"],
        "failover_type": run["job_type"], "outcome": outcome, "status": run["status"],
        "failed_step": run["failed_step"], "error_code": run["error_code"], "detail": detail,
        "requested_at": run["created_at"], "running_at": running_at,
        "seconds_to_running": _seconds(run["created_at"], running_at),
        "startup_seconds": run["startup_seconds"] if outcome == "completed" else None,
        "queued_seconds": _seconds(run["created_at"], run["started_at"]),
        "destination_vm_id": run["destination_vm_id"] if outcome == "completed" else None,
        "rolled_back": run["rolled_back"],
        "cleanup": None if cleanup is None else {"job_id": cleanup["job_id"], "status": cleanup["status"],
                                                 "completed_at": cleanup["completed_at"]},
    }


def cleanup_text(row: dict[str, Any], *, short: bool = False) -> str:
    """What became of a completed test failover's VM: cleaned up, being cleaned up, or left
    (`short`: without the times and commands, for the table)."""
    cleanup = row["cleanup"]
    if row["outcome"] != "completed" or row["failover_type"] != "test":
        return "-"
    if cleanup is None:
        return "not cleaned up" + ("" if short else f" (failoverctl cleanup {row['job_id']})")
    if cleanup["status"] == "completed":
        return "cleaned up" + ("" if short else f" {str(cleanup['completed_at'])[:19]}")
    if cleanup["status"] in ("failed", "cancelled"):
        return f"cleanup {cleanup['status']}" + ("" if short else
                                                 f": {cleanup['job_id']} (failoverctl show {cleanup['job_id']})")
    return "cleanup running" + ("" if short else f": {cleanup['job_id']}")


def note(row: dict[str, Any]) -> str:
    """The table's short word on a row: its cleanup once it came up, else where it stopped."""
    if row["outcome"] == "completed":
        return cleanup_text(row, short=True)
    if row["outcome"] in ("failed", "cancelled"):
        at = f"at {row['failed_step']}: {row['error_code']}" if row["failed_step"] else row["outcome"]
        return at + ("; rollback incomplete" if row["rolled_back"] is False else "")
    if row["outcome"] == "running":
        return f"now {row['status']}"
    return str(row["detail"]).split(" (")[0]  # (none: the reason without what to do, which follows the table)


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The wave's counts by outcome and its times: request -> Running over the VMs that came up
    (median, max), from the first request to the last VM Running."""
    counts = {outcome: sum(1 for r in rows if r["outcome"] == outcome)
              for outcome in ("completed", "failed", "cancelled", "running", "none")}
    times = [r["seconds_to_running"] for r in rows if r["seconds_to_running"] is not None]
    requested = [r["requested_at"] for r in rows if r["requested_at"]]
    up = [r["running_at"] for r in rows if r["running_at"]]
    first, last = (min(requested), max(up)) if requested and up else (None, None)
    return {"vms": len(rows), **counts,
            "seconds_to_running_median": round(statistics.median(times), 3) if times else None,
            "seconds_to_running_max": max(times) if times else None,
            "first_request": min(requested) if requested else None, "last_running": last,
            "wave_seconds": _seconds(first, last)}


def exit_code(rows: Sequence[dict[str, Any]]) -> int:
    return wave_exit_code(_CODES[r["outcome"]] for r in rows)


CSV_COLUMNS = ("given", "vm_id", "vm_name", "job_id", "failover_type", "outcome", "status", "requested_at",
               "running_at", "seconds_to_running", "startup_seconds", "queued_seconds", "destination_vm_id",
               "failed_step", "error_code", "rolled_back", "detail", "cleanup")


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """One CSV row per VM, with a header; `cleanup` as the sentence the table shows."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if (value := (cleanup_text(row) if col == "cleanup" else row[col])) is None
                         else value for col in CSV_COLUMNS])
    return out.getvalue()
