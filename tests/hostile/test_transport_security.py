"""Transport security, proven against real servers: a private MariaDB (own datadir, port and
socket) and a private RabbitMQ node, both with TLS only, certificates made here with openssl.
The shared servers are never touched.

- MariaDB: `?ssl_ca=` in the URL (through `make_engine`) makes a verified TLS connection, which
  a `REQUIRE SSL` user proves; a wrong CA or a wrong host name is refused; a client certificate
  (`?ssl_cert=&ssl_key=`) works for a `REQUIRE X509` user; the migrations run over TLS too.
- RabbitMQ: `amqps://` with FAILOVER_AMQP_CA_FILE connects, verified; a wrong CA is refused.
- `failoverctl serve` runs over both and answers a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from sqlalchemy import text

from adapters import bus
from adapters.db.engine import make_engine
from adapters.db.migrate import upgrade
from emulators.runner import start_emulators
from tests.helpers import ServeProcess, free_port, service_env

from .helpers import Watcher, command, publish_raw, running, wait_until

MARIADBD = shutil.which("mariadbd") or shutil.which("mysqld")
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
RABBITMQ_SERVER = shutil.which("rabbitmq-server", path="/usr/lib/rabbitmq/bin") or shutil.which("rabbitmq-server")
OPENSSL = shutil.which("openssl")


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if OPENSSL is None:
        pytest.skip("needs openssl")
    d = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=hostile tests {ca} CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                  "extendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={'127.0.0.1' if who == 'server' else 'failover'}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o644)  # the servers run as another user in some set-ups
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
                 d / "rogue.pem")


# --------------------------------------------------------------------------- MariaDB


@dataclass
class TlsMariaDb:
    port: int
    socket: Path

    def url(self, user: str, password: str, database: str = "failover_tls", **query: str) -> str:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"mysql+asyncmy://{user}:{password}@127.0.0.1:{self.port}/{database}" + (f"?{q}" if q else "")


def _sql(server: TlsMariaDb, statements: str) -> None:
    subprocess.run(["mariadb", "--no-defaults", "-S", str(server.socket), "-uroot", "-e", statements],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_mariadb(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMariaDb]:
    if not (MARIADBD and INSTALL_DB and shutil.which("mariadb")):
        pytest.skip("needs mariadbd and mariadb-install-db for a private server")
    d = tmp_path_factory.mktemp("mariadb")
    user = ["--user=root"] if os.geteuid() == 0 else []
    subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={d / 'data'}", "--auth-root-authentication-method=normal",
                    "--skip-test-db", *user], check=True, capture_output=True)
    port, sock = free_port(), d / "mysqld.sock"
    proc = subprocess.Popen([MARIADBD, "--no-defaults", f"--datadir={d / 'data'}", f"--socket={sock}",
                             f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={d / 'pid'}",
                             f"--log-error={d / 'error.log'}", "--innodb-buffer-pool-size=16M", "--skip-name-resolve",
                             f"--ssl-ca={certs.ca}", f"--ssl-cert={certs.server_cert}",
                             f"--ssl-key={certs.server_key}", *user],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = TlsMariaDb(port, sock)
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"mariadbd exited: {(d / 'error.log').read_text()[-2000:]}")
            if sock.exists() and subprocess.run(["mariadb", "--no-defaults", "-S", str(sock), "-uroot", "-e",
                                                 "SELECT 1"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the private mariadbd did not start in 30 s")
        _sql(server, "CREATE DATABASE failover_tls CHARACTER SET utf8mb4;"
                     "CREATE USER 'tls'@'%' IDENTIFIED BY 'tls-pw' REQUIRE SSL;"
                     "GRANT ALL ON failover_tls.* TO 'tls'@'%';"
                     "CREATE USER 'mtls'@'%' IDENTIFIED BY 'mtls-pw' REQUIRE X509;"
                     "GRANT ALL ON failover_tls.* TO 'mtls'@'%';")
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _session_tls(url: str) -> tuple[str, str]:
    engine = make_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text(
                "SHOW SESSION STATUS WHERE Variable_name IN ('Ssl_cipher', 'Ssl_version')"))).all())
        return str(rows.get("Ssl_version", "")), str(rows.get("Ssl_cipher", ""))
    finally:
        await engine.dispose()


async def test_mariadb_over_verified_tls_with_ssl_ca(tls_mariadb: TlsMariaDb, certs: Certs) -> None:
    version, cipher = await _session_tls(tls_mariadb.url("tls", "tls-pw", ssl_ca=str(certs.ca)))
    assert version in ("TLSv1.2", "TLSv1.3") and cipher
    # the same through make_engine's own argument
    engine = make_engine(tls_mariadb.url("tls", "tls-pw"), ssl_ca=str(certs.ca), pool_size=1)
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    await engine.dispose()


async def test_mariadb_refuses_the_user_without_tls(tls_mariadb: TlsMariaDb) -> None:
    """The control: the `REQUIRE SSL` user cannot connect in clear, so the above was TLS."""
    with pytest.raises(Exception, match="Access denied"):
        await _session_tls(tls_mariadb.url("tls", "tls-pw"))


@pytest.mark.parametrize("how", ["rogue-ca", "wrong-host-name"])
async def test_mariadb_tls_is_verified(tls_mariadb: TlsMariaDb, certs: Certs, how: str) -> None:
    if how == "rogue-ca":
        url = tls_mariadb.url("tls", "tls-pw", ssl_ca=str(certs.rogue_ca))
    else:  # the certificate names 127.0.0.1, not localhost
        url = tls_mariadb.url("tls", "tls-pw", ssl_ca=str(certs.ca)).replace("@127.0.0.1:", "@localhost:")
    with pytest.raises(Exception) as caught:
        await _session_tls(url)
    assert "CERTIFICATE_VERIFY_FAILED" in repr(caught.value) or "certificate" in repr(caught.value).lower()
    if how == "wrong-host-name":  # and an operator can opt out of the name check (not the chain)
        version, _ = await _session_tls(url + "&ssl_check_hostname=false")
        assert version.startswith("TLS")


async def test_mariadb_client_certificate(tls_mariadb: TlsMariaDb, certs: Certs) -> None:
    with pytest.raises(Exception, match="Access denied"):
        await _session_tls(tls_mariadb.url("mtls", "mtls-pw", ssl_ca=str(certs.ca)))
    version, _ = await _session_tls(tls_mariadb.url("mtls", "mtls-pw", ssl_ca=str(certs.ca),
                                                    ssl_cert=str(certs.client_cert), ssl_key=str(certs.client_key)))
    assert version.startswith("TLS")


async def test_the_migrations_run_over_tls(tls_mariadb: TlsMariaDb, certs: Certs) -> None:
    url = tls_mariadb.url("tls", "tls-pw", ssl_ca=str(certs.ca))
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url, pool_size=1)
    async with engine.connect() as conn:
        tables = {r[0] for r in await conn.execute(text("SHOW TABLES"))}
    await engine.dispose()
    assert {"failover_jobs", "job_commands", "outbox", "alembic_version"} <= tables


# --------------------------------------------------------------------------- RabbitMQ


@dataclass
class TlsRabbit:
    port: int

    def url(self, vhost: str = "") -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.port}/{vhost}"


@pytest.fixture(scope="module")
def tls_rabbit(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRabbit]:
    if RABBITMQ_SERVER is None:
        pytest.skip("needs rabbitmq-server for a private node")
    d = tmp_path_factory.mktemp("rabbitmq")
    port, dist = free_port(), free_port()
    node = f"hostile-tls-{os.getpid()}@localhost"
    (d / "rabbitmq.conf").write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {certs.ca}\n"
        f"ssl_options.certfile = {certs.server_cert}\n"
        f"ssl_options.keyfile = {certs.server_key}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n")
    (d / "enabled_plugins").write_text("[].\n")
    env = {**os.environ, "HOME": str(d), "RABBITMQ_NODENAME": node, "RABBITMQ_DIST_PORT": str(dist),
           "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"), "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
           "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_LOGS": str(d / "node.log"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"), "RABBITMQ_PID_FILE": str(d / "pid"),
           "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
           "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}
    proc = subprocess.Popen([RABBITMQ_SERVER], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log = d / "node.log"
                raise AssertionError(f"rabbitmq-server exited: {log.read_text()[-2000:] if log.exists() else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise AssertionError("the private RabbitMQ node did not start in 60 s")
            time.sleep(0.2)
        yield TlsRabbit(port)
    finally:
        ctl = shutil.which("rabbitmqctl", path="/usr/lib/rabbitmq/bin") or shutil.which("rabbitmqctl")
        if ctl:
            subprocess.run([ctl, "-n", node, "stop"], env=env, capture_output=True, timeout=60)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_amqps_with_the_ca_file(tls_rabbit: TlsRabbit, certs: Certs) -> None:
    connection = await bus.connect(tls_rabbit.url(), ca_file=str(certs.ca), name="tls-test")
    try:
        topology = await bus.declare(connection)
        queue = await topology.channel.declare_queue(exclusive=True)
        await queue.bind(bus.EVENTS_EXCHANGE, routing_key="#")
        await topology.events.publish(aio_pika.Message(b"over tls"), routing_key="job.x.Test")
        message = await wait_until(lambda: queue.get(fail=False), 10, "the message back")
        assert message.body == b"over tls"
        await message.ack()
    finally:
        await connection.close()


@pytest.mark.parametrize("how", ["rogue-ca", "system-cas", "plain-amqp"])
async def test_amqps_is_verified(tls_rabbit: TlsRabbit, certs: Certs, how: str) -> None:
    url = tls_rabbit.url()
    with pytest.raises(Exception):  # noqa: B017 - refused, whichever way the library words it
        if how == "rogue-ca":
            connection = await asyncio.wait_for(bus.connect(url, ca_file=str(certs.rogue_ca)), 15)
        elif how == "system-cas":
            connection = await asyncio.wait_for(bus.connect(url), 15)
        else:
            connection = await asyncio.wait_for(bus.connect(url.replace("amqps://", "amqp://")), 15)
        await connection.close()


# --------------------------------------------------------------------------- the service


async def test_the_service_runs_over_tls_to_both(tls_mariadb: TlsMariaDb, tls_rabbit: TlsRabbit, certs: Certs,
                                                 tmp_path: Path) -> None:
    db_url = tls_mariadb.url("tls", "tls-pw", ssl_ca=str(certs.ca))  # a REQUIRE SSL user
    await asyncio.to_thread(upgrade, db_url)
    emu = await start_emulators()
    env = service_env(db_url, tls_rabbit.url(), emu, FAILOVER_AMQP_CA_FILE=str(certs.ca))
    try:
        async with running(ServeProcess(env, tmp_path / "serve.log")) as serve:
            async with aiohttp.ClientSession() as http, http.get(serve.metrics_url + "/readyz") as resp:
                assert resp.status == 200
            watcher = await Watcher.start(f"{tls_rabbit.url()}?cafile={certs.ca}")
            try:
                body = command(vm_id="no-such-vm")
                await publish_raw(watcher.channel, json.dumps(body).encode())
                answer = await watcher.first_event(body["request_id"])
                assert answer.type == "JobRejected" and answer.reason == "not_found"
            finally:
                await watcher.close()
        log = (tmp_path / "serve.log").read_text()
        assert "amqps://guest:***@127.0.0.1" in log and "tls:***@127.0.0.1" in log
    finally:
        await emu.close()

