"""`python -m bench.ab`: two versions of serve side by side, burst for burst, in one run.

This machine's speed swings by a third for minutes at a time (bench/PROFILE.md), so two
benchmark runs minutes apart cannot tell a change of 5-10% from the weather. Here sides A (the
baseline) and B (the candidate) take turns: per round one throughput burst each, in the order
ABBA, every burst on a fresh `serve` and a freshly seeded world, against the same RabbitMQ,
MariaDB and emulators. A side is an interpreter (`--b-python`), a version of the code
(`--b-ref`, a git commit, or the work tree as it is) and settings (`--b-setting`). The verdict
is on the pairs: each round's B / A for serve's CPU per job, the emulators', RabbitMQ's and
MariaDB's CPU per job, jobs/s and the garbage collector's share; their median; and in how many
rounds B was the better.

    python -m bench.ab --a-ref HEAD --rounds 8            # the work tree's changes against HEAD
    python -m bench.ab --b-python /path/to/python3.12     # another interpreter, same code
    python -m bench.ab --b-setting FAILOVER_GC_YOUNG_COLLECTION_AFTER=50000

It empties the same broker queues and recreates the same database as `python -m bench.run`:
never run the two at once. A side's code (`--x-ref`) runs on the database schema of the work
tree (the migrations are applied once, from it): two sides whose migrations differ are refused.

Results: `bench/results/ab/ab.json` and the table printed (`--results` to put them elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from .infra import RESULTS, ROOT, SERVICE_PACKAGES, Serve, machine, python_probe
from .run import log

METRICS = (  # (key, what, lower is better)
    ("serve_cpu_ms_per_job", "serve's CPU per job, ms", True),
    ("others_cpu_ms_per_job", "the emulators', RabbitMQ's and MariaDB's CPU per job, ms", True),
    ("jobs_per_second", "jobs/s to JobCompleted", False),
    ("serve_gc_ms_per_job", "of serve's CPU, its garbage collector's per job, ms", True),
    ("young_collection_ms", "serve's young collections, ms each (a pause of the event loop)", True),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for side in ("a", "b"):
        p.add_argument(f"--{side}-python", default=sys.executable, help=f"side {side.upper()}'s interpreter "
                       "(its environment must have the project's dependencies)")
        p.add_argument(f"--{side}-ref", default=None, help=f"side {side.upper()}'s code: a git commit "
                       "(default: the work tree as it is now)")
        p.add_argument(f"--{side}-setting", action="append", default=[], metavar="FAILOVER_X=VALUE",
                       help=f"a setting for side {side.upper()}'s serve (repeatable)")
    p.add_argument("--rounds", type=int, default=6, help="rounds of one burst per side (default 6)")
    p.add_argument("--jobs", type=int, default=200, help="test failovers per burst (default 200)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="FAILOVER_POLL_INTERVAL_SECONDS")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds any one burst may take")
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="before each burst, wait up to this long for other work on the machine to calm down")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--database-url", default="mysql+asyncmy://root@127.0.0.1:3306/")
    p.add_argument("--results", type=Path, default=RESULTS / "ab")
    p.add_argument("--warmup", type=int, default=1,
                   help="bursts on side A first, not counted (the new database's first burst is the dearest)")
    a = p.parse_args(argv)
    from failover.settings import Settings

    for one in a.a_setting + a.b_setting:
        name, sep, _ = one.partition("=")
        if not sep or not name.startswith("FAILOVER_"):
            p.error(f"setting {one!r}: give it as FAILOVER_NAME=VALUE")
        if name.removeprefix("FAILOVER_").lower() not in Settings.model_fields:
            # serve ignores a name it does not know: both sides would run the same
            p.error(f"setting {name}: serve has no such setting (README's Configuration lists them)")
    if a.rounds < 1 or a.jobs < 1:
        p.error("--rounds and --jobs must be at least 1")
    # what the shared phases read (bench/service_phases.py)
    a.serve_setting, a.mariadb_callgrind = [], None
    return a


def resolve(ref: str) -> str:
    """The full commit `ref` names (an error that says what to do if none)."""
    try:
        return subprocess.run(["git", "rev-parse", "--verify", ref + "^{commit}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench.ab: git could not give {ref!r}: {exc.stderr.strip() if exc.stderr else exc}; "
                         "name a commit of this repository") from exc


def checkout(ref: str, dest: Path) -> str:
    """The service's packages at git commit `ref`, written to `dest` (emptied first); returns
    the full commit."""
    commit = resolve(ref)
    tar = subprocess.run(["git", "archive", "--format=tar", commit, *SERVICE_PACKAGES], cwd=ROOT, check=True,
                         capture_output=True).stdout
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    return commit


def same_migrations(code: Path, work: Path) -> bool:
    """Whether the two copies of the code migrate the database alike (adapters/migrations)."""
    def tree(root: Path) -> dict[str, bytes]:
        base = root / "adapters" / "migrations"
        return {str(f.relative_to(base)): f.read_bytes() for f in base.rglob("*.py")
                if "__pycache__" not in f.parts}
    return tree(code) == tree(work)


def pairs(a: list[float | None], b: list[float | None], lower_better: bool) -> dict[str, Any]:
    """Round by round B / A (None where either side has no reading, or A read 0), the median
    of those, and in how many of the rounds with both readings B was the better."""
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    ratios = [None if x is None or y is None or not x else round(y / x, 3) for x, y in zip(a, b, strict=True)]
    known = [r for r in ratios if r is not None]
    better = sum(1 for x, y in both if (y < x if lower_better else y > x))
    return {"a": a, "b": b, "b_over_a": ratios,
            "median_b_over_a": round(statistics.median(known), 3) if known else None,
            "b_better_in": f"{better} of {len(both)}"}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from . import service_phases

    out: dict[str, Any] = {"command": "python -m bench.ab " + " ".join(sys.argv[1:]), "machine": machine()}
    # each side's commit, found before the database is touched (a ref that names nothing stops here)
    commits = {side: resolve(ref) for side in ("a", "b") if (ref := getattr(args, f"{side}_ref")) is not None}
    async with service_phases.open_bench(args, out, log) as bench:
        sides: dict[str, dict[str, Any]] = {}
        for side in ("a", "b"):
            ref = commits.get(side)
            code = None
            if ref is not None:
                code = args.results / f"code-{side}"
                checkout(ref, code)
                if not same_migrations(code, args.results / "code"):
                    raise SystemExit(f"bench.ab: side {side.upper()}'s commit {ref[:10]} migrates the database "
                                     "differently from the work tree, whose schema both sides would run on; "
                                     "compare two versions with the same migrations")
            sides[side] = {"python": getattr(args, f"{side}_python"), "ref": ref or "work tree",
                           "settings": getattr(args, f"{side}_setting"), "code": code, "bursts": []}
            log(f"side {side.upper()}: {sides[side]['python']}, code {sides[side]['ref']}, "
                f"settings {sides[side]['settings'] or 'none'}")
        order = ["a"] * args.warmup + [side for r in range(args.rounds) for side in ("ab" if r % 2 == 0 else "ba")]
        for i, side in enumerate(order):
            warm = i < args.warmup
            round_ = (i - args.warmup) // 2 + 1
            name = f"warmup{i + 1}" if warm else f"{side.upper()}{round_}"
            burst = await _burst(bench, args, sides[side], name)
            if warm:
                out.setdefault("warmup", []).append(burst)
            else:
                burst["round"] = round_
                sides[side]["bursts"].append(burst)
            log(f"{name}: {burst['jobs_per_second']} jobs/s, "
                f"serve {burst['serve_cpu_ms_per_job']} ms/job, others {burst['others_cpu_ms_per_job']} ms/job "
                f"(probe {burst['python_probe_ms']} ms)")
        out["sides"] = {k: {**v, "code": str(v["code"]) if v["code"] else None} for k, v in sides.items()}
        out["pairs"] = {key: pairs([b[key] for b in sides["a"]["bursts"]], [b[key] for b in sides["b"]["bursts"]],
                                   lower)
                        for key, _, lower in METRICS}
        out["notes"] = bench.notes
    out["python_probe_ms_end"] = python_probe()
    return out


async def _burst(bench: Any, args: argparse.Namespace, side: dict[str, Any], name: str) -> dict[str, Any]:
    """One throughput burst on a fresh serve of `side`."""
    from . import service_phases

    env = service_phases.throughput_env(bench)
    env.update(one.split("=", 1) for one in side["settings"])
    serve = Serve(env, args.results / f"serve-{name}.log", python=side["python"], code=side["code"])
    await serve.start()
    try:
        t = await service_phases.throughput(bench, serve, args.jobs, label=f"ab-{name}")
    finally:
        await serve.stop()
    cpu = t["cpu"]["cpu_seconds"]
    gc = t["serve_gc_per_job"]  # {} from a serve without failover_gc_pause_seconds: no reading
    young = gc.get("0") or {}
    return {"jobs_per_second": t["jobs_per_second"], "serve_cpu_ms_per_job": t["serve_cpu_ms_per_job"],
            "others_cpu_ms_per_job": round(1000 * sum(cpu.get(k, 0.0) for k in ("emulators", "rabbitmq", "mariadb"))
                                           / args.jobs, 1),
            "serve_gc_ms_per_job": round(sum(g["ms_per_job"] for g in gc.values()), 3) if gc else None,
            "young_collection_ms": round(young["ms_per_job"] / young["collections_per_job"], 2)
            if young.get("collections_per_job") else None,
            "python_probe_ms": t["python_probe_ms"]}


def _cells(values: list[Any]) -> str:
    return ", ".join("-" if v is None else str(v) for v in values)


def table(out: dict[str, Any]) -> str:
    a, b = out["sides"]["a"], out["sides"]["b"]
    lines = [f"A: {a['python']}, {a['ref']}, {' '.join(a['settings']) or 'no settings'}",
             f"B: {b['python']}, {b['ref']}, {' '.join(b['settings']) or 'no settings'}", "",
             "| measure | A | B | B / A per round | median B / A | B better in |", "|---|---|---|---|---|---|"]
    for key, what, _ in METRICS:
        p = out["pairs"][key]
        lines.append(f"| {what} | {_cells(p['a'])} | {_cells(p['b'])} | {_cells(p['b_over_a'])} | "
                     f"{p['median_b_over_a']} | {p['b_better_in']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(run(args))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ab.json").write_text(json.dumps(out, indent=2, default=str))
    text = table(out)
    (args.results / "ab.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
