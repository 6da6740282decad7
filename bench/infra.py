"""The benchmark's machinery: its own vhost and database, the emulators and `failoverctl serve`
as separate processes, and the readings taken from them (/proc, /metrics, MariaDB status).

Nothing here changes the service: it is started exactly as a user starts it, with settings
in its environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aio_pika
import aiohttp
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
T = TypeVar("T")

BENCH_DB = "failover_bench"
BENCH_VHOST = "failover-bench"


class BenchError(RuntimeError):
    """A phase could not be measured (a deadline passed, a process died)."""


# --------------------------------------------------------------------------- waiting


async def wait_until(check: Callable[[], Awaitable[T | None]], timeout: float, what: str,
                     interval: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the broker and the database


def broker_url(base: str) -> str:
    """The bench vhost on the broker of `base` (created with rabbitmqctl)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base)
    if not shutil.which("rabbitmqctl"):
        raise BenchError("rabbitmqctl not found: the bench needs it to create its vhost")
    made = subprocess.run(["rabbitmqctl", "add_vhost", BENCH_VHOST], capture_output=True, text=True)
    if made.returncode != 0 and "already_exists" not in (made.stdout + made.stderr):
        raise BenchError(f"rabbitmqctl add_vhost {BENCH_VHOST} failed: {made.stderr.strip()}")
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", BENCH_VHOST, parts.username or "guest",
                    ".*", ".*", ".*"], capture_output=True, check=True)
    return urlunsplit(parts._replace(path="/" + quote(BENCH_VHOST, safe="")))


async def clean_broker(url: str, queues: list[str]) -> None:
    """Delete the named queues (absent is fine): a run starts from empty queues."""
    connection = await aio_pika.connect(url)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except Exception:
                pass


def rabbitmq_version() -> str:
    try:
        out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "?"
    except Exception:
        return "?"


SERVICE_PACKAGES = ("statemachine", "consumers", "publishers", "schemas", "adapters", "emulators", "failover")


def snapshot_code(dest: Path) -> dict[str, Any]:
    """Copy the service's packages as they are now: every process of one run (serve, the
    emulators, the migrations) runs this copy, so edits others make to the work tree meanwhile
    cannot mix two versions of the code into one run. Returns a hash of what was copied."""
    import hashlib

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    digest = hashlib.sha256()
    for pkg in SERVICE_PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in sorted(dest.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(dest)).encode())
            digest.update(path.read_bytes())
    return {"snapshot": str(dest), "sha256": digest.hexdigest()[:16]}


CODE_DIR: Path = ROOT  # where serve, the emulators and the migrations import the service from


def set_code_dir(path: Path) -> None:
    global CODE_DIR
    CODE_DIR = path


async def fresh_database(base_url: str, name: str = BENCH_DB) -> str:
    """Drop and recreate the database `name` (the benchmark's, `failover_bench`), apply the
    migrations; returns its URL."""
    parsed = make_url(base_url)
    server = create_async_engine(parsed.set(database=""))
    try:
        async with server.begin() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
            await conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    finally:
        await server.dispose()
    url = parsed.set(database=name).render_as_string(hide_password=False)
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-c", "import sys; from adapters.db.migrate import upgrade; upgrade(sys.argv[1])", url],
        cwd=str(CODE_DIR), env={**os.environ, "PYTHONPATH": str(CODE_DIR)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"the migrations failed: {done.stderr[-2000:]}")
    return url


SERVICE_USER = "failover_bench"
CELERY_USER = "celery_bench"
USER_PASSWORD = "failover-bench"  # a local benchmark account, on its own database only


