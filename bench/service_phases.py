"""The service's phases: probe (one job: its calls and events), throughput (a burst at zero
latency), paced (20 requests/s), slow (many jobs waiting on 2 s emulated latencies), profile
(the throughput burst again, under py-spy)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncEngine

from emulators.client import EmulatorControl

from . import sqlcount
from .client import Client, Timings, require_all_completed, seed_vms, summarize
from .infra import (
    SERVICE_USER,
    Callgrind,
    CpuMeter,
    Emulators,
    Serve,
    broker_url,
    clean_broker,
    db_variables,
    ensure_users,
    fresh_database,
    git_state,
    global_status,
    histogram_quantiles,
    proc_status,
    python_probe,
    quantile,
    quiet_machine,
    rabbitmq_version,
    service_env,
    set_code_dir,
    set_userstat,
    snapshot_code,
    status_delta,
    substrate_pids,
    user_stats,
    user_url,
    wait_until,
)

# CloudStack commands that answer with a jobid (the caller waits on an async job), and the
# Volume Daemon calls that start an operation (the caller waits on it).
ASYNC_CS = {"createSnapshot", "deployVirtualMachine", "startVirtualMachine", "stopVirtualMachine",
            "destroyVirtualMachine", "revertSnapshot", "deleteSnapshot", "attachVolume", "detachVolume"}
ASYNC_VD = {"attach", "attach-root", "detach"}


@dataclass
class Bench:
    """What every phase shares."""

    args: Any
    amqp_url: str
    db_url: str
    engine: AsyncEngine
    emu: Emulators
    client: Client
    results: Path
    sql: Any = None  # a SqlCounter (bench/sqlcount.py) the service may connect through
    notes: list[str] = field(default_factory=list)

    @property
    def service_db_url(self) -> str:
        """The service connects as its own user (exact per-user statistics)."""
        return user_url(self.db_url, SERVICE_USER)

    def env(self, *, counted: bool = False, **extra: str) -> dict[str, str]:
        """`counted`: through the statement-counting proxy (exact SQL per job; a little slower)."""
        url = self.service_db_url
        if counted and self.sql is not None:
            from sqlalchemy.engine import make_url

            url = make_url(url).set(host="127.0.0.1", port=self.sql.port).render_as_string(hide_password=False)
        chosen = dict(one.split("=", 1) for one in self.args.serve_setting)
        return service_env(url, self.amqp_url, self.emu.state, **{**chosen, **extra})

    async def quiet(self, *pids: int) -> dict[str, Any]:
        """Wait (bounded) for the rest of this shared machine to calm down before a measurement."""
        known = [os.getpid(), self.emu.pid, *pids, *[p for ps in substrate_pids().values() for p in ps]]
        result = await quiet_machine(known, max_wait=self.args.quiet_wait)
        if not result["quiet"]:
            self.notes.append(f"the machine was busy with other work (foreign {result['foreign_cores']} cores) "
                              f"after waiting {result['waited_seconds']} s")
        return result

    async def fresh_world(self, count: int, prefix: str, *, async_job_seconds: float = 0.0,
                          operation_seconds: float = 0.0) -> list[str]:
        """Reset the emulators (a small world keeps their O(n) lookups cheap), set the
        latency, seed `count` VMs; returns their vm ids."""
        async with EmulatorControl(self.emu.control_url) as control:
            await control.reset()
            await control.set_latency(async_job_seconds=async_job_seconds, operation_seconds=operation_seconds,
                                      api_seconds=0)
        began = time.monotonic()
        vms = await seed_vms(self.engine, self.emu.control_url, self.emu.state["appliance_vm_id"], count,
                             prefix=prefix)
        if count:
            self.notes.append(f"seeded {count} VMs for {prefix} in {time.monotonic() - began:.1f} s")
        return [v.vm_id for v in vms]


@contextlib.asynccontextmanager
async def open_bench(args: Any, out: dict[str, Any], log: Callable[[str], None],
                     queues: tuple[str, ...] = ()) -> AsyncIterator[Bench]:
    """What a run's phases share, set up and torn down: the code copied (`out["code"]`), the
    broker's vhost emptied (the service's queues and `queues`), the database recreated and
    migrated, the emulators, the statement-counting proxy, the bench's client."""
    from sqlalchemy.engine import make_url

    from adapters.db.engine import make_engine

    from .sqlcount import SqlCounter

    results: Path = args.results
    results.mkdir(parents=True, exist_ok=True)
    for old in results.glob("*.log"):
        old.unlink()
    out["code"] = git_state()
    out["code"].update(snapshot_code(results / "code"))
    set_code_dir(results / "code")
    log(f"code: HEAD {out['code']['head']} + work tree, copied to {results / 'code'} (sha256 {out['code']['sha256']})")
    log("broker: vhost failover-bench; database: failover_bench (recreated, migrated)")
    amqp = broker_url(args.amqp_url)
    await clean_broker(amqp, ["failover.commands", "failover.projector", "failover.dead", *queues])
    db_url = await fresh_database(args.database_url)
    engine = make_engine(db_url, pool_size=5)
    out["machine"]["mariadb"] = await db_variables(engine)
    out["machine"]["rabbitmq"] = rabbitmq_version()
    await ensure_users(engine)
    userstat_was = await set_userstat(engine, True)
    # with CloudStack's event bus emulated on the bench's broker, publishing only in the phase
    # that listens to it (`events_on`)
    emu = Emulators(results / "emulators.log", event_bus_url=amqp)
    await emu.start()
    async with EmulatorControl(emu.control_url) as control:
        await control.set_event_bus(False)
    parsed = make_url(db_url)
    sql = SqlCounter(parsed.host or "127.0.0.1", parsed.port or 3306)
    await sql.start()
    try:
        async with Client(amqp) as client:
            yield Bench(args=args, amqp_url=amqp, db_url=db_url, engine=engine, emu=emu, client=client,
                        results=results, sql=sql)
    finally:
        await sql.close()
        emu.stop()
        if userstat_was is not None and not userstat_was:
            await set_userstat(engine, False)
        await engine.dispose()


