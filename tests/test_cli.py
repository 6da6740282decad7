"""`failoverctl` for people, run as people run it: the installed `failoverctl` program as a
subprocess, against the session's `serve` process, the real broker and database. Checks the exit
codes (0 completed, 1 failed, 2 cancelled, 3 rejected, 5 bad settings), the --json output
(one event per line when following), and what the read commands show."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import pty
import re
import signal
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from adapters.db.tables import job_tracking
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import SeededVm, seed_vm
from schemas.common import FAILOVER_STEPS
from schemas.parsing import parse_event

from .helpers import ROOT, ServeProcess, failover, failover_row, projected, wait_until

_PROGRAM = Path(sys.executable).with_name("failoverctl")
FAILOVERCTL = [str(_PROGRAM)] if _PROGRAM.exists() else [sys.executable, "-m", "failover.cli"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli_env(database_url: str, amqp_url: str) -> dict[str, str]:
    """A client's environment: the broker and the database, nothing of the service's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVER_")}
    env.update({"FAILOVER_AMQP_URL": amqp_url, "FAILOVER_DATABASE_URL": database_url,
                "PYTHONPATH": str(ROOT), "COLUMNS": "160"})
    return env


class Ctl:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd  # an empty directory: no .env file is read

    async def start(self, *args: str, **env: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *FAILOVERCTL, *args, env={**self.env, **env}, cwd=str(self.cwd),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    @staticmethod
    async def finish(proc: asyncio.subprocess.Process, timeout: float = 90) -> Result:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            raise AssertionError(f"failoverctl did not end within {timeout} s:\n{out.decode()}\n{err.decode()}") from None
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())

    async def __call__(self, *args: str, timeout: float = 90, **env: str) -> Result:
        return await self.finish(await self.start(*args, **env), timeout)


@pytest.fixture
def ctl(cli_env: dict[str, str], tmp_path: Path) -> Ctl:
    return Ctl(cli_env, tmp_path)


async def _seed(db: Any, control: EmulatorControl, emulators: EmulatorHandle, name: str, **kw: Any) -> SeededVm:
    return await seed_vm(db, control, emulators.appliance_vm_id, vm_name=name,
                         test_network_id=emulators.test_network_id, **kw)


async def _tracking_status(db: Any, job_id: str) -> str | None:
    async with db.connect() as conn:
        return (await conn.execute(select(job_tracking.c.status).where(job_tracking.c.id == job_id))).scalar()


