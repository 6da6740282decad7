"""The examples and tables of CONTRACT.md, section 1, hold for the models."""

from __future__ import annotations

import json
from uuid import UUID

import pytest

from schemas import (
    CLEANUP_STEPS,
    COMMAND_TYPES,
    EVENT_TYPES,
    FAILOVER_STEPS,
    CancelRequested,
    CleanupRequested,
    Event,
    FailoverRequested,
    RollbackRequested,
    parse_command,
)

REQUEST_ID = "7d7e1f0e-3c55-4e8e-9d9a-0d5e7f1b2a10"
OTHER_ID = "0b6f4d3e-8a51-4c1b-a1d2-52f0c6a4e9b7"

# Verbatim from the contract, with "<uuid>" placeholders filled in.
FAILOVER_EXAMPLE = """
{"type": "FailoverRequested", "schema_version": 1,
 "request_id": "7d7e1f0e-3c55-4e8e-9d9a-0d5e7f1b2a10",
 "vm_id": "4205a841-0265-f4bd-39a6-39fd92196f53",
 "failover_type": "test",
 "requested_by": "ops@example.com",
 "options": {"driver_injection": "auto"}}
"""
CLEANUP_EXAMPLE = f"""
{{"type": "CleanupRequested", "schema_version": 1, "request_id": "{REQUEST_ID}",
 "failover_job_id": "{OTHER_ID}", "requested_by": "ops"}}
"""
CANCEL_EXAMPLE = f"""
{{"type": "CancelRequested", "schema_version": 1, "request_id": "{REQUEST_ID}", "job_id": "{OTHER_ID}"}}
"""
ROLLBACK_EXAMPLE = f"""
{{"type": "RollbackRequested", "schema_version": 1, "request_id": "{REQUEST_ID}", "job_id": "{OTHER_ID}"}}
"""


def test_the_failover_example_parses() -> None:
    command = parse_command(FAILOVER_EXAMPLE.encode())
    assert command == FailoverRequested(
        request_id=UUID(REQUEST_ID),
        vm_id="4205a841-0265-f4bd-39a6-39fd92196f53",
        failover_type="test",
        requested_by="ops@example.com",
    )
    assert isinstance(command, FailoverRequested)
    assert command.options.driver_injection == "auto"
    assert command.job_type == "test-failover"


def test_the_cleanup_example_parses() -> None:
    command = parse_command(CLEANUP_EXAMPLE.encode())
    assert command == CleanupRequested(
        request_id=UUID(REQUEST_ID), failover_job_id=UUID(OTHER_ID), requested_by="ops"
    )


@pytest.mark.parametrize(
    ("example", "model"),
    [(CANCEL_EXAMPLE, CancelRequested), (ROLLBACK_EXAMPLE, RollbackRequested)],
)
def test_the_cancel_and_rollback_examples_parse(
    example: str, model: type[CancelRequested | RollbackRequested]
) -> None:
    command = parse_command(example.encode())
    assert command == model(request_id=UUID(REQUEST_ID), job_id=UUID(OTHER_ID))
    assert command.requested_by == "system"


def test_optional_fields_take_the_contracts_defaults() -> None:
    body = json.loads(FAILOVER_EXAMPLE)
    del body["requested_by"], body["options"]
    command = parse_command(json.dumps(body).encode())
    assert isinstance(command, FailoverRequested)
    assert command.requested_by == "system"
    assert command.options.driver_injection == "auto"


def test_the_command_types_are_the_routing_keys_of_the_contract() -> None:
    assert set(COMMAND_TYPES) == {
        "FailoverRequested",
        "CleanupRequested",
        "CancelRequested",
        "RollbackRequested",
    }


COMMON_FIELDS = {
    "type",
    "schema_version",
    "event_id",
    "job_id",
    "job_type",
    "vm_id",
    "sequence",
    "correlation_id",
    "causation_id",
    "occurred_at",
}

# The contract's events table: event -> its extra fields.
EXTRA_FIELDS = {
    "JobAccepted": {"vm_name", "requested_by", "steps"},
    "JobRejected": {"reason", "detail"},
    "StepStarted": {"step", "step_order", "total_steps", "percent_complete"},
    "StepCompleted": {"step", "step_order", "percent_complete", "outputs"},
    "StepSkipped": {"step", "step_order", "percent_complete", "reason"},
    "StepFailed": {"step", "step_order", "error", "attempts"},
    "LogRecorded": {"level", "message", "step", "fields"},
    "RollbackStarted": {"reason", "actions"},
    "RollbackCompleted": {"actions"},
    "RollbackFailed": {"error", "manual_actions"},
    "JobCompleted": {"outputs", "duration_seconds"},
    "JobFailed": {"failed_step", "error", "rolled_back"},
    "JobCancelled": {"rolled_back"},
}


def test_the_common_fields_are_the_contracts() -> None:
    assert set(Event.model_fields) == COMMON_FIELDS


@pytest.mark.parametrize("name", sorted(EXTRA_FIELDS))
def test_each_event_has_exactly_the_contracts_fields(name: str) -> None:
    assert set(EVENT_TYPES[name].model_fields) == COMMON_FIELDS | EXTRA_FIELDS[name]


def test_every_event_type_of_the_contract_exists_and_no_other() -> None:
    assert set(EVENT_TYPES) == set(EXTRA_FIELDS)


def test_the_step_names_are_the_contracts() -> None:
    assert FAILOVER_STEPS == (
        "pre-failover-validation",
        "cloudstack-snapshot",
        "virtio-driver-injection",
        "vm-creation",
        "volume-attachment",
        "vm-startup-validation",
    )
    assert CLEANUP_STEPS == (
        "power-off",
        "volume-detachment",
        "vm-deletion",
        "snapshot-revert",
        "volume-reattachment",
        "snapshot-deletion",
    )
