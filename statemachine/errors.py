"""Errors the engine understands. Adapters translate foreign errors into these at the edge."""

from __future__ import annotations


class StepError(Exception):
    """A step cannot go on. `code` is stable (it ends up in events and tables); `message`
    tells an operator what happened and what to do. `transient` errors are retried."""

    def __init__(self, code: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient
        self.attempts = 1  # how many tries it took (set by JobContext.retrying)
        # the outside system's async job or operation whose failure this is: it ended, and what
        # it created may be left behind (CloudStack keeps a failed deploy's VM, in Error)
        self.failed_job: str | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# the transient failures an outage of CloudStack or the Volume Daemon gives (no answer, a 5xx,
# work it forgot in a restart): retried through the retry window (EngineConfig.retry_window).
# The others (an async job that failed, no capacity) are retried the attempts alone
OUTAGE_CODES = frozenset({
    "CLOUDSTACK_UNREACHABLE", "CLOUDSTACK_ERROR", "CLOUDSTACK_JOB_LOST", "CLOUDSTACK_THROTTLED",
    "VOLUME_DAEMON_UNREACHABLE", "VOLUME_DAEMON_ERROR", "VOLUME_OPERATION_LOST", "POLLER_STOPPED",
})


# a wait past its FAILOVER_*_TIMEOUT_SECONDS: final in a failover's step (the job rolls back),
# tried the attempts in an undo (a rollback's or a cleanup's: undoing is worth waiting for, and
# a retry waits on the same job)
WAIT_TIMEOUT_CODES = frozenset({"CLOUDSTACK_JOB_TIMEOUT", "VOLUME_OPERATION_TIMEOUT"})  # (an undo takes no snapshot)


class TransientError(StepError):
    """Worth another try: a 5xx, a timeout, a connection refused, an operation not finished."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, transient=True)


class RefusedError(StepError):
    """The outside system refused the request (CloudStack 431, a daemon 4xx): never retried."""


class NotFound(RefusedError):
    """The outside system does not know the resource (it is gone, or never was)."""


class MalformedResponse(StepError):
    """An answer of the wrong shape: the outside system or something in between is broken."""

    def __init__(self, system: str, detail: str) -> None:
        super().__init__(
            "MALFORMED_RESPONSE",
            f"{system} answered with a malformed response ({detail}); check the {system} "
            "service and any proxy in front of it",
        )


class HandBack(Exception):
    """The process is draining (SIGTERM) and a step is between two tries of a transient failure,
    nothing in flight: it stops there, and the next owner resumes the step."""


class LeaseLost(Exception):
    """Another process owns this job now (our lease expired): stop touching it at once."""


class CancelWhileRetrying(Exception):
    """A cancel was seen while a step waited to try a transient failure again: the step stops
    there, between two tries of an idempotent unit (its ledger says what it did), and the job
    rolls back as after a cancel between steps."""

    def __init__(self, what: str, error: StepError) -> None:
        super().__init__(f"cancel requested while retrying {what} ({error})")
        self.what = what
        self.error = error
