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
            except Exception:  # noqa: BLE001 - absent
                pass


def rabbitmq_version() -> str:
    try:
        out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "?"
    except Exception:  # noqa: BLE001
        return "?"


async def fresh_database(base_url: str) -> str:
    """Drop and recreate `failover_bench`, apply the migrations; returns its URL."""
    parsed = make_url(base_url)
    server = create_async_engine(parsed.set(database=""))
    try:
        async with server.begin() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS `{BENCH_DB}`"))
            await conn.execute(text(f"CREATE DATABASE `{BENCH_DB}` CHARACTER SET utf8mb4"))
    finally:
        await server.dispose()
    url = parsed.set(database=BENCH_DB).render_as_string(hide_password=False)
    from adapters.db.migrate import upgrade

    await asyncio.to_thread(upgrade, url)
    return url


async def global_status(engine: AsyncEngine, names: tuple[str, ...] = (
        "Com_commit", "Com_rollback", "Com_insert", "Com_update", "Com_select", "Com_delete",
        "Com_begin", "Questions", "Innodb_os_log_fsyncs", "Innodb_data_fsyncs", "Handler_commit")) -> dict[str, int]:
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


@dataclass
class CpuMeter:
    """CPU seconds used by named processes between `start()` and `stop()`."""

    pids: dict[str, list[int]] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0

    def _read(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}

    def start(self) -> None:
        self._start = self._read()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t0
        end = self._read()
        used = {name: round(end[name] - self._start.get(name, 0.0), 2) for name in end}
        return {"wall_seconds": round(wall, 2), "cpu_seconds": used,
                "cpu_percent_of_one_core": {k: round(100 * v / wall, 1) if wall else 0.0 for k, v in used.items()}}


def substrate_pids() -> dict[str, list[int]]:
    return {"rabbitmq": pids_named("beam.smp"), "mariadb": pids_named("mariadbd")}


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

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.state_file = log_path.with_suffix(".state.json")
        self.proc: subprocess.Popen[bytes] | None = None
        self.state: dict[str, Any] = {}

    async def start(self, timeout: float = 30.0) -> None:
        self.state_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emulators", "--cloudstack-port", "0", "--volume-daemon-port", "0",
             "--state-file", str(self.state_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})

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
        "PYTHONPATH": str(ROOT),
    })
    env.update(extra)
    return env


class Serve:
    """`failoverctl serve` (python -m failover.cli serve) as a subprocess, ready when /readyz
    answers 200. With `profile_to`, it runs as the child of `py-spy record` (py-spy cannot
    attach to a running process in this sandbox, but it can launch one)."""

    def __init__(self, env: dict[str, str], log_path: Path, *, profile_to: Path | None = None,
                 profile_rate: int = 100) -> None:
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
        argv = [sys.executable, "-m", "failover.cli", "serve"]
        if self.profile_to is not None:
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            argv = [pyspy, "record", "--nonblocking", "-r", str(self.profile_rate), "-f", "raw",
                    "-o", str(self.profile_to), "--"] + argv
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT))

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
            while self.proc.poll() is None and time.monotonic() < deadline:
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
    index = min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))
    return ordered[index]
