"""The generated documents: committed and current, the state diagram equal to the machine the
service runs, and the AsyncAPI document valid AsyncAPI 3.0 (checked with the specification's
own JSON Schema, from the `@asyncapi/specs` package, kept in tests/data) and true to the bus."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from adapters.bus import COMMANDS_EXCHANGE, DLX_EXCHANGE, EVENTS_EXCHANGE
from failover.docs import ASYNCAPI_FILE, STATE_MACHINE_FILE, mermaid_id, render_docs
from schemas.commands import COMMAND_TYPES, FailoverRequested
from schemas.common import utc_now
from schemas.events import EVENT_TYPES, JobFailed
from statemachine.machine import STATES, build_machine

from .helpers import ROOT

DOCS = ROOT / "docs"
ASYNCAPI_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0-without-id.schema.json"
_PROGRAM = Path(sys.executable).with_name("failoverctl")
FAILOVERCTL = [str(_PROGRAM)] if _PROGRAM.exists() else [sys.executable, "-m", "failover.cli"]


@pytest.mark.parametrize("name", [STATE_MACHINE_FILE, ASYNCAPI_FILE])
def test_committed_docs_are_current(name: str) -> None:
    committed = DOCS / name
    assert committed.exists(), f"docs/{name} is missing: run `failoverctl docs`"
    assert committed.read_text(encoding="utf-8") == render_docs()[name], (
        f"docs/{name} is out of date: run `failoverctl docs` and commit the result")


def test_failoverctl_docs_writes_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([*FAILOVERCTL, "docs", "--directory", str(out)], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(render_docs())
    for name, text in render_docs().items():
        assert (out / name).read_text(encoding="utf-8") == text
        assert str(out / name) in done.stdout


# --------------------------------------------------------------------------- the state machine

def _diagram_edges(markdown: str) -> tuple[set[tuple[str, str, str]], dict[str, str]]:
    block = re.search(r"```mermaid\n(.*?)```", markdown, re.S)
    assert block is not None, "no mermaid block"
    lines = block.group(1).splitlines()
    assert lines[0] == "stateDiagram-v2"
    labels = {m.group(2): m.group(1) for line in lines if (m := re.fullmatch(r'\s+state "(.+)" as (\S+)', line))}
    edges = set()
    for line in lines:
        m = re.fullmatch(r"\s+(\S+) --> (\S+)(?:: (\w+)(?: \[\w+\])?)?", line)
        if m and m.group(3):
            source, dest = (labels.get(x, x) for x in m.group(1, 2))
            edges.add((source, dest, m.group(3)))
    return edges, labels


def test_the_state_diagram_is_the_machine_the_service_runs() -> None:
    """Every transition of the built machine is an edge of the diagram, and nothing else is."""
    machine = build_machine()
    running = {(source, t.dest or source, trigger)
               for trigger, event in machine.events.items()
               for source, transitions in event.transitions.items()
               for t in transitions}
    edges, labels = _diagram_edges((DOCS / STATE_MACHINE_FILE).read_text(encoding="utf-8"))
    assert edges == running
    # every state shows under its real name; Mermaid ids have no dashes
    assert set(labels.values()) == {s for s in STATES if "-" in s}
    assert all(re.fullmatch(r"\w+", mermaid_id(s)) for s in STATES)
    assert {s for edge in edges for s in edge[:2]} == set(STATES)


# --------------------------------------------------------------------------- AsyncAPI

@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DOCS / ASYNCAPI_FILE).read_text(encoding="utf-8"))
    return document


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [
            r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_asyncapi_is_valid_asyncapi_3(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    spec = json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft7Validator(spec).iter_errors(asyncapi), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message[:300]}" for e in errors[:10])
    for ref in _refs(asyncapi):  # the specification's schema cannot check references
        _resolve(asyncapi, ref)
    assert {op["action"] for op in asyncapi["operations"].values()} == {"send", "receive"}
    for name, op in asyncapi["operations"].items():
        channel = _resolve(asyncapi, op["channel"]["$ref"])
        channel_path = op["channel"]["$ref"]
        for message in op["messages"]:  # an operation's messages are its channel's
            assert message["$ref"].startswith(channel_path + "/messages/"), (name, message)
            assert message["$ref"].rsplit("/", 1)[1] in channel["messages"]
    for name, message in asyncapi["components"]["messages"].items():
        assert "payload" in message, name


def test_asyncapi_describes_the_bus(asyncapi: dict[str, Any]) -> None:
    channels = asyncapi["channels"]
    assert asyncapi["servers"]["rabbitmq"]["protocol"] == "amqp"
    exchanges = {name: c["bindings"]["amqp"]["exchange"] for name, c in channels.items()}
    assert exchanges["commands"]["name"] == COMMANDS_EXCHANGE and exchanges["commands"]["type"] == "topic"
    assert exchanges["events"]["name"] == EVENTS_EXCHANGE and exchanges["events"]["type"] == "topic"
    assert exchanges["deadLetters"]["name"] == DLX_EXCHANGE
    # each command is received on the commands exchange with its type as routing key
    assert set(channels["commands"]["messages"]) == set(COMMAND_TYPES)
    receives = {op["messages"][0]["$ref"].rsplit("/", 1)[1]: op for op in asyncapi["operations"].values()
                if op["action"] == "receive"}
    assert set(receives) == set(COMMAND_TYPES)
    assert all(op["bindings"]["amqp"]["cc"] == [name] for name, op in receives.items())
    # every event is sent on job.{job_id}.{EventType}
    assert channels["events"]["address"] == "job.{job_id}.{EventType}"
    assert set(channels["events"]["parameters"]) == {"job_id", "EventType"}
    assert channels["events"]["parameters"]["EventType"]["enum"] == list(EVENT_TYPES)
    assert set(channels["events"]["messages"]) == set(EVENT_TYPES)
    sends = [op for op in asyncapi["operations"].values() if op["action"] == "send"]
    assert {m["$ref"].rsplit("/", 1)[1] for op in sends for m in op["messages"]} == {*EVENT_TYPES, "DeadLetter"}


def _payload_validator(asyncapi: dict[str, Any], message: str) -> jsonschema.protocols.Validator:
    payload = asyncapi["components"]["messages"][message]["payload"]
    schema = {**payload, "components": asyncapi["components"]}  # its refs point into the document
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_asyncapi_payloads_are_the_message_models(asyncapi: dict[str, Any]) -> None:
    """Real messages, serialised by the models, validate against the document's payloads;
    broken ones do not."""
    command = FailoverRequested(request_id=uuid.uuid4(), vm_id="4205a841-0265-f4bd-39a6-39fd92196f53",
                                failover_type="test", options={"driver_injection": "never"})
    validator = _payload_validator(asyncapi, "FailoverRequested")
    body = command.model_dump(mode="json")
    assert not list(validator.iter_errors(body))
    assert list(validator.iter_errors({k: v for k, v in body.items() if k != "request_id"}))
    assert list(validator.iter_errors({**body, "failover_type": "sideways"}))

    event = JobFailed(event_id=uuid.uuid4(), job_id=uuid.uuid4(), job_type="test-failover", vm_id="vm-1",
                      sequence=9, correlation_id=uuid.uuid4(), causation_id=uuid.uuid4(), occurred_at=utc_now(),
                      failed_step="vm-creation", error={"code": "CLOUDSTACK_REFUSED", "message": "no"},
                      rolled_back=True)
    validator = _payload_validator(asyncapi, "JobFailed")
    body = event.model_dump(mode="json")
    assert not list(validator.iter_errors(body))
    assert list(validator.iter_errors({**body, "error": {"code": "X"}}))  # the nested schema is used too


# --------------------------------------------------------------------------- README

def _section(readme: str, title: str) -> str:
    start = readme.index(f"\n{title}\n")
    level = title.split(" ")[0]
    rest = readme[start + len(title) + 2:]
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", rest, re.M)]
    return rest[: ends[0]] if ends else rest


def test_readme_lists_every_setting_and_every_alert() -> None:
    from failover.settings import Settings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(FAILOVER_[A-Z0-9_]+)`", _section(readme, "## Configuration")))
    assert listed == {f"FAILOVER_{name.upper()}" for name in Settings.model_fields}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    table = _section(readme, "### What to alert on")
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == alerts
