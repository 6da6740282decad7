"""Programmed failures: which call fails, how, and how many times.

A fault counts the calls that match it from the moment it is added: matching calls number
``nth`` .. ``nth + times - 1`` fail (``times=0``: every matching call from the ``nth`` on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from emulators.model import new_id

APIS = ("cloudstack", "volume-daemon", "inject")
KINDS = (
    "refuse",
    "server_error",
    "async_fail",
    "timeout",
    "malformed",
    "not_revertable",
    "exit_nonzero",
    "hang",
    "unavailable",
    "lost_answer",
)
INJECT_KINDS = ("exit_nonzero", "hang", "timeout", "refuse", "server_error")
MALFORMED_VARIANTS = ("truncated", "wrong_shape")


class FaultSpecError(ValueError):
    """A fault description the control API refuses (HTTP 400)."""


@dataclass(slots=True)
class Fault:
    id: str
    api: str
    kind: str
    command: str | None = None
    match: dict[str, str] = field(default_factory=dict)
    nth: int = 1
    times: int = 1
    variant: str = "truncated"
    errorcode: int | None = None  # a cloudstack server_error's or async_fail's code (530-537; default 530)
    seen: int = 0
    fired: int = 0

    @property
    def active(self) -> bool:
        """False once the fault has failed all the calls it was meant to."""
        return self.times == 0 or self.seen < self.nth + self.times - 1

    def matches(self, api: str, command: str, params: Mapping[str, Any]) -> bool:
        """Whether a call is one this fault counts."""
        if api != self.api:
            return False
        if self.command is not None and self.command.lower() != command.lower():
            return False
        lowered = {k.lower(): v for k, v in params.items()}
        return all(
            key.lower() in lowered and str(lowered[key.lower()]) == value
            for key, value in self.match.items()
        )

    def count(self) -> bool:
        """Count one matching call; True if this call is one that must fail."""
        self.seen += 1
        failing = self.seen >= self.nth and (self.times == 0 or self.seen < self.nth + self.times)
        if failing:
            self.fired += 1
        return failing

    def as_json(self) -> dict[str, Any]:
        """The fault as the control API lists it."""
        return {
            "id": self.id,
            "api": self.api,
            "command": self.command,
            "match": dict(self.match),
            "nth": self.nth,
            "times": self.times,
            "kind": self.kind,
            "variant": self.variant,
            "errorcode": self.errorcode,
            "seen": self.seen,
            "fired": self.fired,
            "active": self.active,
        }


def parse_fault(body: Mapping[str, Any]) -> Fault:
    """Build a fault from the control API's JSON, or raise FaultSpecError."""
    api = body.get("api")
    kind = body.get("kind")
    if api not in APIS:
        raise FaultSpecError(f"api must be one of {', '.join(APIS)}")
    if kind not in KINDS:
        raise FaultSpecError(f"kind must be one of {', '.join(KINDS)}")
    command = body.get("command")
    if command is not None and not isinstance(command, str):
        raise FaultSpecError("command must be a string")
    if api == "inject":
        if kind not in INJECT_KINDS:
            raise FaultSpecError(f"an inject fault's kind must be one of {', '.join(INJECT_KINDS)}")
        command = command or "inject"
    elif kind in ("exit_nonzero", "hang"):
        raise FaultSpecError(f"kind {kind} applies to the inject api only")
    if kind == "not_revertable" and (
        api != "cloudstack" or (command or "").lower() != "createsnapshot"
    ):
        raise FaultSpecError("not_revertable applies to cloudstack createSnapshot only")
    if kind == "lost_answer" and api == "inject":
        raise FaultSpecError("lost_answer applies to the cloudstack and volume-daemon apis only")
    match = body.get("match") or {}
    if not isinstance(match, dict):
        raise FaultSpecError("match must be an object")
    nth = body.get("nth", 1)
    times = body.get("times", 1)
    if not isinstance(nth, int) or isinstance(nth, bool) or nth < 1:
        raise FaultSpecError("nth must be an integer >= 1")
    if not isinstance(times, int) or isinstance(times, bool) or times < 0:
        raise FaultSpecError("times must be an integer >= 0")
    variant = body.get("variant") or "truncated"
    if variant not in MALFORMED_VARIANTS:
        raise FaultSpecError(f"variant must be one of {', '.join(MALFORMED_VARIANTS)}")
    errorcode = body.get("errorcode")
    if errorcode is not None and (
        api != "cloudstack" or kind not in ("server_error", "async_fail") or not isinstance(errorcode, int)
        or isinstance(errorcode, bool) or not 530 <= errorcode <= 537
    ):
        raise FaultSpecError("errorcode applies to a cloudstack server_error or async_fail only, and is one of 530-537")
    return Fault(
        id=new_id(),
        api=str(api),
        kind=str(kind),
        command=command,
        match={str(k): str(v) for k, v in match.items()},
        nth=nth,
        times=times,
        variant=str(variant),
        errorcode=errorcode,
    )


class FaultBook:
    """The programmed faults, checked on every call."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        """Program a fault."""
        self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Forget every fault."""
        self._faults.clear()

    def list(self) -> list[dict[str, Any]]:
        """Every fault, as JSON."""
        return [f.as_json() for f in self._faults]

    def check(self, api: str, command: str, params: Mapping[str, Any]) -> Fault | None:
        """Count the call against every active matching fault; the first that fires, or None."""
        fired: Fault | None = None
        for fault in self._faults:
            if fault.active and fault.matches(api, command, params) and fault.count():
                fired = fired or fault
        return fired


def lost_answer_response(entry: dict[str, Any]) -> web.Response:
    """What a ``lost_answer`` fault sends once the request was served: a proxy's 502, not the
    system's answer (the call log records the 502)."""
    entry["status"] = 502
    return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                        content_type="text/html")
