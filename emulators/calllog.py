"""The log of every call the emulators answered (never with a signature or key)."""

from __future__ import annotations

import time
from typing import Any

SECRET_PARAMS = frozenset({"apikey", "signature", "secretkey", "secret", "signatureversion"})


class CallLog:
    """Append-only list of calls with dense ``seq`` numbers from 1 (until ``reset``)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._seq = 0

    def reset(self) -> None:
        """Forget every call; numbering restarts at 1."""
        self.entries = []
        self._seq = 0

    def record(self, api: str, command: str, params: dict[str, Any]) -> dict[str, Any]:
        """Log a call; the caller sets the returned entry's ``status`` once it answers."""
        self._seq += 1
        entry: dict[str, Any] = {
            "seq": self._seq,
            "time": time.time(),
            "api": api,
            "command": command,
            "params": {k: v for k, v in params.items() if k.lower() not in SECRET_PARAMS},
            "status": None,
        }
        self.entries.append(entry)
        return entry

    def find(
        self, api: str | None = None, command: str | None = None, since: int = 0
    ) -> list[dict[str, Any]]:
        """Calls of one api and/or command (any case), with ``seq`` greater than ``since``."""
        wanted = command.lower() if command else None
        start = 0
        if since > 0 and self.entries:
            start = min(len(self.entries), max(0, since - self.entries[0]["seq"] + 1))
        return [
            c
            for c in self.entries[start:]
            if (api is None or c["api"] == api)
            and (wanted is None or c["command"].lower() == wanted)
        ]
