"""CloudStack adapter on the `cs` package's asyncio client (request signing is the library's).

Async commands are sent with `fetch_result=False` so the `id` and `jobid` of the first answer
can be recorded before waiting (a resumable step needs both); waiting polls
`queryAsyncJobResult` once (while that pays), then joins the adapter's shared poller, whose rounds ask about
many waits with one `listAsyncJobs` (adapters/poller.py). CloudStack's errors become the engine's: 431 (a refused request) is a
`RefusedError`, 5xx, timeouts and connection failures are `TransientError`s, answers of the
wrong shape are `MalformedResponse`. A 429 (the account's API limit reached) is no failure: the
call is made again once CloudStack's window has ended, and every call waits until then
(adapters/pace.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aiohttp
from cs import AIOCloudStack, CloudStackApiException, CloudStackException

from adapters.pace import CallPace, PaceTimeout
from adapters.poller import SharedPoller
from schemas.common import is_uuid_text
from statemachine.errors import MalformedResponse, RefusedError, StepError, TransientError
from statemachine.ports import AsyncStart, CsSnapshot, CsVm, CsVolume, DeploySpec

log = logging.getLogger(__name__)

_PAGE = 500  # CloudStack's default.page.size
_PAGES = 8  # pages of listAsyncJobs a poll round reads at most (from the newest jobs back)
_BEGUN = 10_000  # async jobs started here whose start time is kept until their wait begins
_CLOCK_FRESH = 300.0  # seconds a `created` CloudStack showed serves as a lower bound for new jobs
_CLOCK_MARGIN = 120  # seconds taken off it: management servers behind one endpoint may disagree

# CloudStack's API throttling (ApiErrorCode.API_LIMIT_EXCEED): "The given user has reached
# his/her account api limit, please retry after [N] ms." (adapters/pace.py)
API_LIMIT_EXCEEDED = 429
_RETRY_AFTER = re.compile(r"retry after \[?(\d+)\]? ?ms")  # (older releases: no brackets)
_THROTTLE_MIN, _THROTTLE_MAX = 0.05, 60.0  # seconds a refusal holds the calls, at least and at most
_THROTTLE_SAY_EVERY = 60.0  # seconds between two warnings in the log
_THROTTLE_ADVICE = ("Set FAILOVER_CLOUDSTACK_MAX_CALLS_PER_SECOND below the account's limit (CloudStack's "
                    "api.throttling.max calls per api.throttling.interval seconds), or raise that limit")

# adapter, operation, outcome, seconds: the metric labels of failover.metrics.observe_adapter_call
CallOutcome = Literal["ok", "error", "retry"]
Timer = Callable[[Literal["cloudstack", "volume_daemon", "injection"], str, CallOutcome, float], None]


class CloudStackAdapter:
    """`statemachine.ports.CloudStackPort` for one CloudStack endpoint."""

    def __init__(self, endpoint: str, api_key: str, secret_key: str, *, session: aiohttp.ClientSession,
                 poll_interval: float = 2.0, timeout: float = 60.0, observe: Timer | None = None,
                 batch_from: int = 8, max_calls_per_second: float = 0.0,
                 on_throttled: Callable[[], None] | None = None) -> None:
        self._pace = CallPace(max_calls_per_second)
        self._on_throttled = on_throttled or (lambda: None)
        self._throttle_said = -_THROTTLE_SAY_EVERY
        self._cs = AIOCloudStack(endpoint=endpoint, key=api_key, secret=secret_key, session=session,
                                 timeout=int(timeout), fetch_result=False)
        self._timeout = timeout  # per request: `cs` applies its own only to sessions it opens
        self._observe = observe or (lambda *a: None)
        self._zones: dict[str, str] = {}
        # the newest `created` CloudStack has shown us (its own clock; when we saw it), and for
        # the async jobs started here, a start no later than the job's: that clock, read before
        # the job was started, less a margin for management servers whose clocks differ. A
        # listing finds the job from there, so its wait may skip its first ask
        self._clock: tuple[datetime, float] | None = None  # (in CloudStack's own offset, monotonic)
        self._begun: dict[str, str] = {}
        self._poller: SharedPoller[dict[str, Any]] = SharedPoller(
            poll_interval, batch_from, self._query, self._list_jobs,
            # 432: the command "does not exist or is not available for" the key's role
            unsupported=lambda exc: isinstance(exc, RefusedError) and exc.code == "CLOUDSTACK_UNAVAILABLE",
            asked_to_wait=lambda exc: isinstance(exc, TransientError) and exc.code == "CLOUDSTACK_THROTTLED",
            listing="CloudStack's listAsyncJobs (for the API key's role)")

    async def _call(self, command: str, **params: Any) -> dict[str, Any]:
        began = time.monotonic()
        outcome: CallOutcome = "error"
        try:
            while True:
                try:
                    await self._pace.turn(deadline=began + self._timeout)
                except PaceTimeout:
                    raise TransientError("CLOUDSTACK_THROTTLED", f"{command} waited {self._timeout:.0f} s for its "
                                         f"turn under CloudStack's API limit; {_THROTTLE_ADVICE}") from None
                sent = time.monotonic()
                try:
                    async with asyncio.timeout(self._timeout):
                        result = await getattr(self._cs, command)(**params)
                    self._pace.ok()
                    break
                except CloudStackApiException as exc:
                    if _code(exc) != API_LIMIT_EXCEEDED:
                        self._pace.ok()  # (answered: it counted in CloudStack's window)
                        raise
                    self._throttled(command, exc, began, sent)  # (raises once the wait would be too long)
            if not isinstance(result, dict):
                raise MalformedResponse("CloudStack", f"{command} answered {type(result).__name__}, not an object")
            outcome = "ok"
            return result
        except CloudStackApiException as exc:
            raise _translate(command, exc) from exc
        except CloudStackException as exc:  # non-JSON body, malformed document, timeout
            status = getattr(exc.response, "status", None)
            if isinstance(status, int) and status >= 500:  # a proxy's error page: worth another try
                raise TransientError("CLOUDSTACK_ERROR", f"CloudStack failed {command} ({status}), "
                                                         "with an answer that is not CloudStack's") from exc
            raise MalformedResponse("CloudStack", f"{command}: {exc.args[0] if exc.args else exc}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientError("CLOUDSTACK_UNREACHABLE",
                                 f"CloudStack did not answer {command} ({type(exc).__name__}: {exc}); "
                                 "check FAILOVER_CLOUDSTACK_URL and the network") from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise MalformedResponse("CloudStack", f"{command}: {exc}") from exc
        finally:
            self._observe("cloudstack", command, outcome, time.monotonic() - began)

    def _throttled(self, command: str, exc: CloudStackApiException, began: float, sent: float) -> None:
        """CloudStack refused a call for the account's API limit (429): it did nothing, so it is
        made again once the window CloudStack names has ended, and until then no call of this
        process goes (they would be refused too). Raises `TransientError` once waiting would
        take the call past FAILOVER_HTTP_TIMEOUT_SECONDS: the step's retries take it from there."""
        self._on_throttled()
        text = _text(exc)
        found = _RETRY_AFTER.search(text)
        wait = min(max(int(found.group(1)) / 1000 if found else 1.0, _THROTTLE_MIN), _THROTTLE_MAX)
        quiet = self._pace.held_for > 0  # (another call's refusal already holds them: said once)
        self._pace.hold(wait, sent)
        if time.monotonic() + wait - began > self._timeout:
            raise TransientError("CLOUDSTACK_THROTTLED", f"CloudStack refused {command} for the account's API limit "
                                 f"for {self._timeout:.0f} s ({text}); {_THROTTLE_ADVICE}")
        now = time.monotonic()
        if not quiet and now - self._throttle_said >= _THROTTLE_SAY_EVERY:
            self._throttle_said = now
            log.warning("CloudStack refused %s: the API key's account reached its API limit (429: %s); calls to "
                        "CloudStack wait %.2f s and go on. %s", command, text, wait, _THROTTLE_ADVICE)

    async def _async(self, command: str, **params: Any) -> AsyncStart:
        before = self._clock_before()
        data = await self._call(command, **params)
        job = data.get("jobid")
        if not isinstance(job, str):
            raise MalformedResponse("CloudStack", f"{command} answered without a jobid")
        if before is not None:
            if len(self._begun) >= _BEGUN:  # starts never waited on (a job stopped in between)
                del self._begun[next(iter(self._begun))]
            self._begun[job] = before
        rid = data.get("id")
        return AsyncStart(resource_id=rid if isinstance(rid, str) else None, job_id=job)

    @staticmethod
    def _items(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        items = data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise MalformedResponse("CloudStack", f"list of {key} has the wrong shape")
        return items

    async def listing(self, command: str, key: str, **params: Any) -> list[dict[str, Any]]:
        """A list command's items (`failoverctl check`'s look at the settings' ids)."""
        return self._items(await self._call(command, **params), key)

    async def capabilities(self) -> dict[str, Any]:
        """listCapabilities: what CloudStack allows the API key's account."""
        found = (await self._call("listCapabilities")).get("capability", {})
        if not isinstance(found, dict):
            raise MalformedResponse("CloudStack", "listCapabilities answered a capability of the wrong shape")
        return found

    # ------------------------------------------------------------------ port

    async def resolve_zone(self, zone: str) -> str:
        if is_uuid_text(zone):
            return zone
        if zone not in self._zones:
            zones = self._items(await self._call("listZones", name=zone), "zone")
            match = [z for z in zones if z.get("name") == zone]
            if not match:
                raise RefusedError("ZONE_NOT_FOUND", f"CloudStack has no zone named {zone!r}; check FAILOVER_ZONE")
            zone_id = match[0].get("id")
            if not isinstance(zone_id, str) or not zone_id:
                raise MalformedResponse("CloudStack", f"zone {zone!r} listed without an id")
            self._zones[zone] = zone_id
        return self._zones[zone]

    def _outcome(self, data: dict[str, Any], job_id: str, command: str) -> dict[str, Any] | None:
        """An async job's result once it succeeded; None while it runs; raises if it failed."""
        status = data.get("jobstatus")
        if status == 1:
            result = data.get("jobresult", {})
            return result if isinstance(result, dict) else {}
        if status == 2:
            raise _job_failed(job_id, data)
        if status != 0:
            raise MalformedResponse("CloudStack", f"{command} jobstatus={status!r}")
        return None

    def _saw(self, created: object) -> None:
        """CloudStack showed a job's `created`: its clock is at least there."""
        if not isinstance(created, str):
            return
        try:
            moment = datetime.fromisoformat(created)  # its offset kept: the day CloudStack reads
        except ValueError:
            return
        if moment.tzinfo is not None and (self._clock is None or moment >= self._clock[0]):
            self._clock = (moment, time.monotonic())

    def _clock_before(self) -> str | None:
        """A time in CloudStack's clock and form no later than a job started now, or None when
        what we saw of its clock is too old to be worth reading listings from."""
        if self._clock is None or time.monotonic() - self._clock[1] > _CLOCK_FRESH:
            return None
        return (self._clock[0] - timedelta(seconds=_CLOCK_MARGIN)).strftime("%Y-%m-%dT%H:%M:%S%z")

    def job_done(self, job_id: str) -> None:
        """CloudStack said (its event bus: adapters/cloudstack_events.py) that `job_id` ended:
        its wait asks at once instead of at the next round."""
        self._poller.poke(job_id)

    @property
    def waits_ended_by_events(self) -> int:
        """Waits whose end an event brought forward (the rest ended at a poll round)."""
        return self._poller.pokes_settled

    async def _query(self, job_id: str) -> dict[str, Any] | None:
        data = await self._call("queryAsyncJobResult", jobid=job_id)
        self._saw(data.get("created"))
        return self._outcome(data, job_id, "queryAsyncJobResult")

    async def wait_job(self, job_id: str, timeout: float) -> dict[str, Any]:
        """Asks once at once while that pays (always for a job not started here); then waits
        with the adapter's other waits (adapters/poller.py)."""
        since = self._begun.pop(job_id, None)
        if since is None or self._poller.ask_first():
            data = await self._call("queryAsyncJobResult", jobid=job_id)
            try:
                result = self._outcome(data, job_id, "queryAsyncJobResult")
            except StepError:
                self._poller.asked_first(True)  # ended (failed): the ask found it done
                raise
            self._poller.asked_first(result is not None)
            if result is not None:
                return result
            created = data.get("created")  # CloudStack's own clock: where a listing of its jobs starts
            self._saw(created)
            since = created if isinstance(created, str) else None
        # past its timeout a wait is over for good: waiting again would stretch the operator's
        # FAILOVER_*_TIMEOUT_SECONDS by the attempts (the job is still CloudStack's to finish)
        return await self._poller.wait(
            job_id, timeout, lambda: StepError(
                "CLOUDSTACK_JOB_TIMEOUT", f"CloudStack async job {job_id} did not finish within {timeout:.0f} s; "
                "look at it in CloudStack (listAsyncJobs), and if it is only slow, raise "
                "FAILOVER_SNAPSHOT_TIMEOUT_SECONDS (snapshots) or FAILOVER_ASYNC_JOB_TIMEOUT_SECONDS"),
            note=since)

    async def _list_jobs(self, notes: Mapping[str, object]) -> dict[str, Any]:
        """The outcomes of the waits whose start CloudStack told us, from `listAsyncJobs`.

        CloudStack reads only the date of `startdate` (midnight, its own time zone: the date
        its `created` shows) and lists by id, oldest first, in pages: so the count first,
        then pages from the newest back, until every wait is found or the pages reach jobs
        older than the oldest wait; at most `_PAGES` pages a round. A wait not found (older,
        or not listed) is polled on its own."""
        starts = {k: t for k, v in notes.items() if isinstance(v, str) and (t := _cs_time(v)) is not None}
        if not starts:
            return {}
        oldest_key = min(starts, key=lambda k: starts[k])
        oldest, day = starts[oldest_key], str(notes[oldest_key])[:10]
        count = (await self._call("listAsyncJobs", startdate=day, page=1, pagesize=1)).get("count", 0)
        if not isinstance(count, int) or count < 0:
            raise MalformedResponse("CloudStack", f"listAsyncJobs count={count!r}")
        found: dict[str, Any] = {}
        # the waits are among the newest jobs: pages of a third of their number read little more
        # than the jobs begun since the oldest of them (every job listed comes with its result)
        size = min(_PAGE, max(16, -(-len(starts) // 3)))
        last = -(-count // size)
        for page in range(last, max(0, last - _PAGES), -1):
            jobs = self._items(await self._call("listAsyncJobs", startdate=day, page=page, pagesize=size),
                               "asyncjobs")
            if page == last and jobs:  # the newest job listed
                self._saw(jobs[-1].get("created"))
            for j in jobs:
                jid = j.get("jobid")
                if isinstance(jid, str) and jid in starts:
                    try:
                        found[jid] = self._outcome(j, jid, "listAsyncJobs")
                    except StepError as exc:
                        found[jid] = exc
                    if found[jid] is None and isinstance(created := j.get("created"), str):
                        self._poller.renote(jid, created)  # its own start from now on
            if len(found) == len(starts):
                break
            first = _cs_time(str(jobs[0].get("created"))) if jobs else None
            if first is not None and first < oldest:  # the pages before hold older jobs only
                break
        return found

    async def create_snapshot(self, volume_id: str, name: str) -> AsyncStart:
        return await self._async("createSnapshot", volumeid=volume_id, name=name)

    def _snapshot(self, s: dict[str, Any]) -> CsSnapshot:
        try:
            return CsSnapshot(id=str(s["id"]), name=str(s.get("name", "")), volume_id=str(s.get("volumeid", "")),
                              state=str(s["state"]), revertable=bool(s.get("revertable", False)))
        except KeyError as exc:
            raise MalformedResponse("CloudStack", f"snapshot without {exc}") from exc

    async def find_snapshots(self, name: str, volume_id: str) -> list[CsSnapshot]:
        # CloudStack filters names with LIKE %name%: keep the exact ones
        items = self._items(await self._call("listSnapshots", volumeid=volume_id, name=name), "snapshot")
        found = [self._snapshot(s) for s in items if s.get("name") == name]
        return [s for s in found if s.state.lower() != "destroyed"]

    async def find_snapshot(self, name: str, volume_id: str) -> CsSnapshot | None:
        found = [s for s in await self.find_snapshots(name, volume_id) if s.state.lower() != "error"]
        return found[0] if found else None

    def snapshot_in(self, job_result: dict[str, Any]) -> CsSnapshot | None:
        s = job_result.get("snapshot")
        if not isinstance(s, dict) or not {"id", "state", "revertable"} <= s.keys():
            return None
        return self._snapshot(s)

    def vm_in(self, job_result: dict[str, Any]) -> CsVm | None:
        v = job_result.get("virtualmachine")
        if not isinstance(v, dict) or not {"id", "state"} <= v.keys():
            return None
        return self._vm(v)

    async def get_snapshot(self, snapshot_id: str) -> CsSnapshot | None:
        items = self._items(await self._call("listSnapshots", id=snapshot_id), "snapshot")
        return self._snapshot(items[0]) if items else None

    async def revert_snapshot(self, snapshot_id: str) -> AsyncStart:
        return await self._async("revertSnapshot", id=snapshot_id)

    async def volume_state(self, volume_id: str) -> str | None:
        items = self._items(await self._call("listVolumes", id=volume_id), "volume")
        if not items:
            return None
        state = items[0].get("state")
        if not isinstance(state, str) or not state:
            raise MalformedResponse("CloudStack", f"listVolumes id={volume_id}: state={state!r}")
        return state

    async def delete_snapshot(self, snapshot_id: str) -> AsyncStart:
        return await self._async("deleteSnapshot", id=snapshot_id)

    async def deploy_vm(self, spec: DeploySpec) -> AsyncStart:
        if "~" in spec.name or "~" in spec.display_name:  # `cs` signs "~" differently from CloudStack
            raise StepError("INVALID_NAME", "VM names must not contain '~'")
        params: dict[str, Any] = {
            "serviceofferingid": spec.service_offering_id, "templateid": spec.template_id,
            "zoneid": spec.zone_id, "name": spec.name, "displayname": spec.display_name,
            "networkids": list(spec.network_ids), "startvm": False,
            "details": {"cpuNumber": spec.cpu_count, "memory": spec.memory_mb},
        }
        if spec.disk_offering_id:
            params["diskofferingid"] = spec.disk_offering_id
        return await self._async("deployVirtualMachine", **params)

    def _vm(self, v: dict[str, Any]) -> CsVm:
        try:
            return CsVm(id=str(v["id"]), name=str(v.get("name", "")), state=str(v["state"]),
                        display_name=str(v.get("displayname") or ""))
        except KeyError as exc:
            raise MalformedResponse("CloudStack", f"virtual machine without {exc}") from exc

    async def find_vms(self, name: str) -> list[CsVm]:
        items = self._items(await self._call("listVirtualMachines", name=name), "virtualmachine")
        found = [self._vm(v) for v in items if v.get("name") == name]
        return [v for v in found if v.state not in ("Destroyed", "Expunging", "Expunged")]

    async def find_vm(self, name: str) -> CsVm | None:
        found = [v for v in await self.find_vms(name) if v.state != "Error"]
        return found[0] if found else None

    async def get_vm(self, vm_id: str) -> CsVm | None:
        items = self._items(await self._call("listVirtualMachines", id=vm_id), "virtualmachine")
        return self._vm(items[0]) if items else None

    async def start_vm(self, vm_id: str) -> AsyncStart:
        return await self._async("startVirtualMachine", id=vm_id)

    async def stop_vm(self, vm_id: str) -> AsyncStart:
        return await self._async("stopVirtualMachine", id=vm_id, forced=True)

    async def destroy_vm(self, vm_id: str) -> AsyncStart:
        return await self._async("destroyVirtualMachine", id=vm_id, expunge=True)

    async def list_vm_volumes(self, vm_id: str) -> list[CsVolume]:
        items = self._items(await self._call("listVolumes", virtualmachineid=vm_id), "volume")
        out = []
        for v in items:
            try:
                dev = v.get("deviceid")
                out.append(CsVolume(id=str(v["id"]), name=str(v.get("name", "")), type=str(v["type"]),
                                    vm_id=v.get("virtualmachineid"), device_id=int(dev) if dev is not None else None))
            except (KeyError, ValueError, TypeError) as exc:
                raise MalformedResponse("CloudStack", f"volume of the wrong shape ({exc})") from exc
        return out

    async def delete_volume(self, volume_id: str) -> None:
        try:
            await self._call("deleteVolume", id=volume_id)
        except RefusedError as exc:
            items = self._items(await self._call("listVolumes", id=volume_id), "volume")
            if items:  # still there: the refusal stands
                raise exc from None


def _code(exc: CloudStackApiException) -> object:
    """CloudStack's error code of a refused call (its HTTP status where the body has none)."""
    error = exc.error if isinstance(exc.error, dict) else {}
    code = error.get("errorcode")
    if code is None and exc.response is not None:
        code = getattr(exc.response, "status", None)
    return code


def _text(exc: CloudStackApiException) -> str:
    error = exc.error if isinstance(exc.error, dict) else {}
    return str(error.get("errortext") or exc)


def _job_failed(job_id: str, data: dict[str, Any]) -> StepError:
    """The error of a failed async job. Its `jobresult` carries the code of the command's own
    error (CloudStack's ApiAsyncJobDispatcher: 533 for want of capacity, 535 past a resource
    limit, 531 permission denied; `jobresultcode` the same): those are told apart as for a
    call's answer, the rest (530, a 431 found once the job ran) stay CLOUDSTACK_JOB_FAILED, tried
    its attempts. `failed_job` names the job either way: what it created may be left in Error."""
    result = data.get("jobresult") or {}
    text = str(result.get("errortext") if isinstance(result, dict) else result)
    code = result.get("errorcode") if isinstance(result, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        code = data.get("jobresultcode")
    cmd = str(data.get("cmd") or "").rsplit(".", 1)[-1]  # org.apache.cloudstack...DeployVMCmd
    what = f"async job {job_id}" + (f" ({cmd})" if cmd else "")
    error = _server_error(what, code, text) if code in (531, 532, 533, 535) else None
    if error is None:
        error = TransientError("CLOUDSTACK_JOB_FAILED", f"CloudStack {what} failed: {text}")
    error.failed_job = job_id
    return error


def _translate(command: str, exc: CloudStackApiException) -> StepError:
    code, text = _code(exc), _text(exc)
    if code == 401:
        return RefusedError("CLOUDSTACK_AUTH", "CloudStack refused the API key or signature (401); check "
                                               "FAILOVER_CLOUDSTACK_API_KEY and FAILOVER_CLOUDSTACK_SECRET_KEY")
    if code == 432:
        return RefusedError("CLOUDSTACK_UNAVAILABLE", f"CloudStack refused {command} ({code}): {text}; allow "
                                                      f"{command} for the API key's role")
    if isinstance(code, int) and 400 <= code < 500:
        return RefusedError("CLOUDSTACK_REFUSED", f"CloudStack refused {command} ({code}): {text}")
    return _server_error(command, code, text) or TransientError("CLOUDSTACK_ERROR", f"CloudStack failed {command} "
                                                                                   f"({code}): {text}")


def _server_error(command: str, code: object, text: str) -> StepError | None:
    """CloudStack's server errors (ApiErrorCode) that no outage explains: tried the attempts
    alone, not through FAILOVER_RETRY_WINDOW_SECONDS (errors.OUTAGE_CODES), or not at all."""
    if code == 531:  # ACCOUNT_ERROR: a PermissionDeniedException
        return RefusedError("CLOUDSTACK_PERMISSION_DENIED", f"CloudStack refused {command} for the API key's "
                                                            f"account (531): {text}; give that account access to "
                                                            "what the call names, or use an account that has it")
    if code == 533:  # INSUFFICIENT_CAPACITY_ERROR
        return TransientError("CLOUDSTACK_NO_CAPACITY", f"CloudStack has no capacity for {command} (533): {text}; "
                                                        "free capacity in the zone or fail over fewer VMs at once")
    if code in (532, 535):  # ACCOUNT_RESOURCE_LIMIT_ERROR; RESOURCE_ALLOCATION_ERROR (mostly checkResourceLimit's)
        return TransientError("CLOUDSTACK_RESOURCE_LIMIT", f"CloudStack could not allocate for {command} ({code}): "
                                                           f"{text}; if the API key's account is at a resource "
                                                           "limit, raise it (updateResourceLimit) or free what the "
                                                           "account holds")
    return None


def _cs_time(text: str) -> datetime | None:
    """CloudStack's `created` (``2024-05-01T12:00:00+0000``), or None if it is not a time with
    its offset. (`fromisoformat`, 0.2 us: `strptime` took 7 us, and a poll round reads the
    start of every wait.)"""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.astimezone(UTC) if moment.tzinfo is not None else None
