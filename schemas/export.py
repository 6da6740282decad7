"""The contract's messages as JSON Schema files, for clients in other languages.

``python -m schemas.export OUT_DIR`` writes ``OUT_DIR/commands/<Type>.json`` and
``OUT_DIR/events/<Type>.json`` for each message, plus the unions ``commands.json`` and
``events.json``. A copy is kept in ``schemas/json/`` (a test checks it is current); regenerate it
with ``python -m schemas.export schemas/json``.

The schemas are *open*: they never set ``additionalProperties: false``, because the contract
welcomes additions (new optional fields), so a client validating with them must accept fields a
newer service adds. Command schemas describe what a client may send (validation mode); event
schemas describe what the service publishes (serialization mode: every field is present).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, TypeAdapter

from schemas.commands import COMMAND_TYPES, Command
from schemas.events import EVENT_TYPES, AnyEvent

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
PACKAGED_SCHEMA_DIR: Final = Path(__file__).parent / "json"
"""Where the committed (and packaged) copy of the schemas lives."""

Mode = Literal["validation", "serialization"]


def _open(schema: Any) -> Any:
    """``schema`` without any ``additionalProperties: false``, at any depth."""
    if isinstance(schema, dict):
        return {
            key: _open(value)
            for key, value in schema.items()
            if not (key == "additionalProperties" and value is False)
        }
    if isinstance(schema, list):
        return [_open(item) for item in schema]
    return schema


def _document(schema: dict[str, Any]) -> str:
    return json.dumps({"$schema": JSON_SCHEMA_DIALECT, **_open(schema)}, indent=2) + "\n"


def _model_schema(model: type[BaseModel], mode: Mode) -> str:
    return _document(model.model_json_schema(mode=mode))


def json_schema_documents() -> dict[str, str]:
    """Every schema file's path (relative, ``/``-separated) and its exact text."""
    documents = {
        f"commands/{name}.json": _model_schema(model, "validation")
        for name, model in COMMAND_TYPES.items()
    }
    documents.update(
        {
            f"events/{name}.json": _model_schema(model, "serialization")
            for name, model in EVENT_TYPES.items()
        }
    )
    commands: TypeAdapter[Any] = TypeAdapter(Command)
    events: TypeAdapter[Any] = TypeAdapter(AnyEvent)
    documents["commands.json"] = _document(
        {"title": "Command", **commands.json_schema(mode="validation")}
    )
    documents["events.json"] = _document(
        {"title": "Event", **events.json_schema(mode="serialization")}
    )
    return documents


def write_json_schemas(directory: Path) -> list[Path]:
    """Write every schema file under ``directory`` and return their paths.

    Stale ``.json`` files in ``directory/commands`` and ``directory/events`` (a message that no
    longer exists) are removed, so the directory is exactly the current set.
    """
    documents = json_schema_documents()
    written: list[Path] = []
    for relative, text in sorted(documents.items()):
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    for folder in ("commands", "events"):
        for path in (directory / folder).glob("*.json"):
            if f"{folder}/{path.name}" not in documents:
                path.unlink()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m schemas.export OUT_DIR``: write the schemas, print their paths."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m schemas.export OUT_DIR", file=sys.stderr)
        return 2
    for path in write_json_schemas(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
