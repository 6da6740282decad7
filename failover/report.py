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

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ENDED_AS = {"completed": "completed", "cleaned_up": "completed", "failed": "failed", "cancelled": "cancelled"}
_CODES = {"completed": EXIT["completed"], "failed": EXIT["failed"], "cancelled": EXIT["cancelled"],
          "none": EXIT["rejected"], "running": EXIT["no_answer"]}


class SinceError(ValueError):
    """A --since that is neither a time nor a time ago."""


def parse_since(text: str, now: datetime) -> datetime:
    """`--since`: a time ago (`90m`, `2h`, `1d`, `30s`, by this machine's clock) or an ISO 8601
    time (UTC unless it says otherwise); returned as naive UTC, as the tables hold their times."""
    bad = SinceError(f"--since {text!r} is neither a time ago (90m, 2h, 1d) nor a time "
                     "(2026-12-08T02:00, UTC unless it names its zone)")
    try:
        if match := _AGO.match(text):
            ago = timedelta(seconds=float(match[1]) * _UNITS[match[2].lower()])
            return (now - ago).astimezone(UTC).replace(tzinfo=None)
        at = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):  # (not a time; a time ago before year 1)
        raise bad from None
    return (at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)).replace(tzinfo=None)


def _at(value: str | None) -> str | None:
    """A time as the report writes it: ISO 8601 UTC, always to the microsecond."""
    return datetime.fromisoformat(value).isoformat(timespec="microseconds") if value else None


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


def _outcome(run: dict[str, Any]) -> str:
    """completed (its VM came up; cleaned up since, too), failed, cancelled, or running; a job
    rolling back is already failed (a step failed) or cancelled (a cancel, no step failed)."""
    if run["status"] in _ENDED_AS:
        return _ENDED_AS[run["status"]]
    if run["status"] == "rolling_back":  # (as the engine will end it: `JobModel.ends_cancelled`)
        cancelled = run["cancel_requested"] and not run["failed_step"] and not run["error_code"]
        return "cancelled" if cancelled and run["rolled_back"] is not False else "failed"
    return "running"


def run_row(given: str, run: dict[str, Any] | None, why_none: str = "") -> dict[str, Any]:
    """The report's row of one VM (or job) `given`: from its failover's run (`reads.failover_runs`),
    or, with none, `why_none`."""
    if run is None:
        return {"given": given, "vm_id": None, "vm_name": None, "job_id": None, "failover_type": None,
                "outcome": "none", "status": None, "failed_step": None, "error_code": None, "detail": why_none,
                "requested_at": None, "requested_by": None, "running_at": None, "seconds_to_running": None,
                "startup_seconds": None, "queued_seconds": None, "destination_vm_id": None, "rolled_back": None,
                "cleanup": None}
    outcome = _outcome(run)
    job = run["job_id"]
    running_at = _at(run["completed_at"]) if outcome == "completed" else None
    detail = ""
    if outcome == "failed":
        detail = f"failed at {run['failed_step'] or '?'}: {run['error_code'] or '?'}: {run['error_message'] or ''}".strip()
    elif outcome == "cancelled":
        detail = "cancelled"
    elif outcome == "running":
        detail = f"still running ({run['status']}; failoverctl watch {job})"
    if run["status"] == "rolling_back":
        detail += f"; rolling back now (failoverctl watch {job})"
    elif outcome in ("failed", "cancelled") and run["rolled_back"] is False:
        detail += f"; its rollback did not complete (failoverctl show {job})"
    if outcome == "failed":
        detail += f" (its log: failoverctl logs {job})"
    cleanup = run["cleanup"]
    return {
        "given": given, "vm_id": run["vm_id"], "vm_name": run["source_vm_name"], "job_id": job,
        "failover_type": run["job_type"], "outcome": outcome, "status": run["status"],
        "failed_step": run["failed_step"], "error_code": run["error_code"], "detail": detail,
        "requested_at": _at(run["created_at"]), "requested_by": run["requested_by"], "running_at": running_at,
        "seconds_to_running": _seconds(run["created_at"], running_at),
        "startup_seconds": run["startup_seconds"] if outcome == "completed" else None,
        "queued_seconds": _seconds(run["created_at"], run["started_at"]),
        "destination_vm_id": run["destination_vm_id"] if outcome == "completed" else None,
        "rolled_back": run["rolled_back"],
        "cleanup": None if cleanup is None else {
            "job_id": cleanup["job_id"], "status": cleanup["status"], "completed_at": _at(cleanup["completed_at"]),
            "failed_step": cleanup["failed_step"], "error_code": cleanup["error_code"],
            "error_message": cleanup["error_message"]},
    }


def cleanup_text(row: dict[str, Any], *, short: bool = False) -> str:
    """What became of a completed test failover's VM: cleaned up, being cleaned up, or left
    (`short`: without the times and commands, for the table)."""
    cleanup = row["cleanup"]
    if row["outcome"] != "completed" or row["failover_type"] != "test":
        return "-"
    if row["status"] == "cleaned_up" or (cleanup is not None and cleanup["status"] == "completed"):
        when = cleanup["completed_at"] if cleanup is not None else None
        return "cleaned up" + ("" if short or not when else f" {str(when)[:19]}")
    if cleanup is None:
        return "not cleaned up" + ("" if short else f" (failoverctl cleanup {row['job_id']})")
    if cleanup["status"] in ("failed", "cancelled"):
        why = f" at {cleanup['failed_step'] or '?'}: {cleanup['error_code'] or '?'}: {cleanup['error_message'] or ''}"
        return f"cleanup {cleanup['status']}" + ("" if short else (
            f"{why.rstrip(': ')} (failoverctl show {cleanup['job_id']}; then failoverctl cleanup {row['job_id']} "
            "again)"))
    return "cleanup running" + ("" if short else f": {cleanup['job_id']}")


def note(row: dict[str, Any]) -> str:
    """The table's short word on a row: its cleanup once it came up, else where it stopped."""
    if row["outcome"] == "completed":
        return cleanup_text(row, short=True)
    if row["outcome"] in ("failed", "cancelled"):
        at = f"at {row['failed_step']}: {row['error_code']}" if row["failed_step"] else row["outcome"]
        if row["status"] == "rolling_back":
            return at + "; rolling back"
        return at + ("; rollback incomplete" if row["rolled_back"] is False else "")
    if row["outcome"] == "running":
        return f"now {row['status']}"
    detail = str(row["detail"])  # (none: why, in a word; in full after the table)
    return "no such job" if detail.startswith("no job") else "a cleanup's id" if "is a cleanup" in detail \
        else "no failover"


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
               "requested_by", "running_at", "seconds_to_running", "startup_seconds", "queued_seconds",
               "destination_vm_id", "failed_step", "error_code", "rolled_back", "detail", "cleanup")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula


def _cell(value: Any) -> Any:
    """A CSV cell: empty for None; a text a spreadsheet would take for a formula (a VM's name, an
    error's text, from vSphere or CloudStack) led by a quote, so that it stays text."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """One CSV row per VM, with a header; `cleanup` as the sentence the table's notes give (empty
    for a failover that did not come up, or a live one)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell((cleanup_text(row).removeprefix("-") or None) if col == "cleanup" else row[col])
                         for col in CSV_COLUMNS])
    return out.getvalue()
