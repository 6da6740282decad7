"""`failoverctl check`: whether this machine's settings would let a failover run, looked at
before one is asked for (before a DR test, after a change of settings), not discovered by the
first job at its fourth step.

Each check reads, never writes: the database (reachable, migrated), RabbitMQ (reachable),
CloudStack (reachable, the API key accepted, and every id the settings name: the zone, the
template ready in it, the offerings, the network, the appliance VM; and whether the key's
account may expunge and force-stop VMs), the Volume Daemon (its API, as the service asks it)
and the driver injection (the command, `flock`, the lock directory). A check that fails says
what to set or do; a note is something to know that need not stop a failover.

With `--vm`, each VM named is also validated as a test failover's first step validates it (the
same code, `pre_failover_validation`, on the platform tables and the Volume Daemon: read only),
and looked up among the jobs: one holding it would have the request rejected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, cast

import aiohttp

from adapters.bus import connect
from adapters.cloudstack import CloudStackAdapter
from adapters.db.commands import BLOCKER, conflict_detail
from adapters.db.engine import make_engine
from adapters.db.migrate import schema_problem
from adapters.db.platform import PlatformTables
from adapters.injection import InjectionScript
from adapters.volume_daemon import VolumeDaemonAdapter
from statemachine.context import EngineConfig, JobContext, Ports
from statemachine.errors import NotFound, RefusedError, StepError
from statemachine.ports import JobRow, JobStorePort
from statemachine.steps.failover import pre_failover_validation

from .settings import Settings, redact_url

__all__ = ["CHECK_TIMEOUT_SECONDS", "Check", "run_checks"]

# one look's time at most (a system down answers nothing: the check says so, not hangs)
CHECK_TIMEOUT_SECONDS = 15.0


@dataclass
class Check:
    name: str
    ok: bool | None  # passed; failed; None: a note, not a failure
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Failed(Exception):
    """A check's failure, with what to do."""


async def _timed(look: Awaitable[str | tuple[bool | None, str]], what: str) -> tuple[bool | None, str]:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            found = await look
    except TimeoutError:
        return False, f"{what} did not answer within {CHECK_TIMEOUT_SECONDS:.0f} s"
    except _Failed as exc:
        return False, str(exc)
    except StepError as exc:
        return False, exc.message
    except Exception as exc:  # (a check's own bug or an error no one foresaw: said, not a traceback)
        return False, f"the check failed: {type(exc).__name__}: {exc}"
    return found if isinstance(found, tuple) else (True, found)


async def run_checks(settings: Settings, vm_ids: Sequence[str] = ()) -> list[Check]:
    """Every check, in order (with each of `vm_ids` validated last); none raises."""
    checks: list[Check] = []

    async def check(name: str, look: Callable[[], Awaitable[str | tuple[bool | None, str]]], what: str) -> bool:
        ok, detail = await _timed(look(), what)
        checks.append(Check(name, ok, detail))
        return ok is not False

    await check("database", lambda: _database(settings), "MariaDB")
    await check("broker", lambda: _broker(settings), "RabbitMQ")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        cs = CloudStackAdapter(settings.cloudstack_url, settings.cloudstack_api_key.get_secret_value(),
                               settings.cloudstack_secret_key.get_secret_value(), session=http,
                               timeout=CHECK_TIMEOUT_SECONDS)
        daemon = VolumeDaemonAdapter(settings.volume_daemon_url, session=http, timeout=CHECK_TIMEOUT_SECONDS)
        if await check("cloudstack", lambda: _cloudstack(cs), "CloudStack"):
            zone: list[str] = []
            if await check("zone", lambda: _zone(cs, settings.zone, zone), "CloudStack"):
                await check("template", lambda: _template(cs, settings.template_id, zone[0]), "CloudStack")
                await check("network", lambda: _network(cs, settings.network_id, zone[0]), "CloudStack")
            await check("service offering", lambda: _offering(cs, settings.service_offering_id), "CloudStack")
            if settings.disk_offering_id:
                await check("disk offering", lambda: _one(
                    cs, "listDiskOfferings", "diskoffering", settings.disk_offering_id or "",
                    "FAILOVER_DISK_OFFERING_ID"), "CloudStack")
            await check("appliance VM", lambda: _appliance(cs, settings.appliance_vm_id), "CloudStack")
            await check("account rights", lambda: _rights(cs), "CloudStack")
        daemon_ok = await check("volume daemon", lambda: _volume_daemon(daemon, settings), "the Volume Daemon")
        await check("driver injection", lambda: _injection(settings), "the injection's lock directory")
        if vm_ids and not (checks[0].ok and daemon_ok):
            checks.append(Check("VMs", False, "not validated: the database and the Volume Daemon must pass first"))
        elif vm_ids:
            from .service import engine_config

            engine = make_engine(settings.database_url.get_secret_value(), pool_size=2)
            ports = Ports(cloudstack=cs, volumes=daemon,
                          injection=InjectionScript(settings.inject_argv, timeout=settings.inject_timeout_seconds),
                          platform=PlatformTables(engine),
                          store=cast(JobStorePort, None))  # (a test failover's validation writes nothing)
            config = dataclasses.replace(engine_config(settings), retry_attempts=1, retry_window=0.0)
            try:
                for vm_id in vm_ids:
                    notes: list[str] = []
                    await check(f"VM {vm_id}", partial(_vm, engine, ports, config, vm_id, notes), "the validation")
                    checks.extend(Check(f"VM {vm_id}", None, note) for note in notes)
            finally:
                await engine.dispose()
    return checks


