"""Async jobs (CloudStack) and operations (Volume Daemon) completing on timers.

Each job or operation is one ``loop.call_later`` handle: nothing polls, so thousands of
pending jobs with multi-second latencies cost nothing while they wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from emulators.model import (
    JOB_FAILED,
    JOB_SUCCEEDED,
    AsyncJob,
    CloudStackError,
    Latency,
    Operation,
    cs_time,
    internal_error,
    iso_time,
    new_id,
)

JobAction = Callable[[], dict[str, Any]]
OperationAction = Callable[[], dict[str, Any] | None]


class JobRunner:
    """Owns the async jobs and daemon operations and the timers that finish them."""

    def __init__(self, latency: Callable[[], Latency]) -> None:
        self._latency = latency
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._begins: dict[str, Callable[[], None]] = {}  # jobs' work not under way yet
        self._closing = asyncio.Event()
        self.jobs: dict[str, AsyncJob] = {}
        self.operations: dict[str, Operation] = {}
        # lookups that stay cheap as the world grows (a benchmark runs thousands of jobs): the
        # jobs in the order they were made (their `created` never decreases: a listing since a
        # date is a bisection, a page a slice), and the operations not ended yet, oldest first
        self.job_order: list[AsyncJob] = []
        self.unended: dict[str, Operation] = {}
        # told each async job's end (the emulated event bus, emulators/events.py)
        self.on_job_end: Callable[[AsyncJob], None] | None = None

    def reset(self) -> None:
        """Forget every job and operation; the pending ones never finish."""
        self._cancel_timers()
        self._begins.clear()
        self.jobs = {}
        self.operations = {}
        self.job_order, self.unended = [], {}

    def close(self) -> None:
        """Stop every timer and release whatever waits in ``hang``."""
        self._cancel_timers()
        self._closing.set()

    async def hang(self) -> None:
        """Wait until ``close``: how a request "never" answers."""
        await self._closing.wait()

    def _cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    # --------------------------------------------------------------- async jobs
    def submit_job(
        self,
        command: str,
        instance_type: str | None,
        instance_id: str | None,
        run: JobAction,
        on_fail: Callable[[], None] | None = None,
        fault: str | None = None,
        begin: Callable[[], None] | None = None,
    ) -> AsyncJob:
        """Queue an async job whose ``run`` applies its effect after the job latency.

        ``run`` returns the job result (e.g. ``{"volume": {...}}``) or raises CloudStackError,
        which fails the job. Fault ``async_fail`` fails it without running; ``timeout`` leaves
        it pending forever. ``on_fail`` undoes a transitional state when the job fails.
        ``begin`` is the job under way (a state its resource shows while it works): at half
        the latency, and before ``run`` in any case.
        """
        job = AsyncJob(new_id(), command, instance_type, instance_id)
        self.jobs[job.id] = job
        self.job_order.append(job)
        if begin is not None:
            self._begins[job.id] = begin
            self._timers[f"{job.id}:begin"] = asyncio.get_running_loop().call_later(
                self._latency().async_job_seconds / 2, self._begin, job.id)
        if fault != "timeout":
            self._timers[job.id] = asyncio.get_running_loop().call_later(
                self._latency().async_job_seconds,
                self._finish_job,
                job,
                run,
                on_fail,
                fault == "async_fail",
            )
        return job

    def submit_failed_job(self, command: str, instance_type: str | None, instance_id: str | None,
                          error: Exception) -> AsyncJob:
        """A job whose command's rules failed it as it began (CloudStack checks many of them in
        the job, not at the call): it fails on the next loop turn, whatever the latency."""
        job = AsyncJob(new_id(), command, instance_type, instance_id)
        self.jobs[job.id] = job
        self.job_order.append(job)

        def run() -> dict[str, Any]:
            raise error

        self._timers[job.id] = asyncio.get_running_loop().call_later(0, self._finish_job, job, run, None, False)
        return job

    def _begin(self, job_id: str) -> None:
        """The job's work under way, once (at its timer, or as it ends if that came first)."""
        handle = self._timers.pop(f"{job_id}:begin", None)
        if handle is not None:
            handle.cancel()
        begin = self._begins.pop(job_id, None)
        if begin is not None:
            begin()

    def _finish_job(
        self,
        job: AsyncJob,
        run: JobAction,
        on_fail: Callable[[], None] | None,
        injected_failure: bool,
    ) -> None:
        self._timers.pop(job.id, None)
        self._begin(job.id)
        job.completed = cs_time()
        try:
            if injected_failure:
                raise job.failure or internal_error(f"Injected fault: the {job.command} job failed")
            result = run()
        except Exception as exc:
            if on_fail is not None:
                on_fail()
            # as CloudStack's ApiAsyncJobDispatcher: the code of the command's ServerApiException
            # (533 for want of capacity, 535 past a resource limit ...), else 530
            code = job.failure.errorcode if injected_failure and job.failure else 530
            job.status, job.result_code = JOB_FAILED, code
            job.result = {"errorcode": code, "errortext": _text(exc)}
        else:
            job.status, job.result_code, job.result = JOB_SUCCEEDED, 0, result
        if self.on_job_end is not None:
            self.on_job_end(job)

    # ------------------------------------------------------- daemon operations
    def submit_operation(
        self,
        op_type: str,
        volume_id: str,
        vm_id: str | None,
        request: dict[str, Any],
        run: OperationAction,
        fault: str | None = None,
    ) -> Operation:
        """Queue a daemon operation: ``pending``, ``executing`` on the next loop turn, then
        ``completed`` or ``failed`` after the operation latency (``timeout``: never)."""
        op = Operation(new_id(), op_type, volume_id, vm_id, request)
        self.operations[op.id] = op
        self.unended[op.id] = op
        loop = asyncio.get_running_loop()
        loop.call_soon(self._start_operation, op)
        if fault != "timeout":
            self._timers[op.id] = loop.call_later(
                self._latency().operation_seconds,
                self._finish_operation,
                op,
                run,
                fault == "async_fail",
            )
        return op

    def forget_operations(self) -> int:
        """The Volume Daemon restarted: it knows no operation any more, and those under way
        never finish (their effect is not applied). How many it forgot."""
        for op_id in list(self.unended):
            handle = self._timers.pop(op_id, None)
            if handle is not None:
                handle.cancel()
        forgotten = len(self.operations)
        self.operations, self.unended = {}, {}
        return forgotten

    def _start_operation(self, op: Operation) -> None:
        if op.status == "pending" and self.operations.get(op.id) is op:
            op.status, op.updated_at = "executing", iso_time()

    def _finish_operation(self, op: Operation, run: OperationAction, injected: bool) -> None:
        self._timers.pop(op.id, None)
        try:
            if injected:
                raise internal_error(f"Injected fault: the {op.type} operation failed")
            op.response = run()
        except Exception as exc:
            op.status, op.error = "failed", _text(exc)
        else:
            op.status = "completed"
        op.updated_at = op.completed_at = iso_time()
        self.unended.pop(op.id, None)


def _text(exc: Exception) -> str:
    return exc.errortext if isinstance(exc, CloudStackError) else f"Internal error: {exc}"
