"""The event models and parse_event."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import (
    EVENT_TYPES,
    TERMINAL_EVENTS,
    AnyEventType,
    FailoverOutputs,
    InvalidEvent,
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobRejected,
    SnapshotRef,
    StepRef,
    StepStarted,
    UnsupportedEvent,
    event_routing_key,
    is_terminal,
    parse_event,
)
from tests.schemas.strategies import events, json_values, mangled

JOB_ID = UUID("7d7e1f0e-3c55-4e8e-9d9a-0d5e7f1b2a10")
EVENT_ID = UUID("0b6f4d3e-8a51-4c1b-a1d2-52f0c6a4e9b7")
AT = datetime(2025, 9, 1, 12, 30, tzinfo=UTC)


def common(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event_id": EVENT_ID,
        "job_id": JOB_ID,
        "job_type": "test-failover",
        "vm_id": "4205a841-0265-f4bd-39a6-39fd92196f53",
        "sequence": 1,
        "correlation_id": JOB_ID,
        "causation_id": JOB_ID,
        "occurred_at": AT,
    }
    return {**fields, **changes}


def test_an_event_serialises_as_the_contract_says() -> None:
    event = StepStarted(
        **common(sequence=3),
        step="cloudstack-snapshot",
        step_order=2,
        total_steps=6,
        percent_complete=17,
    )
    assert json.loads(event.model_dump_json()) == {
        "type": "StepStarted",
        "schema_version": 1,
        "event_id": str(EVENT_ID),
        "job_id": str(JOB_ID),
        "job_type": "test-failover",
        "vm_id": "4205a841-0265-f4bd-39a6-39fd92196f53",
        "sequence": 3,
        "correlation_id": str(JOB_ID),
        "causation_id": str(JOB_ID),
        "occurred_at": "2025-09-01T12:30:00Z",
        "step": "cloudstack-snapshot",
        "step_order": 2,
        "total_steps": 6,
        "percent_complete": 17,
    }
    assert event_routing_key(event) == f"job.{JOB_ID}.StepStarted"


def test_occurred_at_is_kept_in_utc() -> None:
    paris = timezone(timedelta(hours=2))
    event = JobCancelled(**common(occurred_at=AT.astimezone(paris)), rolled_back=True)
    assert event.occurred_at == AT
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert json.loads(event.model_dump_json())["occurred_at"] == "2025-09-01T12:30:00Z"


def test_a_naive_occurred_at_is_refused() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        JobCancelled(**common(occurred_at=datetime(2025, 9, 1)), rolled_back=True)


def test_unknown_keywords_are_refused_when_we_build_an_event() -> None:
    with pytest.raises(ValidationError, match="extra"):
        JobCancelled(**common(), rolled_back=True, rolledback=True)  # type: ignore[call-arg]


@pytest.mark.parametrize("field", ["job_type", "vm_id"])
def test_only_a_rejection_may_leave_job_type_or_vm_id_null(field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field} may be null only on a JobRejected"):
        JobCancelled(**common(**{field: None}), rolled_back=False)
    rejected = JobRejected(
        **common(**{field: None}), reason="invalid", detail="field 'x': required"
    )
    assert getattr(rejected, field) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [("sequence", 0), ("event_id", "not-a-uuid"), ("job_type", "failover"), ("vm_id", "a\nb")],
)
def test_common_fields_are_checked(name: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        JobCancelled(**common(**{name: value}), rolled_back=False)


def test_percent_complete_is_0_to_100() -> None:
    for percent in (-1, 101):
        with pytest.raises(ValidationError):
            StepStarted(**common(), step="x", step_order=1, total_steps=1, percent_complete=percent)


def test_a_failovers_completion_carries_its_outputs() -> None:
    outputs = FailoverOutputs(
        destination_vm_id="vm-9",
        snapshots=[SnapshotRef(volume_id="vol-1", snapshot_id="snap-1")],
        network_ids=["net-1"],  # type: ignore[call-arg]  # "at least" these: more is fine
    )
    event = JobCompleted(**common(), outputs=outputs.as_outputs(), duration_seconds=12.5)
    assert event.failover_outputs() == outputs
    assert event.outputs["network_ids"] == ["net-1"]
    with pytest.raises(ValidationError, match="destination_vm_id"):
        JobCompleted(**common(), outputs={"snapshots": []}, duration_seconds=1)
    cleanup = JobCompleted(**common(job_type="cleanup"), outputs={}, duration_seconds=1)
    assert cleanup.outputs == {}


def test_terminal_events() -> None:
    assert TERMINAL_EVENTS == {"JobCompleted", "JobFailed", "JobCancelled", "JobRejected"}
    assert TERMINAL_EVENTS <= set(EVENT_TYPES)
    assert is_terminal(JobCancelled(**common(), rolled_back=True))
    assert not is_terminal(
        JobAccepted(
            **common(), vm_name="pgtest2", requested_by="ops", steps=[StepRef(name="a", order=1)]
        )
    )


# --- parse_event -------------------------------------------------------------------------------


def cancelled_fields(**changes: Any) -> dict[str, Any]:
    event = JobCancelled(**common(), rolled_back=True)
    return {**json.loads(event.model_dump_json()), **changes}


def test_parse_event_reads_what_we_publish() -> None:
    event = JobCancelled(**common(), rolled_back=True)
    assert parse_event(event.model_dump_json().encode()) == event


def test_parse_event_ignores_fields_a_newer_service_adds_at_any_depth() -> None:
    event = JobAccepted(
        **common(), vm_name="pgtest2", requested_by="ops", steps=[StepRef(name="a", order=1)]
    )
    data = json.loads(event.model_dump_json())
    data["priority"] = 5
    data["steps"][0]["estimate_seconds"] = 30
    assert parse_event(json.dumps(data).encode()) == event


@pytest.mark.parametrize(
    "data", [cancelled_fields(type="JobPaused"), cancelled_fields(schema_version=2)]
)
def test_unknown_event_types_and_versions_are_unsupported(data: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedEvent) as caught:
        parse_event(json.dumps(data).encode())
    assert caught.value.job_id == JOB_ID


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"\xff", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps(cancelled_fields(type=None)).encode(), "field 'type': required"),
        (json.dumps(cancelled_fields(schema_version="1")).encode(), "field 'schema_version'"),
        (json.dumps(cancelled_fields(rolled_back="yes")).encode(), "field 'rolled_back'"),
        (
            json.dumps(cancelled_fields(occurred_at="0001-01-01T00:00:00+05:00")).encode(),
            "field 'occurred_at'",
        ),
        (json.dumps(cancelled_fields(occurred_at="2025-09-01T12:30:00")).encode(), "time zone"),
    ],
)
def test_bad_events_are_invalid(body: bytes, detail: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(body)
    assert detail in caught.value.detail
    assert not isinstance(caught.value, UnsupportedEvent)


def only_invalid_event(body: bytes) -> None:
    try:
        parse_event(body)
    except InvalidEvent as error:
        assert error.detail


@given(st.binary(max_size=400))
def test_any_bytes_give_an_event_or_invalid_event(body: bytes) -> None:
    only_invalid_event(body)


@given(json_values)
def test_any_json_value_gives_an_event_or_invalid_event(value: Any) -> None:
    only_invalid_event(json.dumps(value).encode())


@given(mangled(events))
def test_any_mangled_event_gives_an_event_or_invalid_event(body: bytes) -> None:
    only_invalid_event(body)


@given(events)
def test_any_event_survives_the_wire(event: AnyEventType) -> None:
    assert parse_event(event.model_dump_json().encode()) == event