async def _vm(engine: Any, ports: Ports, config: EngineConfig, vm_id: str, notes: list[str]) -> str:
    """A test failover's validation of `vm_id`, run as its first step runs it (tried once); its
    warnings go to `notes`. A job holding the VM fails it, said as the intake would reject it."""
    async with engine.connect() as conn:
        holder = (await conn.execute(BLOCKER, {"vm_id": vm_id})).first()
    if holder is not None:
        raise _Failed(f"a request would be rejected (conflict): {conflict_detail(vm_id, holder)}")
    job_id = str(uuid.uuid4())
    row = JobRow(job_id=job_id, request_id=job_id, job_type="test-failover", vm_id=vm_id, vm_name="",
                 correlation_id=job_id, parent_job_id=None, requested_by="failoverctl check", status="checking",
                 last_sequence=0, resume_state=None, options={}, plan={}, cancel_requested=False,
                 rollback_requested=False, failed_step=None, error_code=None, error_message=None,
                 created_at=time.time(), started_at=None)
    ctx = JobContext(row=row, ports=ports, config=config)
    ctx.current_step = "pre-failover-validation"
    try:
        result = await pre_failover_validation(ctx)
    finally:
        notes.extend(message for level, message, _, _ in ctx.pending_lines() if level in ("WARN", "ERROR"))
    plan = ctx.row.plan
    return (f"{plan['vm_name']}: {len(plan['volumes'])} volume(s) on the appliance, root {result.outputs['root_volume_id']}; "
            f"networks from {plan['network_source']}; driver injection {'yes' if plan['inject'] else 'no'} "
            f"({plan['inject_reason']})")


async def _database(settings: Settings) -> str:
    url = settings.database_url.get_secret_value()
    engine = None
    try:
        try:
            engine = make_engine(url, pool_size=1)  # (a TLS option's file missing fails here)
            problem = await schema_problem(engine)
        except Exception as exc:
            raise _Failed(f"cannot reach MariaDB at {redact_url(url)} (FAILOVER_DATABASE_URL): "
                          f"{type(exc).__name__}: {exc}") from exc
        if problem is not None:
            raise _Failed(problem)
        return f"reachable at {redact_url(url)}, migrated"
    finally:
        if engine is not None:
            await engine.dispose()


async def _broker(settings: Settings) -> str:
    url = settings.amqp_url.get_secret_value()
    try:
        connection = await connect(url, ca_file=settings.amqp_ca_file, name="failoverctl check")
    except Exception as exc:
        raise _Failed(f"cannot reach RabbitMQ at {redact_url(url)} (FAILOVER_AMQP_URL): "
                      f"{type(exc).__name__}: {exc}") from exc
    await connection.close()
    return f"reachable at {redact_url(url)}"


async def _cloudstack(cs: CloudStackAdapter) -> str:
    capabilities = await cs.capabilities()  # (any call: the key and the signature are checked)
    version = capabilities.get("cloudstackversion")
    return f"reachable, the API key accepted{f' (CloudStack {version})' if version else ''}"


async def _zone(cs: CloudStackAdapter, zone: str, found: list[str]) -> str:
    zone_id = await cs.resolve_zone(zone)
    zones = await _listed(cs, "listZones", "zone", "FAILOVER_ZONE", id=zone_id)
    if not zones:
        raise _Failed(f"CloudStack lists no zone {zone_id} for this API key; check FAILOVER_ZONE")
    found.append(zone_id)
    return f"{zones[0].get('name', '?')} ({zone_id})"


async def _template(cs: CloudStackAdapter, template_id: str, zone_id: str) -> tuple[bool | None, str]:
    items = await _listed(cs, "listTemplates", "template", "FAILOVER_TEMPLATE_ID", id=template_id,
                          templatefilter="executable", zoneid=zone_id)
    here = [t for t in items if t.get("id") == template_id and t.get("zoneid", zone_id) == zone_id]
    if not here:
        raise _Failed(f"CloudStack lists no template {template_id} this API key may deploy from in zone {zone_id}; "
                      "check FAILOVER_TEMPLATE_ID (and that the template is in that zone)")
    if not here[0].get("isready"):
        raise _Failed(f"template {template_id} ({here[0].get('name', '?')}) is not ready in zone {zone_id} "
                      f"({here[0].get('status', 'no status')}); wait until CloudStack shows it ready")
    return True, f"{here[0].get('name', '?')} ({template_id}), ready in the zone"


