"""The events the service publishes to ``failover.events`` (CONTRACT.md, "Events").

Every event carries the common fields of :class:`Event`; each subclass adds the contract's extra
fields for its type. Events are facts, named in the past tense; a job's events are numbered by
``sequence`` (1, 2, 3, ...), by which consumers order and de-duplicate them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.common import (
    Actor,
    EventModel,
    JobType,
    LogLevel,
    RejectReason,
    UtcDatetime,
    Uuid,
    VmId,
)

Percent = Annotated[int, Field(ge=0, le=100)]
Order = Annotated[int, Field(ge=1)]


class Event(EventModel):
    """The fields every event carries. Not published itself: see the subclasses."""

    type: str
    schema_version: Literal[1] = 1
    event_id: Uuid = Field(description="Unique; also the AMQP message_id.")
    job_id: Uuid
    job_type: JobType | None = Field(description="Null only on a JobRejected that had none.")
    vm_id: VmId | None = Field(description="The source VM; null only on a JobRejected.")
    sequence: int = Field(ge=1, description="1, 2, 3, ... per job: no gaps, no repeats.")
    correlation_id: Uuid = Field(
        description="A failover's own job_id; for a cleanup, the job_id of the failover."
    )
    causation_id: Uuid = Field(description="The request_id or event_id that caused this event.")
    occurred_at: UtcDatetime

    _subject_may_be_null: ClassVar[bool] = False

    @model_validator(mode="after")
    def _subject_is_known(self) -> Event:
        # The contract allows a null job_type / vm_id only on a JobRejected.
        if not self._subject_may_be_null:
            missing = [name for name in ("job_type", "vm_id") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} may be null only on a JobRejected")
        return self


# --- nested objects ----------------------------------------------------------------------------


class StepRef(EventModel):
    """One step of a job, as listed in ``JobAccepted.steps``."""

    name: str
    order: Order


class ErrorInfo(EventModel):
    """What went wrong: a stable machine ``code`` and a ``message`` for people."""

    code: str
    message: str


class RollbackAction(EventModel):
    """One thing a rollback undoes (or undid), e.g. ``delete-snapshot`` of a ``snapshot``."""

    action: str
    resource_type: str
    resource_id: str = Field(description="The real CloudStack (or platform) id.")
    detail: str | None = None


class ManualAction(EventModel):
    """What an operator must still do by hand after a failed rollback, with the real ids."""

    action: str
    resource_type: str
    resource_id: str = Field(description="The real CloudStack (or platform) id.")
    detail: str | None = None


class SnapshotRef(BaseModel):
    """A snapshot taken of a replicated volume before a failover."""

    model_config = ConfigDict(frozen=True, extra="allow")

    volume_id: str
    snapshot_id: str


class FailoverOutputs(BaseModel):
    """The typed view of a failover's ``JobCompleted.outputs``: the contract's minimum.

    Other keys are allowed and kept ("at least" these), so ``as_outputs()`` of a parsed value
    gives back everything that was there.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    destination_vm_id: str
    snapshots: list[SnapshotRef]

    def as_outputs(self) -> dict[str, Any]:
        """The JSON-ready ``outputs`` object for a ``JobCompleted``."""
        return self.model_dump(mode="json")


# --- the events --------------------------------------------------------------------------------


class JobAccepted(Event):
    """A command became a job."""

    type: Literal["JobAccepted"] = "JobAccepted"
    vm_name: str
    requested_by: Actor
    steps: list[StepRef]


class JobRejected(Event):
    """A command could not become a job; ``job_id`` is its ``request_id``, ``sequence`` 1."""

    type: Literal["JobRejected"] = "JobRejected"
    reason: RejectReason
    detail: str

    _subject_may_be_null: ClassVar[bool] = True


class StepStarted(Event):
    """A step began."""

    type: Literal["StepStarted"] = "StepStarted"
    step: str
    step_order: Order
    total_steps: Order
    percent_complete: Percent


class StepCompleted(Event):
    """A step finished and did what it had to."""

    type: Literal["StepCompleted"] = "StepCompleted"
    step: str
    step_order: Order
    percent_complete: Percent
    outputs: dict[str, Any] = Field(default_factory=dict)