async def ensure_users(engine: AsyncEngine) -> None:
    """The service and the Celery worker each connect as their own user, so that MariaDB's
    per-user statistics count their statements and transactions exactly (the server is shared
    with whatever else runs on this machine; its global counters are not)."""
    async with engine.begin() as conn:
        have = {(r[0], r[1]) for r in (await conn.execute(text(
            "SELECT User, Host FROM mysql.user WHERE User IN (:a, :b)"), {"a": SERVICE_USER, "b": CELERY_USER})).all()}
        for user in (SERVICE_USER, CELERY_USER):
            for host in ("localhost", "127.0.0.1", "%"):
                if (user, host) not in have:
                    await conn.execute(text(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{USER_PASSWORD}'"))
                await conn.execute(text(f"GRANT ALL PRIVILEGES ON `{BENCH_DB}`.* TO '{user}'@'{host}'"))


def user_url(url: str, user: str) -> str:
    return make_url(url).set(username=user, password=USER_PASSWORD).render_as_string(hide_password=False)


async def set_userstat(engine: AsyncEngine, on: bool | None) -> bool | None:
    """Turn MariaDB's per-user statistics on (or back to what they were); returns the old value."""
    async with engine.begin() as conn:
        row = (await conn.execute(text("SHOW GLOBAL VARIABLES LIKE 'userstat'"))).first()
        old = None if row is None else str(row[1]).upper() in ("ON", "1")
        if on is not None and row is not None:
            await conn.execute(text(f"SET GLOBAL userstat = {1 if on else 0}"))
    return old


USER_STAT_COLUMNS = ("SELECT_COMMANDS", "UPDATE_COMMANDS", "OTHER_COMMANDS", "COMMIT_TRANSACTIONS",
                     "ROLLBACK_TRANSACTIONS", "ROWS_INSERTED", "ROWS_UPDATED", "ROWS_READ", "BYTES_RECEIVED",
                     "BYTES_SENT", "BUSY_TIME", "CPU_TIME", "TOTAL_CONNECTIONS")


async def user_stats(engine: AsyncEngine, user: str) -> dict[str, float]:
    async with engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT " + ", ".join(USER_STAT_COLUMNS) + " FROM information_schema.USER_STATISTICS WHERE USER = :u"),
            {"u": user})).first()
    return {c.lower(): float(row[i]) if row is not None else 0.0 for i, c in enumerate(USER_STAT_COLUMNS)}


def git_state() -> dict[str, Any]:
    """The commit measured, and the files changed in the work tree (others edit it meanwhile)."""
    def run(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.rstrip()
        except Exception:
            return ""

    changed = [line[3:] for line in run("status", "--porcelain").splitlines() if line[3:] and not line[3:].startswith("bench/")]
    return {"head": run("rev-parse", "--short", "HEAD").strip(), "changed_outside_bench": changed}


async def global_status(engine: AsyncEngine, names: tuple[str, ...] = (
        "Com_commit", "Com_rollback", "Com_insert", "Com_update", "Com_select", "Com_delete",
        "Com_begin", "Questions", "Innodb_os_log_fsyncs", "Innodb_data_fsyncs", "Handler_commit",
        # rows read through an index / by scanning, and pages read from disk (not in the buffer pool)
        "Handler_read_key", "Handler_read_next", "Handler_read_rnd_next", "Innodb_buffer_pool_reads")) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SHOW GLOBAL STATUS"))).all()
    wanted = set(names)
    return {r[0]: int(r[1]) for r in rows if r[0] in wanted}


def status_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in before}


async def db_variables(engine: AsyncEngine) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('version', 'innodb_flush_log_at_trx_commit', "
            "'sync_binlog', 'log_bin', 'innodb_buffer_pool_size', 'max_connections')"))).all()
    return {r[0]: r[1] for r in rows}


