"""A counting TCP proxy between `serve` and MariaDB: every command the service sends, by kind
(COMMIT, ROLLBACK, SELECT, INSERT, UPDATE, ping, ...) and table. MariaDB's own counters are
server-wide (this server is shared) or count statements rather than transactions, so the
exact per-job figures come from here. It forwards bytes unchanged; it only reads the
client's command packets (MySQL protocol: 3-byte length, sequence id, command byte)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

_TABLE = re.compile(r"\b(?:INTO|UPDATE|FROM)\s+`?([A-Za-z_][A-Za-z0-9_]*)`?", re.IGNORECASE)
COM_QUERY, COM_PING, COM_QUIT = 0x03, 0x0E, 0x01


def statements(script: str) -> list[str]:
    """The statements of one COM_QUERY (several when the service sends a script), split at the
    semicolons outside quotes; MariaDB's `IF ... THEN ...; END IF` counts as one statement, and
    an anonymous block's (`BEGIN NOT ATOMIC ...; END`, adapters/db/raw.py `block`) as the
    statements in it."""
    out: list[str] = []
    start, quote, i, n = 0, "", 0, len(script)
    while i < n:
        c = script[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"`":
            quote = c
        elif c == ";":
            out.append(script[start:i].strip())
            start = i + 1
        i += 1
    out.append(script[start:].strip())
    merged: list[str] = []
    for sql in filter(None, out):  # the pieces of an IF block go back together
        lead = _SET_STATEMENT.match(sql)
        if lead and sql[lead.end():lead.end() + 17].upper() == "BEGIN NOT ATOMIC ":
            sql = sql[lead.end():]  # a block under `SET STATEMENT ... FOR` (a group commit's)
        if sql[:17].upper() == "BEGIN NOT ATOMIC ":
            sql = sql[17:].strip()  # the block's first statement
        elif sql.upper() == "END":  # the block's end (an IF's is "END IF")
            continue
        if merged and merged[-1].upper().startswith("IF ") and not merged[-1].upper().endswith("END IF"):
            merged[-1] += "; " + sql
        else:
            merged.append(sql)
    return merged


_SET_STATEMENT = re.compile(r"SET\s+STATEMENT\s+.*?\bFOR\s+", re.IGNORECASE | re.DOTALL)


def counted(sql: str) -> list[str]:
    """What one statement of `statements` runs in the usual case: itself (a stop, `IF ... THEN
    SIGNAL ...`, runs nothing inside when the fence holds)."""
    lead = _SET_STATEMENT.match(sql)
    if lead:  # `SET STATEMENT var = value FOR UPDATE ...`: the UPDATE
        return counted(sql[lead.end():])
    return [sql]


class SqlCounter:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.kinds: Counter[str] = Counter()
        self.by_table: Counter[str] = Counter()
        self.connections = 0
        self.requests = 0  # COM_QUERY packets (a multi-statement script is one)
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def snapshot(self) -> dict[str, Any]:
        return {"kinds": dict(self.kinds), "by_table": dict(self.by_table), "connections": self.connections,
                "requests": self.requests}

    def _count(self, payload: bytes) -> None:
        cmd = payload[0]
        if cmd == COM_QUERY:
            self.requests += 1  # one round trip, however many statements it carries
            for sql in (one for block in statements(payload[1:].decode("utf-8", "replace")) for one in counted(block)):
                kind = sql.split(None, 1)[0].upper() if sql else "?"
                self.kinds[kind] += 1
                if kind in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                    m = _TABLE.search(sql[:2000])
                    self.by_table[f"{kind} {m.group(1) if m else '?'}"] += 1
        elif cmd == COM_PING:
            self.kinds["PING"] += 1
        elif cmd != COM_QUIT:
            self.kinds[f"command 0x{cmd:02x}"] += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def client_to_server() -> None:
            buf = b""
            try:
                while data := await reader.read(65536):
                    up_writer.write(data)
                    buf += data
                    while len(buf) >= 4:
                        length = int.from_bytes(buf[:3], "little")
                        if len(buf) < 4 + length:
                            break
                        if buf[3] == 0 and length:  # a new command (seq 0), not a handshake packet
                            self._count(buf[4:4 + length])
                        buf = buf[4 + length:]
                    await up_writer.drain()
            finally:
                up_writer.close()

        async def server_to_client() -> None:
            try:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        await asyncio.gather(client_to_server(), server_to_client(), return_exceptions=True)


def delta(before: dict[str, Any], after: dict[str, Any], jobs: int) -> dict[str, Any]:
    """Per job, between two snapshots."""
    def sub(a: dict[str, int], b: dict[str, int]) -> dict[str, float]:
        keys = set(a) | set(b)
        return {k: round((b.get(k, 0) - a.get(k, 0)) / jobs, 2) for k in sorted(keys, key=lambda k: -(b.get(k, 0) - a.get(k, 0)))
                if b.get(k, 0) - a.get(k, 0)}

    kinds = sub(before["kinds"], after["kinds"])
    requests = (after.get("requests", 0) - before.get("requests", 0)) / jobs
    return {"per_job": kinds, "by_table_per_job": sub(before["by_table"], after["by_table"]),
            "statements_per_job": round(sum(v for k, v in kinds.items() if k != "PING"), 2),
            # requests, not statements: a script of several statements is one round trip
            "round_trips_per_job": round(requests + kinds.get("PING", 0.0), 2),
            "commits_per_job": kinds.get("COMMIT", 0.0), "rollbacks_per_job": kinds.get("ROLLBACK", 0.0),
            "pings_per_job": kinds.get("PING", 0.0)}
