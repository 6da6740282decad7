"""Guarantee 7, end to end: every delivery on `failover.commands` ends in exactly one of a job,
a `JobRejected`, or `failover.dead` with the reason in `x-failover-reason`; the consumer never
stops, never loops on a message, and answers the next good command (CONTRACT.md, "Bad
deliveries"). Published as raw bytes over the real RabbitMQ to a real `serve` process."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select, text

from adapters.db.tables import failover_jobs, job_commands
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import seed_vm
from tests.helpers import ServeProcess, metric

from .helpers import REASON, Watcher, command, publish_raw, wait_until

LIMIT = 256 * 1024  # FAILOVER_MAX_MESSAGE_BYTES' default: the shared serve process runs with it


def _ascii(value: Any) -> bytes:
    return json.dumps(value).encode()  # \u escapes: any str, even a lone surrogate, is valid JSON


def _sized(size: int) -> bytes:
    """A valid FailoverRequested (of an unknown VM) of exactly `size` bytes."""
    body = command(vm_id="no-such-vm", padding="")
    raw = _ascii(body)
    body["padding"] = "x" * (size - len(raw))
    raw = _ascii(body)
    assert len(raw) == size
    return raw


# (id, body, words the x-failover-reason must contain)
DEAD: list[tuple[str, Callable[[], bytes], str]] = [
    ("not-json", lambda: b"DROP TABLE failover_jobs; --", "not JSON"),
    ("empty", lambda: b"", "not JSON"),
    ("truncated-json", lambda: _ascii(command())[:-7], "not JSON"),
    ("nan", lambda: b'{"request_id": "%s", "schema_version": NaN}' % str(uuid.uuid4()).encode(), "not JSON"),
    ("deeply-nested", lambda: b"[" * 200_000, "not JSON"),
    ("huge-integer", lambda: b'{"schema_version": ' + b"9" * 10_000 + b"}", "not JSON"),
    ("not-utf8", lambda: b"\xff\xfe{\x00}", "not UTF-8"),
    ("latin-1", lambda: json.dumps(command(vm_id="Caf\u00e9")).replace("\\u00e9", "\u00e9").encode("latin-1"),
     "not UTF-8"),
    ("utf16", lambda: json.dumps(command()).encode("utf-16"), "not UTF-8"),
    ("array", lambda: _ascii([command()]), "not a JSON object"),
    ("string", lambda: b'"FailoverRequested"', "not a JSON object"),
    ("number", lambda: b"42", "not a JSON object"),
    ("null", lambda: b"null", "not a JSON object"),
    ("no-request-id", lambda: _ascii(command(request_id=...)), "request_id"),
    ("request-id-null", lambda: _ascii(command(request_id=None)), "request_id"),
    ("request-id-int", lambda: _ascii(command(request_id=42)), "request_id"),
    ("request-id-sql", lambda: _ascii(command(request_id="1' OR '1'='1")), "request_id"),
    ("request-id-no-dashes", lambda: _ascii(command(request_id=uuid.uuid4().hex)), "request_id"),
    ("request-id-braces", lambda: _ascii(command(request_id=f"{{{uuid.uuid4()}}}")), "request_id"),
    ("request-id-object", lambda: _ascii(command(request_id={"uuid": str(uuid.uuid4())})), "request_id"),
    ("over-the-limit", lambda: _sized(LIMIT + 1), "over the limit"),
    ("far-over-the-limit", lambda: _sized(4 * LIMIT), "over the limit"),
]


@pytest.mark.parametrize(("body", "words"), [(b, w) for _, b, w in DEAD], ids=[i for i, _, _ in DEAD])
async def test_an_unreadable_delivery_is_dead_lettered_with_its_reason(
        serve: ServeProcess, bus: BusClient, watcher: Watcher, db: Any,
        body: Callable[[], bytes], words: str) -> None:
    raw = body()
    message_id = await publish_raw(bus.channel, raw, routing_key="FailoverRequested",
                                   headers={REASON: "forged by the client", "x-client": "tests"})
    letter = await watcher.dead_letter(message_id)
    assert words in letter.reason, letter.reason
    assert letter.reason != "forged by the client"
    assert letter.reason.isascii() and letter.reason.isprintable() and len(letter.reason) <= 500
    # nothing lost: the body as published, and the client's own headers, kept for an operator
    assert letter.body == raw
    assert letter.headers.get("x-client") == "tests"
    assert letter.headers.get("x-original-routing-key") == "FailoverRequested"
    # and nothing else happened: no job, no row
    async with db.connect() as conn:
        jobs = (await conn.execute(select(func.count()).select_from(failover_jobs).where(
            failover_jobs.c.requested_by == "hostile-tests"))).scalar_one()
    assert jobs == 0


# (id, command fields, the field the detail must name)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("vm-id-missing", {"vm_id": ...}, "vm_id"),
    ("vm-id-number", {"vm_id": 42}, "vm_id"),
    ("vm-id-null", {"vm_id": None}, "vm_id"),
    ("vm-id-empty", {"vm_id": ""}, "vm_id"),
    ("vm-id-newline", {"vm_id": "vm-1\nINFO forged log line"}, "vm_id"),
    ("vm-id-nul", {"vm_id": "vm\x00id"}, "vm_id"),
    ("vm-id-10000-chars", {"vm_id": "a" * 10_000}, "vm_id"),
    ("vm-id-lone-surrogate", {"vm_id": "vm-\ud800"}, "vm_id"),
    ("vm-id-array", {"vm_id": ["a", "b"]}, "vm_id"),
    ("failover-type-unknown", {"failover_type": "tset"}, "failover_type"),
    ("failover-type-missing", {"failover_type": ...}, "failover_type"),
    ("requested-by-too-long", {"requested_by": "r" * 500}, "requested_by"),
    ("requested-by-object", {"requested_by": {"name": "x"}}, "requested_by"),
    ("options-a-string", {"options": "always"}, "options"),
    ("driver-injection-unknown", {"options": {"driver_injection": "sometimes"}}, "options.driver_injection"),
    ("type-unknown", {"type": "DeleteEverything"}, "type"),
    ("type-missing", {"type": ...}, "type"),
    ("type-number", {"type": 7}, "type"),
    ("type-case", {"type": "failoverrequested"}, "type"),
    ("schema-version-2", {"schema_version": 2}, "schema_version"),
    ("schema-version-string", {"schema_version": "1"}, "schema_version"),
    ("schema-version-float", {"schema_version": 1.0}, "schema_version"),
    ("schema-version-true", {"schema_version": True}, "schema_version"),
    ("schema-version-missing", {"schema_version": ...}, "schema_version"),
    ("cleanup-job-id-not-uuid", {"type": "CleanupRequested", "vm_id": ..., "failover_job_id": "../../etc"},
     "failover_job_id"),
    ("cancel-job-id-missing", {"type": "CancelRequested", "vm_id": ...}, "job_id"),
    ("rollback-job-id-number", {"type": "RollbackRequested", "vm_id": ..., "job_id": 42}, "job_id"),
]


@pytest.mark.parametrize(("fields", "field"), [(f, n) for _, f, n in INVALID], ids=[i for i, _, _ in INVALID])
async def test_an_invalid_command_is_rejected_naming_the_field(
        serve: ServeProcess, bus: BusClient, watcher: Watcher, db: Any,
        fields: dict[str, Any], field: str) -> None:
    body = command(**fields)
    request_id = body["request_id"]
    message_id = await publish_raw(bus.channel, _ascii(body), routing_key=str(body.get("type", "x")))
    kind, answer = await watcher.outcome(message_id, request_id)
    assert kind == "event", f"dead-lettered: {answer.reason}"
    assert answer.type == "JobRejected" and answer.reason == "invalid"
    assert str(answer.job_id) == request_id and answer.sequence == 1
    assert str(answer.causation_id) == request_id
    assert f"field '{field}'" in answer.detail, answer.detail
    assert len(answer.detail) < 2000
    async with db.connect() as conn:
        recorded = (await conn.execute(select(job_commands).where(job_commands.c.request_id == request_id))).one()
        jobs = (await conn.execute(select(func.count()).select_from(failover_jobs).where(
            failover_jobs.c.job_id == request_id))).scalar_one()
    assert recorded.outcome == "rejected_invalid" and jobs == 0
    assert message_id not in watcher.dead


HOSTILE_IDS = [
    "vm'; DROP TABLE failover_jobs; --",
    'vm" OR "1"="1',
    "../../../../etc/passwd",
    "vm;$(reboot);`id`",
    "%00%0a%27",
    "\u202evm-rtl-override",
    "x" * 191,
]


@pytest.mark.parametrize("vm_id", HOSTILE_IDS, ids=["quote", "double-quote", "dot-dot", "shell", "percent",
                                                    "rtl", "191-chars"])
async def test_a_hostile_vm_id_is_data_not_code(serve: ServeProcess, bus: BusClient, watcher: Watcher,
                                                db: Any, vm_id: str) -> None:
    """Valid ids (quotes, semicolons, `../` are data): an unknown VM, answered `not_found`."""
    body = command(vm_id=vm_id)
    message_id = await publish_raw(bus.channel, json.dumps(body, ensure_ascii=False).encode())
    kind, answer = await watcher.outcome(message_id, body["request_id"])
    assert kind == "event" and answer.type == "JobRejected", answer
    assert answer.reason == "not_found" and answer.vm_id == vm_id
    async with db.connect() as conn:  # the tables are all still there
        tables = {r[0] for r in await conn.execute(text("SHOW TABLES"))}
    assert {"failover_jobs", "job_commands", "outbox", "vm_replication_contexts"} <= tables


async def test_extra_fields_odd_routing_keys_and_properties_are_ignored(
        serve: ServeProcess, bus: BusClient, watcher: Watcher) -> None:
    """The body decides: unknown fields are ignored (the contract welcomes additions), and the
    routing key, content type and headers change nothing."""
    body = command(vm_id="no-such-vm", extra="x", nested={"a": [1, {"b": None}]}, __proto__={"admin": True},
                   options={"driver_injection": "never", "future_option": 3})
    message_id = await publish_raw(bus.channel, _ascii(body), routing_key="not.a.command.#",
                                   content_type="text/plain", headers={REASON: "forged", "x-delivery-count": 99})
    kind, answer = await watcher.outcome(message_id, body["request_id"])
    assert kind == "event" and answer.type == "JobRejected" and answer.reason == "not_found", answer
    cancel = {"type": "CancelRequested", "schema_version": 1, "request_id": str(uuid.uuid4()),
              "job_id": str(uuid.uuid4())}
    message_id = await publish_raw(bus.channel, _ascii(cancel), routing_key="FailoverRequested", content_type=None)
    kind, answer = await watcher.outcome(message_id, cancel["request_id"])
    assert kind == "event" and answer.type == "JobRejected" and answer.reason == "not_found", answer


async def test_the_size_limit_is_exact(serve: ServeProcess, bus: BusClient, watcher: Watcher) -> None:
    at_limit = _sized(LIMIT)
    request_id = json.loads(at_limit)["request_id"]
    message_id = await publish_raw(bus.channel, at_limit)
    kind, answer = await watcher.outcome(message_id, request_id)
    assert kind == "event" and answer.reason == "not_found", answer
    over = _sized(LIMIT + 1)
    message_id = await publish_raw(bus.channel, over)
    kind, answer = await watcher.outcome(message_id, json.loads(over)["request_id"])
    assert kind == "dead" and "262145 bytes" in answer.reason and "262144" in answer.reason


async def test_the_same_command_many_times_is_one_answer(
        serve: ServeProcess, bus: BusClient, watcher: Watcher, db: Any,
        control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """Redeliveries and client retries: one job, one rejection, nothing more, nothing looping."""
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="redelivered", os_type="ubuntu64Guest")
    good = command(vm_id=vm.vm_id)
    bad = command(failover_type="tset")
    outcomes = ("duplicate", "accepted", "rejected_invalid")
    before = {o: await metric(serve, "failover_commands_total", {"outcome": o}) for o in outcomes}
    deploys = len(await control.calls(command="deployVirtualMachine"))
    copies = 15
    await asyncio.gather(*(publish_raw(bus.channel, _ascii(body)) for body in [good, bad] * copies))
    events = await watcher.until_ended(good["request_id"])
    assert events[-1].type == "JobCompleted", events[-1]
    rejected = await watcher.until_ended(bad["request_id"])
    assert [e.type for e in rejected] == ["JobRejected"]

    async def all_counted() -> bool:
        now = {o: await metric(serve, "failover_commands_total", {"outcome": o}) for o in outcomes}
        return sum(now.values()) - sum(before.values()) >= 2 * copies

    await wait_until(all_counted, 20, "every copy to be handled")
    after = {o: await metric(serve, "failover_commands_total", {"outcome": o}) for o in outcomes}
    assert after["accepted"] - before["accepted"] == 1
    assert after["rejected_invalid"] - before["rejected_invalid"] == 1
    assert after["duplicate"] - before["duplicate"] == 2 * copies - 2
    async with db.connect() as conn:
        for rid in (good["request_id"], bad["request_id"]):
            rows = (await conn.execute(select(func.count()).select_from(job_commands).where(
                job_commands.c.request_id == rid))).scalar_one()
            assert rows == 1
        jobs = (await conn.execute(select(func.count()).select_from(failover_jobs).where(
            failover_jobs.c.vm_id == vm.vm_id))).scalar_one()
    assert jobs == 1
    assert len(await control.calls(command="deployVirtualMachine")) == deploys + 1
    assert len(watcher.events[bad["request_id"]]) == 1  # only sequence 1, ever


async def test_every_delivery_was_answered_once_and_the_service_still_serves(
        serve: ServeProcess, bus: BusClient, watcher: Watcher, db: Any,
        control: EmulatorControl, emulators: EmulatorHandle) -> None:
    """After all the above: no message dead-lettered twice (no loop), no (job, sequence) with two
    different events, no dead letter from the broker's delivery limit, and a good command is served."""
    assert watcher.dead, "the tests above dead-lettered nothing?"
    assert all(len(copies) == 1 for copies in watcher.dead.values())
    assert not watcher.dead_without_id
    for letter in (c[0] for c in watcher.dead.values()):
        assert "x-first-death-reason" not in letter.headers, letter.headers  # we answered, not the broker
    for job_id, by_seq in watcher.events.items():
        for seq, copies in by_seq.items():
            assert len({e.event_id for e in copies}) == 1, (job_id, seq)
    assert not watcher.unparsable_events
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="after the storm", os_type="ubuntu64Guest")
    good = command(vm_id=vm.vm_id)
    await publish_raw(bus.channel, _ascii(good))
    events = await watcher.until_ended(good["request_id"])
    assert events[-1].type == "JobCompleted"
    async with aiohttp.ClientSession() as http, http.get(serve.metrics_url + "/readyz") as resp:
        assert resp.status == 200
    assert serve.proc is not None and serve.proc.returncode is None