async def _network(cs: CloudStackAdapter, network_id: str, zone_id: str) -> str:
    items = await _listed(cs, "listNetworks", "network", "FAILOVER_NETWORK_ID", id=network_id)
    if not items:
        raise _Failed(f"CloudStack lists no network {network_id} for this API key; check FAILOVER_NETWORK_ID")
    if items[0].get("zoneid") not in (None, zone_id):
        raise _Failed(f"network {network_id} is in zone {items[0].get('zoneid')}, not in FAILOVER_ZONE's "
                      f"{zone_id}; check FAILOVER_NETWORK_ID and FAILOVER_ZONE")
    return f"{items[0].get('name', '?')} ({network_id})"


async def _offering(cs: CloudStackAdapter, offering_id: str) -> tuple[bool | None, str]:
    offering = await _item(cs, "listServiceOfferings", "serviceoffering", offering_id, "FAILOVER_SERVICE_OFFERING_ID")
    name = offering.get("name", "?")
    if offering.get("iscustomized") is False:
        return None, (f"{name} ({offering_id}) is a fixed-size offering: CloudStack sizes a VM by it, not by the "
                      "source VM's CPU count and memory the deploy passes (those are a custom offering's); use a "
                      "custom offering for test VMs the size of their source")
    return True, f"{name} ({offering_id}), custom: the source VM's CPU count and memory"


async def _item(cs: CloudStackAdapter, command: str, key: str, wanted: str, setting: str) -> dict[str, Any]:
    items = await _listed(cs, command, key, setting, id=wanted)
    if not items:
        raise _Failed(f"CloudStack lists no {key} {wanted} for this API key; check {setting}")
    return items[0]


async def _one(cs: CloudStackAdapter, command: str, key: str, wanted: str, setting: str) -> str:
    return f"{(await _item(cs, command, key, wanted, setting)).get('name', '?')} ({wanted})"


async def _listed(cs: CloudStackAdapter, command: str, key: str, setting: str, **params: Any) -> list[dict[str, Any]]:
    """A listing by id; an id CloudStack refuses (not one, or not of this kind) fails, naming
    the setting."""
    try:
        return await cs.listing(command, key, **params)
    except StepError as exc:
        if exc.code != "CLOUDSTACK_REFUSED":
            raise
        raise _Failed(f"{exc.message}; check {setting}") from exc


async def _appliance(cs: CloudStackAdapter, vm_id: str) -> tuple[bool | None, str]:
    items = await _listed(cs, "listVirtualMachines", "virtualmachine", "FAILOVER_APPLIANCE_VM_ID", id=vm_id)
    if not items:
        raise _Failed(f"CloudStack lists no VM {vm_id} for this API key; set FAILOVER_APPLIANCE_VM_ID to the "
                      "appliance (OMA) VM the replicated volumes are attached to")
    name, state = items[0].get("name", "?"), items[0].get("state", "?")
    if state != "Running":
        return None, (f"{name} ({vm_id}) is {state}: the replicated volumes go back to it after each test; "
                      "a failover does not need it running, the replication does")
    return True, f"{name} ({vm_id}), {state}"


async def _rights(cs: CloudStackAdapter) -> tuple[bool | None, str]:
    """What CloudStack lets a user account do that the undo needs (an admin's key may anyway)."""
    capabilities = await cs.capabilities()
    said = []
    if capabilities.get("allowuserexpungerecovervm") is not True:
        said.append("allow.user.expunge.recover.vm is not true for the key's account: a user account's key could "
                    "not expunge the test VMs that rollbacks and cleanups destroy")
    if capabilities.get("allowuserforcestopvm") is False:
        said.append("allow.user.force.stop.vm is false for the key's account: a user account's key could not "
                    "force the stop of a test VM")
    if said:
        return None, ("; ".join(said) + ". Fine if the key is an admin's or a domain admin's (README, Configuration: "
                      "what the CloudStack API key must be allowed)")
    return True, "the key's account may expunge and force-stop VMs"


async def _volume_daemon(daemon: VolumeDaemonAdapter, settings: Settings) -> tuple[bool | None, str]:
    """The daemon's API as the adapter uses it (its listing of running operations). A listing
    refused (a 404: another server, or a daemon without that route, whose waits the service
    then polls one by one) is a note; no answer, or a failure of the daemon's, fails."""
    shown = redact_url(settings.volume_daemon_url)
    try:
        running = await daemon.operations_running()
    except (NotFound, RefusedError) as exc:
        return None, (f"{shown} refused the Volume Daemon's listing of operations ({exc.message}): check that "
                      "FAILOVER_VOLUME_DAEMON_URL is the daemon's base URL; a daemon without that listing works, its "
                      "operations then waited on one by one")
    except StepError as exc:
        raise _Failed(f"the Volume Daemon at {shown} (FAILOVER_VOLUME_DAEMON_URL): {exc.message}") from exc
    return True, f"its API answers at {shown} ({running} operation(s) running)"


async def _injection(settings: Settings) -> str:
    script = InjectionScript(settings.inject_argv, timeout=settings.inject_timeout_seconds,
                             lock_dir=settings.inject_lock_dir or None)
    problem = await asyncio.to_thread(script.problem)
    if problem is not None:
        raise _Failed(problem)
    return f"{settings.inject_argv[0]} runs under flock, locks in {script.lock_dir}"
