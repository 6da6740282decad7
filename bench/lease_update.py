"""MariaDB's CPU for a job's commit UPDATE when it moves the lease and when it leaves it, side by side.

    python -m bench.lease_update [--rows 1000] [--group 20] [--updates 20000] [--rounds 3]

A job's commit is a fenced UPDATE of its `failover_jobs` row. Until the thirteenth session each
one pushed `lease_expires_at` to now + the lease (`GREATEST(...)`), which moves the row in the
claim index (ended, lease_expires_at); now it does so only once a sixth of the lease has run
(`IF(...)`, adapters/db/store.py). This runs both forms, alternating, `--rounds` times each, on
a table of `--rows` jobs (the project's own schema, in a database of its own), `--group`
UPDATEs per transaction in one compound block as serve's group commit sends them, and prints
the server's CPU per UPDATE (mariadbd's user + system time from /proc, its idle rate taken
off; the purge of old index entries, which follows the commits, included).

On a shared machine whose speed swings from minute to minute, CPU time cannot tell 20% apart.
`--callgrind PID` counts instructions instead, of a server of your own run under callgrind
(repeatable whatever else the machine does), e.g.:

    mariadb-install-db --no-defaults --datadir=/tmp/mdb --user=root --auth-root-authentication-method=normal
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out /usr/sbin/mariadbd --no-defaults \
        --datadir=/tmp/mdb --port=3307 --bind-address=127.0.0.1 --socket=/tmp/mdb.sock --user=root \
        --skip-grant-tables --innodb-buffer-pool-size=256M --innodb-buffer-pool-size-max=256M \
        --innodb-use-native-aio=0 &
    python -m bench.lease_update --port 3307 --updates 4000 --callgrind $(pgrep -f datadir=/tmp/mdb)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import asyncmy
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import CreateIndex, CreateTable

from adapters.db.store import LEASE_LEFT_AFTER_COMMIT
from adapters.db.tables import failover_jobs
from bench.infra import Callgrind

DB = "failover_lease_bench"
LEASE_US = 30_000_000
# each form with the lease each round starts from: GREATEST moves a lease of 25 s at every
# UPDATE; the store's IF (adapters/db/store.py) leaves one of an hour, whatever a round lasts
FORMS = {
    "moves (GREATEST: every commit)": (
        f"GREATEST(lease_expires_at, date_add(now(6), INTERVAL {LEASE_US} MICROSECOND))", 25),
    "kept (IF: while enough is left)": (
        f"IF(lease_expires_at < date_add(now(6), INTERVAL {int(LEASE_US * LEASE_LEFT_AFTER_COMMIT)} MICROSECOND), "
        f"date_add(now(6), INTERVAL {LEASE_US} MICROSECOND), lease_expires_at)", 3600),
}


def mariadbd_cpu() -> float:
    pid = int(subprocess.run(["pidof", "mariadbd"], capture_output=True, text=True, check=True).stdout.split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # clock ticks (USER_HZ 100)


async def setup(cur: asyncmy.cursors.Cursor, rows: int) -> dict[str, int]:
    await cur.execute(f"CREATE DATABASE IF NOT EXISTS {DB}")
    await cur.execute(f"DROP DATABASE {DB}")
    await cur.execute(f"CREATE DATABASE {DB}")
    await cur.execute(f"USE {DB}")
    await cur.execute(str(CreateTable(failover_jobs).compile(dialect=mysql.dialect())))
    for index in failover_jobs.indexes:  # the claim index (ended, lease_expires_at) among them
        await cur.execute(str(CreateIndex(index).compile(dialect=mysql.dialect())))
    plan = json.dumps({"volumes": [{"volume_id": str(uuid.uuid4()), "size_gb": 40, "root": i == 0} for i in range(3)],
                       "networks": [str(uuid.uuid4())], "cpu_count": 2, "memory_mb": 4096, "notes": "x" * 600})
    ids: dict[str, int] = {}
    for i in range(rows):
        job_id = str(uuid.uuid4())
        ids[job_id] = 0
        await cur.execute(
            "INSERT INTO failover_jobs (job_id, vm_id, job_type, status, source_vm_name, created_at, updated_at, "
            "request_id, correlation_id, options, plan, last_sequence, ended, cancel_requested, lease_owner, "
            "lease_expires_at) VALUES (%s, %s, 'test-failover', 'running', %s, now(6), now(6), %s, %s, '{}', %s, 0, 0, 0, "
            "'bench', date_add(now(6), INTERVAL 25 SECOND))",
            (job_id, f"vm-{i}", f"vm-{i}", job_id, job_id, plan))
    return ids


async def one_form(conn: asyncmy.Connection, cur: asyncmy.cursors.Cursor, form: tuple[str, int],
                   ids: dict[str, int], group: int, updates: int, idle: float, grind: Callgrind | None) -> float:
    lease, reset_seconds = form
    order = sorted(ids)
    await cur.execute(f"UPDATE failover_jobs SET lease_expires_at = date_add(now(6), INTERVAL {reset_seconds} SECOND)")
    await conn.commit()
    await asyncio.sleep(2)  # the purge of the reset
    if grind is not None:
        grind.zero()
    else:
        cpu0, began = mariadbd_cpu(), time.monotonic()
    done = 0
    while done < updates:
        parts = []
        for k in range(group):
            job_id = order[(done + k) % len(order)]
            seq = ids[job_id]
            ids[job_id] = seq + 1
            parts.append(
                f"UPDATE failover_jobs SET status='running', updated_at=now(6), last_sequence={seq + 1}, "
                f"lease_expires_at={lease} WHERE job_id='{job_id}' AND lease_owner='bench' "
                f"AND lease_expires_at > now(6) AND last_sequence={seq} AND cancel_requested IS false")
        await cur.execute("BEGIN NOT ATOMIC " + "; ".join(parts) + "; END")
        await conn.commit()
        done += group
    await asyncio.sleep(3)  # the purge of what these left behind
    if grind is not None:
        return grind.count() / done
    spent = mariadbd_cpu() - cpu0 - idle * (time.monotonic() - began)
    return spent / done * 1e6


async def main(args: argparse.Namespace) -> None:
    conn = await asyncmy.connect(host=args.host, port=args.port, user=args.user, password=args.password,
                                 autocommit=False)
    try:
        cur = conn.cursor()
        ids = await setup(cur, args.rows)
        await conn.commit()
        grind = Callgrind(args.callgrind) if args.callgrind else None
        unit = "instructions" if grind else "us of mariadbd CPU"
        idle = 0.0
        if grind is None:
            cpu0 = mariadbd_cpu()
            await asyncio.sleep(5)
            idle = (mariadbd_cpu() - cpu0) / 5
        print(f"{args.rows} jobs, {args.group} UPDATEs per transaction, {args.updates} per run; "
              + (f"mariadbd idle {idle * 1000:.1f} ms/s" if grind is None else "counted by callgrind"))
        results: dict[str, list[float]] = {name: [] for name in FORMS}
        for r in range(args.rounds):
            for name, form in FORMS.items():
                us = await one_form(conn, cur, form, ids, args.group, args.updates, idle, grind)
                results[name].append(us)
                print(f"  round {r + 1}, {name}: {us:,.1f} {unit} per UPDATE", flush=True)
        med = {name: statistics.median(v) for name, v in results.items()}
        names = list(FORMS)
        for name in names:
            print(f"{name}: median {med[name]:,.1f} {unit} per UPDATE")
        print(f"kept / moves: {med[names[1]] / med[names[0]]:.2f}")
        await cur.execute(f"DROP DATABASE {DB}")
    finally:
        conn.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--group", type=int, default=20)
    p.add_argument("--updates", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3306)
    p.add_argument("--user", default="root")
    p.add_argument("--password", default="")
    p.add_argument("--callgrind", type=int, metavar="PID",
                   help="count the instructions of this mariadbd run under callgrind instead of its CPU time")
    asyncio.run(main(p.parse_args()))
