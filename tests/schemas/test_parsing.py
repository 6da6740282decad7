"""parse_command against the contract's "Bad deliveries" table, and properties over any input."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    DEFAULT_MAX_COMMAND_BYTES,
    AnyCommand,
    InvalidCommand,
    JobRejected,
    UnreadableMessage,
    parse_command,
    utc_now,
)
from tests.schemas.helpers import DROP, JOB_ID, REQUEST_ID, failover_body, failover_fields
from tests.schemas.strategies import commands, json_values, mangled

# --- dead-lettered: no readable request_id ----------------------------------------------------


def unreadable(body: bytes, max_bytes: int = DEFAULT_MAX_COMMAND_BYTES) -> UnreadableMessage:
    with pytest.raises(UnreadableMessage) as caught:
        parse_command(body, max_bytes)
    return caught.value


def test_a_body_over_the_size_limit_is_unreadable() -> None:
    body = failover_body(requested_by="x" * 100)
    parse_command(body, max_bytes=len(body))  # at the limit: fine
    error = unreadable(body, max_bytes=len(body) - 1)
    assert error.code == "too_large"
    assert f"{len(body)} bytes" in error.reason
    assert unreadable(b" " * (DEFAULT_MAX_COMMAND_BYTES + 1)).code == "too_large"


@pytest.mark.parametrize("body", [b"\xff\xfe{}", failover_body()[:-3] + b"\xc3(}", b"\xed\xa0\x80"])
def test_a_body_that_is_not_utf8_is_unreadable(body: bytes) -> None:
    assert unreadable(body).code == "not_utf8"


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"{'type': 1}", failover_body()[:-1], b"NaN", b'{"a": Infinity}', b"[" * 50_000],
)
def test_a_body_that_is_not_json_is_unreadable(body: bytes) -> None:
    error = unreadable(body)
    assert error.code == "not_json"
    assert error.reason.startswith("body is not JSON")


@pytest.mark.parametrize("body", [b"[]", b'"FailoverRequested"', b"42", b"null", b"true"])
def test_a_body_that_is_not_an_object_is_unreadable(body: bytes) -> None:
    assert unreadable(body).code == "not_object"


@pytest.mark.parametrize(
    "request_id",
    [
        DROP,
        None,
        42,
        "",
        "not-a-uuid",
        REQUEST_ID.replace("-", ""),
        "{" + REQUEST_ID + "}",
        "urn:uuid:" + REQUEST_ID,
        " " + REQUEST_ID,
        [REQUEST_ID],
    ],
)
def test_a_body_without_a_readable_request_id_is_unreadable(request_id: Any) -> None:
    error = unreadable(failover_body(request_id=request_id))
    assert error.code == "no_request_id"
    assert "request_id" in error.reason


def test_reasons_fit_in_an_amqp_header() -> None:
    error = unreadable(failover_body(request_id="\u2603" * 100))
    assert error.reason.isascii()
    assert len(error.reason) <= 500


# --- rejected as invalid: a readable request_id, but something wrong -------------------------


def invalid(**changes: Any) -> InvalidCommand:
    with pytest.raises(InvalidCommand) as caught:
        parse_command(failover_body(**changes))
    assert caught.value.request_id == UUID(REQUEST_ID)
    return caught.value


def test_an_unknown_type_is_invalid() -> None:
    error = invalid(type="FailoverRequest")
    assert error.detail.startswith("field 'type': unknown command type 'FailoverRequest'")
    assert "'FailoverRequested'" in error.detail
    assert error.command_type is None
    assert error.vm_id == "4205a841-0265-f4bd-39a6-39fd92196f53"


@pytest.mark.parametrize("value", [DROP, None, 7, ["FailoverRequested"]])
def test_a_missing_or_non_string_type_is_invalid(value: Any) -> None:
    error = invalid(type=value)
    assert error.detail.startswith("field 'type': ")
    assert error.command_type is None


def test_an_unsupported_schema_version_is_invalid_and_only_that_is_reported() -> None:
    error = invalid(schema_version=2, failover_type="tset")
    assert error.detail == "field 'schema_version': unsupported version 2; this service speaks 1"
    assert error.command_type == "FailoverRequested"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (DROP, "field 'schema_version': required"),
        ("1", "field 'schema_version': must be the integer 1, got '1'"),
        (True, "field 'schema_version': must be the integer 1, got true"),
        (1.0, "field 'schema_version': must be the integer 1, got 1.0"),
    ],
)
def test_a_missing_or_mistyped_schema_version_is_invalid(value: Any, problem: str) -> None:
    assert invalid(schema_version=value).problems == (problem,)


def test_a_missing_field_is_named() -> None:
    assert invalid(vm_id=DROP).detail == "field 'vm_id': required"


def test_a_wrong_field_is_named_with_what_it_must_be_and_what_it_was() -> None:
    error = invalid(failover_type="tset")
    assert error.detail == "field 'failover_type': must be 'test' or 'live', got 'tset'"
    assert error.job_type is None


def test_nested_fields_are_named_by_their_path() -> None:
    error = invalid(options={"driver_injection": "sometimes"})
    assert error.detail == (
        "field 'options.driver_injection': must be 'auto', 'always' or 'never', got 'sometimes'"
    )
    assert invalid(options=[]).detail == "field 'options': must be an object, got an array"


def test_several_problems_are_joined_with_semicolons() -> None:
    error = invalid(schema_version=DROP, vm_id="", failover_type=3)
    assert error.problems == (
        "field 'schema_version': required",
        "field 'vm_id': must not be empty",
        "field 'failover_type': must be 'test' or 'live', got 3",
    )
    assert error.detail == "; ".join(error.problems)


def test_long_values_are_cut_in_the_detail() -> None:
    error = invalid(failover_type="t" * 5000)
    assert "(5000 characters)" in error.detail
    assert len(error.detail) < 200


def test_an_invalid_failover_says_what_a_rejection_needs() -> None:
    error = invalid(requested_by=5)
    assert (error.command_type, error.vm_id, error.job_type) == (
        "FailoverRequested",
        "4205a841-0265-f4bd-39a6-39fd92196f53",
        "test-failover",
    )
    assert error.target_job_id is None


def test_an_invalid_cleanup_names_the_failover_it_was_about() -> None:
    body = {
        "type": "CleanupRequested",
        "schema_version": 1,
        "request_id": REQUEST_ID,
        "failover_job_id": JOB_ID,
        "requested_by": ["ops"],
        "vm_id": "ignored",
    }
    with pytest.raises(InvalidCommand) as caught:
        parse_command(json.dumps(body).encode())
    error = caught.value
    assert error.detail == "field 'requested_by': must be a string, got an array"
    assert (error.command_type, error.job_type, error.vm_id) == (
        "CleanupRequested",
        "cleanup",
        None,
    )
    assert error.target_job_id == UUID(JOB_ID)


@pytest.mark.parametrize(
    "command_type", ["CleanupRequested", "CancelRequested", "RollbackRequested"]
)
def test_a_bad_job_reference_is_invalid(command_type: str) -> None:
    field = "failover_job_id" if command_type == "CleanupRequested" else "job_id"
    body = {"type": command_type, "schema_version": 1, "request_id": REQUEST_ID, field: "job-7"}
    with pytest.raises(InvalidCommand) as caught:
        parse_command(json.dumps(body).encode())
    assert caught.value.detail.startswith(f"field '{field}': must be a UUID string like ")
    assert caught.value.detail.endswith(", got 'job-7'")
    assert caught.value.target_job_id is None


# --- properties --------------------------------------------------------------------------------


def assert_only_contract_errors(body: bytes) -> None:
    """parse_command raises nothing but its two errors, and an InvalidCommand's details can be
    published in a JobRejected."""
    try:
        parse_command(body)
    except UnreadableMessage as error:
        assert error.reason and error.reason.isascii()
    except InvalidCommand as error:
        assert error.detail
        rejected = JobRejected(
            event_id=uuid4(),
            job_id=error.request_id,
            job_type=error.job_type,
            vm_id=error.vm_id,
            sequence=1,
            correlation_id=error.target_job_id or error.request_id,
            causation_id=error.request_id,
            occurred_at=utc_now(),
            reason="invalid",
            detail=error.detail,
        )
        rejected.model_dump_json().encode("utf-8")


@given(st.binary(max_size=400))
def test_any_bytes_give_a_command_or_a_contract_error(body: bytes) -> None:
    assert_only_contract_errors(body)


@given(json_values)
def test_any_json_value_gives_a_command_or_a_contract_error(value: Any) -> None:
    assert_only_contract_errors(json.dumps(value).encode())


@given(st.dictionaries(st.sampled_from(sorted(failover_fields())), json_values))
def test_any_object_with_the_contracts_keys_gives_a_command_or_a_contract_error(
    fields: dict[str, Any],
) -> None:
    assert_only_contract_errors(json.dumps({"request_id": REQUEST_ID, **fields}).encode())


@given(mangled(commands))
def test_any_mangled_command_gives_a_command_or_a_contract_error(body: bytes) -> None:
    assert_only_contract_errors(body)


@given(commands)
def test_any_valid_command_survives_the_wire(command: AnyCommand) -> None:
    assert parse_command(command.model_dump_json().encode()) == command