def throughput_env(bench: Bench, counted: bool = False) -> dict[str, str]:
    """Defaults as a user runs them, but the poll interval of the slow phase (0.5 s; zero
    latency means the first poll already finds each job done)."""
    return bench.env(counted=counted, FAILOVER_POLL_INTERVAL_SECONDS=str(bench.args.poll_interval))


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# --------------------------------------------------------------------------- probe


async def probe(bench: Bench, serve: Serve) -> dict[str, Any]:
    """One job alone: the emulator calls it makes (by step), the async waits on its critical
    path, and its events (count, types, body sizes)."""
    vm_ids = await bench.fresh_world(1, "probe")
    async with EmulatorControl(bench.emu.control_url) as control:
        before = await control.calls()
        since = before[-1]["seq"] if before else 0
        us0 = await user_stats(bench.engine, SERVICE_USER)
        sql0 = bench.sql.snapshot() if bench.sql is not None else None
        timings = await bench.client.burst(vm_ids)
        await bench.client.wait_all(timings, 60, "probe")
        require_all_completed(timings, "probe")
        calls = await control.calls(since=since)
    job_id = next(iter(timings.published))
    await _projected(bench.engine, [job_id], 30)
    us1 = await user_stats(bench.engine, SERVICE_USER)
    sql1 = bench.sql.snapshot() if bench.sql is not None else None
    async with bench.engine.connect() as conn:
        sent = (await conn.execute(text(
            "SELECT TIMESTAMPDIFF(MICROSECOND, created_at, published_at) / 1e3 FROM outbox "
            "WHERE job_id = :j AND published_at IS NOT NULL ORDER BY sequence"), {"j": job_id})).scalars().all()
    async with bench.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT sequence, event_type, body FROM outbox WHERE job_id = :j ORDER BY sequence"), {"j": job_id})).all()
    events = [(r.sequence, r.event_type, json.loads(r.body)) for r in rows]
    # segment the calls by step, with the StepStarted times
    starts = [(_epoch(b["occurred_at"]), b["step"]) for _, t, b in events if t == "StepStarted"]
    by_step: dict[str, list[str]] = {s: [] for _, s in starts}
    for c in calls:
        step = None
        for at, s in starts:
            if c["time"] >= at:
                step = s
        by_step.setdefault(step or "?", []).append(f"{c['api']}:{c['command']}")
    def waited(call: str) -> bool:
        api, _, command = call.partition(":")
        return command in (ASYNC_CS if api == "cloudstack" else ASYNC_VD)

    waits = [f"{c['api']}:{c['command']}" for c in calls if waited(f"{c['api']}:{c['command']}")]
    types: dict[str, int] = {}
    for _, t, _ in events:
        types[t] = types.get(t, 0) + 1
    sizes = [len(r.body.encode()) for r in rows]
    return {
        "job_id": job_id,
        "emulator_calls": len(calls),
        "calls_by_step": {s: len(v) for s, v in by_step.items()},
        "calls_by_step_detail": by_step,
        "async_waits": len(waits),
        "async_wait_calls": waits,
        "async_waits_by_step": {step: sum(map(waited, v)) for step, v in by_step.items()},
        "events": len(events),
        "events_by_type": types,
        "event_body_bytes": {"median": statistics.median(sizes), "min": min(sizes), "max": max(sizes)},
        "seconds": summarize(timings)["wall_seconds"],
        "request_to_accepted_ms": _ms(timings.latencies("JobAccepted")[0]),
        "request_to_completed_ms": _ms(timings.latencies("JobCompleted")[0]),
        "db_user_stats_delta": {k: us1[k] - us0[k] for k in us0},
        "outbox_commit_to_published_ms": [round(float(x), 1) for x in sent],
        "sql": sqlcount.delta(sql0, sql1, 1) if sql0 is not None and sql1 is not None else None,
    }


