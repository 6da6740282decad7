"""The JSON Schema files: the committed copy is current, and the schemas say what they should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas import COMMAND_TYPES, EVENT_TYPES
from schemas.export import PACKAGED_SCHEMA_DIR, json_schema_documents, main, write_json_schemas

REGENERATE = "regenerate it with: python -m schemas.export schemas/json"


def test_the_committed_schemas_match_the_models() -> None:
    expected = json_schema_documents()
    committed = {
        path.relative_to(PACKAGED_SCHEMA_DIR).as_posix(): path.read_text(encoding="utf-8")
        for path in PACKAGED_SCHEMA_DIR.rglob("*.json")
    }
    assert sorted(committed) == sorted(expected), f"schemas/json has other files; {REGENERATE}"
    stale = [name for name in expected if committed[name] != expected[name]]
    assert not stale, f"schemas/json is out of date ({', '.join(stale)}); {REGENERATE}"


def test_write_json_schemas_writes_one_file_per_message_and_the_unions(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "JobVanished.json").write_text("{}")
    written = write_json_schemas(tmp_path)
    names = {path.relative_to(tmp_path).as_posix() for path in written}
    assert names == (
        {f"commands/{name}.json" for name in COMMAND_TYPES}
        | {f"events/{name}.json" for name in EVENT_TYPES}
        | {"commands.json", "events.json"}
    )
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")} == names
    for path in written:
        assert json.loads(path.read_text())["$schema"].startswith("https://json-schema.org/")


def test_command_schemas_require_the_envelope_and_stay_open() -> None:
    schema = json.loads(json_schema_documents()["commands/FailoverRequested.json"])
    assert schema["required"] == ["type", "schema_version", "request_id", "vm_id", "failover_type"]
    assert schema["properties"]["vm_id"]["maxLength"] == 191
    assert "additionalProperties" not in schema


def test_event_schemas_list_every_field_as_required_and_stay_open() -> None:
    documents = json_schema_documents()
    for name, model in EVENT_TYPES.items():
        schema = json.loads(documents[f"events/{name}.json"])
        assert set(schema["required"]) == set(model.model_fields), name
        assert '"additionalProperties": false' not in documents[f"events/{name}.json"]


def test_the_module_runs_as_a_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 0
    assert "FailoverRequested.json" in capsys.readouterr().out
    assert main([]) == 2
