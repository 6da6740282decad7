"""Pydantic validation errors in words an operator can act on.

``field 'failover_type': must be 'test' or 'live', got 'tset'`` rather than pydantic's
``Input should be 'test' or 'live' [type=literal_error, ...]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from pydantic_core import ErrorDetails

_SHOWN_CHARACTERS: Final = 40
_UUID_EXAMPLE: Final = "7d7e1f0e-3c55-4e8e-9d9a-0d5e7f1b2a10"


def describe_value(value: object) -> str:
    """A short rendering of a JSON value for a message: strings quoted and escaped (control
    characters and lone surrogates as escapes) and cut after 40 characters."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if len(value) > _SHOWN_CHARACTERS:
            return f"{value[:_SHOWN_CHARACTERS]!r}... ({len(value)} characters)"
        return repr(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def field_path(loc: Iterable[int | str]) -> str:
    """``('options', 'driver_injection')`` -> ``options.driver_injection``; indexes as ``[0]``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


_EXPECTED: Final[dict[str, str]] = {
    "string_type": "a string",
    "string_unicode": "valid Unicode text (no lone surrogates)",
    "uuid_type": f"a UUID string like {_UUID_EXAMPLE}",
    "uuid_parsing": f"a UUID string like {_UUID_EXAMPLE}",
    "uuid_version": f"a UUID string like {_UUID_EXAMPLE}",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
    "list_type": "an array",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "datetime_type": "an RFC 3339 date-time",
    "datetime_parsing": "an RFC 3339 date-time",
    "datetime_from_date_parsing": "an RFC 3339 date-time",
    "timezone_aware": "an RFC 3339 date-time with a time zone",
}


def _problem(error: ErrorDetails) -> str:
    kind = error["type"]
    value: Any = error.get("input")
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    got = describe_value(value)
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "not a field of this message"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the allowed values')}, got {got}"
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}, got {got}"
    if kind == "string_too_short":
        minimum = ctx.get("min_length", 1)
        return "must not be empty" if minimum == 1 else f"must be at least {minimum} characters"
    if kind == "string_too_long":
        length = len(value) if isinstance(value, str) else "more"
        return f"must be at most {ctx.get('max_length')} characters, got {length}"
    for bound, words in (
        ("ge", "at least"),
        ("gt", "more than"),
        ("le", "at most"),
        ("lt", "less than"),
    ):
        if bound in ctx and kind.startswith(("greater_than", "less_than")):
            return f"must be {words} {ctx[bound]}, got {got}"
    if kind in ("control_character", "surrogate_character", "json_invalid"):
        return error["msg"]
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = message[:1].lower() + message[1:]
    return message if kind in ("value_error", "assertion_error") else f"{message}, got {got}"


def describe_error(error: ErrorDetails) -> str:
    """One problem, as ``field 'a.b': <what is wrong>`` (or just the problem, for the whole)."""
    path = field_path(error["loc"])
    return f"field {path!r}: {_problem(error)}" if path else _problem(error)
