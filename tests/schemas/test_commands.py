"""The command models: defaults, constraints, serialisation, unknown fields."""

from __future__ import annotations

import json
import unicodedata
from uuid import UUID

import pytest
from pydantic import TypeAdapter, ValidationError

from schemas import (
    MAX_ID_LENGTH,
    CleanupRequested,
    FailoverRequested,
    FailoverRequestedOptions,
    InvalidCommand,
    VmId,
    parse_command,
)
from tests.schemas.helpers import REQUEST_ID, failover_body


def test_commands_are_frozen() -> None:
    command = FailoverRequested(request_id=UUID(REQUEST_ID), vm_id="vm-1", failover_type="live")
    with pytest.raises(ValidationError):
        command.vm_id = "other"


def test_python_callers_get_the_envelope_filled_in() -> None:
    command = FailoverRequested(request_id=UUID(REQUEST_ID), vm_id="vm-1", failover_type="live")
    assert (command.type, command.schema_version) == ("FailoverRequested", 1)
    assert command.job_type == "live-failover"
    assert (
        CleanupRequested(request_id=UUID(REQUEST_ID), failover_job_id=UUID(REQUEST_ID)).job_type
        == "cleanup"
    )


def test_uuids_are_serialised_in_lower_case_whatever_case_came_in() -> None:
    command = parse_command(failover_body(request_id=REQUEST_ID.upper()))
    assert json.loads(command.model_dump_json())["request_id"] == REQUEST_ID


def test_unknown_fields_are_ignored_at_any_depth() -> None:
    body = failover_body(priority="high", options={"driver_injection": "never", "turbo": True})
    command = parse_command(body)
    assert isinstance(command, FailoverRequested)
    assert command.options == FailoverRequestedOptions(driver_injection="never")
    assert "priority" not in command.model_dump()


def test_null_optional_fields_mean_the_default() -> None:
    command = parse_command(failover_body(requested_by=None, options=None))
    assert isinstance(command, FailoverRequested)
    assert command.requested_by == "system"
    assert command.options.driver_injection == "auto"
    command = parse_command(failover_body(options={"driver_injection": None}))
    assert isinstance(command, FailoverRequested)
    assert command.options.driver_injection == "auto"


@pytest.mark.parametrize(
    "vm_id",
    [
        "vm'; DROP TABLE vm_replication_contexts; --",
        "\"quoted\" 'single'",
        "../../../etc/passwd",
        "虚拟机-01 Café 🚀",
        "\u202eevil-bidi",
        " padded ",
        "x" * MAX_ID_LENGTH,
    ],
)
def test_hostile_but_printable_vm_ids_are_just_data(vm_id: str) -> None:
    command = parse_command(failover_body(vm_id=vm_id))
    assert isinstance(command, FailoverRequested)
    assert command.vm_id == vm_id


@pytest.mark.parametrize(
    ("vm_id", "problem"),
    [
        ("vm\n1", "must not contain control characters, found newline at position 2"),
        ("vm\x001", "found NUL at position 2"),
        ("\x1b[31mred", "found U+001B at position 0"),
        ("vm\x85", "found U+0085 at position 2"),
        ("x" * 10_000, "must be at most 191 characters, got 10000"),
        ("x" * (MAX_ID_LENGTH + 1), "must be at most 191 characters, got 192"),
        ("", "must not be empty"),
        ("vm\ud800", "must be valid Unicode"),
        (42, "must be a string, got 42"),
        (None, "must be a string, got null"),
    ],
)
def test_bad_vm_ids_are_invalid(vm_id: object, problem: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        parse_command(failover_body(vm_id=vm_id))
    assert caught.value.detail.startswith("field 'vm_id': ")
    assert problem in caught.value.detail
    assert caught.value.vm_id is None


def test_exactly_the_control_and_surrogate_code_points_are_refused() -> None:
    """Every code point of Unicode's categories Cc and Cs is refused where it stands, and every
    other one is taken: the check that finds them at C speed misses none and adds none."""
    ids = TypeAdapter(VmId)
    refused = [c for c in map(chr, range(0x110000)) if unicodedata.category(c) in ("Cc", "Cs")]
    assert len(refused) == 65 + 2048
    for char in refused:  # (a lone surrogate pydantic itself refuses, before this check)
        with pytest.raises(ValidationError, match="position 2" if unicodedata.category(char) == "Cc" else "unicode"):
            ids.validate_python("vm" + char)
    taken = "".join(c for c in map(chr, range(0x110000)) if unicodedata.category(c) not in ("Cc", "Cs"))
    for start in range(0, len(taken), MAX_ID_LENGTH):
        chunk = taken[start:start + MAX_ID_LENGTH]
        assert ids.validate_python(chunk) == chunk


def test_requested_by_is_bounded_and_printable() -> None:
    assert parse_command(failover_body(requested_by="")).requested_by == ""
    for bad, problem in (("a" * 192, "at most 191"), ("ops\r\n", "carriage return")):
        with pytest.raises(InvalidCommand, match=f"field 'requested_by': .*{problem}"):
            parse_command(failover_body(requested_by=bad))
