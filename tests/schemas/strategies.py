"""Hypothesis strategies for the contract's messages: valid ones, and arbitrary JSON."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

from schemas import (
    CLEANUP_STEPS,
    DRIVER_INJECTIONS,
    FAILOVER_STEPS,
    FAILOVER_TYPES,
    JOB_TYPES,
    LOG_LEVELS,
    REJECT_REASONS,
    AnyCommand,
    AnyEventType,
    CancelRequested,
    CleanupRequested,
    ErrorInfo,
    FailoverOutputs,
    FailoverRequested,
    FailoverRequestedOptions,
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobRejected,
    LogRecorded,
    ManualAction,
    RollbackAction,
    RollbackCompleted,
    RollbackFailed,
    RollbackRequested,
    RollbackStarted,
    SnapshotRef,
    StepCompleted,
    StepFailed,
    StepRef,
    StepSkipped,
    StepStarted,
)

# Text a client may put in an id: anything but control characters and lone surrogates.
id_text = st.characters(exclude_categories=("Cc", "Cs"))
vm_ids = st.text(id_text, min_size=1, max_size=191)
actors = st.text(id_text, max_size=191)
short_text = st.text(st.characters(codec="utf-8"), max_size=30)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=4)

commands: st.SearchStrategy[AnyCommand] = st.one_of(
    st.builds(
        FailoverRequested,
        request_id=st.uuids(),
        vm_id=vm_ids,
        failover_type=st.sampled_from(FAILOVER_TYPES),
        requested_by=actors,
        options=st.builds(
            FailoverRequestedOptions, driver_injection=st.sampled_from(DRIVER_INJECTIONS)
        ),
    ),
    st.builds(
        CleanupRequested, request_id=st.uuids(), failover_job_id=st.uuids(), requested_by=actors
    ),
    st.builds(CancelRequested, request_id=st.uuids(), job_id=st.uuids(), requested_by=actors),
    st.builds(RollbackRequested, request_id=st.uuids(), job_id=st.uuids(), requested_by=actors),
)

instants = st.builds(
    lambda moment, offset: moment.replace(tzinfo=timezone(offset)),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)).map(
        lambda delta: timedelta(minutes=delta // timedelta(minutes=1))
    ),
)


_ANY_JOB_TYPE = st.sampled_from(JOB_TYPES)


def _common(job_type: Any = _ANY_JOB_TYPE) -> dict[str, Any]:
    return {
        "event_id": st.uuids(),
        "job_id": st.uuids(),
        "job_type": job_type,
        "vm_id": vm_ids,
        "sequence": st.integers(min_value=1, max_value=10_000),
        "correlation_id": st.uuids(),
        "causation_id": st.uuids(),
        "occurred_at": instants,
    }


steps = st.sampled_from(FAILOVER_STEPS + CLEANUP_STEPS)
orders = st.integers(min_value=1, max_value=6)
percents = st.integers(min_value=0, max_value=100)
errors = st.builds(ErrorInfo, code=short_text, message=short_text)
actions = st.lists(
    st.builds(
        RollbackAction,
        action=short_text,
        resource_type=short_text,
        resource_id=short_text,
        detail=st.none() | short_text,
    ),
    max_size=3,
)
failover_outputs = st.builds(
    FailoverOutputs,
    destination_vm_id=short_text,
    snapshots=st.lists(st.builds(SnapshotRef, volume_id=short_text, snapshot_id=short_text)),
).map(FailoverOutputs.as_outputs)

events: st.SearchStrategy[AnyEventType] = st.one_of(
    st.builds(
        JobAccepted,
        **_common(),
        vm_name=short_text,
        requested_by=actors,
        steps=st.lists(st.builds(StepRef, name=steps, order=orders), max_size=6),
    ),
    st.builds(
        JobRejected,
        **{**_common(st.none() | st.sampled_from(JOB_TYPES)), "vm_id": st.none() | vm_ids},
        reason=st.sampled_from(REJECT_REASONS),
        detail=short_text,
    ),
    st.builds(
        StepStarted,
        **_common(),
        step=steps,
        step_order=orders,
        total_steps=orders,
        percent_complete=percents,
    ),
    st.builds(
        StepCompleted,
        **_common(),
        step=steps,
        step_order=orders,
        percent_complete=percents,
        outputs=json_objects,
    ),
    st.builds(
        StepSkipped,
        **_common(),
        step=steps,
        step_order=orders,
        percent_complete=percents,
        reason=short_text,
    ),
    st.builds(
        StepFailed, **_common(), step=steps, step_order=orders, error=errors, attempts=orders
    ),
    st.builds(
        LogRecorded,
        **_common(),
        level=st.sampled_from(LOG_LEVELS),
        message=short_text,
        step=st.none() | steps,
        fields=json_objects,
    ),
    st.builds(RollbackStarted, **_common(), reason=short_text, actions=actions),
    st.builds(RollbackCompleted, **_common(), actions=actions),
    st.builds(
        RollbackFailed,
        **_common(),
        error=errors,
        manual_actions=st.lists(
            st.builds(
                ManualAction,
                action=short_text,
                resource_type=short_text,
                resource_id=short_text,
                detail=st.none() | short_text,
            ),
            max_size=3,
        ),
    ),
    st.builds(
        JobCompleted,
        **_common(st.sampled_from(("test-failover", "live-failover"))),
        outputs=failover_outputs,
        duration_seconds=st.floats(min_value=0, max_value=1e6),
    ),
    st.builds(
        JobCompleted,
        **_common(st.just("cleanup")),
        outputs=json_objects,
        duration_seconds=st.floats(min_value=0, max_value=1e6),
    ),
    st.builds(
        JobFailed,
        **_common(),
        failed_step=st.none() | steps,
        error=errors,
        rolled_back=st.booleans(),
    ),
    st.builds(JobCancelled, **_common(), rolled_back=st.booleans()),
)


@st.composite
def mangled(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> bytes:
    """A valid message's JSON with a few fields dropped, replaced or added: reaches the field
    validation that arbitrary JSON rarely gets to."""
    data: dict[str, Any] = json.loads(draw(valid).model_dump_json())
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(sorted(data)) | st.text(max_size=10))
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(json_values)
    return json.dumps(data).encode()