# --------------------------------------------------------------------------- /proc readings


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its own threads, not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def pids_named(name: str) -> list[int]:
    """Pids whose command name (comm) is `name` (e.g. mariadbd, beam.smp)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICKS


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0


@dataclass
class CpuMeter:
    """CPU seconds used by named processes between `start()` and `stop()`, and by everything
    else on the machine ("foreign": other people's work on a shared machine)."""

    pids: dict[str, list[int]] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _busy0: float = 0.0
    _load0: float = 0.0

    _per_pid: dict[int, float] = field(default_factory=dict)

    def start(self) -> None:
        self.pids.setdefault("bench client", [os.getpid()])
        self._per_pid = {p: cpu_seconds(p) for pids in self.pids.values() for p in pids}
        self._t0 = time.monotonic()
        self._busy0 = machine_busy_seconds()
        self._load0 = loadavg()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t0
        used: dict[str, float] = {}
        for name, pids in self.pids.items():
            total = 0.0
            for p in pids:
                end = cpu_seconds(p)
                if end > 0:  # a process that exited meanwhile reads 0: leave it out
                    total += max(0.0, end - self._per_pid.get(p, 0.0))
            used[name] = round(total, 2)
        busy = machine_busy_seconds() - self._busy0
        used["foreign (rest of the machine)"] = round(max(0.0, busy - sum(used.values())), 2)
        return {"wall_seconds": round(wall, 2), "cpu_seconds": used,
                "cpu_percent_of_one_core": {k: round(100 * v / wall, 1) if wall else 0.0 for k, v in used.items()},
                "machine_busy_percent": round(100 * busy / wall / (os.cpu_count() or 1), 1) if wall else 0.0,
                "loadavg_start_end": [self._load0, loadavg()]}


def _serves_port(pid: int, port: int) -> bool:
    """Whether the process's command line names no other port than `port` (test suites start
    private servers with --port=...; the shared ones use their defaults)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    ports = [a.split(b"=", 1)[1] for a in args if a.startswith(b"--port=")]
    return not ports or ports == [str(port).encode()]


def substrate_pids(db_port: int = 3306) -> dict[str, list[int]]:
    """The broker and the database this bench uses (not the private servers of test runs)."""
    return {"rabbitmq": [p for p in pids_named("beam.smp") if _serves_port(p, 5672)],
            "mariadb": [p for p in pids_named("mariadbd") if _serves_port(p, db_port)]}


async def quiet_machine(known: list[int], *, max_wait: float = 45.0, threshold: float = 0.3,
                        window: float = 1.0, needed: int = 3) -> dict[str, Any]:
    """Wait (at most `max_wait`) until the rest of the machine uses less than `threshold` of one
    core for `needed` consecutive windows: other work on a shared machine skews every rate.
    Returns how long it waited and the foreign load seen last."""
    began = time.monotonic()
    calm = 0
    foreign = 0.0
    while True:
        busy0, mine0 = machine_busy_seconds(), sum(cpu_seconds(p) for p in known)
        await asyncio.sleep(window)
        busy1, mine1 = machine_busy_seconds(), sum(cpu_seconds(p) for p in known)
        foreign = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / window
        calm = calm + 1 if foreign < threshold else 0
        waited = time.monotonic() - began
        if calm >= needed or waited >= max_wait:
            return {"waited_seconds": round(waited, 1), "foreign_cores": round(foreign, 2), "quiet": calm >= needed}


def _probe_work() -> int:
    rows = []
    for i in range(20_000):
        row = {"job_id": f"job-{i}", "step": i % 7, "status": "running", "n": i * 3}
        rows.append(json.dumps(row))
    return sum(len(json.loads(r)["job_id"]) for r in rows)


def python_probe(rounds: int = 7) -> float:
    """Milliseconds, best of `rounds`, of one fixed piece of pure Python work (dicts, f-strings,
    JSON, as serve does): how fast this machine runs Python at the moment. Machines of the same
    kind differ by up to 2x, and a shared one from hour to hour, so a run's absolute figures
    compare with another run's only through this; the ratios within a run need nothing."""
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        _probe_work()
        best = min(best, time.perf_counter() - began)
    return round(best * 1000, 1)


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "ram_gib": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "kernel": platform.release()}


# --------------------------------------------------------------------------- the emulators


