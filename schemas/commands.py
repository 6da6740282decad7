"""The commands clients publish to ``failover.commands`` (CONTRACT.md, "Commands").

Each is an order, named as the contract names it; the routing key is its ``type``. ``request_id``
is the client's idempotency key, and the ``job_id`` of the job a ``FailoverRequested`` or
``CleanupRequested`` starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, Field

from schemas.common import (
    Actor,
    CommandModel,
    DriverInjection,
    FailoverType,
    JobType,
    Uuid,
    VmId,
    failover_job_type,
)

DEFAULT_REQUESTED_BY: Final = "system"


def _null_is_default(default: Any) -> BeforeValidator:
    # An explicit JSON null for an optional field means "not given", the same as leaving it out.
    return BeforeValidator(lambda value: default if value is None else value)


RequestedBy = Annotated[Actor, _null_is_default(DEFAULT_REQUESTED_BY)]


class FailoverRequestedOptions(CommandModel):
    """The ``options`` object of a ``FailoverRequested``."""

    driver_injection: Annotated[DriverInjection, _null_is_default("auto")] = Field(
        default="auto",
        description="auto: inject VirtIO drivers when the VM's os_type is Windows; always; never.",
    )


class FailoverRequested(CommandModel):
    """Fail a source VM over to CloudStack: a ``test`` (reversible) or ``live`` failover."""

    type: Literal["FailoverRequested"] = "FailoverRequested"
    schema_version: Literal[1] = 1
    request_id: Uuid = Field(description="Idempotency key chosen by the client; the new job_id.")
    vm_id: VmId = Field(description="vm_replication_contexts.vmware_vm_id of the source VM.")
    failover_type: FailoverType
    requested_by: RequestedBy = DEFAULT_REQUESTED_BY
    options: Annotated[FailoverRequestedOptions, _null_is_default(FailoverRequestedOptions())] = (
        Field(default_factory=FailoverRequestedOptions)
    )

    @property
    def job_type(self) -> JobType:
        """``test-failover`` or ``live-failover``."""
        return failover_job_type(self.failover_type)


class CleanupRequested(CommandModel):
    """Undo a completed test failover (the job it names)."""

    type: Literal["CleanupRequested"] = "CleanupRequested"
    schema_version: Literal[1] = 1
    request_id: Uuid = Field(description="Idempotency key chosen by the client; the new job_id.")
    failover_job_id: Uuid = Field(description="job_id of the completed test failover to undo.")
    requested_by: RequestedBy = DEFAULT_REQUESTED_BY

    @property
    def job_type(self) -> JobType:
        """Always ``cleanup``."""
        return "cleanup"


class CancelRequested(CommandModel):
    """Stop a running job at its next safe point and roll back what it had done."""

    type: Literal["CancelRequested"] = "CancelRequested"
    schema_version: Literal[1] = 1
    request_id: Uuid = Field(description="Idempotency key chosen by the client.")
    job_id: Uuid = Field(description="The running job to cancel.")
    requested_by: RequestedBy = DEFAULT_REQUESTED_BY


class RollbackRequested(CommandModel):
    """Retry the rollback of a failed job whose rollback did not complete."""

    type: Literal["RollbackRequested"] = "RollbackRequested"
    schema_version: Literal[1] = 1
    request_id: Uuid = Field(description="Idempotency key chosen by the client.")
    job_id: Uuid = Field(description="The failed job (rolled_back: false) to roll back again.")
    requested_by: RequestedBy = DEFAULT_REQUESTED_BY


AnyCommand = FailoverRequested | CleanupRequested | CancelRequested | RollbackRequested

Command = Annotated[AnyCommand, Field(discriminator="type")]
"""Any command, discriminated by ``type`` (for pydantic; to mypy it is ``AnyCommand``)."""

COMMAND_TYPES: Final[Mapping[str, type[AnyCommand]]] = {
    model.__name__: model
    for model in (FailoverRequested, CleanupRequested, CancelRequested, RollbackRequested)
}
"""Command type name (= routing key on ``failover.commands``) -> its model."""
