"""The one table (rich on the terminal, Markdown in bench/RESULTS.md) and the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# the variants run beside the default serve (whose intake runs in a thread of its own): the
# key of their results, the setting and its value, what the table calls them
INTAKES = (("_intake", "FAILOVER_INTAKE_PROCESS=true", "intake process"),
           ("_loop", "FAILOVER_INTAKE_THREAD=false", "intake in serve's loop"))


def _f(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2f}"
    return f"{v}{unit}"


def _over_waits(phase: dict[str, Any], waits: dict[str, int]) -> str:
    """A slow phase's steps, in order, each as `step (waits) +p50 / +max`: its own time less
    its waits times the latency (what the service added to the step)."""
    steps, latency = phase["step_seconds"], phase["latency_seconds"]
    return "; ".join(f"{step} ({waits.get(step, 0)}) {steps[step]['p50'] - waits.get(step, 0) * latency:+.2f} / "
                     f"{steps[step]['max'] - waits.get(step, 0) * latency:+.2f}" for step in waits if step in steps)


def _pair(d: dict[str, Any] | None, unit: str = " ms") -> str:
    if not d:
        return "-"
    return f"{_f(d.get('p50'))} / {_f(d.get('p99'))}{unit}"


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def _kinds(sql: dict[str, Any], kind: str) -> float:
    return sum(v for k, v in sql.get("per_job", {}).items() if k == kind)


def _sql_line(sql: dict[str, Any]) -> str:
    if not sql:
        return "-"
    return (f"{_f(sql['round_trips_per_job'])} ({_f(_kinds(sql, 'SELECT'))} / {_f(_kinds(sql, 'INSERT'))} / "
            f"{_f(_kinds(sql, 'UPDATE'))})")


def _celery_commits(best: dict[str, Any]) -> str:
    db = best.get("db_per_job")
    if not db:
        return "-"
    return _f(round(db["other_commands"] - db["rollback_transactions"], 2))  # COMMITs: the "other" statements


def _celery_sql(best: dict[str, Any]) -> str:
    db = best.get("db_per_job")
    if not db:
        return "-"
    total = db["select_commands"] + db["update_commands"] + db["other_commands"]
    return f"{_f(round(total, 2))} ({_f(db['select_commands'])} / {_f(db['update_commands'])} / 0)"


def rows(out: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(measure, service, Celery, target, met)."""
    t, p, s, d = out["throughput"], out["paced"], out["slow"], out["derived"]
    sql = (out.get("profile_run") or {}).get("sql") or {}
    sub = out["substrate"]
    cel = out.get("celery") or {}
    tg = d["targets"]
    best_t = max(cel.get("throughput") or [{}], key=lambda r: r.get("jobs_per_second", 0))
    best_s = min(cel.get("slow") or [{}], key=lambda r: r.get("wall_seconds", 1e9))

    def met(key: str) -> str:
        return ("yes" if tg[key]["met"] else "NO") if key in tg else "-"

    return [
        ("1. Throughput: jobs/s to JobCompleted", _f(t["jobs_per_second"]),
         f"{_f(best_t.get('jobs_per_second'))} ({best_t.get('pool', '-')} -c {best_t.get('concurrency', '-')})",
         ">= 2x Celery", (f"{_f(d.get('throughput_over_celery'))}x; by the median of the pairs below"
                          if d.get("throughput_over_celery_pairs") else
                          met("throughput / Celery >= 2") + f" ({_f(d.get('throughput_over_celery'))}x)")),
        *_pair_rows(out),
        ("   wall time of the burst", _f(t["wall_seconds"], " s"), _f(best_t.get("wall_seconds"), " s"), "", ""),
        *_speed_rows(t, best_t),
        ("   CPU per job (serve process / Celery worker)", _f(t["serve_cpu_ms_per_job"], " ms"),
         _f(best_t.get("worker_cpu_ms_per_job"), " ms"), "", "serve is one Python process"),
        *_gc_rows(t),
        *([("   MariaDB instructions per job (the server under callgrind, --mariadb-callgrind)",
            f"{t['mariadb_instructions_per_job'] / 1e6:,.2f} M", "-", "", "repeatable where CPU time swings")]
          if t.get("mariadb_instructions_per_job") else []),
        ("   machine CPU per job outside serve / the Celery worker (emulators + RabbitMQ + MariaDB)",
         _f(d.get("cpu_outside_serve_ms_per_job"), " ms"), _f(d.get("celery_cpu_outside_worker_ms_per_job"), " ms"),
         "", "the same burst"),
        ("   jobs/s these cores allow even with a zero-CPU orchestrator (cores / the line above)",
         _f(d.get("jobs_per_second_with_a_free_orchestrator")), "", "",
         f"2x Celery = {_f(d.get('twice_celery_jobs_per_second'))}" if d.get("twice_celery_jobs_per_second") else ""),
        *_intake_rows(out, "throughput"),
        *_multi_throughput_rows(out),
        ("   events/s (outbox rows)", _f(t["events_per_second"]), "-", "", ""),
        ("   request -> JobAccepted p50 / p99", _pair(t["request_to_accepted_ms"]), "-", "", ""),
        ("   request -> JobCompleted p50 / p99", _pair(t["request_to_completed_ms"]),
         _pair(best_t.get("request_to_completed_ms")), "", ""),
        ("   projector lag, terminal event p50 / p99", _pair(t["projector_lag_terminal_ms"]), "-", "", ""),
        ("   projector lag, all events p50 / p99 (histogram)",
         _pair(t["projector_lag_all_events_ms_histogram"]), "-", "", ""),
        ("   JobCompleted committed -> seen on the bus p50 / p99", _pair(t["completed_event_to_client_ms"]),
         "-", "", ""),
        ("   any event committed -> published by the relay p50 / p99", _pair(t.get("outbox_commit_to_published_ms")),
         "-", "", "the relay's backlog"),
        ("   one job alone: request -> JobAccepted / -> JobCompleted",
         f"{_f(out['probe'].get('request_to_accepted_ms'))} / {_f(out['probe'].get('request_to_completed_ms'))} ms",
         "-", "", "no queue: the service's own latency"),
        ("   one job alone: event committed -> published by the relay, median / max",
         _pair({"p50": _median(out["probe"]["outbox_commit_to_published_ms"]),
                "p99": max(out["probe"]["outbox_commit_to_published_ms"] or [0])}), "-", "", "p99 column = max"),
        ("3. Broker: confirmed persistent publish+consume", _f(sub["broker"]["messages_per_second"], " msg/s"),
         "", "", f"{sub['broker']['body_bytes']} B bodies"),
        ("   Database: single-row commits", _f(sub["db"]["commits_per_second"], " /s"), "", "",
         f"{sub['db']['connections']} connections"),
        ("   messages per job (1 command + events)", _f(d["messages_per_job"]), "-", "", ""),
        ("   transactions (COMMITs) per job", _f(d["transactions_per_job"]), _celery_commits(best_t), "",
         "counted on the wire" if "wire" in d.get("transactions_source", "") else "server-wide Com_commit"),
        ("   SQL round trips per job: requests + pings (statements in them: SELECT / INSERT / UPDATE)",
         _sql_line(sql), _celery_sql(best_t), "", "the profiled burst" if sql else ""),
        ("   read-only transactions (ROLLBACK) / pings per job",
         f"{_f(sql.get('rollbacks_per_job'))} / {_f(sql.get('pings_per_job'))}" if sql else "-",
         _f((best_t.get("db_per_job") or {}).get("rollback_transactions")), "", ""),
        ("   ceiling = min(broker/msgs, db/commits)", _f(d["ceiling_jobs_per_second"], " jobs/s"), "", "",
         f"bound by the {d['bound_by']}"),
        ("   throughput / ceiling", _f(d["throughput_over_ceiling"]), "", ">= 0.5",
         met("throughput_over_ceiling >= 0.5")),
        (f"2. Slow: {s['jobs']} jobs, {s['latency_seconds']:g} s per wait: wall", _f(s["wall_seconds"], " s"),
         f"{_f(best_s.get('wall_seconds'), ' s')} ({best_s.get('pool', '-')})", "", ""),
        (f"   critical path ({s['async_waits_per_job']} waits x {s['latency_seconds']:g} s)",
         _f(s["critical_path_seconds"], " s"), "same", "", ""),
        ("   wall / critical path", _f(s["wall_over_critical_path"]), _f(best_s.get("wall_over_critical_path")),
         "<= 1.2", met("slow wall / critical path <= 1.2")),
        *_slow_baseline_rows(out),
        ("   event committed -> published by the relay p50 / p99", _pair(s.get("outbox_commit_to_published_ms")),
         "-", "", ""),
        ("   serve RSS idle / peak (VmHWM)", f"{_f(s['idle_rss_kb'])} / {_f(s['peak_rss_kb'])} kB",
         f"{_f(best_s.get('idle_rss_kb'))} / {_f(best_s.get('peak_rss_kb'))} kB", "", ""),
        (f"   RSS per job in flight ({s['peak_jobs_in_flight']} in flight)", _f(s["rss_per_job_kb"], " kB"),
         _f(round((best_s['peak_rss_kb'] - best_s['idle_rss_kb']) / best_s['jobs'], 1)
            if best_s.get("jobs") else None, " kB"), "< 150 kB", met("RSS per job in flight < 150 kB")),
        (f"Paced: {p['rate_offered']:g}/s for {p['seconds_offered']:g} s: request -> JobAccepted p50 / p99",
         _pair(p["request_to_accepted_ms"]), "-", "p99 < 50 ms", met("paced p99 request->JobAccepted < 50 ms")),
        ("   request -> JobCompleted p50 / p99", _pair(p["request_to_completed_ms"]), "-", "", ""),
        *_intake_rows(out, "paced"),
        *_multi_paced_rows(out),
        *_history_rows(out),
    ]