def _epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- throughput


async def _projected(engine: AsyncEngine, job_ids: list[str], timeout: float) -> None:
    stmt = text("SELECT COUNT(*) FROM job_tracking WHERE id IN :ids AND status IN "
                "('completed', 'failed', 'cancelled')").bindparams(bindparam("ids", expanding=True))

    async def check() -> bool:
        async with engine.connect() as conn:
            return int((await conn.execute(stmt, {"ids": job_ids})).scalar_one()) >= len(job_ids)

    await wait_until(check, timeout, f"{len(job_ids)} jobs to be projected as ended", interval=0.2)


async def publish_lag(engine: AsyncEngine, job_ids: list[str]) -> dict[str, Any]:
    """The outbox relay's delay: published_at - created_at of every event of these jobs (ms)."""
    async with engine.connect() as conn:
        lags = (await conn.execute(text(
            "SELECT TIMESTAMPDIFF(MICROSECOND, created_at, published_at) / 1e3 FROM outbox "
            "WHERE job_id IN :ids AND published_at IS NOT NULL").bindparams(
            bindparam("ids", expanding=True)), {"ids": job_ids})).scalars().all()
    values = [float(v) for v in lags]
    return {"events": len(values), "p50": quantile(values, 0.5), "p99": quantile(values, 0.99),
            "max": max(values) if values else None}


