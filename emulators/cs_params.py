"""Reading a CloudStack command's parameters the way CloudStack's ParamProcessWorker does.

Names are matched without case; an empty value counts as absent; a UUID parameter must name
an entity that exists or existed (removed ones included, as ``findByUuidIncludingRemoved``),
else the command is refused with 431 before it runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TypeVar

from emulators.model import CS_SERVER_API, PARAM_ERROR, CloudStackError

T = TypeVar("T")


class Params:
    """The parameters of one command (names lower-cased, first value of each)."""

    def __init__(self, command: str, values: Mapping[str, str]) -> None:
        self.command = command
        self.values = {k.lower(): v for k, v in values.items()}

    def error(self, text: str) -> CloudStackError:
        return CloudStackError(PARAM_ERROR, text, CS_SERVER_API)

    def _invalid(self, name: str, value: str) -> CloudStackError:
        return self.error(
            f"Unable to execute API command {self.command.lower()} due to invalid value. "
            f"Invalid parameter {name} value={value} due to incorrect long value format, or "
            "entity does not exist or due to incorrect parameter annotation for the field in "
            "api cmd class."
        )

    def get(self, name: str) -> str | None:
        """The value, or None when absent or empty."""
        value = self.values.get(name)
        return value if value else None

    def require(self, name: str) -> str:
        """The value, or 431 "missing parameter"."""
        value = self.get(name)
        if value is None:
            raise self.error(
                f"Unable to execute API command {self.command.lower()} due to missing "
                f"parameter {name}"
            )
        return value

    def entity(self, name: str, table: Mapping[str, T], *, required: bool = False) -> T | None:
        """The entity a UUID parameter names (removed ones included), or 431."""
        value = self.require(name) if required else self.get(name)
        if value is None:
            return None
        found = table.get(value)
        if found is None:
            raise self._invalid(name, value)
        return found

    def required_entity(self, name: str, table: Mapping[str, T]) -> T:
        """Like ``entity`` for a required parameter."""
        found = self.entity(name, table, required=True)
        assert found is not None
        return found

    def entities(self, name: str, table: Mapping[str, T]) -> list[T]:
        """The entities a comma-separated UUID list names, or 431."""
        value = self.get(name)
        if value is None:
            return []
        found = []
        for item in (part.strip() for part in value.split(",")):
            entity = table.get(item)
            if entity is None:
                raise self._invalid(name, item)
            found.append(entity)
        return found

    def boolean(self, name: str, default: bool) -> bool:
        """A boolean the way Java's ``Boolean.valueOf`` reads it."""
        value = self.get(name)
        return default if value is None else value.lower() == "true"

    def integer(self, name: str, *, minimum: int | None = None) -> int | None:
        """An integer parameter, or 431."""
        value = self.get(name)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            raise self.error(
                f"Unable to execute API command {self.command.lower()} due to invalid value. "
                f"Invalid parameter {name} value={value}: not an integer"
            ) from None
        if minimum is not None and number < minimum:
            raise self.error(
                f"Unable to execute API command {self.command.lower()} due to invalid value. "
                f"Invalid parameter {name} value={value}: must be {minimum} or more"
            )
        return number

    def date(self, name: str) -> datetime | None:
        """A date parameter as CloudStack reads one for most commands: its ``yyyy-MM-dd`` start
        only (Java's ``SimpleDateFormat("yyyy-MM-dd").parse`` ignores what follows), midnight in
        the server's time zone (UTC here); or 431."""
        value = self.get(name)
        if value is None:
            return None
        found = re.match(r"(\d{4})-(\d{1,2})-(\d{1,2})", value)
        try:
            if found is None:
                raise ValueError(value)
            year, month, day = (int(g) for g in found.groups())
            return datetime(year, month, day, tzinfo=UTC)
        except ValueError:
            raise self.error(
                f"Unable to execute API command {self.command.lower()} due to invalid value. "
                f"Invalid parameter {name} value={value}: not a date (yyyy-MM-dd)"
            ) from None