def _pair_rows(out: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    d, pairs = out["derived"], out.get("ratio_pairs") or []
    ratios = d.get("throughput_over_celery_pairs")
    if not pairs or not ratios:
        return []
    key = f"throughput / Celery >= 2, median of {len(ratios)} pairs"
    met = d["targets"].get(key, {}).get("met")
    def side(p: dict[str, Any]) -> str:
        return f"{_f(p['jobs_per_second'])} (probe {_f(p['python_probe_ms'], ' ms')})"
    return [
        ("   the two bursts again, back to back: jobs/s (the machine's speed probe just before)",
         "; ".join(side(p["service"]) for p in pairs), "; ".join(side(p["celery"]) for p in pairs), "",
         "ratios " + ", ".join(f"{_f(r)}x" for r in ratios[1:]) + " (Celery first in the odd pairs)"),
        (f"   the ratio, median of {len(ratios)} pairs (the first burst's pair included)",
         f"{_f(d['throughput_over_celery_median'])}x", "", ">= 2x Celery",
         ("yes" if met else "NO") + f" ({', '.join(f'{_f(r)}x' for r in ratios)})"),
    ]


def _gc_rows(t: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    gc = t.get("serve_gc_per_job")
    if not gc:
        return []
    gens = sorted(gc)
    return [(f"   of it, serve's garbage collections per job (generation {' / '.join(gens)}): count; ms",
             f"{' / '.join(_f(gc[g]['collections_per_job']) for g in gens)}; "
             f"{' / '.join(_f(gc[g]['ms_per_job']) for g in gens)} ms", "-", "",
             "timed by the service (failover_gc_pause_seconds)")]


def _history_rows(out: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    h = out.get("history")
    if not h:
        return []
    b, a, r = h["before"], h["after"], h["ratios_after_over_before"]

    def both(key: str, unit: str = "") -> str:
        def side(d: dict[str, Any]) -> str:  # the mean (each burst)
            return f"{_f(d[key])} ({', '.join(_f(x[key]) for x in d['runs'])})"
        return f"{side(b)} / {side(a)}{unit}"

    return [
        (f"History: {h['repeats']} bursts before / after adding {h['added']['jobs']:,} finished jobs "
         f"({h['added']['rows']:,} rows), mean (each): jobs/s", both("jobs_per_second"), "-", "",
         f"after / before {_f(r['jobs_per_second'])}"),
        ("   CPU per job: serve, before / after", both("serve_cpu_ms_per_job", " ms"), "-", "",
         f"after / before {_f(r['serve_cpu_ms_per_job'])}"),
        ("   CPU per job: MariaDB, before / after", both("mariadb_cpu_ms_per_job", " ms"), "-", "",
         f"after / before {_f(r['mariadb_cpu_ms_per_job'])}"),
        ("   MariaDB per job, before / after: rows read by index; by scan; pages read from disk",
         f"{_f(b['rows_read_by_index_per_job'])} / {_f(a['rows_read_by_index_per_job'])}; "
         f"{_f(b['rows_read_by_scan_per_job'])} / {_f(a['rows_read_by_scan_per_job'])}; "
         f"{_f(b['pages_read_from_disk_per_job'])} / {_f(a['pages_read_from_disk_per_job'])}", "-", "",
         "server-wide counters"),
    ]


def _slow_baseline_rows(out: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    s, b, m = out["slow"], out.get("slow_one_poll_per_wait"), out.get("slow_multi")
    rows: list[tuple[str, str, str, str, str]] = []
    if s.get("job_run_s"):
        rows.append(("   the wall in two parts: first job recorded -> the last job's first step; each job's own run "
                     "p50 / max", f"{_f(s['start_after_first_request_s']['max'], ' s')}; "
                     f"{_f(s['job_run_s']['p50'])} / {_f(s['job_run_s']['max'], ' s')}", "-", "",
                     "the ramp, then the waits and the turns behind other jobs"))
    waits = (out.get("probe") or {}).get("async_waits_by_step") or {}
    if s.get("step_seconds") and waits:
        rows.append(("   each step's own time over its waits (how many): p50 / max, s", _over_waits(s, waits), "-", "",
                     "what the service added to each step: its calls and commits, the poll rounds (each wait "
                     "ends at the first round after its work did), the turns behind other jobs"))
    d = out.get("derived") or {}
    if d.get("slow_cpu_over_cores_over_critical_path") is not None:
        serve = d.get("slow_serve_cpu_over_critical_path")
        rows.append(("   the floors the CPU sets: (serve + emulators + RabbitMQ + MariaDB) / cores; serve alone "
                     "(one process), each over the critical path",
                     f"{_f(d['slow_cpu_over_cores_over_critical_path'])}; {_f(serve)}", "-", "",
                     f"{_f(d['slow_cpu_seconds'], ' s')} of CPU on {out['machine']['nproc']} cores: a wall this "
                     "short needs every core busy all through"))
    f = out.get("slow_floor")
    if f:
        rows.append((f"   the same with {f['jobs']} jobs at once: wall / critical path",
                     f"{_f(f['wall_seconds'], ' s')} / {_f(f['wall_over_critical_path'])}", "-", "",
                     f"the waits' own cost: poll rounds every {_f(out['settings'].get('poll_interval'), ' s')}, "
                     "the steps' calls"))
    for key, setting, what in INTAKES:
        si = out.get("slow" + key)
        if si:
            rows.append((f"   with the {what} ({setting}): wall / critical path",
                         f"{_f(si['wall_seconds'], ' s')} / {_f(si['wall_over_critical_path'])}", "-", "<= 1.2",
                         "yes" if si["wall_over_critical_path"] <= 1.2 else "NO"))
    e = out.get("slow_events")
    if e:
        rows.append(("   with CloudStack's event bus (FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE): wall / critical path",
                     f"{_f(e['wall_seconds'], ' s')} / {_f(e['wall_over_critical_path'])}", "-", "<= 1.2",
                     "yes" if e["wall_over_critical_path"] <= 1.2 else "NO"))
        if e.get("step_seconds") and waits:
            rows.append(("   with CloudStack's event bus: each step's own time over its waits, p50 / max, s",
                         _over_waits(e, waits), "-", "",
                         "the CloudStack steps' waits end on its events; the Volume Daemon's still at the rounds"))
    if m:
        rows.append((f"   with {m['processes']} serve processes: wall / critical path",
                     f"{_f(m['wall_seconds'], ' s')} / {_f(m['wall_over_critical_path'])}", "-", "<= 1.2",
                     "yes" if m["wall_over_critical_path"] <= 1.2 else "NO"))
    if not b:
        return rows
    serve, base = s["cpu"]["cpu_seconds"].get("serve"), b["cpu"]["cpu_seconds"].get("serve")
    rows += [
        ("   same, one poll per wait (no shared poller): wall / critical path",
         f"{_f(b['wall_seconds'], ' s')} / {_f(b['wall_over_critical_path'])}", "-", "",
         f"shared poller: {_f(round(b['wall_seconds'] / s['wall_seconds'], 2))}x faster"),
        ("   serve CPU: shared poller / one poll per wait", f"{_f(serve, ' s')} / {_f(base, ' s')}", "-", "", ""),
    ]
    return rows


def _multi_throughput_rows(out: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    tm, d = out.get("throughput_multi"), out["derived"]
    if not tm:
        return []
    key = f"throughput / Celery >= 2, {tm['processes']} serve processes"
    met = d["targets"].get(key)
    return [
        (f"   with {tm['processes']} serve processes side by side: jobs/s", _f(tm["jobs_per_second"]), "",
         ">= 2x Celery", (("yes" if met["met"] else "NO") + f" ({_f(met['value'])}x)") if met else ""),
        (f"   with {tm['processes']} serve processes: CPU per job (all of them) / request -> JobAccepted p50 / p99",
         f"{_f(tm['serve_cpu_ms_per_job'], ' ms')} / {_pair(tm['request_to_accepted_ms'])}", "", "", ""),
    ]


def _intake_rows(out: dict[str, Any], phase: str) -> list[tuple[str, str, str, str, str]]:
    """The `phase` ("throughput" or "paced") rows of each intake variant that ran."""
    rows: list[tuple[str, str, str, str, str]] = []
    for key, setting, what in INTAKES:
        r, targets = out.get(phase + key), out["derived"]["targets"]
        if not r:
            continue
        if phase == "paced":
            met = targets.get(f"paced p99 request->JobAccepted < 50 ms, {what}")
            rows += [(f"   with the {what} ({setting}): request -> JobAccepted p50 / p99",
                      _pair(r["request_to_accepted_ms"]), "-", "p99 < 50 ms",
                      ("yes" if met["met"] else "NO") if met else ""),
                     (f"   with the {what}: request -> JobCompleted p50 / p99",
                      _pair(r["request_to_completed_ms"]), "-", "", "")]
            continue
        met = targets.get(f"throughput / Celery >= 2, {what}")
        rows += [(f"   with the {what} ({setting}): jobs/s", _f(r["jobs_per_second"]), "",
                  ">= 2x Celery", (("yes" if met["met"] else "NO") + f" ({_f(met['value'])}x)") if met else ""),
                 (f"   with the {what}: CPU per job ({'both processes' if key == '_intake' else 'serve'}) / "
                  "request -> JobAccepted p50 / p99",
                  f"{_f(r['serve_cpu_ms_per_job'], ' ms')} / {_pair(r['request_to_accepted_ms'])}", "", "", "")]
    return rows


def _multi_paced_rows(out: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    pm, d = out.get("paced_multi"), out["derived"]
    if not pm:
        return []
    key = f"paced p99 request->JobAccepted < 50 ms, {pm['processes']} serve processes"
    met = d["targets"].get(key)
    return [
        (f"   with {pm['processes']} serve processes: request -> JobAccepted p50 / p99",
         _pair(pm["request_to_accepted_ms"]), "-", "p99 < 50 ms", ("yes" if met["met"] else "NO") if met else ""),
        (f"   with {pm['processes']} serve processes: request -> JobCompleted p50 / p99",
         _pair(pm["request_to_completed_ms"]), "-", "", ""),
    ]


def render(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"failover-orchestrator benchmark, {out['date']} "
                        f"({out['machine']['nproc']} CPU {out['machine']['cpu_model']}, {out['machine']['ram_gib']} GiB)")
    for col in ("measure", "service", "Celery (best pool)", "target", "met / note"):
        table.add_column(col, overflow="fold")
    for r in rows(out):
        table.add_row(*r)
    Console(width=160).print(table)
    if out.get("celery"):
        cel = Table(title="Celery pools tried")
        for col in ("phase", "pool", "concurrency", "jobs/s", "wall s", "p50 / p99 to completed ms", "peak RSS kB"):
            cel.add_column(col)
        for phase in ("throughput", "slow"):
            for r in out["celery"][phase]:
                cel.add_row(phase, r["pool"], str(r["concurrency"]), _f(r["jobs_per_second"]), _f(r["wall_seconds"]),
                            _pair(r["request_to_completed_ms"], ""), _f(r["peak_rss_kb"]))
        Console(width=160).print(cel)


def _speed_rows(t: dict[str, Any], best_t: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The machine's Python speed just before the service's burst and Celery's: the ratio of
    the two rates holds only while the machine ran both at one speed."""
    ours, theirs = t.get("python_probe_ms"), best_t.get("python_probe_ms")
    if not ours:
        return []
    note = "a fixed piece of Python, lower is faster"
    if theirs:
        drift = theirs / ours - 1
        if abs(drift) > 0.10:
            note = (f"the machine ran {abs(drift):.0%} {'slower' if drift > 0 else 'faster'} for Celery: "
                    "the ratio above does not hold")
    return [("   the machine's speed just before the burst (python_probe)", _f(ours, " ms"),
             _f(theirs, " ms") if theirs else "-", "", note)]


def markdown(out: dict[str, Any]) -> str:
    m = out["machine"]
    lines = [
        "# Benchmark results (latest run)",
        "",
        f"- date: {out['date']}",
        f"- command: `{out['command']}` (took {out['total_seconds']} s)",
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Python {m['python']}, "
        f"kernel {m['kernel']}",
        *([f"- the machine's speed at the start / end: {probe.get('start', '?')} / {probe.get('end', '?')} ms for a "
           "fixed piece of Python (bench/infra.py `python_probe`, best of 7; lower is faster): compare runs on "
           "other machines by it"] if (probe := m.get("python_probe_ms")) else []),
        f"- code measured: HEAD {out.get('code', {}).get('head', '?')}; files changed in the work tree outside "
        f"bench/ at the time: {', '.join(out.get('code', {}).get('changed_outside_bench', [])) or 'none'}",
        f"- RabbitMQ {m.get('rabbitmq', '?')}, MariaDB {m.get('mariadb', {}).get('version', '?')} "
        f"(innodb_flush_log_at_trx_commit={m.get('mariadb', {}).get('innodb_flush_log_at_trx_commit', '?')}, "
        f"log_bin={m.get('mariadb', {}).get('log_bin', '?')})",
        "- everything (broker, database, emulators, serve, Celery, the bench client) on this one machine",
        "",
        "| measure | service | Celery (best pool) | target | met / note |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(out)]
    if out.get("celery"):
        lines += ["", "Celery pools tried:", "", "| phase | pool | concurrency | jobs/s | wall s | p50 / p99 to completed ms | worker CPU ms/job | peak RSS kB | foreign CPU s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for phase in ("throughput", "slow"):
            for r in out["celery"][phase]:
                lines.append(f"| {phase} | {r['pool']} | {r['concurrency']} | {_f(r['jobs_per_second'])} | "
                             f"{_f(r['wall_seconds'])} | {_pair(r['request_to_completed_ms'], '')} | {_f(r.get('worker_cpu_ms_per_job'))} | "
                             f"{_f(r['peak_rss_kb'])} | {r['cpu']['cpu_seconds'].get('foreign (rest of the machine)', '-')} |")
    t = out["throughput"]
    pr = out["probe"]
    s_ = out["slow"]
    lines += [
        "",
        "Per job (throughput burst): "
        f"{t['events_per_job']} events ({', '.join(f'{k} {v}' for k, v in sorted(t['events_by_type_per_job'].items()))}).",
        "",
        "Slow phase, jobs whose first step started in each 20 s after the first request: "
        + (", ".join(f"{k}-{int(k) + 20} s: {v}" for k, v in (s_.get("started_per_20s") or {}).items()) or "-") + ".",
        "",
        "SQL per job on the wire (profiled burst): "
        + ", ".join(f"{k} {v}" for k, v in ((out.get('profile_run') or {}).get('sql') or {}).get('per_job', {}).items())
        + "; by table: "
        + ", ".join(f"{k} {v}" for k, v in list(((out.get('profile_run') or {}).get('sql') or {}).get(
            'by_table_per_job', {}).items())[:8]) + ".",
        "",
        "SQL for one job alone (probe, no batching in the projector or relay): "
        + ", ".join(f"{k} {v}" for k, v in (pr.get('sql') or {}).get('per_job', {}).items()) + ".",
        "",
        f"One job alone (probe): {pr['emulator_calls']} emulator calls "
        f"({', '.join(f'{k} {v}' for k, v in pr['calls_by_step'].items())}), {pr['async_waits']} async waits, "
        f"{pr['events']} events, median event body {pr['event_body_bytes']['median']} B.",
        "",
        "CPU seconds during each phase (for the Celery rows the serve column is the Celery worker; "
        "\"foreign\" is everything else on the machine: this box is shared, and other work lowers every "
        "rate; each measurement first waits up to --quiet-wait s for the machine to calm down):",
        "",
        "| phase | wall s | " + " | ".join(t["cpu"]["cpu_seconds"]) + " | machine busy % | load avg start, end |",
        "|---|---|" + "---|" * len(t["cpu"]["cpu_seconds"]) + "---|---|",
    ]
    phases = [("throughput", t), ("paced", out["paced"])]
    for key, _, what in INTAKES:
        for name in ("throughput", "paced"):
            if out.get(name + key):
                phases.append((f"{name}, {what}", out[name + key]))
    for key, name in (("throughput_multi", "throughput"), ("paced_multi", "paced")):
        if out.get(key):
            phases.append((f"{name}, {out[key]['processes']} serve processes", out[key]))
    phases.append(("slow", out["slow"]))
    if out.get("slow_floor"):
        phases.append((f"slow, {out['slow_floor']['jobs']} jobs", out["slow_floor"]))
    for key, _, what in INTAKES:
        if out.get("slow" + key):
            phases.append((f"slow, {what}", out["slow" + key]))
    if out.get("slow_events"):
        phases.append(("slow, CloudStack's event bus", out["slow_events"]))
    if out.get("slow_multi"):
        phases.append((f"slow, {out['slow_multi']['processes']} serve processes", out["slow_multi"]))
    if out.get("slow_one_poll_per_wait"):
        phases.append(("slow, one poll per wait", out["slow_one_poll_per_wait"]))
    phases += [(f"celery {ph} {r['pool']}", r) for ph in ("throughput", "slow") for r in (out.get("celery") or {}).get(ph, [])]
    for name, phase in phases:
        c = phase["cpu"]
        lines.append(f"| {name} | {c['wall_seconds']} | " + " | ".join(
            str(c["cpu_seconds"].get(k, c["cpu_seconds"].get("celery", "-") if k == "serve" else "-"))
            for k in t["cpu"]["cpu_seconds"])
                     + f" | {c.get('machine_busy_percent', '-')} | {c.get('loadavg_start_end', '-')} |")
    lines += [
        "",
        "Full figures: `bench/results/latest.json` (git-ignored). What each number means: `bench/README.md`. "
        "Hot spots and the ranked levers: `bench/PROFILE.md`.",
        "",
    ]
    return "\n".join(lines)


def write(out: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.json").write_text(json.dumps(out, indent=2, default=str))
    # bench/RESULTS.md only for a run into the default results folder (a trial elsewhere keeps it)
    target = BENCH / "RESULTS.md" if results.resolve() == (BENCH / "results").resolve() else results / "RESULTS.md"
    target.write_text(markdown(out))