class StepSkipped(Event):
    """A step had nothing to do (e.g. no driver injection for a Linux VM)."""

    type: Literal["StepSkipped"] = "StepSkipped"
    step: str
    step_order: Order
    percent_complete: Percent
    reason: str


class StepFailed(Event):
    """A step failed, after ``attempts`` tries."""

    type: Literal["StepFailed"] = "StepFailed"
    step: str
    step_order: Order
    error: ErrorInfo
    attempts: Order


class LogRecorded(Event):
    """One structured log line of a job."""

    type: Literal["LogRecorded"] = "LogRecorded"
    level: LogLevel
    message: str
    step: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)


class RollbackStarted(Event):
    """A rollback began, after a failure or a cancel; ``actions`` will be undone in order."""

    type: Literal["RollbackStarted"] = "RollbackStarted"
    reason: str
    actions: list[RollbackAction]


class RollbackCompleted(Event):
    """A rollback undid everything (``actions``)."""

    type: Literal["RollbackCompleted"] = "RollbackCompleted"
    actions: list[RollbackAction]


class RollbackFailed(Event):
    """A rollback could not undo everything; ``manual_actions`` is what is left to do."""

    type: Literal["RollbackFailed"] = "RollbackFailed"
    error: ErrorInfo
    manual_actions: list[ManualAction]


class JobCompleted(Event):
    """A job ended well. For a failover, ``outputs`` holds at least ``destination_vm_id`` and
    ``snapshots`` (see ``FailoverOutputs``)."""

    type: Literal["JobCompleted"] = "JobCompleted"
    outputs: dict[str, Any]
    duration_seconds: float = Field(ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _failover_outputs_present(self) -> JobCompleted:
        if self.job_type in ("test-failover", "live-failover"):
            FailoverOutputs.model_validate(self.outputs)
        return self

    def failover_outputs(self) -> FailoverOutputs:
        """``outputs`` as :class:`FailoverOutputs` (raises ``ValidationError`` for a cleanup's)."""
        return FailoverOutputs.model_validate(self.outputs)


class JobFailed(Event):
    """A job ended in failure; ``rolled_back`` says whether the world is as before."""

    type: Literal["JobFailed"] = "JobFailed"
    failed_step: str | None
    error: ErrorInfo
    rolled_back: bool


class JobCancelled(Event):
    """A job was cancelled; ``rolled_back`` says whether the world is as before."""

    type: Literal["JobCancelled"] = "JobCancelled"
    rolled_back: bool


AnyEventType = (
    JobAccepted
    | JobRejected
    | StepStarted
    | StepCompleted
    | StepSkipped
    | StepFailed
    | LogRecorded
    | RollbackStarted
    | RollbackCompleted
    | RollbackFailed
    | JobCompleted
    | JobFailed
    | JobCancelled
)

AnyEvent = Annotated[AnyEventType, Field(discriminator="type")]
"""Any event, discriminated by ``type`` (for pydantic; to mypy it is ``AnyEventType``)."""

EVENT_TYPES: Final[Mapping[str, type[AnyEventType]]] = {
    model.__name__: model
    for model in (
        JobAccepted,
        JobRejected,
        StepStarted,
        StepCompleted,
        StepSkipped,
        StepFailed,
        LogRecorded,
        RollbackStarted,
        RollbackCompleted,
        RollbackFailed,
        JobCompleted,
        JobFailed,
        JobCancelled,
    )
}
"""Event type name -> its model, in the order the contract lists them."""

TERMINAL_EVENTS: Final = frozenset({"JobCompleted", "JobFailed", "JobCancelled", "JobRejected"})
"""The types that end a job's stream (a ``RollbackRequested`` may reopen a ``JobFailed`` one)."""


def event_routing_key(event: Event) -> str:
    """The routing key on ``failover.events``: ``job.{job_id}.{type}``."""
    return f"job.{event.job_id}.{event.type}"


def is_terminal(event: Event) -> bool:
    """Whether ``event`` ends its job's stream."""
    return event.type in TERMINAL_EVENTS