async def _job_rows(engine: AsyncEngine, job_ids: list[str]) -> dict[str, Any]:
    """Per job: events in the outbox, and the projector's lag on the terminal event."""
    out: dict[str, Any] = {}
    async with engine.connect() as conn:
        ev = (await conn.execute(text(
            "SELECT event_type, COUNT(*) n, AVG(LENGTH(body)) size FROM outbox WHERE job_id IN :ids "
            "GROUP BY event_type").bindparams(bindparam("ids", expanding=True)), {"ids": job_ids})).all()
        lag = (await conn.execute(text(
            "SELECT id, completed_at, updated_at FROM job_tracking WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)), {"ids": job_ids})).all()
        bodies = (await conn.execute(text(
            "SELECT LENGTH(body) FROM outbox WHERE job_id IN :ids").bindparams(
            bindparam("ids", expanding=True)), {"ids": job_ids[:50]})).scalars().all()
    total = sum(r.n for r in ev)
    out["events_total"] = int(total)
    out["events_by_type"] = {r.event_type: int(r.n) for r in ev}
    out["event_body_bytes_median"] = statistics.median(bodies) if bodies else None
    utc = datetime.UTC
    out["terminal_lag"] = [(r.updated_at - r.completed_at).total_seconds() for r in lag
                           if r.completed_at is not None and r.updated_at is not None]
    out["terminal_occurred"] = {r.id: r.completed_at.replace(tzinfo=utc).timestamp() for r in lag
                                if r.completed_at is not None}
    return out


def _serves(serve: Serve | list[Serve]) -> list[Serve]:
    return serve if isinstance(serve, list) else [serve]


async def throughput(bench: Bench, serve: Serve | list[Serve], count: int, label: str = "throughput",
                     counted: bool = False) -> dict[str, Any]:
    """`count` test failovers published at once, zero latency (to one or several serve
    processes: their CPU is added up)."""
    serves = _serves(serve)
    vm_ids = await bench.fresh_world(count, label)
    quiet = await bench.quiet(*(s.pid for s in serves))
    speed = python_probe()  # the machine's speed right before the burst (after the seeding and the quiet)
    metrics_before = [await s.metrics_text() for s in serves]
    status_before = await global_status(bench.engine)
    us0 = await user_stats(bench.engine, SERVICE_USER)
    sql0 = bench.sql.snapshot() if counted and bench.sql is not None else None
    meter = CpuMeter({"serve": [p for s in serves for p in s.pids()], "emulators": [bench.emu.pid], **substrate_pids()})
    grind = Callgrind(bench.args.mariadb_callgrind) if bench.args.mariadb_callgrind else None
    if grind is not None:
        grind.zero()
    meter.start()
    timings = await bench.client.burst(vm_ids)
    await bench.client.wait_all(timings, bench.args.deadline, label)
    job_ids = list(timings.published)
    await _projected(bench.engine, job_ids, 120)
    cpu = meter.stop()
    instructions = grind.count() if grind is not None else None
    status_after = await global_status(bench.engine)
    us1 = await user_stats(bench.engine, SERVICE_USER)
    sql1 = bench.sql.snapshot() if counted and bench.sql is not None else None
    metrics_after = [await s.metrics_text() for s in serves]
    require_all_completed(timings, label)
    s = summarize(timings)
    rows = await _job_rows(bench.engine, job_ids)
    wall = s["wall_seconds"]
    accepted = timings.latencies("JobAccepted")
    completed = timings.latencies("JobCompleted")
    relay = [timings.seen[j]["JobCompleted"] - t for j, t in rows["terminal_occurred"].items()
             if "JobCompleted" in timings.seen.get(j, {})]
    db = status_delta(status_before, status_after)
    us = {k: us1[k] - us0[k] for k in us0}
    lag_all = _histogram_delta(metrics_before, metrics_after, "failover_projector_lag_seconds")
    return {
        "jobs": count,
        "wall_seconds": round(wall, 3),
        "jobs_per_second": round(count / wall, 2),
        "events_per_job": round(rows["events_total"] / count, 2),
        "events_by_type_per_job": {k: round(v / count, 2) for k, v in rows["events_by_type"].items()},
        "events_per_second": round(rows["events_total"] / wall, 1),
        "event_body_bytes_median": rows["event_body_bytes_median"],
        "request_to_accepted_ms": {"p50": _ms(quantile(accepted, 0.5)), "p99": _ms(quantile(accepted, 0.99))},
        "request_to_completed_ms": {"p50": _ms(quantile(completed, 0.5)), "p99": _ms(quantile(completed, 0.99))},
        "projector_lag_terminal_ms": {"p50": _ms(quantile(rows["terminal_lag"], 0.5)),
                                      "p99": _ms(quantile(rows["terminal_lag"], 0.99))},
        "projector_lag_all_events_ms_histogram": {k: _ms(v) if k.startswith("p") else v for k, v in lag_all.items()},
        "completed_event_to_client_ms": {"p50": _ms(quantile(relay, 0.5)), "p99": _ms(quantile(relay, 0.99))},
        "db_server_wide_delta": db,
        "db_server_wide_per_job": {k: round(v / count, 2) for k, v in db.items()},
        "db_user_stats_delta": us,
        "db_per_job": {k: round(v / count, 3) for k, v in us.items()},
        "serve_cpu_ms_per_job": round(1000 * cpu["cpu_seconds"]["serve"] / count, 1),
        # a server under callgrind (--mariadb-callgrind): its instructions, whatever the machine's speed
        "mariadb_instructions_per_job": round(instructions / count) if instructions is not None else None,
        "serve_gc_per_job": _gc_delta(metrics_before, metrics_after, count),
        "cpu": cpu,
        "publish_seconds": round(s["publish_seconds"], 3),
        "sql": sqlcount.delta(sql0, sql1, count) if sql0 is not None and sql1 is not None else None,
        "quiet_wait": quiet,
        "python_probe_ms": speed,
        "outbox_commit_to_published_ms": await publish_lag(bench.engine, job_ids),
    }


def _sums(texts: list[str], names: tuple[str, ...], key: Callable[[Any], str]) -> dict[tuple[str, str], float]:
    """The samples of `names` in these scrapes of /metrics (one per serve process), added up by
    (sample name, `key(sample)`)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in (f for txt in texts for f in text_string_to_metric_families(txt)):
        for x in family.samples:
            if x.name in names:
                k = (x.name, key(x))
                out[k] = out.get(k, 0.0) + x.value
    return out


def _histogram_delta(before: list[str], after: list[str], name: str) -> dict[str, Any]:
    """Quantiles of the observations made between two scrapes of a histogram (of each serve
    process, added up)."""
    names = (name + "_bucket", name + "_count", name + "_sum")
    b0, b1 = (_sums(t, names, lambda x: x.labels.get("le", "")) for t in (before, after))
    lines = [f"# TYPE {name} histogram"]
    for (sample, le), v in b1.items():
        d = v - b0.get((sample, le), 0.0)
        lines.append(f'{sample}{{le="{le}"}} {d}' if sample.endswith("_bucket") else f"{sample} {d}")
    return histogram_quantiles("\n".join(lines) + "\n", name)


def _gc_delta(before: list[str], after: list[str], jobs: int) -> dict[str, Any]:
    """Serve's garbage collections between two scrapes (`failover_gc_pause_seconds`, timed by
    the service itself, every process added up): per job, by generation, how many and the CPU
    they took (a pause is CPU: the collector runs in the loop's thread)."""
    names = ("failover_gc_pause_seconds_count", "failover_gc_pause_seconds_sum")
    t0, t1 = (_sums(t, names, lambda x: x.labels.get("generation", "?")) for t in (before, after))

    def per_job(name: str, gen: str, scale: float) -> float:
        return round(scale * (t1.get((name, gen), 0.0) - t0.get((name, gen), 0.0)) / jobs, 3)

    return {g: {"collections_per_job": per_job(names[0], g, 1), "ms_per_job": per_job(names[1], g, 1000)}
            for g in sorted({g for _, g in t1})}


# --------------------------------------------------------------------------- paced


async def paced(bench: Bench, serve: Serve | list[Serve], rate: float, seconds: float) -> dict[str, Any]:
    """Requests at `rate` per second for `seconds`: the latency a user sees when the
    service is not saturated."""
    serves = _serves(serve)
    count = max(1, int(rate * seconds))
    vm_ids = await bench.fresh_world(count, "paced")
    quiet = await bench.quiet(*(s.pid for s in serves))
    meter = CpuMeter({"serve": [p for s in serves for p in s.pids()], "emulators": [bench.emu.pid], **substrate_pids()})
    meter.start()
    timings = await bench.client.paced(vm_ids, rate)
    await bench.client.wait_all(timings, bench.args.deadline, "paced")
    cpu = meter.stop()
    require_all_completed(timings, "paced")
    accepted = timings.latencies("JobAccepted")
    completed = timings.latencies("JobCompleted")
    s = summarize(timings)
    return {
        "jobs": count, "rate_offered": rate, "seconds_offered": seconds, "quiet_wait": quiet,
        "publish_seconds": round(s["publish_seconds"], 2),
        "request_to_accepted_ms": {"p50": _ms(quantile(accepted, 0.5)), "p99": _ms(quantile(accepted, 0.99)),
                                   "max": _ms(max(accepted))},
        "request_to_completed_ms": {"p50": _ms(quantile(completed, 0.5)), "p99": _ms(quantile(completed, 0.99))},
        "serve_cpu_ms_per_job": round(1000 * cpu["cpu_seconds"]["serve"] / count, 1),
        "cpu": cpu,
        "outbox_commit_to_published_ms": await publish_lag(bench.engine, list(timings.published)),
    }


# --------------------------------------------------------------------------- slow


async def slow(bench: Bench, count: int, latency: float, critical_waits: int, log: Path,
               processes: int = 1, profile_to: Path | None = None, **env: str) -> dict[str, Any]:
    """`count` jobs at once, every async job and daemon operation taking `latency` seconds
    (`env`: settings of this run's serve processes, e.g. FAILOVER_POLL_BATCH_FROM). With more
    than one process, RSS is the first one's (each runs about `count / processes` jobs). With
    `profile_to`, the (first) serve runs under py-spy, which writes its raw stacks there."""
    vm_ids = await bench.fresh_world(count, "slow", async_job_seconds=latency, operation_seconds=latency)
    serves = [Serve(bench.env(FAILOVER_MAX_CONCURRENT_JOBS=str(max(count, 200)),
                              FAILOVER_POLL_INTERVAL_SECONDS=str(bench.args.poll_interval), **env),
                    log if processes == 1 else log.with_name(f"{log.stem}-{i + 1}{log.suffix}"),
                    profile_to=profile_to if i == 0 else None)
              for i in range(processes)]
    serve = serves[0]
    try:
        for one in serves:
            await one.start()
        quiet = await bench.quiet(serve.pid)
        idle = proc_status(serve.pid)
        samples: list[tuple[float, int, int]] = []  # (t, rss kB, jobs in flight)
        stop = asyncio.Event()

        async def sample() -> None:
            stmt = text("SELECT COUNT(*) FROM failover_jobs WHERE ended = 0 AND status <> 'pending'")
            while not stop.is_set():
                async with bench.engine.connect() as conn:
                    running = int((await conn.execute(stmt)).scalar_one())
                samples.append((time.time(), proc_status(serve.pid).get("VmRSS", 0), running))
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except TimeoutError:
                    pass

        meter = CpuMeter({"serve": [p for one in serves for p in one.pids()], "emulators": [bench.emu.pid], **substrate_pids()})
        meter.start()
        sampler = asyncio.create_task(sample())
        timings = await bench.client.burst(vm_ids)
        await bench.client.wait_all(timings, max(bench.args.deadline, critical_waits * latency * 6 + 120), "slow")
        stop.set()
        await sampler
        cpu = meter.stop()
        peak = proc_status(serve.pid)
    finally:
        for one in serves:
            await one.stop()
    async with EmulatorControl(bench.emu.control_url) as control:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
    require_all_completed(timings, "slow")
    s = summarize(timings)
    critical = critical_waits * latency
    in_flight = max((n for _, _, n in samples), default=0)
    rss_at_peak = max((r for _, r, n in samples if n >= in_flight), default=0)
    hwm = peak.get("VmHWM", 0)
    completed = timings.latencies("JobCompleted")
    return {
        "jobs": count, "processes": processes, "latency_seconds": latency, "async_waits_per_job": critical_waits, "quiet_wait": quiet,
        "critical_path_seconds": critical,
        "wall_seconds": round(s["wall_seconds"], 2),
        "wall_over_critical_path": round(s["wall_seconds"] / critical, 3),
        "request_to_completed_s": {"p50": round(quantile(completed, 0.5) or 0, 2),
                                   "p99": round(quantile(completed, 0.99) or 0, 2)},
        "idle_rss_kb": idle.get("VmRSS"), "peak_rss_kb": hwm, "rss_at_peak_in_flight_kb": rss_at_peak,
        "peak_jobs_in_flight": in_flight,
        "rss_per_job_kb": round((hwm - idle.get("VmRSS", 0)) / in_flight, 1) if in_flight and processes == 1 else None,
        "serve_cpu_ms_per_job": round(1000 * cpu["cpu_seconds"]["serve"] / count, 1),
        "cpu": cpu,
        "outbox_commit_to_published_ms": await publish_lag(bench.engine, list(timings.published)),
        **await _ramp_and_runs(bench.engine, list(timings.published), timings),
        "step_seconds": await _step_seconds(bench.engine, list(timings.published)),
    }


EVENTS_EXCHANGE = "cloudstack-events"  # the emulated CloudStack event bus's exchange (its default)


@contextlib.asynccontextmanager
async def events_on(bench: Bench) -> AsyncIterator[dict[str, str]]:
    """The emulated CloudStack publishes its jobs' ends meanwhile; yields the serve setting
    that listens to them."""
    async with EmulatorControl(bench.emu.control_url) as control:
        await control.set_event_bus(True)
        try:
            yield {"FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE": EVENTS_EXCHANGE}
        finally:
            await control.set_event_bus(False)


async def _step_seconds(engine: AsyncEngine, job_ids: list[str]) -> dict[str, dict[str, float]]:
    """Each step's own time (StepStarted -> StepCompleted or StepSkipped, as written to the outbox), p50 and
    max over the jobs: set against the step's waits (the probe's `async_waits_by_step`), what
    the service added in that step (its calls, the poll rounds, the turns behind other jobs)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT job_id, sequence, event_type, JSON_VALUE(body, '$.step'), "
            "TIMESTAMPDIFF(MICROSECOND, '2000-01-01', created_at) / 1e6 FROM outbox "  # (no time zone in it)
            "WHERE job_id IN :ids AND event_type IN ('StepStarted', 'StepCompleted', 'StepSkipped')").bindparams(
            bindparam("ids", expanding=True)), {"ids": job_ids})).all()
    began: dict[tuple[str, str], float] = {}
    took: dict[str, list[float]] = {}
    for job_id, _, kind, step, at in sorted(rows, key=lambda r: (r[0], r[1])):  # each job's events in order
        if kind == "StepStarted":
            began[(job_id, step)] = float(at)
        elif (job_id, step) in began:
            took.setdefault(step, []).append(float(at) - began.pop((job_id, step)))
    return {step: {"p50": round(quantile(v, 0.5) or 0, 2), "max": round(max(v), 2)} for step, v in took.items()}


async def _ramp_and_runs(engine: AsyncEngine, job_ids: list[str], timings: Timings) -> dict[str, Any]:
    """The slow phase's wall in two parts: the ramp (from the first job's record, moments after
    the first request, until the last job began its first step: taking the commands and the
    first steps of the jobs before it) and each job's own run (its first step's start to its
    end, in the database's clock: the waits, what the service does between them, and the turns
    it waits behind other jobs); and how many jobs began in each 20 s."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT TIMESTAMPDIFF(MICROSECOND, (SELECT MIN(created_at) FROM failover_jobs WHERE job_id IN :ids), "
            "started_at) / 1e6, TIMESTAMPDIFF(MICROSECOND, started_at, completed_at) / 1e6 FROM failover_jobs "
            "WHERE job_id IN :ids AND started_at IS NOT NULL AND completed_at IS NOT NULL").bindparams(
            bindparam("ids", expanding=True)), {"ids": job_ids})).all()
    starts, runs = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    accepted = timings.latencies("JobAccepted")

    def pair(values: list[float]) -> dict[str, float | None]:
        return {"p50": round(quantile(values, 0.5) or 0, 2), "max": round(max(values), 2) if values else None}

    per_20s = Counter(int(one // 20) * 20 for one in starts)  # jobs whose first step began in each 20 s
    return {"request_to_accepted_s": pair(accepted), "start_after_first_request_s": pair(starts),
            "job_run_s": pair(runs), "started_per_20s": dict(sorted(per_20s.items()))}
