"""Building command bodies for the parser tests."""

from __future__ import annotations

import json
from typing import Any, Final

REQUEST_ID: Final = "7d7e1f0e-3c55-4e8e-9d9a-0d5e7f1b2a10"
JOB_ID: Final = "0b6f4d3e-8a51-4c1b-a1d2-52f0c6a4e9b7"
DROP: Final = object()
"""Pass as a field's value to leave the field out."""


def failover_fields(**changes: Any) -> dict[str, Any]:
    """A valid FailoverRequested as a dict, with ``changes`` applied."""
    fields: dict[str, Any] = {
        "type": "FailoverRequested",
        "schema_version": 1,
        "request_id": REQUEST_ID,
        "vm_id": "4205a841-0265-f4bd-39a6-39fd92196f53",
        "failover_type": "test",
        "requested_by": "ops@example.com",
        "options": {"driver_injection": "auto"},
    }
    fields.update(changes)
    return {key: value for key, value in fields.items() if value is not DROP}


def failover_body(**changes: Any) -> bytes:
    """A valid FailoverRequested body, with ``changes`` applied."""
    return json.dumps(failover_fields(**changes)).encode()
