"""Hostile AMQP properties and headers, as a client in another language can send them: strings
that are not UTF-8 where AMQP has a string (content type, routing key, header keys and values),
and a timestamp beyond year 9999. RabbitMQ passes them through; the service must still read the
delivery and answer it by its body, without its connection failing (which would redeliver the
same message forever and stop every command behind it)."""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

import aiohttp
import pamqp.encode
import pytest
from pamqp import common

from failover.client import BusClient
from tests.helpers import ServeProcess

from .helpers import REASON, Watcher, command, publish_raw


class RawStr(str):
    """A str whose encoding is the given bytes, which need not be UTF-8."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawStr:
        obj = super().__new__(cls, raw.decode("latin-1"))
        obj.raw = raw
        return obj

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:  # type: ignore[override]
        return self.raw


class FarFuture(datetime.datetime):
    """Encoded as the largest AMQP timestamp (about 292 million years from now, in ms)."""


@pytest.fixture
def far_future_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pamqp.encode.timestamp

    def timestamp(value: Any) -> bytes:
        if isinstance(value, FarFuture):
            return common.Struct.timestamp.pack(2**63 - 1)
        return original(value)

    monkeypatch.setattr(pamqp.encode, "timestamp", timestamp)
    monkeypatch.setitem(pamqp.encode.METHODS, "timestamp", timestamp)


NOT_JSON = b"\x00 not json"
FAR = FarFuture(2030, 1, 1, tzinfo=datetime.UTC)


def _invalid() -> bytes:
    return json.dumps(command(failover_type="tset")).encode()


def _unknown_vm() -> bytes:
    return json.dumps(command(vm_id="no-such-vm")).encode()


# (id, body, publish options, expected: "dead" or the JobRejected reason)
CASES: list[tuple[str, Any, dict[str, Any], str]] = [
    ("content-type-not-utf8", _unknown_vm, {"content_type": RawStr(b"application/\xff\xfejson")}, "not_found"),
    ("content-type-not-utf8-dead", lambda: NOT_JSON, {"content_type": RawStr(b"\xc3(")}, "dead"),
    ("routing-key-not-utf8", _invalid, {"routing_key": RawStr(b"Failover\xffRequested")}, "invalid"),
    ("routing-key-not-utf8-dead", lambda: NOT_JSON, {"routing_key": RawStr(b"\xed\xa0\x80")}, "dead"),
    ("header-key-not-utf8", lambda: NOT_JSON, {"headers": {RawStr(b"x-\xff\xfe"): "v"}}, "dead"),
    ("header-value-not-utf8", lambda: NOT_JSON, {"headers": {"x-bin": RawStr(b"\x00\xff\xfe")}}, "dead"),
    ("header-value-not-utf8-valid", _unknown_vm, {"headers": {"x-bin": RawStr(b"\xff")}}, "not_found"),
    ("nested-header-not-utf8", lambda: NOT_JSON,
     {"headers": {"x-t": {"inner": [RawStr(b"\xff"), 1, None]}}}, "dead"),
    ("header-timestamp-far-future", lambda: NOT_JSON, {"headers": {"x-when": FAR}}, "dead"),
    ("header-timestamp-far-future-valid", _invalid, {"headers": {"x-when": FAR}}, "invalid"),
]


@pytest.mark.usefixtures("far_future_timestamps")
@pytest.mark.parametrize(("body", "options", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_hostile_properties_do_not_stop_the_service(
        serve: ServeProcess, bus: BusClient, watcher: Watcher,
        body: Any, options: dict[str, Any], expected: str) -> None:
    raw = body()
    message_id = await publish_raw(bus.channel, raw, **options)
    rid = json.loads(raw)["request_id"] if expected != "dead" else None
    kind, answer = await watcher.outcome(message_id, rid, timeout=15)
    if expected == "dead":
        assert kind == "dead", answer
        assert answer.reason.startswith("body is not"), answer.reason
        assert answer.body == raw
        assert "x-first-death-reason" not in answer.headers  # answered by the service, not the broker
    else:
        assert kind == "event" and answer.type == "JobRejected" and answer.reason == expected, answer


async def test_a_timestamp_property_beyond_year_9999_does_not_stop_the_service(
        far_future_timestamps: None, serve: ServeProcess, bus: BusClient, watcher: Watcher) -> None:
    import aio_pika

    from adapters.bus import COMMANDS_EXCHANGE

    exchange = await bus.channel.get_exchange(COMMANDS_EXCHANGE)
    for raw, expected in ((_unknown_vm(), "not_found"), (NOT_JSON, "dead")):
        message_id = str(uuid.uuid4())
        await exchange.publish(aio_pika.Message(raw, message_id=message_id, timestamp=FAR),
                               routing_key="FailoverRequested")
        rid = json.loads(raw)["request_id"] if expected != "dead" else None
        kind, answer = await watcher.outcome(message_id, rid, timeout=15)
        assert kind == ("dead" if expected == "dead" else "event"), answer
        if expected != "dead":
            assert answer.reason == expected


async def test_headers_that_just_fit_a_frame_do_not_break_the_dead_letter(
        serve: ServeProcess, bus: BusClient, watcher: Watcher) -> None:
    """A client's headers just under the broker's frame_max: with the reason added, a copy
    would be over it, and the broker would close the service's connection for it."""
    underlay = await bus.channel.get_underlay_channel()
    frame_max = int(underlay.connection.connection_tune.frame_max)
    message_id = await publish_raw(bus.channel, NOT_JSON, headers={"x-pad": "p" * (frame_max - 160)})
    letter = await watcher.dead_letter(message_id, timeout=15)
    assert letter.reason.startswith("body is not JSON")
    assert "x-failover-headers-dropped" in letter.headers and "x-pad" not in letter.headers
    assert "x-first-death-reason" not in letter.headers
    # and headers that fit are kept
    message_id = await publish_raw(bus.channel, NOT_JSON, headers={"x-pad": "p" * (frame_max // 2)})
    letter = await watcher.dead_letter(message_id, timeout=15)
    assert len(letter.headers["x-pad"]) == frame_max // 2


async def test_the_dead_letter_keeps_what_it_can_and_the_connection_never_failed(
        serve: ServeProcess, bus: BusClient, watcher: Watcher) -> None:
    message_id = await publish_raw(bus.channel, NOT_JSON, headers={
        "x-bin": RawStr(b"\x00\xff\xfe"), "x-text": "kept", REASON: "forged"})
    letter = await watcher.dead_letter(message_id)
    assert letter.headers["x-text"] == "kept"
    assert bytes(letter.headers["x-bin"]) == b"\x00\xff\xfe"  # the client's bytes, as a byte array
    assert letter.reason.startswith("body is not JSON")
    good = command(vm_id="no-such-vm")
    message_id = await publish_raw(bus.channel, json.dumps(good).encode())
    kind, answer = await watcher.outcome(message_id, good["request_id"], timeout=10)
    assert kind == "event" and answer.reason == "not_found"
    async with aiohttp.ClientSession() as http, http.get(serve.metrics_url + "/readyz") as resp:
        assert resp.status == 200
    # no hostile delivery ever broke the service's connection (it would have reconnected)
    log = serve.log_path.read_text(errors="replace")
    assert "reader exited abnormally" not in log and "InvalidFrameError" not in log