async def test_request_follow_json_then_jobs_show_and_cleanup(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await _seed(db, control, emulators, "cli json", disks=2)
    done = await ctl("request", vm.vm_id, "--follow", "--json")
    assert done.code == 0, done.err
    events = [parse_event(json.dumps(line).encode()) for line in done.json_lines()]  # one event per line
    job_id = str(events[0].job_id)
    assert events[0].type == "JobAccepted" and events[-1].type == "JobCompleted"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert {str(e.job_id) for e in events} == {job_id}
    await projected(db, job_id)

    jobs = await ctl("jobs", "--json", "--limit", "50")
    assert jobs.code == 0, jobs.err
    mine = next(j for j in json.loads(jobs.out) if j["id"] == job_id)
    assert (mine["vm_name"], mine["job_type"], mine["status"], mine["percent_complete"]) == (
        "cli json", "test-failover", "completed", 100)
    assert mine["age_seconds"] >= 0 and mine["duration_seconds"] > 0
    table = await ctl("jobs")
    assert table.code == 0 and job_id in table.out and "completed" in table.out

    shown = await ctl("show", job_id, "--json")
    assert shown.code == 0, shown.err
    detail = json.loads(shown.out)
    assert [(s["step_name"], s["status"]) for s in detail["steps"]] == [(s, "completed") for s in FAILOVER_STEPS]
    assert all(s["started_at"] and s["completed_at"] and s["duration_seconds"] is not None for s in detail["steps"])
    keys = {e["resource_key"] for e in detail["ledger"]}
    assert {f"snapshot:{v}" for v in vm.volume_ids} <= keys and "vm" in keys
    destination = events[-1].model_dump(mode="json")["outputs"]["destination_vm_id"]
    assert detail["outputs"]["destination_vm_id"] == destination
    assert detail["errors"] == [] and detail["manual_actions"] == []
    human = await ctl("show", job_id)
    assert human.code == 0 and "resource ledger" in human.out and destination in human.out

    # the cleanup of that test failover, followed; then the job is cleaned up
    cleaned = await ctl("cleanup", job_id, "--follow", "--json")
    assert cleaned.code == 0, cleaned.err
    cleanup_events = cleaned.json_lines()
    assert cleanup_events[0]["job_type"] == "cleanup" and cleanup_events[0]["correlation_id"] == job_id
    assert cleanup_events[-1]["type"] == "JobCompleted"
    assert (await failover_row(db, job_id)).status == "cleaned_up"
    # a second cleanup is refused: exit 3, the reason on stderr, a JSON answer on stdout
    again = await ctl("cleanup", job_id, "--json")
    assert again.code == 3
    assert "not_allowed" in again.err and "cleaned up" in again.err
    assert json.loads(again.out)["status"] == "rejected"


async def test_a_failed_job_exits_1_and_its_logs_filter_by_level(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    vm = await _seed(db, control, emulators, "cli fails")
    await control.add_fault(api="cloudstack", command="deployVirtualMachine", kind="refuse")
    failed = await ctl("request", vm.vm_id, "--follow")  # for people: progress lines, not JSON
    await control.clear_faults()
    assert failed.code == 1, failed.out + failed.err
    assert "failed at vm-creation" in failed.err and "rolled back: true" in failed.err
    assert "vm-creation: failed" in failed.out and "cloudstack-snapshot: completed" in failed.out
    assert "rolling back (step vm-creation failed" in failed.out and "rolled back: " in failed.out
    job_id = failed.out.split("published FailoverRequested ")[1].split()[0]
    await projected(db, job_id)

    everything = await ctl("logs", job_id, "--json")
    warnings = await ctl("logs", job_id, "--json", "--level", "WARN")
    assert everything.code == 0 and warnings.code == 0, everything.err + warnings.err
    all_lines, warn_lines = everything.json_lines(), warnings.json_lines()
    assert {line["level"] for line in warn_lines} <= {"WARN", "ERROR"}
    assert [line for line in all_lines if line["level"] in ("WARN", "ERROR")] == warn_lines
    assert any(line["level"] == "INFO" for line in all_lines)
    assert any("vm-creation" in line["message"] and line["level"] == "ERROR" for line in warn_lines)
    assert all(line["correlation_id"] == job_id for line in all_lines)
    text = await ctl("logs", job_id, "--level", "error")
    assert text.code == 0 and "ERROR" in text.out and " INFO " not in text.out

    shown = json.loads((await ctl("show", job_id, "--json")).out)
    assert [(e["step"], e["code"]) for e in shown["errors"]] == [("vm-creation", "CLOUDSTACK_REFUSED")]
    statuses = {s["step_name"]: s["status"] for s in shown["steps"]}
    assert statuses["vm-creation"] == "failed" and statuses["volume-attachment"] == "pending"
    # a rollback retry of a job that rolled back completely is refused
    retry = await ctl("rollback", job_id)
    assert retry.code == 3 and "not_allowed" in retry.err


async def test_rejected_requests_exit_3_with_the_reason_on_stderr(serve: ServeProcess, ctl: Ctl) -> None:
    unknown = f"no-such-vm-{uuid.uuid4()}"
    plain = await ctl("request", unknown)
    assert plain.code == 3
    assert "rejected (not_found)" in plain.err and unknown in plain.err
    assert "Traceback" not in plain.err, plain.err
    followed = await ctl("request", unknown, "--follow", "--json")
    assert followed.code == 3
    assert [e["type"] for e in followed.json_lines()] == ["JobRejected"]
    assert "not_found" in followed.err
    # unknown jobs: nothing to show, watch or cancel
    nobody = str(uuid.uuid4())
    for args in (("show", nobody), ("watch", nobody), ("logs", nobody), ("cancel", nobody)):
        result = await ctl(*args)
        assert result.code == 3, (args, result)
        assert nobody in result.err or "not_found" in result.err, (args, result.err)


async def test_watch_a_running_job_and_cancel_another(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    # slow enough that both jobs are still running when they are watched and cancelled
    await control.set_latency(async_job_seconds=0.4, operation_seconds=0.4, api_seconds=0.05)
    try:
        slow = await _seed(db, control, emulators, "cli watched")
        doomed = await _seed(db, control, emulators, "cli cancelled")
        answers = await asyncio.gather(ctl("request", slow.vm_id, "--json"), ctl("request", doomed.vm_id, "--json"))
        assert [a.code for a in answers] == [0, 0], [a.err for a in answers]
        slow_id, doomed_id = (json.loads(a.out)["job_id"] for a in answers)
        assert all(json.loads(a.out)["status"] == "accepted" for a in answers)

        async def running(job_id: str) -> bool:
            return await _tracking_status(db, job_id) == "running"

        await wait_until(lambda: running(slow_id), 20, "the watched job to run")
        await wait_until(lambda: running(doomed_id), 20, "the doomed job to run")
        watch_json = await ctl.start("watch", slow_id, "--json")
        watch_human = await ctl.start("watch", doomed_id, PYTHONUNBUFFERED="1")
        # the cancel only once the watcher has joined: else it may join the job already rolling back
        assert watch_human.stdout is not None
        joined = (await asyncio.wait_for(watch_human.stdout.readline(), 30)).decode()
        assert joined.startswith("joined") and "rolling" not in joined, joined
        cancel = await ctl("cancel", doomed_id)
        assert cancel.code == 0, cancel.err
        assert "Traceback" not in cancel.err, cancel.err
        assert "cancel recorded" in cancel.out and doomed_id in cancel.out

        watched = await ctl.finish(watch_json)
        assert watched.code == 0, watched.err
        lines = watched.json_lines()
        assert lines[-1]["type"] == "JobCompleted" and {e["job_id"] for e in lines} == {slow_id}
        seqs = [e["sequence"] for e in lines]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # joined mid-way, then no gap

        cancelled = await ctl.finish(watch_human)
        assert cancelled.code == 2, cancelled.out + cancelled.err
        assert "rolling back (cancel requested)" in cancelled.out
        assert "cancelled (rolled back: true)" in cancelled.err
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0, api_seconds=0)

    # once ended, watch answers at once with the job's outcome
    ended = await ctl("watch", doomed_id, "--json")
    assert ended.code == 2 and [e["type"] for e in ended.json_lines()] == ["JobCancelled"]
    assert (await failover_row(db, doomed_id)).status == "cancelled"
    # and the job can no longer be cancelled
    again = await ctl("cancel", doomed_id, "--follow")
    assert again.code == 3 and "not_allowed" in again.err


async def _rows_about(db: Any, ids: list[str]) -> dict[str, int]:
    """Every row about these jobs or requests, by table."""
    from adapters.db import tables

    counts = {}
    async with db.connect() as conn:
        for name in ("outbox", "resource_ledger", "log_events", "job_steps", "projected_events", "vm_name_claims",
                     "failover_jobs"):
            table = getattr(tables, name)
            counts[name] = (await conn.execute(select(func.count()).select_from(table)
                                               .where(table.c.job_id.in_(ids)))).scalar_one()
        counts["job_tracking"] = (await conn.execute(select(func.count()).select_from(job_tracking)
                                                     .where(job_tracking.c.id.in_(ids)))).scalar_one()
        commands = tables.job_commands
        counts["job_commands"] = (await conn.execute(select(func.count()).select_from(commands).where(
            commands.c.job_id.in_(ids) | commands.c.request_id.in_(ids)))).scalar_one()
    return counts


async def test_db_prune_deletes_what_ended_long_ago_and_keeps_a_vm_still_failed_over(
        serve: ServeProcess, ctl: Ctl, bus: BusClient, db: Any, control: EmulatorControl,
        emulators: EmulatorHandle) -> None:
    from adapters.db.tables import failover_jobs, job_commands

    # a test failover and its cleanup; another not cleaned up (it holds its VM); a request rejected
    cleaned_vm = await _seed(db, control, emulators, "prune me", disks=2)
    done = await ctl("request", cleaned_vm.vm_id, "--follow", "--json")
    assert done.code == 0, done.err
    failover_id = done.json_lines()[0]["job_id"]
    cleaned = await ctl("cleanup", failover_id, "--follow", "--json")
    assert cleaned.code == 0, cleaned.err
    cleanup_id = cleaned.json_lines()[0]["job_id"]
    held_vm = await _seed(db, control, emulators, "prune me not", disks=1)
    held = await ctl("request", held_vm.vm_id, "--follow", "--json")
    assert held.code == 0, held.err
    held_id = held.json_lines()[0]["job_id"]
    rejected = await ctl("request", f"no-such-vm-{uuid.uuid4()}", "--json")
    assert rejected.code == 3
    rejected_rid = json.loads(rejected.out)["request_id"]
    gone = [failover_id, cleanup_id, rejected_rid]
    for job_id in (failover_id, cleanup_id, held_id):  # the projector has every event
        await wait_until(lambda job_id=job_id: _caught_up(db, job_id), 20, f"job {job_id} projected")
    await wait_until(lambda: _sent(db, rejected_rid), 20, "the JobRejected published")
    before = await _rows_about(db, gone)
    held_before = await _rows_about(db, [held_id])
    assert before["failover_jobs"] == 2 and before["outbox"] > 20 and before["vm_name_claims"] == 1
    # they ended 31 days ago, as far as the database knows
    async with db.begin() as conn:
        when = failover_jobs.c.updated_at - text("INTERVAL 31 DAY")
        await conn.execute(update(failover_jobs).where(failover_jobs.c.job_id.in_([*gone, held_id]))
                           .values(updated_at=when))
        await conn.execute(update(job_commands).where(
            job_commands.c.job_id.in_([*gone, held_id]) | job_commands.c.request_id.in_(gone))
            .values(received_at=job_commands.c.received_at - text("INTERVAL 31 DAY")))

    dry = await ctl("db", "prune", "--older-than", "30d", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert await _rows_about(db, gone) == before
    pruned = await ctl("db", "prune", "--older-than", "30d", "--json")
    assert pruned.code == 0, pruned.err
    report, dry_report = json.loads(pruned.out), json.loads(dry.out)
    assert (report["jobs"], report["dry_run"], dry_report["dry_run"]) == (2, False, True)
    assert report["rows"] == dry_report["rows"] == before
    assert report["kept"] == {"blocks_vm": 1}
    assert await _rows_about(db, gone) == dict.fromkeys(before, 0)
    assert await _rows_about(db, [held_id]) == held_before
    shown = await ctl("show", failover_id)
    assert shown.code == 3 and f"no job {failover_id}" in shown.err
    # the rejected request sent again, now for a VM that is there: a new failover, completed
    again = await failover(bus, cleaned_vm.vm_id, request_id=uuid.UUID(rejected_rid))
    assert [again[0].type, again[-1].type] == ["JobAccepted", "JobCompleted"]
    # for people: what went and what stayed, and why
    table = await ctl("db", "prune", "--older-than", "4w")
    assert table.code == 0, table.err
    assert "deleted 0 job(s)" in table.out and "kept 1 failover(s) that still holds its VM" in table.out
    # an age under a day is refused, saying why
    short = await ctl("db", "prune", "--older-than", "12h")
    assert short.code == 5 and "less than a day" in short.err and "redelivered" in short.err


async def _sent(db: Any, job_id: str) -> bool:
    from adapters.db.tables import outbox

    async with db.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(outbox).where(
            outbox.c.job_id == job_id, outbox.c.published_at.is_not(None)))).scalar_one() > 0


async def _caught_up(db: Any, job_id: str) -> bool:
    from adapters.db.tables import failover_jobs

    async with db.connect() as conn:
        last = (await conn.execute(select(failover_jobs.c.last_sequence)
                                   .where(failover_jobs.c.job_id == job_id))).scalar_one()
        seen = (await conn.execute(select(job_tracking.c.last_sequence)
                                   .where(job_tracking.c.id == job_id))).scalar()
    return seen is not None and seen >= last


async def test_bad_settings_exit_5_naming_the_variable(ctl: Ctl, amqp_url: str) -> None:
    job = str(uuid.uuid4())
    wrong_scheme = await ctl("watch", job, FAILOVER_AMQP_URL="http://127.0.0.1:5672/")
    assert wrong_scheme.code == 5 and "FAILOVER_AMQP_URL" in wrong_scheme.err
    wrong_db = await ctl("jobs", FAILOVER_DATABASE_URL="postgresql://127.0.0.1/failover")
    assert wrong_db.code == 5 and "FAILOVER_DATABASE_URL" in wrong_db.err
    no_db = await ctl("show", job, FAILOVER_DATABASE_URL="mysql+asyncmy://root:secret-pw@127.0.0.1:1/failover")
    assert no_db.code == 5 and "FAILOVER_DATABASE_URL" in no_db.err and "secret-pw" not in no_db.err
    closed = await ctl("request", "some-vm", FAILOVER_AMQP_URL="amqp://guest:secret-pw@127.0.0.1:1/")
    assert closed.code == 5 and "FAILOVER_AMQP_URL" in closed.err
    assert "secret-pw" not in closed.err + closed.out
    assert closed.err.count("\n") == 1, closed.err  # one line that says it all, no library noise
    no_gc = await ctl("serve", FAILOVER_GC_FULL_COLLECTION_AFTER="0")
    assert no_gc.code == 5 and "FAILOVER_GC_FULL_COLLECTION_AFTER" in no_gc.err
    no_young = await ctl("serve", FAILOVER_GC_YOUNG_COLLECTION_AFTER="-1")
    assert no_young.code == 5 and "FAILOVER_GC_YOUNG_COLLECTION_AFTER" in no_young.err
    usage = await ctl("cancel", "not-a-uuid")
    assert usage.code == 5 and "JOB_ID" in usage.err
    # the intake process reports to the relay of its serve: without the relay role, refused at once
    service = {"FAILOVER_CLOUDSTACK_URL": "http://127.0.0.1:1/client/api", "FAILOVER_CLOUDSTACK_API_KEY": "k",
               "FAILOVER_CLOUDSTACK_SECRET_KEY": "s", "FAILOVER_ZONE": "z", "FAILOVER_TEMPLATE_ID": "t",
               "FAILOVER_SERVICE_OFFERING_ID": "o", "FAILOVER_NETWORK_ID": "n", "FAILOVER_APPLIANCE_VM_ID": "a"}
    no_relay = await ctl("serve", "--roles", "orchestrator,projector", FAILOVER_INTAKE_PROCESS="true", **service)
    assert no_relay.code == 5 and "FAILOVER_INTAKE_PROCESS" in no_relay.err and "relay" in no_relay.err
    no_relay = await ctl("serve", "--roles", "orchestrator,projector", FAILOVER_INTAKE_THREAD="true", **service)
    assert no_relay.code == 5 and "FAILOVER_INTAKE_THREAD" in no_relay.err and "relay" in no_relay.err
    both = await ctl("serve", FAILOVER_INTAKE_PROCESS="true", FAILOVER_INTAKE_THREAD="true", **service)
    assert both.code == 5 and "FAILOVER_INTAKE_PROCESS and FAILOVER_INTAKE_THREAD are both true" in both.err
    switch = await ctl("serve", FAILOVER_INTAKE_THREAD_SWITCH_SECONDS="0", **service)
    assert switch.code == 5 and "FAILOVER_INTAKE_THREAD_SWITCH_SECONDS" in switch.err


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def _on_a_terminal(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    """`failoverctl ARGS` on a pseudo-terminal: its exit code and everything it drew."""
    leader, follower = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *FAILOVERCTL, *args, env={**env, "TERM": "xterm-256color"}, cwd=str(cwd), stdin=follower,
            stdout=follower, stderr=follower)
        os.close(follower)
        follower = -1
        reader = asyncio.create_task(asyncio.to_thread(_read_all, leader))
        code = await asyncio.wait_for(proc.wait(), timeout)
        return code, (await asyncio.wait_for(reader, 10)).decode(errors="replace")
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


async def test_follow_on_a_terminal_draws_live_bars(
        serve: ServeProcess, cli_env: dict[str, str], tmp_path: Path, db: Any, control: EmulatorControl,
        emulators: EmulatorHandle) -> None:
    vm = await _seed(db, control, emulators, "cli [terminal] *bold*", os_type="ubuntu64Guest")
    code, screen = await _on_a_terminal(cli_env, tmp_path, "request", vm.vm_id, "--follow")
    assert code == 0, screen
    assert "Traceback" not in screen
    assert "\x1b[" in screen and "━" in screen  # redrawn in place, with bars
    assert "vm-startup-validation" in screen and "completed in" in screen
    assert "cli [terminal] *bold*" in screen  # names are shown as they are, never read as markup


# --------------------------------------------------------------------------- waves

async def _vm_jobs(db: Any, vm_id: str) -> list[Any]:
    from adapters.db.tables import failover_jobs

    async with db.connect() as conn:
        return list((await conn.execute(select(failover_jobs).where(failover_jobs.c.vm_id == vm_id)
                                        .order_by(failover_jobs.c.created_at))).all())


async def test_a_wave_followed_from_a_file_then_cleaned_up_by_its_vms(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        tmp_path: Path) -> None:
    good = [await _seed(db, control, emulators, f"wave good {n}", disks=1, os_type="ubuntu64Guest") for n in range(3)]
    stale = await _seed(db, control, emulators, "wave stale", disks=1, os_type="ubuntu64Guest",
                        replication_status="running")  # fails its pre-failover-validation
    hung = await _seed(db, control, emulators, "wave hung", disks=1, os_type="ubuntu64Guest")
    await control.add_fault(api="cloudstack", command="createSnapshot", kind="timeout",
                            match={"volumeid": hung.volume_ids[0]}, times=0)  # its rollback cannot complete
    unknown = f"no-such-vm-{uuid.uuid4()}"
    listing = tmp_path / "wave.txt"
    listing.write_text(f"# the wave\n{good[1].vm_id}  web tier\n\n{good[2].vm_id}\n{stale.vm_id} # old replica\n"
                       f"{unknown}\n{hung.vm_id}\n")
    run = await ctl("request", good[0].vm_id, "--vms-file", str(listing), "--follow", timeout=120)
    # failed comes before rejected in the exit code; each job that did not complete is named on stderr
    assert run.code == 1, run.out + run.err
    assert "3 of 6 completed; the others:" in run.err
    assert "wave stale" in run.err and "failed at pre-failover-validation" in run.err
    assert unknown in run.err and "rejected (not_found)" in run.err
    hung_job = str((await _vm_jobs(db, hung.vm_id))[0].job_id)
    assert "wave hung" in run.err and "(rolled back: false)" in run.err
    assert f"then: failoverctl rollback {hung_job}" in run.err  # and what is left to undo by hand, named:
    assert "an operator must still: delete snapshot" in run.err
    assert any(line.startswith("wave hung ") and "rollback failed: SNAPSHOT_STILL_CREATING" in line
               for line in run.out.splitlines())
    for vm in good:  # one line per step, led by the VM's name, in a pipe
        assert f"wave good {good.index(vm)}" in run.out
        jobs = await _vm_jobs(db, vm.vm_id)
        assert [(j.job_type, j.status) for j in jobs] == [("test", "completed")]
    assert "6/6 vm-startup-validation: running" in run.out
    assert [(j.job_type, j.status, bool(j.rolled_back)) for j in await _vm_jobs(db, stale.vm_id)] == [
        ("test", "failed", True)]
    hint = next(line for line in run.out.splitlines() if line.startswith("undo the 3 test failover(s) with:"))
    named = hint.split(" with: failoverctl cleanup ")[1].split("--vm")
    assert named[0] == "" and sorted(w.strip() for w in named[1:]) == sorted(vm.vm_id for vm in good)

    # the same list undoes the wave: the VMs without a test failover are named, the others cleaned up
    undo = await ctl("cleanup", "--vm", good[0].vm_id, "--vms-file", str(listing), "--follow", "--json", timeout=120)
    assert undo.code == 3, undo.out + undo.err  # nothing failed; two VMs had nothing to clean up, one was refused
    assert f"{stale.vm_id}: no test failover to clean up" in undo.err and f"{unknown}: no test failover" in undo.err
    refused = next(line for line in undo.err.splitlines() if line.startswith(f"  {hung.vm_id} ("))  # by its VM
    assert "rejected (not_allowed)" in refused and "only a completed test failover can be cleaned up" in refused
    events = undo.json_lines()
    ends = {e["correlation_id"]: e["type"] for e in events if e["type"] in ("JobCompleted", "JobFailed")
            and e["correlation_id"] != hung_job}
    parents = {str((await _vm_jobs(db, vm.vm_id))[0].job_id) for vm in good}
    assert ends == dict.fromkeys(parents, "JobCompleted")
    assert {e["job_type"] for e in events} == {"cleanup"}
    assert [e["type"] for e in events if e["correlation_id"] == hung_job] == ["JobRejected"]
    for vm in good:
        assert [(j.job_type, j.status) for j in await _vm_jobs(db, vm.vm_id)] == [("test", "cleaned_up"),
                                                                              ("cleanup", "completed")]
    again = await ctl("cleanup", "--vm", good[0].vm_id)  # nothing holds it any more
    assert again.code == 3 and "no test failover to clean up" in again.err


async def test_a_report_of_a_wave_says_which_vms_came_up_how_fast_and_what_was_left(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        tmp_path: Path) -> None:
    good = [await _seed(db, control, emulators, f"report good {n}", disks=1, os_type="ubuntu64Guest") for n in range(2)]
    stale = await _seed(db, control, emulators, "report stale", disks=1, os_type="ubuntu64Guest",
                        replication_status="running")  # fails its pre-failover-validation
    unknown = f"no-such-vm-{uuid.uuid4()}"
    listing = tmp_path / "wave.txt"
    listing.write_text("".join(f"{vm}\n" for vm in (good[0].vm_id, good[1].vm_id, stale.vm_id, unknown)))
    since = (await _db_now(db)).isoformat(timespec="seconds")
    run = await ctl("request", "--vms-file", str(listing), "--follow", "--json", timeout=120)
    assert run.code == 1, run.out + run.err
    undo = await ctl("cleanup", "--vm", good[0].vm_id, "--follow", timeout=120)
    assert undo.code == 0, undo.out + undo.err
    jobs = {vm.vm_id: (await _vm_jobs(db, vm.vm_id))[0] for vm in (*good, stale)}

    answer = await ctl("report", "--vms-file", str(listing), "--since", since, "--json")
    assert answer.code == 1, answer.out + answer.err  # a failed one comes before the VM with no failover
    report = json.loads(answer.out)
    rows = {row["given"]: row for row in report["vms"]}
    assert list(rows) == [good[0].vm_id, good[1].vm_id, stale.vm_id, unknown]
    for vm in good:
        row = rows[vm.vm_id]
        job = jobs[vm.vm_id]
        assert (row["outcome"], row["job_id"], row["vm_name"]) == ("completed", job.job_id, job.source_vm_name)
        assert row["destination_vm_id"] == job.destination_vm_id and row["destination_vm_id"]
        assert 0 < row["startup_seconds"] < row["seconds_to_running"], row
    cleaned, left = rows[good[0].vm_id], rows[good[1].vm_id]
    assert cleaned["status"] == "cleaned_up" and cleaned["cleanup"]["status"] == "completed"
    assert left["status"] == "completed" and left["cleanup"] is None
    failed = rows[stale.vm_id]
    assert (failed["outcome"], failed["failed_step"], failed["rolled_back"]) == (
        "failed", "pre-failover-validation", True)
    assert failed["seconds_to_running"] is None and failed["error_code"]
    assert rows[unknown]["outcome"] == "none" and "no failover requested since" in rows[unknown]["detail"]
    total = report["summary"]
    assert (total["vms"], total["completed"], total["failed"], total["none"]) == (4, 2, 1, 1)
    assert total["seconds_to_running_max"] == max(rows[vm.vm_id]["seconds_to_running"] for vm in good)

    table = await ctl("report", "--vms-file", str(listing))
    assert table.code == 1, table.out + table.err
    assert "4 VMs: 2 came up, 1 failed, 1 with no failover; request -> Running median" in table.out
    assert all(name in table.out for name in ("report good 0", "report good 1", "report stale", unknown))
    assert f"undo the 1 test failover not cleaned up with: failoverctl cleanup {left['job_id']}" in table.out
    assert f"report stale (job {failed['job_id']}): failed at pre-failover-validation: {failed['error_code']}" \
        in table.out and f"(its log: failoverctl logs {failed['job_id']})" in table.out
    assert "give --since the test's start" in table.err  # (each VM's newest failover ever was reported)
    assert "give --since" not in answer.err

    sheet = await ctl("report", "--vm", good[1].vm_id, "--csv")
    assert sheet.code == 0, sheet.err  # the one VM came up
    (line,) = csv.DictReader(io.StringIO(sheet.out))
    assert (line["outcome"], line["job_id"]) == ("completed", left["job_id"])
    assert line["cleanup"] == f"not cleaned up (failoverctl cleanup {left['job_id']})"
    later = await ctl("report", "--vm", good[1].vm_id, "--since", "2099-01-01T00:00")
    assert later.code == 3 and "no failover requested since 2099-01-01 00:00:00 UTC" in later.out, later.out
    of_cleanup = await ctl("report", cleaned["cleanup"]["job_id"])
    assert of_cleanup.code == 3 and f"is a cleanup; report its failover {cleaned['job_id']}" in of_cleanup.out
    both = await ctl("report", "--vm", good[1].vm_id.upper(), left["job_id"], "--json")  # one failover, one row
    assert both.code == 0 and [r["job_id"] for r in json.loads(both.out)["vms"]] == [left["job_id"]], both.out
    wrong = await ctl("report", "--vm", good[1].vm_id, "--since", "yesterday")
    assert wrong.code == 5 and "neither a time ago" in wrong.err  # (a usage error, as every command's)


async def _db_now(db: Any) -> Any:
    """The database's clock (the times the service writes), a second back: a --since before the wave."""
    async with db.connect() as conn:
        return (await conn.execute(text("SELECT UTC_TIMESTAMP() - INTERVAL 1 SECOND"))).scalar()


async def test_a_wave_without_follow_answers_each_and_bad_lists_publish_nothing(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        tmp_path: Path) -> None:
    a, b = [await _seed(db, control, emulators, f"wave answer {n}", disks=1, os_type="ubuntu64Guest") for n in "ab"]
    twice = await ctl("request", a.vm_id, b.vm_id, a.vm_id)
    assert twice.code == 5 and f"VM {a.vm_id} is given twice (argument 1 and argument 3)" in twice.err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n\n")
    none = await ctl("request", "--vms-file", str(empty))
    assert none.code == 5 and "no VM given" in none.err
    missing = await ctl("request", "--vms-file", str(tmp_path / "absent.txt"))
    assert missing.code == 5 and "cannot read" in missing.err
    assert await _vm_jobs(db, a.vm_id) == [] and await _vm_jobs(db, b.vm_id) == []  # nothing was published

    unknown = f"no-such-vm-{uuid.uuid4()}"
    answered = await ctl("request", a.vm_id, b.vm_id, unknown, "--json")
    assert answered.code == 3, answered.err
    lines = answered.json_lines()
    assert [(line["vm_id"], line["vm_name"], line["status"]) for line in lines] == [
        (a.vm_id, "wave answer a", "accepted"), (b.vm_id, "wave answer b", "accepted"), (unknown, None, "rejected")]
    assert lines[2]["reason"] == "not_found" and f"{unknown}: job {lines[2]['job_id']}: rejected (not_found)" \
        in answered.err
    ids = [line["job_id"] for line in lines[:2]]
    # the wave, watched by its VMs to its end: each job from wherever it is (ended already, or not)
    watched = await ctl("watch", "--vm", a.vm_id, "--vm", b.vm_id, "--vm", unknown, "--json")
    assert watched.code == 3, watched.out + watched.err  # both completed; the unknown VM has no job
    assert f"{unknown}: the VM has no job" in watched.err
    ends = Counter((e["job_id"], e["type"]) for e in watched.json_lines() if e["type"].startswith("Job"))
    assert ends == {(ids[0], "JobCompleted"): 1, (ids[1], "JobCompleted"): 1}  # each end once
    again = await ctl("watch", *ids)  # all ended already: at once, each named with when it ended
    assert again.code == 0 and "all 2 jobs completed" in again.out, again.out + again.err
    assert again.out.count("ended already (") == 2 and "wave answer a (" in again.out
    undo = await ctl("cleanup", *ids)
    assert undo.code == 0, undo.err
    assert undo.out.count("accepted: ") == 2 and "2 of 2 accepted" in undo.out
    for vm in (a, b):
        await wait_until(lambda vm=vm: _cleaned(db, vm.vm_id), 60, f"{vm.vm_id} cleaned up")
    no_args = await ctl("cleanup")
    assert no_args.code == 5 and "give the test failovers to clean up" in no_args.err


async def _cleaned(db: Any, vm_id: str) -> bool:
    return [j.status for j in await _vm_jobs(db, vm_id)] == ["cleaned_up", "completed"]


async def test_a_wave_not_ended_in_time_exits_4_and_goes_on(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    a, b = [await _seed(db, control, emulators, f"wave slow {n}", disks=1, os_type="ubuntu64Guest") for n in "ab"]
    await control.set_latency(async_job_seconds=3, operation_seconds=1)  # each job takes 10 s at least
    try:
        run = await ctl("request", a.vm_id, b.vm_id, "--follow", "--json", "--timeout", "5")
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
    assert run.code == 4, run.out + run.err
    # with --json too, the reasons are on stderr
    assert "0 of 2 completed" in run.err and run.err.count("no end within 5 s; it goes on") == 2
    assert {e["type"] for e in run.json_lines()} >= {"JobAccepted", "StepStarted"}
    for vm in (a, b):  # the jobs went on without the client
        await wait_until(lambda vm=vm: _status_is(db, vm.vm_id, "completed"), 60, f"{vm.vm_id} to complete")


async def _status_is(db: Any, vm_id: str, status: str) -> bool:
    return [j.status for j in await _vm_jobs(db, vm_id)] == [status]


async def test_a_wave_on_a_terminal_draws_one_board(
        serve: ServeProcess, cli_env: dict[str, str], tmp_path: Path, db: Any, control: EmulatorControl,
        emulators: EmulatorHandle) -> None:
    vms = [await _seed(db, control, emulators, f"wave [tty] {n}", disks=1, os_type="ubuntu64Guest") for n in range(3)]
    await control.set_latency(async_job_seconds=0.5, operation_seconds=0.2)  # (the board draws running jobs)
    try:
        code, screen = await _on_a_terminal(cli_env, tmp_path, "request", *(vm.vm_id for vm in vms), "--follow")
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
    assert code == 0, screen
    assert "Traceback" not in screen, screen[screen.index("Traceback") - 300:]
    assert "\x1b[" in screen and "━" in screen  # redrawn in place, with a bar
    assert "test failover of 3 VMs" in screen and "3 completed" in screen and "all 3 jobs completed" in screen
    assert "running for" in screen and re.search(r"[a-z-]+ \([1-6]/6\)", screen)  # the running jobs' table
    for n in range(3):
        assert f"done   wave [tty] {n}" in screen  # a line as each ends, names as they are (no markup)


async def test_a_wave_of_a_hundred_vms_follows_every_job_to_its_end(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        tmp_path: Path) -> None:
    vms = [await _seed(db, control, emulators, f"wave hundred {n}", disks=1, os_type="ubuntu64Guest")
           for n in range(100)]
    listing = tmp_path / "hundred.txt"
    listing.write_text("".join(f"{vm.vm_id}\n" for vm in vms))
    run = await ctl("request", "--vms-file", str(listing), "--follow", "--json", timeout=240)
    assert run.code == 0, run.err[-2000:]
    by_job: dict[str, list[Any]] = {}
    for event in run.json_lines():
        by_job.setdefault(event["job_id"], []).append(event)
    assert len(by_job) == 100 and {e[0]["vm_id"] for e in by_job.values()} == {vm.vm_id for vm in vms}
    for events in by_job.values():  # each job's whole stream, in order, once
        assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
        assert events[0]["type"] == "JobAccepted" and events[-1]["type"] == "JobCompleted"
    undo = await ctl("cleanup", "--vms-file", str(listing), "--follow", timeout=240)
    assert undo.code == 0, undo.err[-2000:]
    assert "all 100 jobs completed" in undo.out and undo.out.count("completed in") == 100
    for vm in vms[::10]:
        assert await _cleaned(db, vm.vm_id)


async def test_a_command_no_queue_takes_exits_4_saying_serve_never_ran_there(
        serve: ServeProcess, ctl: Ctl, amqp_url: str) -> None:
    """RabbitMQ returns a command that no queue takes (the service never started on that broker
    and vhost): the client says so and what to do, instead of a traceback."""
    import aio_pika

    from adapters.bus import COMMANDS_EXCHANGE, COMMANDS_QUEUE

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(COMMANDS_QUEUE, ensure=True)
        await queue.unbind(COMMANDS_EXCHANGE, "#")  # the service's own binding, for this test only
        try:
            one = await ctl("request", f"vm-{uuid.uuid4()}")
            many = await ctl("request", f"vm-{uuid.uuid4()}", f"vm-{uuid.uuid4()}", "--follow")
            cancel = await ctl("cancel", str(uuid.uuid4()))
        finally:
            await queue.bind(COMMANDS_EXCHANGE, "#")
    for result in (one, many, cancel):
        assert result.code == 4, result.out + result.err
        assert "Traceback" not in result.err, result.err
        assert "returned the command: no queue is bound to the exchange failover.commands" in result.err
        assert "start it there, or fix FAILOVER_AMQP_URL" in result.err
    assert "none of the 2 commands was taken" in many.err


async def test_a_wave_interrupted_says_which_jobs_go_on(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    a, b = [await _seed(db, control, emulators, f"wave interrupted {n}", disks=1, os_type="ubuntu64Guest")
            for n in "ab"]
    await control.set_latency(async_job_seconds=1, operation_seconds=0.5)
    try:
        # (SIGINT as a terminal sends it: a background job of a non-interactive shell, as CI runs
        # the tests, starts with it ignored)
        proc = await asyncio.create_subprocess_exec(
            *FAILOVERCTL, "request", a.vm_id, b.vm_id, "--follow", env={**ctl.env, "PYTHONUNBUFFERED": "1"},
            cwd=str(ctl.cwd), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            while b"running" not in (line := await proc.stdout.readline()):  # a job has started
                assert line, (await ctl.finish(proc)).err  # (ended early: say why)
        proc.send_signal(signal.SIGINT)
        run = await ctl.finish(proc)
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
    assert run.code == 130, run.out + run.err
    assert "interrupted: at least 2 of 2 commands were published; the service acts on them" in run.err
    jobs = {str((await _vm_jobs(db, vm.vm_id))[0].job_id) for vm in (a, b)}
    assert all(job in run.err for job in jobs)
    for vm in (a, b):  # they did
        await wait_until(lambda vm=vm: _status_is(db, vm.vm_id, "completed"), 60, f"{vm.vm_id} to complete")


async def test_a_wave_of_cancels_by_vm_and_by_job(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        tmp_path: Path) -> None:
    done = await _seed(db, control, emulators, "cancel done", disks=1, os_type="ubuntu64Guest")
    finished = await ctl("request", done.vm_id, "--follow", "--json")
    assert finished.code == 0, finished.err
    done_job = finished.json_lines()[0]["job_id"]
    vms = [await _seed(db, control, emulators, f"cancel wave {n}", disks=1, os_type="ubuntu64Guest") for n in range(3)]
    rolling = await _seed(db, control, emulators, "cancel rolling", disks=2, os_type="ubuntu64Guest")
    # its start, the first in this test, is refused: its last step fails, and the rollback undoes
    # every step (ten or so waits, over 10 s) while the wave is asked for and cancelled
    await control.add_fault(api="cloudstack", command="startVirtualMachine", kind="refuse", times=1)
    await control.set_latency(async_job_seconds=3, operation_seconds=1)  # long enough to be cancelled
    try:
        failing = await ctl("request", rolling.vm_id, "--json")
        assert failing.code == 0, failing.err
        rolling_id = failing.json_lines()[0]["job_id"]
        await wait_until(lambda: _state_is(db, rolling_id, "rolling_back"), 90, "the failed job to roll back")
        started = await ctl("request", *(vm.vm_id for vm in vms), "--json")
        assert started.code == 0, started.err
        ids = [line["job_id"] for line in started.json_lines()] + [rolling_id]
        for job_id in ids[:3]:
            await wait_until(lambda job_id=job_id: _is_running(db, job_id), 30, f"{job_id} to run")
        # without --follow: the last of the wave and the one rolling back by job id, a finished job,
        # and the finished VM
        recorded = await ctl("cancel", ids[2], ids[3], done_job, "--vm", done.vm_id)
        unknown = f"no-such-vm-{uuid.uuid4()}"
        listing = tmp_path / "stop.txt"
        listing.write_text(f"{vms[0].vm_id}\n{vms[1].vm_id}\n{unknown}\n")
        stopped = await ctl("cancel", "--vms-file", str(listing), "--follow", timeout=120)
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
    assert recorded.code == 3, recorded.out + recorded.err
    assert f"recorded: job {ids[2]}" in recorded.out
    # the service's note on a cancel of a job rolling back already is passed on
    assert f"job {ids[3]}: CancelRequested recorded, but job {ids[3]} is rolling back already" in recorded.err
    assert f"job {done_job}: rejected (not_allowed)" in recorded.err
    assert f"{done.vm_id}: no job is running for the VM: its test failover {done_job} completed (undo it with " \
           f"failoverctl cleanup --vm {done.vm_id})" in recorded.err
    assert stopped.code == 3, stopped.out + stopped.err  # both cancelled; the unknown VM runs nothing
    assert "2 of 3 cancelled; the others:" in stopped.err and f"{unknown}: no job is running for the VM" in stopped.err
    assert stopped.out.count("cancelled (rolled back: true)") == 2
    for vm in vms:
        await wait_until(lambda vm=vm: _status_is(db, vm.vm_id, "cancelled"), 60, f"{vm.vm_id} cancelled")


async def test_a_followed_cancel_of_a_job_rolling_back_says_so_and_a_refused_ones_json_names_its_job(
        serve: ServeProcess, ctl: Ctl, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    rolling = await _seed(db, control, emulators, "cancel followed", disks=1, os_type="ubuntu64Guest")
    # CloudStack's jobs outlast the service's 3 s wait for them (tests/helpers.py): the snapshot
    # step fails, and its undo waits as long (then looks again): a rollback of 9 s or so to send
    # the cancel into
    await control.set_latency(async_job_seconds=6, operation_seconds=1)
    try:
        started = await ctl("request", rolling.vm_id, "--json")
        assert started.code == 0, started.err
        job_id = started.json_lines()[0]["job_id"]
        await wait_until(lambda: _state_is(db, job_id, "rolling_back"), 60, "the failed job to roll back")
        followed = await ctl("cancel", job_id, "--follow", timeout=120)
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
    # the job ends as its rollback does, and the cancel's follower says why it did not end cancelled
    assert followed.code == 1, followed.out + followed.err
    assert f"CancelRequested recorded, but job {job_id} is rolling back already" in followed.out, followed.out
    assert "a rollback is not stopped" in followed.out
    end = " ".join(followed.err.split())  # (wrapped at 80 columns in a pipe)
    assert end.startswith("failed at cloudstack-snapshot") and end.endswith("(rolled back: true)"), end
    # a wave of cancels of ended jobs, with --json: each refusal comes under its cancel's own id,
    # which the published lines tie to the job it was for
    other = await ctl("request", (await _seed(db, control, emulators, "cancel ended", disks=1,
                                              os_type="ubuntu64Guest")).vm_id, "--follow", "--json")
    assert other.code == 0, other.err
    ended = [job_id, other.json_lines()[0]["job_id"]]
    refused = await ctl("cancel", *ended, "--follow", "--json")
    assert refused.code == 3, refused.out + refused.err
    lines = refused.json_lines()
    published = {line["request_id"]: line["job_id"] for line in lines if line.get("status") == "published"}
    assert sorted(published.values()) == sorted(ended), lines
    rejections = [line for line in lines if line.get("type") == "JobRejected"]
    assert sorted(published[r["job_id"]] for r in rejections) == sorted(ended), lines
    assert all(f"job {published[r['job_id']]} has already ended" in r["detail"] for r in rejections), rejections


async def _state_is(db: Any, job_id: str, state: str) -> bool:
    return (await failover_row(db, job_id)).status == state


async def _is_running(db: Any, job_id: str) -> bool:
    return await _tracking_status(db, job_id) == "running"
