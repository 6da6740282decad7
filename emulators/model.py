"""The records the emulated world is made of, and the errors its rules raise.

Plain mutable dataclasses: the world owns them and mutates them in place on its single
asyncio loop. Rendering them as CloudStack or Volume Daemon JSON lives in ``views.py``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GIB = 1024**3

# CloudStack's own cserrorcode values (com.cloud.utils.exception.CSExceptionErrorCode).
CS_CLOUD_RUNTIME = 4250
CS_INVALID_PARAMETER = 4350
CS_SERVER_API = 9999

# ApiErrorCode HTTP codes.
PARAM_ERROR = 431
UNSUPPORTED_ACTION_ERROR = 432
INTERNAL_ERROR = 530
UNAUTHORIZED = 401
API_LIMIT_EXCEED = 429  # the account's API limit (api.throttling.max) reached

JOB_PENDING = 0
JOB_SUCCEEDED = 1
JOB_FAILED = 2


def new_id() -> str:
    """A fresh UUID4 string, the form of every id in the emulated world."""
    return str(uuid.uuid4())


def cs_time(moment: datetime | None = None) -> str:
    """A timestamp the way CloudStack prints them: ``2024-05-01T12:00:00+0000``."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S+0000")


def iso_time(moment: datetime | None = None) -> str:
    """An RFC 3339 UTC timestamp with milliseconds, as the Volume Daemon prints them."""
    stamp = (moment or datetime.now(UTC)).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class CloudStackError(Exception):
    """A refusal the way CloudStack reports it: HTTP ``errorcode``, ``cserrorcode`` and text."""

    def __init__(self, errorcode: int, errortext: str, cserrorcode: int | None) -> None:
        super().__init__(errortext)
        self.errorcode = errorcode
        self.errortext = errortext
        self.cserrorcode = cserrorcode


def param_error(text: str) -> CloudStackError:
    """431, as CloudStack answers an InvalidParameterValueException (bad value or state)."""
    return CloudStackError(PARAM_ERROR, text, CS_INVALID_PARAMETER)


def internal_error(text: str) -> CloudStackError:
    """530, as CloudStack answers an unexpected CloudRuntimeException."""
    return CloudStackError(INTERNAL_ERROR, text, CS_CLOUD_RUNTIME)


@dataclass(slots=True)
class Zone:
    id: str
    name: str


@dataclass(slots=True)
class ServiceOffering:
    id: str
    name: str
    iscustomized: bool = True
    default_cpunumber: int = 1
    default_memory: int = 1024


@dataclass(slots=True)
class DiskOffering:
    id: str
    name: str
    disksize_gb: int = 20


@dataclass(slots=True)
class Template:
    id: str
    name: str
    size_gb: int = 10
    ostypename: str = "Other Linux (64-bit)"


@dataclass(slots=True)
class Network:
    id: str
    name: str
    zone_id: str


@dataclass(slots=True)
class VirtualMachine:
    id: str
    name: str
    displayname: str
    state: str
    number: int
    cpunumber: int
    memory: int
    zone_id: str
    template_id: str
    serviceoffering_id: str
    network_ids: list[str]
    created: str = field(default_factory=cs_time)
    destroyed: bool = False


@dataclass(slots=True)
class Volume:
    id: str
    name: str
    type: str
    size: int
    zone_id: str
    content: str
    vm_id: str | None = None
    device_id: int | None = None
    state: str = "Ready"
    diskoffering_id: str | None = None
    created: str = field(default_factory=cs_time)
    destroyed: bool = False

    @property
    def attached(self) -> bool:
        """True while the volume is attached to a VM."""
        return self.vm_id is not None


@dataclass(slots=True)
class Snapshot:
    id: str
    name: str
    volume_id: str
    volume_name: str
    volume_type: str
    zone_id: str
    state: str = "Allocated"
    revertable: bool = True
    content: str | None = None
    created: str = field(default_factory=cs_time)
    destroyed: bool = False


@dataclass(slots=True)
class AsyncJob:
    id: str
    command: str
    instance_type: str | None
    instance_id: str | None
    status: int = JOB_PENDING
    result_code: int = 0
    result: dict[str, Any] | None = None
    created: str = field(default_factory=cs_time)
    completed: str | None = None
    failure: CloudStackError | None = None  # how an injected async_fail fails it (default: a 530)


@dataclass(slots=True)
class Operation:
    id: str
    type: str
    volume_id: str
    vm_id: str | None
    request: dict[str, Any]
    status: str = "pending"
    response: dict[str, Any] | None = None
    error: str | None = None
    created_at: str = field(default_factory=iso_time)
    updated_at: str = field(default_factory=iso_time)
    completed_at: str | None = None


@dataclass(slots=True)
class ApiLimit:
    """CloudStack's API throttling (the rate-limit plugin: `api.throttling.enabled`,
    `api.throttling.interval`, `api.throttling.max`): per account, at most `max_calls` calls in
    a window of `interval_seconds` that begins with the account's first call after the last
    window ended; a call past it is refused with 429 and still counted (as CloudStack counts
    it). Off while `max_calls` is 0."""

    max_calls: int = 0
    interval_seconds: float = 1.0
    refused: int = 0  # calls refused so far
    _windows: dict[str, tuple[float, int]] = field(default_factory=dict)  # account -> (ends, count)

    def check(self, account: str, now: float) -> float | None:
        """Count a call of `account` at `now`: None if it may go, else the seconds until its
        window ends (CloudStack's "retry after")."""
        if self.max_calls <= 0:
            return None
        ends, count = self._windows.get(account, (0.0, 0))
        if now >= ends:
            ends, count = now + self.interval_seconds, 0
        count += 1
        self._windows[account] = (ends, count)
        if count <= self.max_calls:
            return None
        self.refused += 1
        return ends - now

    def as_json(self) -> dict[str, Any]:
        """The settings as the control API shows them."""
        return {"max_calls": self.max_calls, "interval_seconds": self.interval_seconds, "refused": self.refused}


@dataclass(slots=True)
class Latency:
    async_job_seconds: float = 0.0
    operation_seconds: float = 0.0
    api_seconds: float = 0.0

    def as_json(self) -> dict[str, float]:
        """The settings as the control API shows them."""
        return {
            "async_job_seconds": self.async_job_seconds,
            "operation_seconds": self.operation_seconds,
            "api_seconds": self.api_seconds,
        }
