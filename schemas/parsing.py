"""The edge parsers: bytes off the bus in, a model or one of :mod:`schemas.errors` out.

Whatever the bytes, :func:`parse_command` raises only :class:`UnreadableMessage` or
:class:`InvalidCommand`, and :func:`parse_event` only :class:`InvalidEvent` (or its subclass
:class:`UnsupportedEvent`), so one bad delivery can never stop a consumer.
"""

from __future__ import annotations

import json
from typing import Any, Final, NoReturn
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from schemas._describe import describe_error, describe_value
from schemas.commands import COMMAND_TYPES, AnyCommand
from schemas.common import SCHEMA_VERSION, JobType, VmId, failover_job_type, is_uuid_text
from schemas.errors import InvalidCommand, InvalidEvent, UnreadableMessage, UnsupportedEvent
from schemas.events import EVENT_TYPES, AnyEventType

__all__ = [
    "DEFAULT_MAX_COMMAND_BYTES",
    "InvalidCommand",
    "InvalidEvent",
    "UnreadableMessage",
    "UnsupportedEvent",
    "parse_command",
    "parse_event",
]

DEFAULT_MAX_COMMAND_BYTES: Final = 256 * 1024
"""The contract's default size limit for a command body (256 KiB)."""

_VM_ID: Final = TypeAdapter(VmId)
_COMMANDS_WITHOUT_VM_ID: Final = frozenset(COMMAND_TYPES) - {"FailoverRequested"}


def _refuse_constant(name: str) -> NoReturn:
    # Python's json module takes NaN and Infinity, which JSON does not have.
    raise ValueError(f"{name} is not a JSON value")


