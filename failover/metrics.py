"""Prometheus metric definitions of the failover service.

Every metric lives on prometheus-client's default ``REGISTRY``. The objects below are
definitions, not connections, so defining them at import time is safe; the code that runs jobs,
adapters, the outbox relay and the projectors updates them, and ``failover.health`` serves them
on ``/metrics``.

Each ``failoverctl serve`` process exposes its own values and Prometheus adds an ``instance``
label to every series it scrapes, so dashboards and alerts ``sum`` over instances.

Label sets with a closed list of values (job types, outcomes, command types) are created at
import time with value 0. Prometheus' ``increase()`` cannot see the first increment of a series
that did not exist before it, so a counter that an alert watches (a failed rollback, a
dead-lettered command) must be exported at 0 before it ever moves.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import metadata
from typing import Any, Final, Literal, TypeVar

from prometheus_client import Counter, Gauge, Histogram, Info

from schemas.events import EVENT_TYPES as _EVENT_MODELS

__all__ = [
    "ADAPTERS",
    "ADAPTER_CALLS",
    "ADAPTER_CALL_DURATION",
    "ADAPTER_OUTCOMES",
    "ALL_METRIC_NAMES",
    "BUILD_INFO",
    "CLOUDSTACK_JOB_EVENTS",
    "CLOUDSTACK_THROTTLED",
    "COMMANDS",
    "COMMAND_OUTCOMES",
    "COMMAND_TYPES",
    "EVENTS_PUBLISHED",
    "EVENT_LOOP_LAG",
    "EVENT_TYPES",
    "GC_PAUSE",
    "HISTOGRAM_METRIC_NAMES",
    "INTAKE_LOOP_LAG",
    "INTAKE_RESTARTS",
    "JOBS_ENDED",
    "JOBS_IN_PROGRESS",
    "JOBS_STARTED",
    "JOBS_WAITING",
    "JOB_DURATION",
    "JOB_OUTCOMES",
    "JOB_STATE_OLDEST",
    "JOB_TYPES",
    "OUTBOX_BACKLOG",
    "OUTBOX_OLDEST_UNSENT_AGE",
    "PROJECTOR_EVENTS",
    "PROJECTOR_LAG",
    "PROJECTOR_OUTCOMES",
    "ROLLBACKS",
    "ROLLBACK_OUTCOMES",
    "STEP_DURATION",
    "STEP_OUTCOMES",
    "AdapterName",
    "AdapterOutcome",
    "CommandOutcome",
    "JobOutcome",
    "JobType",
    "ProjectorOutcome",
    "RollbackOutcome",
    "StepOutcome",
    "child",
    "observe_adapter_call",
    "observed",
    "set_job_state_gauges",
    "watch_event_loop",
    "watch_gc",
]

T = TypeVar("T")

JobType = Literal["test-failover", "live-failover", "cleanup"]
JobOutcome = Literal["completed", "failed", "cancelled"]
StepOutcome = Literal["completed", "failed", "skipped", "cancelled"]
AdapterName = Literal["cloudstack", "volume_daemon", "injection", "platform_db"]
AdapterOutcome = Literal["ok", "error", "retry"]
RollbackOutcome = Literal["completed", "failed"]
CommandOutcome = Literal[
    "accepted",
    "duplicate",
    "rejected_invalid",
    "rejected_conflict",
    "rejected_not_found",
    "rejected_not_allowed",
    "dead_lettered",
]
ProjectorOutcome = Literal["applied", "duplicate"]

JOB_TYPES: Final[tuple[str, ...]] = ("test-failover", "live-failover", "cleanup")
JOB_OUTCOMES: Final[tuple[str, ...]] = ("completed", "failed", "cancelled")
STEP_OUTCOMES: Final[tuple[str, ...]] = ("completed", "failed", "skipped", "cancelled")
ADAPTERS: Final[tuple[str, ...]] = ("cloudstack", "volume_daemon", "injection", "platform_db")
ADAPTER_OUTCOMES: Final[tuple[str, ...]] = ("ok", "error", "retry")
ROLLBACK_OUTCOMES: Final[tuple[str, ...]] = ("completed", "failed")
COMMAND_TYPES: Final[tuple[str, ...]] = (
    "FailoverRequested",
    "CleanupRequested",
    "CancelRequested",
    "RollbackRequested",
    "unknown",
)
PROJECTOR_OUTCOMES: Final[tuple[str, ...]] = ("applied", "duplicate")
EVENT_TYPES: Final[tuple[str, ...]] = tuple(_EVENT_MODELS)
COMMAND_OUTCOMES: Final[tuple[str, ...]] = (
    "accepted",
    "duplicate",
    "rejected_invalid",
    "rejected_conflict",
    "rejected_not_found",
    "rejected_not_allowed",
    "dead_lettered",
)

# --- jobs -------------------------------------------------------------------------------------

JOBS_STARTED: Final = Counter(
    "failover_jobs_started_total",
    "Jobs this process started (accepted and began running).",
    ["job_type"],
)
JOBS_ENDED: Final = Counter(
    "failover_jobs_ended_total",
    "Jobs this process ended, by outcome.",
    ["job_type", "outcome"],
)
JOB_DURATION: Final = Histogram(
    "failover_job_duration_seconds",
    "Wall-clock time from a job's acceptance to its end.",
    ["job_type", "outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
STEP_DURATION: Final = Histogram(
    "failover_step_duration_seconds",
    "Time one step of a job took, by step and outcome.",
    ["job_type", "step", "outcome"],
    buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
JOBS_IN_PROGRESS: Final = Gauge(
    "failover_jobs_in_progress",
    "Jobs this process is running, by state-machine state (a step name or rolling_back).",
    ["state"],
)
JOBS_WAITING: Final = Gauge(
    "failover_jobs_waiting",
    "Jobs this process accepted and has no room for yet, by priority (live: live failovers and their "
    "rollbacks retried, started before the others).",
    ["priority"],
)
for _priority in ("live", "other"):
    JOBS_WAITING.labels(priority=_priority).set(0)
JOB_STATE_OLDEST: Final = Gauge(
    "failover_job_state_oldest_seconds",
    "Time the oldest job this process runs has spent in its current state, by state.",
    ["state"],
)

# --- adapters ---------------------------------------------------------------------------------

ADAPTER_CALLS: Final = Counter(
    "failover_adapter_calls_total",
    "Calls to the outside world, by adapter, operation and outcome (ok, error, retry).",
    ["adapter", "operation", "outcome"],
)
ADAPTER_CALL_DURATION: Final = Histogram(
    "failover_adapter_call_duration_seconds",
    "Duration of calls to the outside world, by adapter and operation.",
    ["adapter", "operation"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
ROLLBACKS: Final = Counter(
    "failover_rollbacks_total",
    "Rollbacks this process finished, by outcome; a failed one needs an operator.",
    ["outcome"],
)

# --- the bus ----------------------------------------------------------------------------------

INTAKE_RESTARTS: Final = Counter(
    "failover_intake_process_restarts_total",
    "Times serve started its intake process (FAILOVER_INTAKE_PROCESS) or thread (FAILOVER_INTAKE_THREAD) "
    "again after it died; commands wait in the queue until it runs.",
)
CLOUDSTACK_JOB_EVENTS: Final = Counter(
    "failover_cloudstack_job_events_total",
    "Async job completions read from CloudStack's event bus (FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE), by "
    "outcome: read (its job's wait, if this process has one, asks at once) or unreadable (no jobId). "
    "Flat at zero with the setting on: CloudStack is not publishing to that exchange (check its "
    "event bus configuration); the waits still end at the poll rounds.",
    ["outcome"],
)
CLOUDSTACK_THROTTLED: Final = Counter(
    "failover_cloudstack_throttled_total",
    "Calls CloudStack refused because the API key's account reached its API limit (429: "
    "api.throttling.max calls per api.throttling.interval). Each was made again once CloudStack's "
    "window ended, and the process's calls to CloudStack waited meanwhile, then went spaced to the "
    "rate that got through: failovers slow down. Rising: set FAILOVER_CLOUDSTACK_MAX_CALLS_PER_SECOND "
    "below the limit, or raise the limit.",
)
COMMANDS: Final = Counter(
    "failover_commands_total",
    "Command deliveries handled, by command type (or unknown) and outcome.",
    ["type", "outcome"],
)
EVENTS_PUBLISHED: Final = Counter(
    "failover_events_published_total",
    "Events the outbox relay published (broker-confirmed), by event type.",
    ["type"],
)
OUTBOX_BACKLOG: Final = Gauge(
    "failover_outbox_backlog",
    "Events committed to the outbox and not yet published.",
)
OUTBOX_OLDEST_UNSENT_AGE: Final = Gauge(
    "failover_outbox_oldest_unsent_age_seconds",
    "Age of the oldest committed and not yet published event (0 when none).",
)

# --- the database --------------------------------------------------------------------------------

JOB_COMMITS_PER_TRANSACTION: Final = Histogram(
    "failover_job_commits_per_transaction",
    "Jobs' commits carried by each transaction of the job store: 1 alone; more under load, when "
    "commits waiting for one in flight go together (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)

# --- projectors -------------------------------------------------------------------------------

PROJECTOR_LAG: Final = Histogram(
    "failover_projector_lag_seconds",
    "Time from an event's occurred_at to the commit of its projection.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PROJECTOR_EVENTS: Final = Counter(
    "failover_projector_events_total",
    "Events a projector handled, by projector and outcome (applied, duplicate).",
    ["projector", "outcome"],
)

# --- the process ------------------------------------------------------------------------------

GC_GENERATIONS: Final = (0, 1, 2)
GC_PAUSE: Final = Histogram(
    "failover_gc_pause_seconds",
    "Pauses of Python's cyclic garbage collector in this process, by generation: every job, "
    "command and event waits while one runs.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)


EVENT_LOOP_LAG: Final = Histogram(
    "failover_event_loop_lag_seconds",
    "How late this process's event loop woke a timer it had set, sampled every quarter second. "
    "Every command, job step and event waits its turn in the same loop: a p99 of tens of "
    "milliseconds means the process is near saturation (run another, or lower "
    "FAILOVER_MAX_CONCURRENT_JOBS).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

INTAKE_LOOP_LAG: Final = Histogram(
    "failover_intake_loop_lag_seconds",
    "How late the intake's event loop (FAILOVER_INTAKE_THREAD's thread, or FAILOVER_INTAKE_PROCESS's "
    "process) woke a timer it had set, sampled every quarter second. Every command waits its turn "
    "there before it is recorded and answered: a p99 of tens of milliseconds delays JobAccepted "
    "as much (with the thread, serve's own work takes the interpreter from it: run another serve, "
    "or lower FAILOVER_MAX_CONCURRENT_JOBS). No samples while commands are taken in serve's own "
    "loop (failover_event_loop_lag_seconds covers them then).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


async def watch_event_loop(interval: float = 0.25) -> None:
    """Observe into `EVENT_LOOP_LAG` how late each of its sleeps woke, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        began = loop.time()
        await asyncio.sleep(interval)
        EVENT_LOOP_LAG.observe(max(0.0, loop.time() - began - interval))


