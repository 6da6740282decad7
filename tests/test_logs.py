"""The process log: JSON lines when not on a terminal, and every line of a job names the job and
its correlation id. Read from what a real `serve` process wrote to stderr."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import subprocess
import sys
import uuid
from typing import Any

from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.logs import JOB_TASK_PREFIX, JobFields, JsonFormatter, bind_job
from failover.seed import seed_vm
from schemas.commands import CleanupRequested

from .helpers import ROOT, ServeProcess, failover, run_command, wait_until


def _lines_since(serve: ServeProcess, offset: int) -> list[dict[str, Any]]:
    raw = serve.log_path.read_bytes()[offset:].decode()
    out = []
    for line in raw.splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(record), line
        out.append(record)
    return out


async def test_every_line_of_a_job_names_the_job_and_its_correlation(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle) -> None:
    offset = serve.log_path.stat().st_size
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="logged",
                       test_network_id=emulators.test_network_id)
    # a transient failure: a WARN line about the retry, from inside the step
    await control.add_fault(api="cloudstack", command="deployVirtualMachine", kind="server_error", times=1)
    job = await failover(bus, vm.vm_id)
    assert job[-1].type == "JobCompleted"
    job_id = str(job[0].job_id)
    cleanup_id = uuid.uuid4()
    cleanup = await run_command(bus, CleanupRequested(request_id=cleanup_id, failover_job_id=job[0].job_id),
                                cleanup_id)
    assert cleanup[-1].type == "JobCompleted"

    expected = {job_id: [e for e in job if e.type == "LogRecorded"],
                str(cleanup_id): [e for e in cleanup if e.type == "LogRecorded"]}

    def lines() -> list[dict[str, Any]]:
        return _lines_since(serve, offset)

    async def all_written() -> bool:
        got = lines()
        return all(sum(r.get("job_id") == j for r in got) >= len(logs) for j, logs in expected.items())

    await wait_until(all_written, 10, "the jobs' lines in the process log")
    records = lines()
    for jid, logs in expected.items():
        mine = [r for r in records if r.get("job_id") == jid]
        # each LogRecorded event is also a line of the process log, in the same order, with its step
        engine_lines = [r for r in mine if r["logger"] == "failover.job"]
        assert [(r["message"], r.get("step")) for r in engine_lines] == [(e.message, e.step) for e in logs]
        level = {"WARN": "WARNING"}
        assert [r["level"] for r in engine_lines] == [level.get(e.level, e.level) for e in logs]
        # every line of the job names its correlation: the failover's own id, also for its cleanup
        assert {r.get("correlation_id") for r in mine} == {job_id}, mine
    retry = [r for r in records if r.get("job_id") == job_id and r["level"] == "WARNING"]
    assert any("retrying" in r["message"] and r.get("fields", {}).get("code") for r in retry), retry
    # lines that are about no job carry no job fields
    serving = [r for r in records if r["logger"] in ("failover.health", "failover.service")]
    assert all("job_id" not in r for r in serving)
    # and no secret reached the log
    text = serve.log_path.read_text()
    assert emulators.secret_key not in text


async def test_job_fields_follow_the_job_task_and_nothing_else() -> None:
    """`bind_job` marks a job's task and the tasks it starts; other tasks stay unmarked, and a
    runner's `job-<id>` task is recognised by its name."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(JobFields())
    logger = logging.getLogger("tests.logs.fields")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    job, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        async def step() -> None:
            logger.info("inside a task the job started")

        async def job_task() -> None:
            bind_job(job, correlation)
            logger.info("in the job")
            await asyncio.gather(step())

        async def other() -> None:
            logger.info("another task")

        await asyncio.gather(asyncio.create_task(job_task()), asyncio.create_task(other()))
        named = asyncio.create_task(other(), name=f"{JOB_TASK_PREFIX}{job}")
        await named
        logger.info("the test's own task")
    finally:
        logger.removeHandler(handler)
    got = [(r.getMessage(), getattr(r, "job_id", None), getattr(r, "correlation_id", None)) for r in records]
    assert sorted(got, key=str) == sorted([
        ("in the job", job, correlation), ("inside a task the job started", job, correlation),
        ("another task", None, None), ("another task", job, correlation), ("the test's own task", None, None),
    ], key=str)
    line = json.loads(JsonFormatter().format(next(r for r in records if r.getMessage() == "in the job")))
    assert (line["job_id"], line["correlation_id"], line["message"]) == (job, correlation, "in the job")


_LOG_ONE_LINE = (
    "import logging; from failover.logs import configure; configure('INFO', 'auto'); "
    "logging.getLogger('failover.job').info('hello', extra={'job_id': 'j1', 'correlation_id': 'c1'})"
)


def test_auto_format_is_json_into_a_pipe_and_text_on_a_terminal() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    piped = subprocess.run([sys.executable, "-c", _LOG_ONE_LINE], env=env, capture_output=True, text=True,
                           timeout=30, check=True)
    record = json.loads(piped.stderr)
    assert (record["message"], record["job_id"], record["correlation_id"]) == ("hello", "j1", "c1")

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", _LOG_ONE_LINE], env=env, stderr=follower,
                              stdout=subprocess.DEVNULL, timeout=30, check=True)
        assert proc.returncode == 0
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    text = b"".join(chunks).decode()
    assert "INFO" in text and "failover.job: hello [job j1 correlation c1]" in text
    assert not text.lstrip().startswith("{")
