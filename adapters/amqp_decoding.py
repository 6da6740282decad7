"""Lenient decoding of AMQP frames: no client can make the service's connection fail to read.

pamqp (under aiormq and aio-pika) decodes a delivery's properties and headers before any of our
code sees it, and three kinds of value that RabbitMQ passes through unchecked make it raise:

- a short string (`content_type`, `message_id`, `correlation_id`, ..., the routing key of a
  `basic.deliver`) that is not UTF-8 (pamqp fixed this for long strings only, gmr/pamqp#40);
- a header table key that is not UTF-8;
- a timestamp (the `timestamp` property, or a `T` header value) beyond year 9999, such as an
  AMQP 1.0 client's milliseconds.

aiormq then treats the frame as a protocol error and closes the connection; the robust
connection reconnects, the broker redelivers the same message, and the consumer dies again, so
one such message stops the service taking commands until the broker's delivery limit drops it,
together with every innocent command prefetched alongside it. `install()` replaces those three
decoders with ones that decode what they can (invalid UTF-8 with U+FFFD, an impossible
timestamp as None); the delivery then reaches the command consumer, whose answer depends on the
body alone. Idempotent; call it before consuming.
"""

from __future__ import annotations

import datetime
import struct
from typing import Any

from pamqp import common, decode

_INSTALLED = False


def short_str(value: bytes) -> tuple[int, str]:
    """A short string; bytes that are not UTF-8 are replaced by U+FFFD instead of raising."""
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, bytes(value[1 : length + 1]).decode("utf-8", "replace")


def timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    """A timestamp; one no `datetime` can hold is None instead of an error."""
    try:
        seconds: float = common.Struct.timestamp.unpack(value[0:8])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack timestamp value") from err
    if seconds > 0xFFFFFFFF:  # as pamqp: past 2106 it is likely milliseconds
        seconds /= 1000.0
    try:
        return 8, datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return 8, None


def field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """A field table; keys that are not UTF-8 are decoded with U+FFFD instead of raising."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, Any] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = bytes(value[offset : offset + key_length]).decode("utf-8", "replace")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def install() -> None:
    """Make pamqp's decoding lenient in this process (see the module's docstring)."""
    global _INSTALLED
    if _INSTALLED:
        return
    decode.short_str = short_str
    decode.timestamp = timestamp  # type: ignore[assignment]  # None for an impossible one
    decode.field_table = field_table
    decode.METHODS["shortstr"] = short_str
    decode.METHODS["timestamp"] = timestamp
    decode.METHODS["table"] = field_table
    decode.TABLE_MAPPING[b"T"] = timestamp
    decode.TABLE_MAPPING[b"F"] = field_table
    _INSTALLED = True