def watch_gc() -> None:
    """Time every collection into `GC_PAUSE` (idempotent)."""
    import gc

    if any(getattr(cb, "__name__", "") == "_gc_timer" for cb in gc.callbacks):
        return
    started: list[float] = [0.0]
    children = {g: GC_PAUSE.labels(generation=str(g)) for g in GC_GENERATIONS}

    def _gc_timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            children[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(_gc_timer)


# --- build ------------------------------------------------------------------------------------

BUILD_INFO: Final = Info("failover_build", "Version of the failover service that is running.")

ALL_METRIC_NAMES: Final[frozenset[str]] = frozenset(
    {
        "failover_gc_pause_seconds",
        "failover_event_loop_lag_seconds",
        "failover_intake_loop_lag_seconds",
        "failover_jobs_started_total",
        "failover_jobs_ended_total",
        "failover_job_duration_seconds",
        "failover_step_duration_seconds",
        "failover_jobs_in_progress",
        "failover_jobs_waiting",
        "failover_job_state_oldest_seconds",
        "failover_adapter_calls_total",
        "failover_adapter_call_duration_seconds",
        "failover_rollbacks_total",
        "failover_commands_total",
        "failover_cloudstack_job_events_total",
        "failover_cloudstack_throttled_total",
        "failover_intake_process_restarts_total",
        "failover_events_published_total",
        "failover_outbox_backlog",
        "failover_outbox_oldest_unsent_age_seconds",
        "failover_projector_lag_seconds",
        "failover_projector_events_total",
        "failover_job_commits_per_transaction",
        "failover_build_info",
    }
)
"""The names a PromQL query uses: counters with ``_total``, histograms without their
``_bucket``/``_sum``/``_count`` suffix, the info metric as ``failover_build_info``."""

HISTOGRAM_METRIC_NAMES: Final[frozenset[str]] = frozenset(
    {
        "failover_job_duration_seconds",
        "failover_step_duration_seconds",
        "failover_adapter_call_duration_seconds",
        "failover_projector_lag_seconds",
        "failover_gc_pause_seconds",
        "failover_event_loop_lag_seconds",
        "failover_intake_loop_lag_seconds",
        "failover_job_commits_per_transaction",
    }
)
"""The members of ``ALL_METRIC_NAMES`` that are histograms (exported as ``_bucket``,
``_sum`` and ``_count`` series)."""


def _package_version() -> str:
    """Return the installed project's version, or a marker when it runs from a source tree."""
    try:
        return metadata.version("failover-orchestrator")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _initialise_series() -> None:
    """Export every closed-set label combination at 0 (see the module docstring)."""
    BUILD_INFO.info({"version": _package_version()})
    for job_type in JOB_TYPES:
        JOBS_STARTED.labels(job_type=job_type)
        for outcome in JOB_OUTCOMES:
            JOBS_ENDED.labels(job_type=job_type, outcome=outcome)
            JOB_DURATION.labels(job_type=job_type, outcome=outcome)
    for rollback_outcome in ROLLBACK_OUTCOMES:
        ROLLBACKS.labels(outcome=rollback_outcome)
    for command_type in COMMAND_TYPES:
        for command_outcome in COMMAND_OUTCOMES:
            COMMANDS.labels(type=command_type, outcome=command_outcome)
    for event_type in EVENT_TYPES:
        EVENTS_PUBLISHED.labels(type=event_type)
    for projector_outcome in PROJECTOR_OUTCOMES:
        PROJECTOR_EVENTS.labels(projector="views", outcome=projector_outcome)
    OUTBOX_BACKLOG.set(0)
    OUTBOX_OLDEST_UNSENT_AGE.set(0)
    for generation in GC_GENERATIONS:
        GC_PAUSE.labels(generation=str(generation))
    for events_outcome in ("read", "unreadable"):
        CLOUDSTACK_JOB_EVENTS.labels(outcome=events_outcome)


_initialise_series()


_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, kept: prometheus_client's labels() takes a lock and builds its
    key on every call, and the hot paths call it about a hundred times per job (1.4% of serve's
    CPU in the benchmark's profile). The label sets here are small and closed."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


def observe_adapter_call(
    adapter: AdapterName, operation: str, outcome: AdapterOutcome, seconds: float
) -> None:
    """Record one call to the outside world: its outcome and how long it took.

    ``operation`` is the remote operation's name (a CloudStack API command such as
    ``deployVirtualMachine``, a Volume Daemon operation such as ``attach``); keep it to a small
    fixed set, never an id.
    """
    child(ADAPTER_CALLS, adapter, operation, outcome).inc()
    child(ADAPTER_CALL_DURATION, adapter, operation).observe(seconds)


class _Observed:
    """A stand-in for an adapter object whose coroutine methods are timed and counted."""

    def __init__(self, adapter: AdapterName, target: object) -> None:
        self._adapter: AdapterName = adapter
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(value):
            return value
        call: Callable[..., Awaitable[Any]] = value
        adapter = self._adapter

        @functools.wraps(call)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.monotonic()
            outcome: AdapterOutcome = "error"
            try:
                result = await call(*args, **kwargs)
                outcome = "ok"
                return result
            finally:
                observe_adapter_call(adapter, name, outcome, time.monotonic() - began)

        return timed


def observed(adapter: AdapterName, target: T) -> T:
    """``target`` with each of its public coroutine methods recorded by ``observe_adapter_call``
    (operation = the method's name). For adapters without their own ``observe`` hook, such as
    the platform tables (``platform_db``)."""
    proxy: Any = _Observed(adapter, target)
    return proxy  # type: ignore[no-any-return]


def set_job_state_gauges(
    entered_at: Iterable[tuple[str, float]],
    now: float,
    known_states: Iterable[str] = (),
) -> None:
    """Set ``failover_jobs_in_progress`` and ``failover_job_state_oldest_seconds``.

    ``entered_at`` holds one ``(state, entered_at)`` pair per job this process runs, with
    ``entered_at`` a timestamp on the same clock as ``now`` (``time.monotonic()`` or
    ``time.time()``). States that had series before and hold no job now go to 0 rather than
    vanishing, so a graph shows the drop. ``known_states`` are set to 0 too when idle (for
    example every step name, so that a fresh process already exports them).
    """
    counts: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for state, since in entered_at:
        counts[state] = counts.get(state, 0) + 1
        age = max(0.0, now - since)
        oldest[state] = max(oldest.get(state, 0.0), age)
    states = set(counts) | set(known_states) | _exported_states()
    for state in states:
        JOBS_IN_PROGRESS.labels(state=state).set(counts.get(state, 0))
        JOB_STATE_OLDEST.labels(state=state).set(oldest.get(state, 0.0))


def move_job_state(before: str | None, after: str | None) -> None:
    """One job of this process left `before` (None: it was not running here) for `after`
    (None: it stopped running here). Counted by one, without recounting every job (that was
    O(jobs) per transition: 7% of serve's CPU with 300 jobs in flight); `set_job_state_gauges`
    still recounts every few seconds."""
    if before == after:
        return
    if before is not None:
        child(JOBS_IN_PROGRESS, before).dec()
    if after is not None:
        child(JOBS_IN_PROGRESS, after).inc()


def _exported_states() -> set[str]:
    """Return the ``state`` label values the in-progress gauge already exports."""
    exported: set[str] = set()
    for family in JOBS_IN_PROGRESS.collect():
        for sample in family.samples:
            exported.add(sample.labels["state"])
    return exported