class Emulators:
    """`python -m emulators --state-file ...` as its own process (so it takes no CPU from
    the service's process)."""

    def __init__(self, log_path: Path, event_bus_url: str | None = None) -> None:
        self.log_path = log_path
        self.event_bus_url = event_bus_url  # the emulated CloudStack event bus's broker, if any
        self.state_file = log_path.with_suffix(".state.json")
        self.proc: subprocess.Popen[bytes] | None = None
        self.state: dict[str, Any] = {}

    async def start(self, timeout: float = 30.0) -> None:
        self.state_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emulators", "--cloudstack-port", "0", "--volume-daemon-port", "0",
             "--state-file", str(self.state_file),
             *(("--event-bus-url", self.event_bus_url) if self.event_bus_url else ())],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(CODE_DIR), env={**os.environ, "PYTHONPATH": str(CODE_DIR)})

        async def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"the emulators exited with {self.proc.returncode}; see {self.log_path}")
            return self.state_file.exists()

        await wait_until(ready, timeout, "the emulators to listen")
        self.state = json.loads(self.state_file.read_text())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def control_url(self) -> str:
        return str(self.state["control_url"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- failoverctl serve


def service_env(database_url: str, amqp_url: str, emu: dict[str, Any], **extra: str) -> dict[str, str]:
    """The environment a user would give `failoverctl serve`, pointed at the emulators."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVER_")}
    env.update({
        "FAILOVER_DATABASE_URL": database_url,
        "FAILOVER_AMQP_URL": amqp_url,
        "FAILOVER_CLOUDSTACK_URL": emu["cloudstack_url"],
        "FAILOVER_CLOUDSTACK_API_KEY": emu["api_key"],
        "FAILOVER_CLOUDSTACK_SECRET_KEY": emu["secret_key"],
        "FAILOVER_ZONE": emu["zone_name"],
        "FAILOVER_TEMPLATE_ID": emu["template_id"],
        "FAILOVER_SERVICE_OFFERING_ID": emu["service_offering_id"],
        "FAILOVER_NETWORK_ID": emu["network_id"],
        "FAILOVER_APPLIANCE_VM_ID": emu["appliance_vm_id"],
        "FAILOVER_VOLUME_DAEMON_URL": emu["volume_daemon_url"],
        "FAILOVER_VIRTIO_INJECT_COMMAND": f"{sys.executable} -m emulators.inject --control-url {emu['control_url']}",
        "FAILOVER_LOG_FORMAT": "json",
        "FAILOVER_LOG_LEVEL": "INFO",
        "PYTHONPATH": str(CODE_DIR),
    })
    env.update(extra)
    return env


class Serve:
    """`failoverctl serve` (python -m failover.cli serve) as a subprocess, ready when /readyz
    answers 200. With `profile_to`, it runs as the child of `py-spy record` (py-spy cannot
    attach to a running process in this sandbox, but it can launch one)."""

    def __init__(self, env: dict[str, str], log_path: Path, *, profile_to: Path | None = None,
                 profile_rate: int = 100, python: str | None = None, code: Path | None = None) -> None:
        self.python = python or sys.executable  # (bench/ab.py: another interpreter)
        self.code = code  # where to import the service from (bench/ab.py: another version); else CODE_DIR
        self.port = free_port()
        self.env = {**env, "FAILOVER_METRICS_PORT": str(self.port), "FAILOVER_METRICS_HOST": "127.0.0.1"}
        self.log_path = log_path
        self.profile_to = profile_to
        self.profile_rate = profile_rate
        self.proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The serve process's own pid (py-spy's child when profiling)."""
        assert self._pid is not None
        return self._pid

    async def start(self, timeout: float = 60.0) -> None:
        argv = [self.python, "-m", "failover.cli", "serve"]
        if self.profile_to is not None:
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            argv = [pyspy, "record", "--nonblocking", "-r", str(self.profile_rate), "-f", "raw",
                    "-o", str(self.profile_to), "--", *argv]
        self._log = self.log_path.open("ab")
        env = {**self.env, "PYTHONPATH": str(self.code)} if self.code is not None else self.env
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(self.code or CODE_DIR))

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                async with aiohttp.ClientSession() as http, http.get(
                        self.metrics_url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_until(ready, timeout, "serve to be ready")
        if self.profile_to is None:
            self._pid = self.proc.pid
        else:
            kids = children(self.proc.pid)
            if not kids:
                raise BenchError("py-spy started no serve process")
            self._pid = kids[0]

    def pids(self) -> list[int]:
        """serve's pid and its intake process's (FAILOVER_INTAKE_PROCESS), whose CPU is serve's."""
        found = [self.pid]
        for kid in children(self.pid):
            try:
                if b"failover.intake" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    found.append(kid)
            except OSError:
                continue
        return found

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession() as http, http.get(self.metrics_url + "/metrics") as resp:
            return await resp.text()

    async def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM (the drain), then wait; py-spy writes its profile when serve has exited."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def histogram_quantiles(metrics_text: str, name: str, quantiles: tuple[float, ...] = (0.5, 0.99)) -> dict[str, Any]:
    """Quantiles of a Prometheus histogram (linear within a bucket, as histogram_quantile does)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    count = total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name == name + "_count":
                count += s.value
            elif s.name == name + "_sum":
                total += s.value
    out: dict[str, Any] = {"count": count, "mean": (total / count) if count else None}
    edges = sorted(buckets)
    for q in quantiles:
        rank = q * count
        value = None
        prev_edge, prev_count = 0.0, 0.0
        for edge in edges:
            c = buckets[edge]
            if c >= rank and count:
                if edge == float("inf"):
                    value = prev_edge
                else:
                    span = c - prev_count
                    value = prev_edge + (edge - prev_edge) * ((rank - prev_count) / span if span else 1.0)
                break
            prev_edge, prev_count = edge, c
        out[f"p{round(q * 100)}"] = value
    return out


def metric_sum(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


class Callgrind:
    """The instructions a server under callgrind ran between `zero()` and `count()`."""

    def __init__(self, pid: int, out_file: str | None = None) -> None:
        self.pid, self.out_file = pid, out_file  # out_file: its --callgrind-out-file, if not on its command line

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.pid)], check=True, capture_output=True)

    def count(self) -> int:
        # (a dump of a server started since may overwrite an earlier one's file of the same name)
        before = {f: f.stat().st_mtime_ns for f in self._dumps()}
        subprocess.run(["callgrind_control", "-d", str(self.pid)], check=True, capture_output=True)
        fresh = [f for f in self._dumps() if before.get(f) != f.stat().st_mtime_ns]
        for dump in sorted(fresh, key=lambda f: f.stat().st_mtime_ns, reverse=True):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("totals:", "summary:")):  # all threads since the last zero
                    return int(line.split()[1])
        raise RuntimeError(f"callgrind_control -d {self.pid} left no dump with totals (is "
                           "--callgrind-out-file a path this process can read?)")

    def _dumps(self) -> list[Path]:
        cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        out = self.out_file or next((a.decode().split("=", 1)[1] for a in cmdline
                                     if a.startswith(b"--callgrind-out-file=")), f"callgrind.out.{self.pid}")
        path = Path(out)
        return list(path.parent.glob(path.name + "*"))
