"""Vocabulary shared by the commands and events of the public contract (CONTRACT.md, section 1).

The value sets are ``Literal`` aliases rather than enums: they are plain strings on the wire and
in Python alike, so ``job_type == "cleanup"`` reads as the contract does, mypy checks the values,
and the JSON Schema lists them as an ``enum``. The ``*_VALUES`` tuples are the same sets at run
time.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, get_args
from uuid import UUID

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

SCHEMA_VERSION: Final = 1
"""The ``schema_version`` every command and event of this contract carries."""

FailoverType = Literal["test", "live"]
JobType = Literal["test-failover", "live-failover", "cleanup"]
RejectReason = Literal["invalid", "conflict", "not_found", "not_allowed"]
LogLevel = Literal["DEBUG", "INFO", "WARN", "ERROR"]
DriverInjection = Literal["auto", "always", "never"]

FAILOVER_TYPES: Final[tuple[FailoverType, ...]] = get_args(FailoverType)
JOB_TYPES: Final[tuple[JobType, ...]] = get_args(JobType)
REJECT_REASONS: Final[tuple[RejectReason, ...]] = get_args(RejectReason)
LOG_LEVELS: Final[tuple[LogLevel, ...]] = get_args(LogLevel)
DRIVER_INJECTIONS: Final[tuple[DriverInjection, ...]] = get_args(DriverInjection)

FAILOVER_STEPS: Final = (
    "pre-failover-validation",
    "cloudstack-snapshot",
    "virtio-driver-injection",
    "vm-creation",
    "volume-attachment",
    "vm-startup-validation",
)
"""The steps of ``test-failover`` and ``live-failover`` jobs, in order (names are contract)."""

CLEANUP_STEPS: Final = (
    "power-off",
    "volume-detachment",
    "vm-deletion",
    "snapshot-revert",
    "volume-reattachment",
    "snapshot-deletion",
)
"""The steps of ``cleanup`` jobs, in order (names are contract)."""

STEPS_BY_JOB_TYPE: Final[dict[JobType, tuple[str, ...]]] = {
    "test-failover": FAILOVER_STEPS,
    "live-failover": FAILOVER_STEPS,
    "cleanup": CLEANUP_STEPS,
}


def failover_job_type(failover_type: FailoverType) -> JobType:
    """The job type a ``FailoverRequested`` of this ``failover_type`` starts."""
    return "test-failover" if failover_type == "test" else "live-failover"


# --- field types -------------------------------------------------------------------------------

MAX_ID_LENGTH: Final = 191
"""The longest ``vm_id`` / ``requested_by``: the columns are VARCHAR(191) (utf8mb4 index limit)."""

_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def is_uuid_text(value: object) -> bool:
    """Whether ``value`` is a UUID in its usual text form (8-4-4-4-12 hex digits, any case)."""
    return isinstance(value, str) and _CANONICAL_UUID.fullmatch(value) is not None


def _uuid_text_only(value: Any) -> Any:
    # pydantic alone would also take 32 bare hex digits, braces or a "urn:uuid:" prefix; the
    # contract's ids appear in routing keys (job.{job_id}.#), so one spelling only on the way in.
    if isinstance(value, str) and not is_uuid_text(value):
        raise PydanticCustomError(
            "uuid_text",
            "must be a UUID string like {example}",
            {"example": "7d7e1f0e-3c55-4e8e-9d9a-0d5e7f1b2a10"},
        )
    return value


Uuid = Annotated[UUID, BeforeValidator(_uuid_text_only)]
"""A UUID: accepted as ``UUID`` or as 8-4-4-4-12 text in any case, serialised in lower case."""


def _control_character_name(char: str) -> str:
    names = {"\n": "newline", "\r": "carriage return", "\t": "tab", "\x00": "NUL"}
    return names.get(char, f"U+{ord(char):04X}")


# what the loop below refuses: category Cc (C0, DEL, C1) and Cs (surrogates), found at C speed
# (the loop, a Python step per character, took 1.2% of serve's CPU on the events it reads)
_REFUSED: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _refuse_control_characters(value: str) -> str:
    if _REFUSED.search(value) is None:
        return value
    for position, char in enumerate(value):
        category = unicodedata.category(char)
        if category == "Cc":
            raise PydanticCustomError(
                "control_character",
                "must not contain control characters, found {char} at position {position}",
                {"char": _control_character_name(char), "position": position},
            )
        if category == "Cs":  # a lone surrogate from a \ud800 escape: not encodable as UTF-8
            raise PydanticCustomError(
                "surrogate_character",
                "must be valid Unicode, found a lone surrogate U+{code:04X} at position {position}",
                {"code": ord(char), "position": position},
            )
    return value


_NO_CONTROL_PATTERN: Final = r"^[^\u0000-\u001f\u007f-\u009f]*$"

VmId = Annotated[
    str,
    Field(
        min_length=1, max_length=MAX_ID_LENGTH, json_schema_extra={"pattern": _NO_CONTROL_PATTERN}
    ),
    AfterValidator(_refuse_control_characters),
]
"""A source VM's ``vmware_vm_id``: 1-191 characters, no control characters. Quotes, semicolons,
``../`` and any other Unicode are data (ids only ever travel as bound SQL parameters)."""

Actor = Annotated[
    str,
    Field(max_length=MAX_ID_LENGTH, json_schema_extra={"pattern": _NO_CONTROL_PATTERN}),
    AfterValidator(_refuse_control_characters),
]
"""Who asked (``requested_by``): at most 191 characters, no control characters."""


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00: not an instant datetime can hold
        raise PydanticCustomError(
            "datetime_range", "must be a date-time within years 1-9999 in UTC"
        ) from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""An aware instant, normalised to UTC; serialised as RFC 3339 with ``Z``."""


def utc_now() -> datetime:
    """The current time as an aware UTC ``datetime`` (for ``occurred_at``)."""
    return datetime.now(UTC)


# --- base models -------------------------------------------------------------------------------


def _envelope_required(schema: dict[str, Any]) -> None:
    # ``type`` and ``schema_version`` have defaults for Python callers, but on the wire every
    # command must carry them: say so in the published JSON Schema.
    properties = schema.get("properties", {})
    envelope = [name for name in ("type", "schema_version") if name in properties]
    if envelope:
        others = [name for name in schema.get("required", []) if name not in envelope]
        schema["required"] = [*envelope, *others]


class CommandModel(BaseModel):
    """Base of the commands clients send, and of their nested objects.

    Frozen, and unknown fields are *ignored*: the contract welcomes additions (new optional
    fields), so a client built against a newer minor revision may send fields this service does
    not know yet; refusing them would break that client for no gain. Only fields this version
    knows are validated and kept.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_extra=_envelope_required)


class EventModel(BaseModel):
    """Base of the events the service publishes, and of their nested objects.

    Frozen, and unknown fields are *forbidden*: these are our own output, so an unknown keyword
    is a bug in our code (a typo such as ``percent_complet``) and should fail where it is made,
    not reach subscribers. Consumers reading events from a newer service use
    :func:`schemas.parse_event`, which ignores unknown fields instead. Every field is listed as
    required in the exported JSON Schema, since every published event carries all of them.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_serialization_defaults_required=True
    )
