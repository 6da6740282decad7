"""Settings: read once from the environment (and a `.env` file), validated, never logged raw.

The names and defaults are part of the public contract (CONTRACT.md section 3); the ones
marked "addition" are ours and optional.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
from collections.abc import Iterable
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def is_uuid(value: str) -> bool:
    """True when `value` has the 8-4-4-4-12 hex form CloudStack uses for ids."""
    return bool(_UUID_RE.match(value))


def _is_local(host: str) -> bool:
    if host in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_SECRET_QUERY_KEY = re.compile(r"pass|pwd|secret|token|credential|api_?key", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with its password, and the value of any query parameter that looks like one
    (`?password=`, `?ssl_key_password=`, `?secret...`), replaced by `***`: safe to log."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL urllib can take apart: show nothing of it
        return "***"
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = "&".join(
        f"{pair.split('=', 1)[0]}=***" if _SECRET_QUERY_KEY.search(pair.split("=", 1)[0]) else pair
        for pair in parts.query.split("&")
    ) if parts.query else ""
    if netloc == parts.netloc and query == parts.query:
        return url
    return parts._replace(netloc=netloc, query=query).geturl()


PositiveFloat = Annotated[float, Field(gt=0)]


class ConnectionSettings(BaseSettings):
    """What every command needs: the broker and the database (clients, `db upgrade`)."""

    model_config = SettingsConfigDict(
        env_prefix="FAILOVER_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: SecretStr = SecretStr("mysql+asyncmy://root@127.0.0.1:3306/failover")
    amqp_ca_file: str | None = None  # CA bundle for amqps:// (addition)
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)  # addition
    log_format: str = "auto"  # auto | json | text (addition)
    log_level: str = "INFO"  # addition

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("amqp", "amqps"):
            raise ValueError(f"must be an amqp:// or amqps:// URL, got scheme {scheme!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _db_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if not scheme.startswith("mysql") and not scheme.startswith("mariadb"):
            raise ValueError(
                f"must be a MariaDB/MySQL URL such as mysql+asyncmy://user@host/db, got {scheme!r}"
            )
        return value


class Settings(ConnectionSettings):
    """Every setting of `failoverctl serve`. Environment variables are `FAILOVER_<NAME>`."""

    # --- contract settings -------------------------------------------------------------
    cloudstack_url: str
    cloudstack_api_key: SecretStr
    cloudstack_secret_key: SecretStr
    zone: str
    template_id: str
    service_offering_id: str
    disk_offering_id: str | None = None
    network_id: str
    appliance_vm_id: str
    volume_daemon_url: str = "http://127.0.0.1:8090"
    virtio_inject_command: str = "sudo /opt/migratekit/bin/inject-virtio-drivers.sh"
    metrics_port: int = Field(default=9108, ge=0, le=65535)

    # --- additions ------------------------------------------------------------------------
    metrics_host: str = "0.0.0.0"
    max_concurrent_jobs: int = Field(default=200, ge=1)  # jobs one process runs at once
    # container objects made (net of those freed) before a young collection of Python's garbage
    # collector (its own default is 700): most of a job's objects are freed by their reference
    # counts soon after; at 700, collections caught them in flight and spent 10-15% of serve's CPU
    gc_young_collection_after: int = Field(default=10_000, ge=1)
    # younger collections between two full ones of Python's garbage collector (its own default
    # is 10): with a thousand jobs in flight a full collection walks every live object
    gc_full_collection_after: int = Field(default=100, ge=1)
    command_prefetch: int = Field(default=64, ge=1)
    projector_prefetch: int = Field(default=256, ge=1)
    delivery_limit: int = Field(default=5, ge=1)  # quorum queue redeliveries before DLX
    lease_seconds: PositiveFloat = 30.0  # a running job's lease; renewed every third of it
    claim_interval_seconds: PositiveFloat = 1.0  # how often to look for unowned jobs
    outbox_poll_seconds: PositiveFloat = 0.2
    outbox_batch: int = Field(default=500, ge=1)
    # a relay round woken by a commit (the round before was not full) first waits this long for
    # the commits of the same moment, and a projector batch that is not full waits this long
    # for more deliveries: fewer, larger transactions at a trickle, for this much more lag
    outbox_linger_seconds: float = Field(default=0.01, ge=0, le=1)
    projector_linger_seconds: float = Field(default=0.01, ge=0, le=1)
    poll_interval_seconds: PositiveFloat = 2.0  # CloudStack async job / daemon op polling
    # from this many waits on one system at once, a poll round lists them with one request
    # (and a new wait may skip its first ask: adapters/poller.py)
    poll_batch_from: int = Field(default=8, ge=1)
    # calls a second to CloudStack from this process at most (0: no limit). With CloudStack's
    # API throttling on (api.throttling.enabled), keep the sum over all serve processes below the
    # account's api.throttling.max / api.throttling.interval, leaving room for its other users;
    # without it a refused call (429) makes every call wait until CloudStack's window ends, then
    # goes again (adapters/pace.py)
    cloudstack_max_calls_per_second: float = Field(default=0.0, ge=0)
    # CloudStack's event bus (its RabbitMQ event bus's `exchange`, commonly cloudstack-events):
    # a wait on an async job then ends when CloudStack says the job is done, not at the next
    # poll round (adapters/cloudstack_events.py); empty: off, the waits poll only
    cloudstack_events_exchange: str = ""
    # the broker CloudStack publishes its events to (default: FAILOVER_AMQP_URL's)
    cloudstack_events_amqp_url: SecretStr | None = None
    snapshot_timeout_seconds: PositiveFloat = 1800.0
    async_job_timeout_seconds: PositiveFloat = 1800.0
    volume_operation_timeout_seconds: PositiveFloat = 600.0
    inject_timeout_seconds: PositiveFloat = 3600.0
    # where each device's injection lock lives (one run per device at a time, even past a
    # killed serve: adapters/injection.py); default: <the system's temporary directory>/failover-inject
    inject_lock_dir: str = ""
    http_timeout_seconds: PositiveFloat = 60.0
    retry_attempts: int = Field(default=5, ge=1)  # tries of a transient failure
    retry_backoff_seconds: PositiveFloat = 2.0  # first backoff, doubles, capped at 60 s
    # an outage's failure (no answer, a 5xx, work forgotten in a restart: errors.OUTAGE_CODES)
    # is tried again until both the attempts were made and this long has passed since it first
    # failed (0: the attempts alone): a CloudStack or Volume Daemon outage shorter than this is
    # ridden out (each try's note on the job's progress) instead of failing the step
    retry_window_seconds: float = Field(default=300.0, ge=0)
    drain_seconds: PositiveFloat = 30.0  # SIGTERM: how long to wait for steps in flight
    process_name: str | None = None  # lease owner id; default host:pid:random
    # take, record and answer commands in a process of serve's own (failover/intake.py), so a
    # request's JobAccepted does not queue behind the running jobs' work in serve's event loop
    intake_process: bool = False
    # the same in a thread of serve's own (failover/intake.py IntakeThread): one process, its
    # own event loop, so the answer waits only for the interpreter lock. On by default wherever
    # serve runs the orchestrator and the relay without the intake process; where it cannot
    # run (roles without the relay, FAILOVER_INTAKE_PROCESS=true), only an explicit `true` is
    # an error: the default then leaves the intake in serve's loop (`intake_thread_wanted`)
    intake_thread: bool = True
    # with it, the longest a thread holding the interpreter lock keeps the other waiting
    # (Python's sys.setswitchinterval, 0.005 by default): each step of an answer waits for it
    intake_thread_switch_seconds: float = Field(default=0.001, gt=0, le=0.1)

    @field_validator("cloudstack_events_amqp_url")
    @classmethod
    def _events_amqp_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and urlsplit(value.get_secret_value()).scheme not in ("amqp", "amqps"):
            raise ValueError(f"must be an amqp:// or amqps:// URL, got scheme "
                             f"{urlsplit(value.get_secret_value()).scheme!r}")
        return value

    @field_validator("cloudstack_url", "volume_daemon_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"must be an http:// or https:// URL with a host, got scheme {parts.scheme!r}"
            )
        return value.rstrip("/")

    @field_validator("virtio_inject_command")
    @classmethod
    def _command_splits(cls, value: str) -> str:
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot be split into arguments: {exc}") from exc
        if not argv:
            raise ValueError("must name a program")
        return value

    @property
    def intake_thread_explicit(self) -> bool:
        """Whether FAILOVER_INTAKE_THREAD was set (in the environment, a .env file or by
        name), rather than left at its default."""
        return "intake_thread" in self.model_fields_set

    def intake_thread_wanted(self, roles: Iterable[str]) -> bool:
        """Whether serve with these roles runs its intake in a thread of its own: asked for,
        or by default wherever it can (the orchestrator with the relay, no intake process)."""
        roles = tuple(roles)
        return (self.intake_thread and not self.intake_process
                and "orchestrator" in roles and "relay" in roles)

    @model_validator(mode="after")
    def _one_intake(self) -> Settings:
        if self.intake_process and self.intake_thread and self.intake_thread_explicit:
            raise ValueError("FAILOVER_INTAKE_PROCESS and FAILOVER_INTAKE_THREAD are both true: the intake runs "
                             "either in a process or in a thread of serve's; set one of them to false")
        return self

    @model_validator(mode="after")
    def _warn_plain_http(self) -> Settings:
        for name in ("cloudstack_url", "volume_daemon_url"):
            parts = urlsplit(getattr(self, name))
            if parts.scheme == "http" and not _is_local(parts.hostname or ""):
                log.warning(
                    "FAILOVER_%s uses plain http to %s: API keys and signed requests travel "
                    "unencrypted; use https:// outside a trusted network",
                    name.upper(),
                    parts.hostname,
                )
        return self

    @property
    def inject_argv(self) -> list[str]:
        """The injection command as an argument list (never run through a shell)."""
        return shlex.split(self.virtio_inject_command)

    def safe_summary(self) -> dict[str, object]:
        """The settings with secrets removed, for the start-up log line."""
        return {
            "amqp_url": redact_url(self.amqp_url.get_secret_value()),
            "database_url": redact_url(self.database_url.get_secret_value()),
            "cloudstack_url": redact_url(self.cloudstack_url),
            "zone": self.zone,
            "volume_daemon_url": redact_url(self.volume_daemon_url),
            "appliance_vm_id": self.appliance_vm_id,
            "metrics_port": self.metrics_port,
            "max_concurrent_jobs": self.max_concurrent_jobs,
            "cloudstack_events_exchange": self.cloudstack_events_exchange or None,
            "cloudstack_events_amqp_url": (redact_url(self.cloudstack_events_amqp_url.get_secret_value())
                                           if self.cloudstack_events_amqp_url is not None else None),
        }
