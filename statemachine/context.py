"""What a running step sees: its job, the ports, and the means to emit events and keep the
ledger, all written through the job store in lease-fenced transactions."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
)

from schemas.common import utc_now
from schemas.events import Event, LogRecorded

from .errors import OUTAGE_CODES, WAIT_TIMEOUT_CODES, CancelWhileRetrying, HandBack, StepError
from .ports import (
    CloudStackPort,
    Commit,
    InjectionPort,
    JobRow,
    JobStorePort,
    LedgerEntry,
    PlatformPort,
    VolumeDaemonPort,
)

log = logging.getLogger("failover.job")
T = TypeVar("T")

_PAUSE_SLICE = 0.25  # a retry's pause looks this often whether the process is draining
_PY_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}


@dataclass(frozen=True)
class EngineConfig:
    """The settings the steps need (built from `failover.settings.Settings`)."""

    zone: str
    template_id: str
    service_offering_id: str
    disk_offering_id: str | None
    default_network_id: str
    appliance_vm_id: str
    snapshot_timeout: float = 1800.0
    async_job_timeout: float = 1800.0
    volume_operation_timeout: float = 600.0
    retry_attempts: int = 5
    retry_backoff: float = 2.0
    retry_backoff_max: float = 60.0
    # an outage's transient failure (errors.OUTAGE_CODES) is tried again until both
    # `retry_attempts` tries were made and this many seconds have passed since it first failed
    # (0: the attempts alone): an outage of CloudStack or the Volume Daemon shorter than it is
    # ridden out, not failed and rolled back
    retry_window: float = 0.0


@dataclass(frozen=True)
class Ports:
    cloudstack: CloudStackPort
    volumes: VolumeDaemonPort
    injection: InjectionPort
    platform: PlatformPort
    store: JobStorePort


@dataclass
class Observer:
    """Hooks for metrics; the engine calls them, the wiring fills them in."""

    step_finished: Callable[[str, str, str, float], None] = lambda job_type, step, outcome, s: None
    job_started: Callable[[str], None] = lambda job_type: None
    job_ended: Callable[[str, str, float], None] = lambda job_type, outcome, s: None
    rollback_ended: Callable[[str], None] = lambda outcome: None
    state_changed: Callable[[str, str | None, str | None], None] = lambda job_id, old, new: None
    retried: Callable[[str, str], None] = lambda code, message: None


@dataclass
class JobContext:
    """One job's handle on the world while a process owns it."""

    row: JobRow
    ports: Ports
    config: EngineConfig
    observer: Observer = field(default_factory=Observer)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _pending_logs: list[tuple[str, str, str | None, dict[str, Any]]] = field(default_factory=list)
    # ledger entries recorded with `durable=False`: written with the job's next commit
    _pending_ledger: dict[str, LedgerEntry] = field(default_factory=dict)
    _ledger: dict[str, LedgerEntry] | None = None
    # events (and job columns) staged by `stage`: written first by the job's next commit
    _staged: list[tuple[type[Event], dict[str, Any]]] = field(default_factory=list)
    _staged_job: dict[str, Any] = field(default_factory=dict)
    cancel_seen: bool = False
    draining: bool = False  # the process is shutting down: stop at the next safe point
    current_step: str | None = None
    owner: str | None = None  # the process driving the job (its lease owner), for the log
    taken_over: bool = False  # this process resumes a job another run (or process) began
    # how many times in a row the engine crashed on this job in its recorded state here (not
    # counting the database's or the network's troubles), and the last crash's exception
    engine_crashes: tuple[int, str] = (0, "")
    _said: set[str] = field(default_factory=set)  # the keys of `log_once`'s lines said here

    # ------------------------------------------------------------------ events

    def _common(self, sequence: int, causation_id: str | None = None) -> dict[str, Any]:
        return {
            "event_id": uuid.uuid4(),
            "job_id": self.row.job_id,
            "job_type": self.row.job_type,
            "vm_id": self.row.vm_id,
            "sequence": sequence,
            "correlation_id": self.row.correlation_id,
            "causation_id": causation_id or self.row.request_id,
            "occurred_at": utc_now(),
        }

    def log_once(self, key: str, level: str, message: str, **fields: Any) -> None:
        """`log`, once per `key` while this process drives the job: a warning that every look
        at the same thing would repeat (a rollback looks at the job's VM in three undo steps)."""
        if key not in self._said:
            self._said.add(key)
            self.log(level, message, **fields)

    def log(self, level: str, message: str, **fields: Any) -> None:
        """A structured log line of this job: a `LogRecorded` event (sent with the next
        commit, or by `flush`) and a line in the process log."""
        self._pending_logs.append((level, message, self.current_step, fields))
        log.log(
            _PY_LEVELS.get(level, logging.INFO),
            message,
            extra={
                "job_id": self.row.job_id,
                "correlation_id": self.row.correlation_id,
                "step": self.current_step,
                "fields": fields,
            },
        )

    def stage(self, events: list[tuple[type[Event], dict[str, Any]]], *, job: dict[str, Any] | None = None) -> None:
        """Have `events` (after the log lines so far) and `job`'s columns written first by the
        job's next commit, instead of a transaction of their own: a step's end rides the next
        step's start (or the job's end). Only for what a resume can redo: a crash before that
        commit runs the step again, its ledger making it idempotent."""
        self._staged.extend(self._log_events())
        self._staged.extend(events)
        self._staged_job.update(job or {})

    @property
    def has_staged(self) -> bool:
        return bool(self._staged)

    def _log_events(self) -> list[tuple[type[Event], dict[str, Any]]]:
        logs, self._pending_logs = self._pending_logs, []
        return [(LogRecorded, {"level": level, "message": message, "step": step, "fields": fields})
                for level, message, step, fields in logs]

    async def commit(
        self,
        events: list[tuple[type[Event], dict[str, Any]]] | None = None,
        *,
        job: dict[str, Any] | None = None,
        ledger: list[LedgerEntry] | None = None,
        vm_status: str | None = None,
        parent: dict[str, Any] | None = None,
        unless_cancelled: bool = False,
    ) -> bool:
        """Write what is staged, the pending logs, then `events`, with the job and ledger
        changes, in one lease-fenced transaction. Returns whether a cancel has been requested.

        `unless_cancelled` (with something staged): `events`, `job`, `vm_status` and `parent`
        are written only while no cancel is asked for; a True return then means they were not
        (the staged part, the logs and the ledger always are)."""
        async with self._lock:
            staged, staged_job = self._staged, self._staged_job
            self._staged, self._staged_job = [], {}
            logs = self._pending_logs[:]
            head_items = [*staged, *self._log_events()]
            deferred, self._pending_ledger = self._pending_ledger, {}
            if deferred:  # the newer state of an entry wins (usually the same object anyway)
                ledger = list({**deferred, **{e.key: e for e in ledger or []}}.values())
            seq = self.row.last_sequence
            head: list[Event] = []
            for cls, extra in head_items:
                seq += 1
                head.append(cls(**self._common(seq), **extra))
            head_seq = seq
            tail: list[Event] = []
            for cls, extra in events or []:
                seq += 1
                tail.append(cls(**self._common(seq), **extra))
            gated = unless_cancelled and bool(staged)
            if gated:
                commit = Commit(events=head, job=staged_job, ledger=ledger or [],
                                tail=Commit(events=tail, job=job or {}, vm_status=vm_status, parent=parent or {}))
            else:
                commit = Commit(events=[*head, *tail], job={**staged_job, **(job or {})}, ledger=ledger or [],
                                vm_status=vm_status, parent=parent or {})
            try:
                cancel = await self.ports.store.commit(self.row, commit)
            except BaseException:
                self._pending_logs[:0] = logs
                self._pending_ledger = {**deferred, **self._pending_ledger}
                self._staged[:0] = staged
                self._staged_job = {**staged_job, **self._staged_job}
                raise
            written = commit if gated and cancel else commit.with_tail()
            self.row.last_sequence = head_seq if gated and cancel else seq
            for key, value in written.job.items():
                if hasattr(self.row, key):
                    setattr(self.row, key, value)
            if ledger and self._ledger is not None:
                for entry in ledger:
                    self._ledger[entry.key] = entry
            self.cancel_seen = self.cancel_seen or cancel
            return cancel

    def pending_lines(self) -> list[tuple[str, str, str | None, dict[str, Any]]]:
        """The log lines not written yet: (level, message, step, fields)."""
        return list(self._pending_logs)

    async def flush(self) -> None:
        """Send the pending log lines (and what is staged) now (long steps call it to show
        progress; a drain before it stops)."""
        if self._pending_logs or self._staged:
            await self.commit()

    # ------------------------------------------------------------------ ledger

    async def ledger(self) -> dict[str, LedgerEntry]:
        """The job's ledger by key (loaded once per ownership, then kept current)."""
        if self._ledger is None:
            self._ledger = {e.key: e for e in await self.ports.store.ledger(self.row.job_id)}
        return self._ledger

    async def record(self, entry: LedgerEntry, *, durable: bool = True) -> LedgerEntry:
        """Write a ledger entry (with any pending log lines) before or after a call.

        `durable=False` is for an entry whose loss in a crash costs only a look-up on resume:
        the "done" of a resource whose CloudStack job id or Volume Daemon operation id is
        already recorded (a resumed step waits on that job or operation again, finds it
        ended, and records the "done" itself). It goes with the job's next commit, at the
        latest the step's end; never use it for what a resume could not find out again."""
        ledger = await self.ledger()
        if durable:
            await self.commit(ledger=[entry])
        else:
            self._pending_ledger[entry.key] = entry
            ledger[entry.key] = entry
        return entry

    # ------------------------------------------------------------------ retries

    async def retrying(self, what: str, call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run an idempotent unit of work, `call(*args, **kwargs)`, retrying transient
        failures with backoff.

        The first attempt is a plain call: tenacity's machinery, built and stepped for every
        call, was 4.4% of serve's CPU with 1,000 slow jobs, and most calls succeed at once.
        A transient failure of it is handed to tenacity as its first attempt's outcome, so
        what follows (the note, the waits, the count of attempts) is as if tenacity had made
        that call itself."""
        try:
            return await call(*args, **kwargs)
        except StepError as exc:
            if not self._retriable(exc):
                raise  # (its `attempts` is 1 already)
            failed: StepError | None = exc
        cfg = self.config

        async def note(state: RetryCallState) -> None:
            await self._retry_note(what, state.attempt_number, state.outcome, state.upcoming_sleep)

        def stop(state: RetryCallState) -> bool:
            """After the attempts; through the window while the failure is an outage's."""
            if state.attempt_number < cfg.retry_attempts:
                return False
            exc = state.outcome.exception() if state.outcome is not None else None
            if cfg.retry_window <= 0 or getattr(exc, "code", None) not in OUTAGE_CODES:
                return True
            return (state.seconds_since_start or 0.0) >= cfg.retry_window

        async def pause(seconds: float) -> None:
            """tenacity's pause before a try, cut short by a drain (in a step: `HandBack`)."""
            until = time.monotonic() + seconds
            while (left := until - time.monotonic()) > 0:
                if self.draining and self.current_step is not None:
                    raise HandBack
                await asyncio.sleep(min(left, _PAUSE_SLICE))

        retry = AsyncRetrying(
            sleep=pause,
            stop=stop,
            wait=wait_exponential(multiplier=cfg.retry_backoff, max=cfg.retry_backoff_max),
            retry=retry_if_exception(self._retriable),
            reraise=True,
            before_sleep=note,
        )
        tries = 0
        try:
            async for attempt in retry:
                with attempt:
                    tries = attempt.retry_state.attempt_number
                    if failed is not None:  # the first attempt, made above
                        replay, failed = failed, None
                        raise replay
                    return await call(*args, **kwargs)
        except StepError as exc:
            exc.attempts = max(getattr(exc, "attempts", 1), tries)
            raise
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _retriable(self, exc: BaseException) -> bool:
        """Transient; or, in an undo (a rollback, a cleanup), a wait past its timeout."""
        return isinstance(exc, StepError) and (exc.transient or (
            exc.code in WAIT_TIMEOUT_CODES and (self.current_step is None or self.row.job_type == "cleanup")))

    async def _retry_note(self, what: str, attempt: int, outcome: Any, pause: float) -> None:
        """Before the pause ahead of a retry: the note, written at once (an outage ridden out
        shows in the job's progress while it lasts), which also sees a cancel: in a failover's
        step, a cancel asked for meanwhile stops the retries there (`CancelWhileRetrying`); and
        in any step, a drain (`HandBack`)."""
        exc = outcome.exception() if outcome is not None else None
        code = getattr(exc, "code", "ERROR")
        self.observer.retried(code, str(exc))
        self.log("WARN", f"{what}: attempt {attempt} failed, retrying in {pause:.1f} s",
                 error=str(exc), code=code, attempt=attempt)
        cancel = await self.commit()
        if self.current_step is None or not isinstance(exc, StepError):
            return  # (a rollback goes on through a cancel and a drain: it is undoing)
        if cancel and self.row.job_type != "cleanup":  # (a cleanup stops between its steps only)
            exc.attempts = attempt
            raise CancelWhileRetrying(what, exc)
        if self.draining:  # nothing in flight: the next owner resumes the step from here
            raise HandBack


def monotonic() -> float:
    return time.monotonic()
