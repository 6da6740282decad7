"""Volume Daemon adapter (HTTP/JSON): attach, attach-root, detach, operation polling, lookup.

Waiting on an operation asks about it once (while that pays), then joins the adapter's shared poller, whose
rounds list the running operations once for many waits (adapters/poller.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from statemachine.errors import MalformedResponse, NotFound, RefusedError, StepError, TransientError
from statemachine.ports import DaemonOperation, DaemonVolume

from .cloudstack import CallOutcome, Timer
from .poller import SharedPoller

_RUNNING = ("pending", "executing")
_SYSTEM = "Volume Daemon"  # as MalformedResponse words it: "... check the Volume Daemon service"


class VolumeDaemonAdapter:
    """`statemachine.ports.VolumeDaemonPort` against `FAILOVER_VOLUME_DAEMON_URL`."""

    def __init__(self, base_url: str, *, session: aiohttp.ClientSession, poll_interval: float = 2.0,
                 timeout: float = 60.0, observe: Timer | None = None, batch_from: int = 8) -> None:
        self._base = base_url.rstrip("/") + "/api/v1"
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._observe = observe or (lambda *a: None)
        self._poller: SharedPoller[DaemonOperation] = SharedPoller(
            poll_interval, batch_from, self._get, self._running,
            unsupported=lambda exc: isinstance(exc, NotFound),  # a daemon without the route
            listing="the Volume Daemon's GET /api/v1/operations?status=")

    async def _request(self, method: str, path: str, operation: str, body: dict[str, Any] | None = None,
                       expect: type = dict) -> Any:
        began = time.monotonic()
        outcome: CallOutcome = "error"
        try:
            async with self._session.request(method, self._base + path, json=body, timeout=self._timeout) as resp:
                raw = await resp.read()
                try:
                    data = json.loads(raw.decode("utf-8")) if raw.strip() else None
                except ValueError as exc:  # not UTF-8, not JSON
                    if resp.status < 400:
                        raise MalformedResponse(_SYSTEM, f"{operation}: not JSON") from exc
                    data = raw.decode("utf-8", "replace")  # an error page (a proxy's): keep its status
                if resp.status >= 500:
                    raise TransientError("VOLUME_DAEMON_ERROR",
                                         f"the Volume Daemon failed {operation} ({resp.status}): {_err(data)}")
                if resp.status == 404:
                    raise NotFound("VOLUME_DAEMON_NOT_FOUND",
                                   f"the Volume Daemon does not know it ({operation}, 404): {_err(data)}")
                if resp.status >= 400:
                    raise RefusedError("VOLUME_DAEMON_REFUSED",
                                       f"the Volume Daemon refused {operation} ({resp.status}): {_err(data)}")
                if not isinstance(data, expect):
                    raise MalformedResponse(_SYSTEM, f"{operation} answered {type(data).__name__}")
                outcome = "ok"
                return data
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientError("VOLUME_DAEMON_UNREACHABLE",
                                 f"the Volume Daemon did not answer {operation} ({type(exc).__name__}); "
                                 "check FAILOVER_VOLUME_DAEMON_URL and that the daemon runs") from exc
        finally:
            self._observe("volume_daemon", operation, outcome, time.monotonic() - began)

    async def get_volume(self, volume_id: str) -> DaemonVolume:
        d = await self._request("GET", f"/volumes/{quote(volume_id, safe='')}", "get_volume")
        try:
            dev = d.get("device_id")
            return DaemonVolume(volume_id=str(d["volume_id"]), vm_id=d.get("vm_id"),
                                device_id=int(dev) if dev is not None else None,
                                device_path=d.get("device_path"), type=str(d.get("type", "")))
        except (KeyError, ValueError, TypeError) as exc:
            raise MalformedResponse(_SYSTEM, f"volume {volume_id}: {exc}") from exc

    async def _start(self, volume_id: str, action: str, body: dict[str, Any]) -> str:
        d = await self._request("POST", f"/volumes/{quote(volume_id, safe='')}/{action}", action, body)
        op = d.get("id")
        if not isinstance(op, str):
            raise MalformedResponse(_SYSTEM, f"{action} answered without an operation id")
        return op

    async def attach(self, volume_id: str, vm_id: str) -> str:
        return await self._start(volume_id, "attach", {"vm_id": vm_id})

    async def attach_root(self, volume_id: str, vm_id: str) -> str:
        return await self._start(volume_id, "attach-root", {"vm_id": vm_id})

    async def detach(self, volume_id: str) -> str:
        return await self._start(volume_id, "detach", {})

    def _outcome(self, operation_id: str, d: dict[str, Any]) -> DaemonOperation | None:
        status = d.get("status")
        if status in ("completed", "failed"):
            response = d.get("response") or {}
            if not isinstance(response, dict):
                raise MalformedResponse(_SYSTEM, "operation response is not an object")
            return DaemonOperation(id=operation_id, status=status, error=d.get("error"),
                                   device_id=response.get("device_id"), device_path=response.get("device_path"))
        if status not in _RUNNING:
            raise MalformedResponse(_SYSTEM, f"operation status {status!r}")
        return None

    async def _get(self, operation_id: str) -> DaemonOperation | None:
        d = await self._request("GET", f"/operations/{quote(operation_id, safe='')}", "get_operation")
        return self._outcome(operation_id, d)

    async def wait_operation(self, operation_id: str, timeout: float) -> DaemonOperation:
        """Asks once at once while that pays; then waits with the adapter's other waits
        (adapters/poller.py)."""
        if self._poller.ask_first():
            done = await self._get(operation_id)
            self._poller.asked_first(done is not None)
            if done is not None:
                return done
        # past its timeout a wait is over for good (not tried again: FAILOVER_RETRY_ATTEMPTS times
        # the timeout is not what the operator set)
        return await self._poller.wait(operation_id, timeout, lambda: StepError(
            "VOLUME_OPERATION_TIMEOUT", f"Volume Daemon operation {operation_id} did not finish within {timeout:.0f} s; "
            "look at it on the Volume Daemon (GET /api/v1/operations/<id>), and if it is only slow, raise "
            "FAILOVER_VOLUME_OPERATION_TIMEOUT_SECONDS"))

    async def operations_running(self) -> int:
        """How many operations the daemon is running (`failoverctl check`: its API answers)."""
        return len(await self._running_ids())

    async def _running_ids(self) -> set[str]:
        """The operations still running, from one listing per running status (the filter is not
        taken on trust: one listed as finished is not counted)."""
        running: set[str] = set()
        for status in _RUNNING:
            listed = await self._request("GET", f"/operations?status={status}", "list_operations", expect=list)
            running |= {op["id"] for op in listed if isinstance(op, dict) and isinstance(op.get("id"), str)
                        and op.get("status") in _RUNNING}
        return running

    async def _running(self, keys: Mapping[str, object]) -> dict[str, DaemonOperation | BaseException | None]:
        """The waits whose operations are still running, settled (None); the others finished (or
        began after the listing) and are asked about on their own."""
        running = await self._running_ids()
        return {k: None for k in keys if k in running}


def _err(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("error") or data)[:500]
    return " ".join(str(data).split())[:200]
