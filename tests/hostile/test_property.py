"""A property over the real bus: whatever is published to `failover.commands` (valid commands,
broken ones, arbitrary bytes, odd routing keys and headers), each delivery ends in exactly one of
a job (`JobAccepted`), a `JobRejected` (`invalid`, naming the field, when the command is broken
but its request_id readable), or `failover.dead` with a reason; each readable command is
recorded before it is acked; and the service still serves a good command afterwards.

Hypothesis generates the deliveries; each is published over the real RabbitMQ to the real
`serve` process and its answer awaited. Hypothesis runs in a thread with its own event loop
(and its own connections): `@given` cannot drive the session's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from adapters.db.tables import job_commands
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.seed import seed_vm
from schemas.commands import COMMAND_TYPES
from tests.helpers import ServeProcess, metric

from .helpers import Watcher, command, publish_raw, wait_until
from .test_amqp_properties import RawStr

LIMIT = 256 * 1024
MAX_EXAMPLES = int(os.environ.get("HOSTILE_PROPERTY_EXAMPLES", "300"))  # more for a longer hunt
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
KNOWN_FIELDS = {"type", "schema_version", "request_id", "vm_id", "failover_type", "requested_by", "options",
                "failover_job_id", "job_id"}
RID = "\x00request-id\x00"  # replaced by a fresh UUID when published


def readable_request_id(body: bytes) -> str | None:
    """The contract's rule, written out independently: the request_id (lower case) of a body the
    service must answer on the bus, or None for one it must dead-letter."""
    if len(body) > LIMIT:
        return None
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    rid = value.get("request_id")
    return rid.lower() if isinstance(rid, str) and _UUID.fullmatch(rid) else None


# --------------------------------------------------------------------------- strategies

plain_text = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=30)
id_text = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=191)
json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False)
                | st.text(max_size=20))
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10)
extra_fields = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in KNOWN_FIELDS), json_values,
                               max_size=3)
not_a_string = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) \
    | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
control_text = st.builds(lambda a, c, b: a + c + b, plain_text,
                         st.characters(categories=("Cc",)), plain_text)


@dataclass
class Delivery:
    fields: dict[str, Any] | None  # a command as a dict (request_id = RID), or None for raw bytes
    raw: bytes = b""
    expect: str = "dead"  # dead | valid | invalid | answered
    field: str | None = None  # the field an `invalid` must name
    routing_key: str = "FailoverRequested"
    headers: dict[str, Any] = dc_field(default_factory=dict)
    content_type: str | None = "application/json"
    ensure_ascii: bool = True
    upper_rid: bool = False

    def body(self, request_id: str) -> bytes:
        if self.fields is None:
            return self.raw
        rid = request_id.upper() if self.upper_rid else request_id
        data = {k: (rid if v == RID else v) for k, v in self.fields.items()}
        return json.dumps(data, ensure_ascii=self.ensure_ascii).encode("utf-8", "surrogatepass")


@dataclass
class Context:
    """What exists before the property runs: a seeded VM, a completed test failover of it."""

    vm_id: str
    job_id: str


def valid_commands(ctx: Context) -> st.SearchStrategy[dict[str, Any]]:
    job_ids = st.sampled_from([ctx.job_id]) | st.uuids().map(str)
    actor = st.none() | st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=191)

    def with_actor(fields: dict[str, Any], who: Any, keep: bool) -> dict[str, Any]:
        return {**fields, "requested_by": who} if keep else fields

    failover = st.builds(
        lambda vm, ftype, inj, who, keep, opts: with_actor(
            {"type": "FailoverRequested", "schema_version": 1, "request_id": RID, "vm_id": vm,
             "failover_type": ftype, **({"options": {"driver_injection": inj}} if opts else {})}, who, keep),
        st.sampled_from([ctx.vm_id]) | id_text, st.sampled_from(["test", "live"]),
        st.sampled_from(["auto", "always", "never", None]), actor, st.booleans(), st.booleans())
    cleanup = st.builds(lambda j, who, keep: with_actor(
        {"type": "CleanupRequested", "schema_version": 1, "request_id": RID, "failover_job_id": j}, who, keep),
        job_ids, actor, st.booleans())
    other = st.builds(lambda t, j, who, keep: with_actor(
        {"type": t, "schema_version": 1, "request_id": RID, "job_id": j}, who, keep),
        st.sampled_from(["CancelRequested", "RollbackRequested"]), job_ids, actor, st.booleans())
    return st.builds(lambda c, extra: {**extra, **c}, failover | cleanup | other, extra_fields)


def _wrong_values(name: str) -> st.SearchStrategy[Any]:
    if name == "vm_id":
        return not_a_string | st.just("") | control_text | st.text(min_size=192, max_size=300).filter(
            lambda t: len(t) > 191) | st.just("v" * 10_000)
    if name == "failover_type":
        return not_a_string | st.text(max_size=10).filter(lambda t: t not in ("test", "live"))
    if name == "requested_by":
        return (not_a_string.filter(lambda v: v is not None) | control_text
                | st.text(st.characters(codec="ascii"), min_size=192, max_size=250))
    if name == "options":
        return not_a_string.filter(lambda v: v is not None and not isinstance(v, dict))
    if name == "options.driver_injection":
        return not_a_string.filter(lambda v: v is not None) | st.text(max_size=10).filter(
            lambda t: t not in ("auto", "always", "never"))
    if name == "type":
        return not_a_string | st.text(max_size=20).filter(lambda t: t not in COMMAND_TYPES)
    if name == "schema_version":
        return (st.integers(-(2**31), 2**31).filter(lambda v: v != 1) | st.floats(allow_nan=False)
                | st.text(max_size=3) | st.booleans() | st.none())
    return not_a_string | st.text(max_size=40).filter(lambda t: not _UUID.fullmatch(t))  # the job ids


@st.composite
def invalid_commands(draw: st.DrawFn, ctx: Context) -> tuple[dict[str, Any], str]:
    """A valid command with one field missing or wrong: the field the rejection must name."""
    fields = dict(draw(valid_commands(ctx)))
    names = ["type", "schema_version"] + [n for n in ("vm_id", "failover_type", "requested_by", "options",
                                                      "failover_job_id", "job_id") if n in fields]
    if fields["type"] == "FailoverRequested":
        names.append("options.driver_injection")
    name = draw(st.sampled_from(names))
    required = name in ("type", "schema_version", "vm_id", "failover_type", "failover_job_id", "job_id")
    if required and draw(st.booleans()):
        del fields[name]
        return fields, name
    if name == "options.driver_injection":
        fields["options"] = {"driver_injection": draw(_wrong_values(name))}
    else:
        fields[name] = draw(_wrong_values(name))
    return fields, name


@st.composite
def unreadable(draw: st.DrawFn, ctx: Context) -> bytes:
    kind = draw(st.sampled_from(["bytes", "not-utf8", "not-object", "bad-request-id", "truncated",
                                 "too-large", "nan"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "not-utf8":
        good = json.dumps(draw(valid_commands(ctx))).encode()
        cut = draw(st.integers(0, len(good)))
        return good[:cut] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])) \
            + good[cut:]
    if kind == "not-object":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "bad-request-id":
        fields = dict(draw(valid_commands(ctx)))
        if draw(st.booleans()):
            del fields["request_id"]
        else:
            fields["request_id"] = draw(
                not_a_string | st.text(max_size=40) | st.uuids().map(lambda u: u.hex)
                | st.uuids().map(lambda u: f"{{{u}}}") | st.uuids().map(lambda u: f" {u}")
                | st.uuids().map(lambda u: f"urn:uuid:{u}"))
        return json.dumps(fields).encode()
    if kind == "truncated":
        good = json.dumps({**draw(valid_commands(ctx)), "request_id": str(uuid.uuid4())}).encode()
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "nan":
        return b'{"request_id": "%s", "type": "FailoverRequested", "x": %s}' % (
            str(uuid.uuid4()).encode(), draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"])))
    return json.dumps({**draw(valid_commands(ctx)), "request_id": str(uuid.uuid4()),
                       "padding": "p" * (LIMIT + draw(st.integers(1, 5000)))}).encode()


raw_strings = st.binary(max_size=20).map(RawStr)  # where AMQP has a string, bytes that need not be UTF-8
header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31 - 1) | st.text(max_size=20)
    | st.binary(max_size=8).map(bytearray) | raw_strings,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(st.characters(codec="ascii"), max_size=8), c,
                                                          max_size=3),
    max_leaves=6)
headers = st.dictionaries(
    st.sampled_from(["x-failover-reason", "x-delivery-count", "x-death", "x-client"])
    | st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=1, max_size=16),
    header_values, max_size=3)
routing_keys = st.sampled_from(sorted(COMMAND_TYPES)) | st.text(max_size=40).filter(
    lambda k: len(k.encode()) < 250) | raw_strings
content_types = st.none() | st.just("application/json") | st.text(max_size=30) | raw_strings


@st.composite
def deliveries(draw: st.DrawFn, ctx: Context) -> Delivery:
    kind = draw(st.sampled_from(["valid", "invalid", "invalid", "object", "unreadable", "unreadable"]))
    if kind == "valid":
        d = Delivery(draw(valid_commands(ctx)), expect="valid")
    elif kind == "invalid":
        fields, name = draw(invalid_commands(ctx))
        d = Delivery(fields, expect="invalid", field=name)
    elif kind == "object":
        d = Delivery({**draw(st.dictionaries(st.text(max_size=10), json_values, max_size=5)), "request_id": RID},
                     expect="answered")
    else:
        d = Delivery(None, raw=draw(unreadable(ctx)), expect="dead")
    d.routing_key = draw(routing_keys)
    d.headers = draw(headers)
    d.content_type = draw(content_types)
    d.ensure_ascii = draw(st.booleans())
    d.upper_rid = draw(st.booleans())
    return d


# --------------------------------------------------------------------------- the property


@dataclass
class Published:
    message_id: str
    request_id: str | None  # readable, lower case
    delivery: Delivery
    outcome: str = ""
    answer: Any = None


@dataclass
class Run:
    published: list[Published] = dc_field(default_factory=list)
    outcomes: dict[str, int] = dc_field(default_factory=dict)


async def _one(watcher: Watcher, channel: AbstractChannel, d: Delivery, run: Run) -> None:
    body = d.body(str(uuid.uuid4()))
    rid = readable_request_id(body)
    message_id = await publish_raw(channel, body, routing_key=d.routing_key, headers=d.headers,
                                   content_type=d.content_type)
    item = Published(message_id, rid, d)
    run.published.append(item)
    kind, answer = await watcher.outcome(message_id, rid, timeout=30)
    item.outcome, item.answer = kind, answer
    if rid is None:
        assert kind == "dead", f"{body[:300]!r} has no readable request_id but was answered: {answer}"
        assert answer.reason and answer.reason.isascii() and len(answer.reason) <= 500
        assert answer.reason != d.headers.get("x-failover-reason")
        assert answer.body == body
        label = "dead"
    else:
        assert kind == "event", f"{body[:300]!r} has request_id {rid} but was dead-lettered: {answer.reason}"
        assert str(answer.job_id) == rid and answer.sequence == 1
        assert answer.type in ("JobAccepted", "JobRejected"), answer
        if d.expect == "valid":
            assert answer.type == "JobAccepted" or answer.reason != "invalid", (body[:300], answer.detail)
        elif d.expect == "invalid":
            assert answer.type == "JobRejected" and answer.reason == "invalid", (body[:300], answer)
            assert f"field '{d.field}'" in answer.detail, (body[:300], d.field, answer.detail)
        label = answer.type if answer.type == "JobAccepted" else f"JobRejected/{answer.reason}"
    run.outcomes[label] = run.outcomes.get(label, 0) + 1


def _property(amqp_url: str, watcher: Watcher, ctx: Context, run: Run) -> None:
    """Runs in its own thread, with its own loop and connection to publish; the answers are read
    from the session's watcher, which goes on consuming in the main loop meanwhile."""
    with asyncio.Runner() as runner:
        async def open_channel() -> tuple[Any, AbstractChannel]:
            connection = await aio_pika.connect(amqp_url)
            return connection, await connection.channel(publisher_confirms=True, on_return_raises=True)

        connection, channel = runner.run(open_channel())
        try:
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, phases=[
                Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
            @given(deliveries(ctx))
            def each(d: Delivery) -> None:
                runner.run(_one(watcher, channel, d, run))

            each()
            # exactly once: no message dead-lettered twice, no request answered twice differently
            for item in run.published:
                assert len(watcher.dead.get(item.message_id, [])) <= 1, item
                if item.request_id is not None:
                    copies = watcher.events.get(item.request_id, {}).get(1, [])
                    assert len({e.event_id for e in copies}) == 1, item
        finally:
            runner.run(connection.close())


async def test_any_delivery_is_answered_exactly_once(
        serve: ServeProcess, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        amqp_url: str, database_url: str, watcher: Watcher) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="property target", os_type="ubuntu64Guest")
    first = command(vm_id=vm.vm_id)
    await publish_raw(watcher.channel, json.dumps(first).encode())
    assert (await watcher.until_ended(first["request_id"]))[-1].type == "JobCompleted"
    before = await metric(serve, "failover_commands_total")

    run = Run()
    await asyncio.to_thread(_property, amqp_url, watcher, Context(vm.vm_id, first["request_id"]), run)

    # every delivery handled once by the consumer (the counter moves once per delivery, after the ack)
    async def counted() -> float:
        return await metric(serve, "failover_commands_total") - before >= len(run.published)

    await wait_until(counted, 30, "every delivery to be counted")
    assert await metric(serve, "failover_commands_total") - before == len(run.published)
    # and each readable one was recorded (before its ack)
    readable = {p.request_id for p in run.published if p.request_id}
    async with db.connect() as conn:
        recorded = (await conn.execute(select(func.count()).select_from(job_commands).where(
            job_commands.c.request_id.in_(readable)))).scalar_one()
    assert recorded == len(readable)
    print(f"\nproperty: {len(run.published)} deliveries published; outcomes: {dict(sorted(run.outcomes.items()))}")

    # the jobs it started end, and the service still serves a good command
    for p in run.published:
        if p.outcome == "event" and p.answer.type == "JobAccepted":
            ended = await watcher.until_ended(p.request_id, timeout=60)
            assert ended[-1].type in ("JobCompleted", "JobFailed"), ended[-1]
    fresh = await seed_vm(db, control, emulators.appliance_vm_id, vm_name="after the property", os_type="l26")
    good = command(vm_id=fresh.vm_id)
    await publish_raw(watcher.channel, json.dumps(good).encode())
    assert (await watcher.until_ended(good["request_id"]))[-1].type == "JobCompleted"
    async with aiohttp.ClientSession() as http, http.get(serve.metrics_url + "/readyz") as resp:
        assert resp.status == 200

