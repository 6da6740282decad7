"""Private MariaDB and RabbitMQ servers for the outage tests.

The machine's shared servers (127.0.0.1:3306 and :5672) serve other engineers' tests, so the
tests that stop or restart a server start their OWN instance in a temporary directory, on free
ports, and stop and restart that one. Everything is torn down at the end (the processes run
in their own session, so a stuck one is killed with its whole group).

- MariaDB: `mariadb-install-db --no-defaults` into a temp datadir, then `mariadbd --no-defaults`
  on a free port and a socket in the temp dir, `--skip-grant-tables` (root without password).
- RabbitMQ: a node `failover-test-<random>@localhost` with its own ports, mnesia, logs,
  config and Erlang cookie (a random one, in a temp HOME that both `rabbitmq-server` and
  `rabbitmqctl` use), started with `rabbitmq-server` in the background, awaited with
  `rabbitmqctl await_startup`, stopped with `rabbitmqctl stop`. Its mnesia directory is kept
  across a restart, so durable queues and persistent messages survive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import free_port


def _find(*candidates: str) -> str | None:
    for c in candidates:
        if os.path.isabs(c) and os.access(c, os.X_OK):
            return c
        found = shutil.which(c)
        if found:
            return found
    return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


async def _wait(check, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- MariaDB


class PrivateMariaDB:
    """A throw-away `mariadbd` on a free port, with its data in `base`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.datadir = base / "data"
        self.socket = base / "mysqld.sock"
        self.pid_file = base / "mysqld.pid"
        self.log = base / "mysqld.err"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.mariadbd = _find("/usr/sbin/mariadbd", "mariadbd", "/usr/sbin/mysqld", "mysqld")
        self.install_db = _find("mariadb-install-db", "mysql_install_db")

    @property
    def available(self) -> bool:
        return bool(self.mariadbd and self.install_db)

    def url(self, database: str) -> str:
        return f"mysql+asyncmy://root@127.0.0.1:{self.port}/{database}"

    def install(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        argv = [str(self.install_db), "--no-defaults", f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal", "--skip-test-db"]
        if os.geteuid() == 0:
            argv.append("--user=root")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")

    async def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [str(self.mariadbd), "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
                f"--socket={self.socket}", "--bind-address=127.0.0.1", "--skip-grant-tables",
                f"--pid-file={self.pid_file}", f"--log-error={self.log}", "--skip-log-bin",
                "--innodb-buffer-pool-size=128M", "--max-connections=500", "--skip-name-resolve"]
        if os.geteuid() == 0:
            argv.append("--user=root")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

        async def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"mariadbd exited with {self.proc.returncode}: {self.log_tail()}")
            return await asyncio.to_thread(self._answers)

        await _wait(up, timeout, "the private MariaDB to answer")

    def _answers(self) -> bool:
        import pymysql

        try:
            conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=1)
        except pymysql.err.OperationalError:
            return False
        conn.close()
        return True

    async def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (SIGTERM), as an operator's `systemctl stop` does."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
        except TimeoutError:
            _kill_group(self.proc)
        await _wait(lambda: asyncio.to_thread(lambda: not _port_open(self.port)), 10, "the port to close")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def destroy(self) -> None:
        _kill_group(self.proc)
        shutil.rmtree(self.base, ignore_errors=True)


# --------------------------------------------------------------------------- RabbitMQ


class PrivateRabbitMQ:
    """A throw-away RabbitMQ node with its own name, ports, data, config and cookie."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.node = f"failover-test-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.home = base / "home"
        self.proc: subprocess.Popen[bytes] | None = None
        self.server = _find("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server")
        self.ctl = _find("/usr/lib/rabbitmq/bin/rabbitmqctl", "rabbitmqctl")
        self._starts = 0

    @property
    def available(self) -> bool:
        return bool(self.server and self.ctl and shutil.which("erl"))

    def url(self, vhost: str = "") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    def prepare(self) -> None:
        for d in (self.home, self.base / "mnesia", self.base / "log"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.file.level = warning\n"
            "vm_memory_high_watermark.relative = 0.2\n"
            "disk_free_limit.absolute = 50MB\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[].\n")

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        return env

    def ctl_run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.ctl), "-n", self.node, *args], env=self.env, cwd=self.base,
                              capture_output=True, text=True, timeout=timeout)

    async def start(self, timeout: float = 90.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._starts += 1
        out = (self.base / f"server-{self._starts}.out").open("ab")
        self.proc = subprocess.Popen([str(self.server)], env=self.env, cwd=self.base, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while True:  # `await_startup` needs the node registered with epmd: retry until it is
            done = await asyncio.to_thread(self.ctl_run, "await_startup", "--timeout", "30", timeout=40)
            if done.returncode == 0:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the private RabbitMQ did not start: {done.stdout} {done.stderr}")
            await asyncio.sleep(0.5)
        await _wait(lambda: asyncio.to_thread(_port_open, self.port), 30, "the AMQP port")

    async def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        await asyncio.to_thread(self.ctl_run, "stop", timeout=timeout)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
        except TimeoutError:
            _kill_group(self.proc)
        await _wait(lambda: asyncio.to_thread(lambda: not _port_open(self.port)), 10, "the port to close")

    def add_vhost(self, vhost: str) -> None:
        done = self.ctl_run("add_vhost", vhost)
        if done.returncode != 0 and "already" not in (done.stdout + done.stderr):
            raise RuntimeError(f"add_vhost failed: {done.stdout} {done.stderr}")
        self.ctl_run("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ctl_run("stop", timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        _kill_group(self.proc)
        # the node's epmd registration goes with the node; the VM may leave helper processes
        # (erl_child_setup, inet_gethost) in its session: they die with the group
        shutil.rmtree(self.base, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def private_mariadb(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateMariaDB]:
    server = PrivateMariaDB(tmp_path_factory.mktemp("private-mariadb"))
    if not server.available:
        pytest.skip("mariadbd / mariadb-install-db are not installed")
    try:
        await asyncio.to_thread(server.install)
        await server.start()
        yield server
    finally:
        await asyncio.to_thread(server.destroy)


@pytest.fixture(scope="module")
async def private_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateRabbitMQ]:
    server = PrivateRabbitMQ(tmp_path_factory.mktemp("private-rabbitmq"))
    if not server.available:
        pytest.skip("rabbitmq-server / rabbitmqctl are not installed")
    try:
        server.prepare()
        await server.start()
        yield server
    finally:
        await asyncio.to_thread(server.destroy)
