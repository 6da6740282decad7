"""`failoverctl report`'s pure parts (failover/report.py): the rows, the summary, the exit code,
the CSV and --since. The command itself runs against the service in tests/test_cli.py."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from failover.report import (
    SinceError,
    cleanup_text,
    csv_text,
    exit_code,
    note,
    parse_since,
    run_row,
    summary,
)

NOW = datetime(2026, 12, 8, 4, 0, 0, tzinfo=UTC)


def _run(status: str, **kw: Any) -> dict[str, Any]:
    run = {"job_id": "job-1", "vm_id": "vm-1", "job_type": "test", "status": status, "source_vm_name": "web-01",
           "destination_vm_id": "dest-1", "error_message": None, "failed_step": None, "error_code": None,
           "rolled_back": None, "created_at": "2026-12-08T03:00:00+00:00", "started_at": "2026-12-08T03:00:02+00:00",
           "completed_at": "2026-12-08T03:01:30.500000+00:00", "cancel_requested": False, "parent_job_id": None,
           "requested_by": "dr-runbook", "cleanup": None, "startup_seconds": 12.25}
    return {**run, **kw}


def test_since_takes_a_time_ago_or_a_time_and_gives_naive_utc() -> None:
    assert parse_since("90m", NOW) == datetime(2026, 12, 8, 2, 30)
    assert parse_since(" 2h ", NOW) == datetime(2026, 12, 8, 2, 0)
    assert parse_since("1d", NOW) == datetime(2026, 12, 7, 4, 0)
    assert parse_since("30s", NOW) == datetime(2026, 12, 8, 3, 59, 30)
    assert parse_since("2026-12-08T02:00", NOW) == datetime(2026, 12, 8, 2, 0)  # UTC unless it says
    assert parse_since("2026-12-08T04:00+02:00", NOW) == datetime(2026, 12, 8, 2, 0)
    assert parse_since("2026-12-08 02:00:05", NOW) == datetime(2026, 12, 8, 2, 0, 5)
    assert parse_since("2H", NOW) == datetime(2026, 12, 8, 2, 0)
    for bad in ("yesterday", "2h30", "-1h", "", "12/08/2026", "99999999999d"):  # (the last: before year 1)
        with pytest.raises(SinceError, match="neither a time ago"):
            parse_since(bad, NOW)


def test_a_completed_failover_came_up_with_its_times_and_its_cleanup() -> None:
    row = run_row("vm-1", _run("completed"))
    assert row["outcome"] == "completed" and row["running_at"] == "2026-12-08T03:01:30.500000+00:00"
    assert row["seconds_to_running"] == 90.5 and row["queued_seconds"] == 2.0 and row["startup_seconds"] == 12.25
    assert row["destination_vm_id"] == "dest-1" and row["detail"] == "" and row["requested_by"] == "dr-runbook"
    assert row["requested_at"] == "2026-12-08T03:00:00.000000+00:00"  # always to the microsecond
    assert note(row) == "not cleaned up" and cleanup_text(row) == "not cleaned up (failoverctl cleanup job-1)"
    done = run_row("vm-1", _run("cleaned_up", cleanup=_cleanup("c-1", "completed", "2026-12-08T03:10:00+00:00")))
    assert done["outcome"] == "completed" and done["status"] == "cleaned_up"  # it came up, then was undone
    assert note(done) == "cleaned up" and cleanup_text(done) == "cleaned up 2026-12-08T03:10:00"
    assert cleanup_text(run_row("vm-1", _run("cleaned_up"))) == "cleaned up"  # (its status says so)
    failed = run_row("vm-1", _run("completed", cleanup=_cleanup("c-2", "failed", failed_step="power-off",
                                                                 error_code="CLOUDSTACK_ERROR")))
    assert note(failed) == "cleanup failed"
    assert cleanup_text(failed) == ("cleanup failed at power-off: CLOUDSTACK_ERROR (failoverctl show c-2; then "
                                    "failoverctl cleanup job-1 again)")
    said = run_row("vm-1", _run("completed", cleanup=_cleanup("c-4", "cancelled", failed_step="vm-deletion",
                                                              error_code="CANCELLED", error_message="stopped")))
    assert cleanup_text(said) == ("cleanup cancelled at vm-deletion: CANCELLED: stopped (failoverctl show c-4; then "
                                  "failoverctl cleanup job-1 again)")
    running = run_row("vm-1", _run("completed", cleanup=_cleanup("c-3", "volume-detachment")))
    assert note(running) == "cleanup running" and cleanup_text(running) == "cleanup running: c-3"
    live = run_row("vm-1", _run("completed", job_type="live"))
    assert cleanup_text(live) == "-"  # nothing to undo: it is for good


def test_a_failed_or_cancelled_failover_says_where_and_whether_it_rolled_back() -> None:
    failed = run_row("vm-1", _run("failed", failed_step="vm-creation", error_code="CLOUDSTACK_ERROR",
                                  error_message="no capacity", rolled_back=True))
    assert failed["outcome"] == "failed" and failed["running_at"] is None and failed["seconds_to_running"] is None
    assert failed["startup_seconds"] is None and failed["destination_vm_id"] is None
    assert failed["detail"] == "failed at vm-creation: CLOUDSTACK_ERROR: no capacity (its log: failoverctl logs job-1)"
    assert note(failed) == "at vm-creation: CLOUDSTACK_ERROR"
    left = run_row("vm-1", _run("failed", failed_step="volume-attachment", error_code="X", rolled_back=False))
    assert "; its rollback did not complete (failoverctl show job-1)" in left["detail"]
    assert note(left) == "at volume-attachment: X; rollback incomplete"
    cancelled = run_row("vm-1", _run("cancelled", rolled_back=True))
    assert cancelled["outcome"] == "cancelled" and note(cancelled) == "cancelled"
    running = run_row("vm-1", _run("vm-creation", completed_at=None))
    assert running["outcome"] == "running" and note(running) == "now vm-creation"
    assert running["detail"] == "still running (vm-creation; failoverctl watch job-1)"
    # a job rolling back has failed already (or was cancelled), whatever its rollback's end: not "running"
    undoing = run_row("vm-1", _run("rolling_back", completed_at=None, failed_step="vm-creation", error_code="E"))
    assert undoing["outcome"] == "failed" and note(undoing) == "at vm-creation: E; rolling back"
    assert "; rolling back now (failoverctl watch job-1)" in undoing["detail"]
    stopping = run_row("vm-1", _run("rolling_back", completed_at=None, cancel_requested=True))
    assert stopping["outcome"] == "cancelled" and note(stopping) == "cancelled; rolling back"
    # as the engine ends it: a cancel with an error (the engine gave up on the job) or with a
    # rollback that did not complete ends failed
    for how in ({"error_code": "ENGINE_CRASHED"}, {"rolled_back": False}):
        assert run_row("vm-1", _run("rolling_back", completed_at=None, cancel_requested=True, **how))["outcome"] \
            == "failed", how
    assert exit_code([run_row("a", _run("completed")), undoing]) == 1
    none = run_row("vm-9", None, "no failover (check the id)")
    assert none["outcome"] == "none" and none["detail"] == "no failover (check the id)"
    assert note(none) == "no failover"


def test_the_summary_counts_and_times_and_the_exit_code_orders_the_worst_first() -> None:
    rows = [run_row("a", _run("completed")),
            run_row("b", _run("completed", created_at="2026-12-08T02:59:00+00:00",
                              completed_at="2026-12-08T03:02:00+00:00")),
            run_row("c", _run("failed", failed_step="s", error_code="E", rolled_back=True)),
            run_row("d", None, "no failover")]
    total = summary(rows)
    assert (total["vms"], total["completed"], total["failed"], total["none"]) == (4, 2, 1, 1)
    assert total["seconds_to_running_median"] == pytest.approx((90.5 + 180.0) / 2)
    assert total["seconds_to_running_max"] == 180.0
    assert total["first_request"] == "2026-12-08T02:59:00.000000+00:00"
    assert total["last_running"] == "2026-12-08T03:02:00.000000+00:00" and total["wave_seconds"] == 180.0
    assert exit_code(rows) == 1  # failed before no failover
    assert exit_code(rows[:2]) == 0
    assert exit_code([rows[0], rows[3]]) == 3
    assert exit_code([rows[0], run_row("e", _run("cancelled")), rows[3]]) == 2
    assert exit_code([rows[0], run_row("f", _run("pending", completed_at=None))]) == 4
    assert summary([])["seconds_to_running_median"] is None


def test_the_csv_has_a_header_and_one_row_per_vm_and_no_formulas() -> None:
    rows = [run_row("vm-1", _run("completed")), run_row("vm-2", None, 'no failover, "quoted"'),
            run_row("vm-3", _run("completed", source_vm_name="=HYPERLINK(\"x\")"))]
    parsed = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert [r["given"] for r in parsed] == ["vm-1", "vm-2", "vm-3"]
    assert parsed[2]["vm_name"] == "'=HYPERLINK(\"x\")"  # text, not a formula, in a spreadsheet
    assert parsed[0]["requested_by"] == "dr-runbook"
    assert parsed[0]["seconds_to_running"] == "90.5" and parsed[0]["cleanup"].startswith("not cleaned up")
    assert parsed[1]["outcome"] == "none" and parsed[1]["detail"] == 'no failover, "quoted"'
    assert parsed[1]["vm_id"] == "" and parsed[1]["cleanup"] == ""


def _cleanup(job_id: str, status: str, completed_at: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"job_id": job_id, "status": status, "completed_at": completed_at, "failed_step": None,
            "error_code": None, "error_message": None, **kw}


def test_since_an_offset_time_is_converted_not_taken_as_utc() -> None:
    east = datetime(2026, 12, 8, 9, 0, tzinfo=timezone(timedelta(hours=5)))
    assert parse_since(east.isoformat(), NOW) == datetime(2026, 12, 8, 4, 0)