def _load_object(body: bytes, max_bytes: int | None) -> dict[str, Any]:
    """The body's JSON object; :class:`UnreadableMessage` if it has none."""
    body = bytes(body)
    if max_bytes is not None and len(body) > max_bytes:
        raise UnreadableMessage(
            f"body of {len(body)} bytes is over the limit of {max_bytes} bytes", code="too_large"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableMessage(f"body is not UTF-8 ({exc})", code="not_utf8") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise UnreadableMessage(f"body is not JSON ({exc})", code="not_json") from None
    if not isinstance(value, dict):
        raise UnreadableMessage(
            f"body is not a JSON object, got {describe_value(value)}", code="not_object"
        )
    return value


def _version_problem(data: dict[str, Any]) -> tuple[str | None, bool]:
    """A problem with ``schema_version``, and whether it is another (unsupported) version."""
    if "schema_version" not in data:
        return "field 'schema_version': required", False
    version = data["schema_version"]
    if isinstance(version, int) and not isinstance(version, bool):
        if version == SCHEMA_VERSION:
            return None, False
        return (
            f"field 'schema_version': unsupported version {version}; "
            f"this service speaks {SCHEMA_VERSION}",
            True,
        )
    return (
        f"field 'schema_version': must be the integer {SCHEMA_VERSION}, got {describe_value(version)}",
        False,
    )


def _valid_vm_id(value: Any) -> str | None:
    try:
        return _VM_ID.validate_python(value) if isinstance(value, str) else None
    except ValidationError:
        return None


def _readable_uuid(value: Any) -> UUID | None:
    return UUID(value) if is_uuid_text(value) else None


def _job_type_hint(command_type: str | None, data: dict[str, Any]) -> JobType | None:
    if command_type == "CleanupRequested":
        return "cleanup"
    failover_type = data.get("failover_type")
    if command_type == "FailoverRequested" and failover_type in ("test", "live"):
        return failover_job_type(failover_type)
    return None


def _read_request_id(data: dict[str, Any]) -> UUID:
    if "request_id" not in data:
        raise UnreadableMessage("no request_id in the body", code="no_request_id")
    request_id = _readable_uuid(data["request_id"])
    if request_id is None:
        raise UnreadableMessage(
            f"request_id is not a UUID string, got {describe_value(data['request_id'])}",
            code="no_request_id",
        )
    return request_id


def _invalid(
    request_id: UUID, command_type: str | None, data: dict[str, Any], problems: list[str]
) -> InvalidCommand:
    """The rejection, with whatever the body says readably about the job it asked for."""
    vm_id = None if command_type in _COMMANDS_WITHOUT_VM_ID else _valid_vm_id(data.get("vm_id"))
    target_field = {
        "CleanupRequested": "failover_job_id",
        "CancelRequested": "job_id",
        "RollbackRequested": "job_id",
    }.get(command_type or "")
    return InvalidCommand(
        request_id,
        command_type,
        vm_id,
        "; ".join(problems),
        job_type=_job_type_hint(command_type, data),
        target_job_id=_readable_uuid(data.get(target_field)) if target_field else None,
        problems=tuple(problems),
    )


def _type_problem(data: dict[str, Any]) -> str:
    if "type" not in data:
        return "field 'type': required"
    expected = ", ".join(repr(name) for name in COMMAND_TYPES)
    value = data["type"]
    if not isinstance(value, str):
        return f"field 'type': must be one of {expected}, got {describe_value(value)}"
    return f"field 'type': unknown command type {describe_value(value)}; expected one of {expected}"


def parse_command(body: bytes, max_bytes: int | None = DEFAULT_MAX_COMMAND_BYTES) -> AnyCommand:
    """Parse a delivery from ``failover.commands`` into a command model.

    Raises :class:`UnreadableMessage` (dead-letter it) when the body is over ``max_bytes``, not
    UTF-8, not JSON, not a JSON object, or has no ``request_id`` in UUID form; and
    :class:`InvalidCommand` (reject it) for an unknown ``type``, an unsupported
    ``schema_version``, or any field missing or wrong. Fields this version does not know are
    ignored. Never raises anything else.
    """
    data = _load_object(body, max_bytes)
    request_id = _read_request_id(data)
    raw_type = data.get("type")
    command_type = raw_type if isinstance(raw_type, str) and raw_type in COMMAND_TYPES else None
    if command_type is None:
        raise _invalid(request_id, None, data, [_type_problem(data)])
    problems: list[str] = []
    version_problem, other_version = _version_problem(data)
    if version_problem is not None:
        problems.append(version_problem)
        if other_version:  # a newer client: its other fields may mean something else
            raise _invalid(request_id, command_type, data, problems)
        data = {**data, "schema_version": SCHEMA_VERSION}  # reported once, above
    try:
        command = COMMAND_TYPES[command_type].model_validate(data)
    except ValidationError as exc:
        problems.extend(describe_error(error) for error in exc.errors())
    if problems:
        raise _invalid(request_id, command_type, data, problems)
    return command


def parse_event(body: bytes, max_bytes: int | None = None) -> AnyEventType:
    """Parse a delivery from ``failover.events`` into an event model, for consumers.

    Fields this version does not know are ignored (the contract welcomes additions), at any
    depth. Raises :class:`UnsupportedEvent` for an unknown event ``type`` or another
    ``schema_version`` (consumers may skip those), and :class:`InvalidEvent` for anything else
    wrong. Never raises anything else.
    """
    body = bytes(body)
    try:
        data = _load_object(body, max_bytes)
    except UnreadableMessage as exc:
        raise InvalidEvent(exc.reason) from None
    event_type = data.get("type")
    job_id = _readable_uuid(data.get("job_id"))
    if not isinstance(event_type, str):
        detail = (
            "required"
            if event_type is None
            else f"must be a string, got {describe_value(event_type)}"
        )
        raise InvalidEvent(f"field 'type': {detail}", job_id=job_id)
    if event_type not in EVENT_TYPES:
        raise UnsupportedEvent(
            f"field 'type': unknown event type {describe_value(event_type)}", job_id=job_id
        )
    version_problem, other_version = _version_problem(data)
    if version_problem is not None:
        error = UnsupportedEvent if other_version else InvalidEvent
        raise error(version_problem, event_type=event_type, job_id=job_id)
    try:
        # Strict: our own output is exact, so "yes" is no boolean and "5" no sequence here.
        return EVENT_TYPES[event_type].model_validate_json(body, strict=True, extra="ignore")
    except ValidationError as exc:
        detail = "; ".join(describe_error(error) for error in exc.errors())
        raise InvalidEvent(detail, event_type=event_type, job_id=job_id) from None
