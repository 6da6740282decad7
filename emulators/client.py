"""``EmulatorControl``: a small async client of the control routes, for tests and the demo.

Use it as ``async with EmulatorControl(handle.control_url) as control: ...`` (or call
``close()``); either app's base URL works, both serve the same world.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import aiohttp


class EmulatorControlError(RuntimeError):
    """The control API refused a request."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class EmulatorControl:
    """Client of ``/_emulator/...`` on either app's base URL (``http://host:port``)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/_emulator")
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> EmulatorControl:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session this client opened, if any."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"{self.base_url}/_emulator/{path}"
        async with self._session.request(method, url, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                raise EmulatorControlError(response.status, body)
            return body

    async def state(self) -> dict[str, Any]:
        """The whole world: vms, volumes (with content), snapshots, jobs, operations, ..."""
        result: dict[str, Any] = await self._request("GET", "state")
        return result

    async def calls(
        self, api: str | None = None, command: str | None = None, since: int = 0
    ) -> list[dict[str, Any]]:
        """The call log, optionally of one api / command, after a ``seq``."""
        query = {k: v for k, v in (("api", api), ("command", command)) if v is not None}
        if since:
            query["since"] = str(since)
        result: list[dict[str, Any]] = await self._request("GET", "calls", params=query)
        return result

    async def add_fault(
        self,
        api: str,
        kind: str,
        command: str | None = None,
        match: dict[str, str] | None = None,
        nth: int = 1,
        times: int = 1,
        variant: str | None = None,
        errorcode: int | None = None,
    ) -> str:
        """Program a fault; its id."""
        body: dict[str, Any] = {"api": api, "kind": kind, "nth": nth, "times": times}
        if command is not None:
            body["command"] = command
        if match:
            body["match"] = match
        if variant is not None:
            body["variant"] = variant
        if errorcode is not None:
            body["errorcode"] = errorcode
        result = await self._request("POST", "faults", json=body)
        return str(result["id"])

    async def faults(self) -> list[dict[str, Any]]:
        """The programmed faults, with how often each matched and fired."""
        result: list[dict[str, Any]] = await self._request("GET", "faults")
        return result

    async def clear_faults(self) -> None:
        """Forget every fault."""
        await self._request("DELETE", "faults")

    async def set_latency(
        self,
        async_job_seconds: float | None = None,
        operation_seconds: float | None = None,
        api_seconds: float | None = None,
    ) -> dict[str, float]:
        """Set the given latencies (the others stay); the settings now in force."""
        body = {
            k: v
            for k, v in (
                ("async_job_seconds", async_job_seconds),
                ("operation_seconds", operation_seconds),
                ("api_seconds", api_seconds),
            )
            if v is not None
        }
        result: dict[str, float] = await self._request("POST", "latency", json=body)
        return result

    async def set_api_limit(self, max_calls: int, interval_seconds: float = 1.0) -> dict[str, Any]:
        """CloudStack's API throttling per account (0: off): the settings and the calls refused."""
        result: dict[str, Any] = await self._request(
            "POST", "api-limit", json={"max_calls": max_calls, "interval_seconds": interval_seconds})
        return result

    async def restart_volume_daemon(self) -> int:
        """The Volume Daemon restarts, forgetting its operations: how many it forgot."""
        result: dict[str, Any] = await self._request("POST", "volume-daemon/restart")
        return int(result["forgotten"])

    async def set_event_bus(self, publish: bool) -> dict[str, Any]:
        """Publish the async jobs' ends on the emulated CloudStack event bus, or stop."""
        result: dict[str, Any] = await self._request("POST", "event-bus", json={"publish": publish})
        return result

    async def create_vm(
        self, name: str, state: str = "Running", id: str | None = None
    ) -> dict[str, Any]:
        """A VM with no volumes (CloudStack's JSON of it)."""
        body: dict[str, Any] = {"name": name, "state": state}
        if id is not None:
            body["id"] = id
        result: dict[str, Any] = await self._request("POST", "vms", json=body)
        return result

    async def create_volume(
        self,
        name: str,
        size_gb: float = 10,
        vm_id: str | None = None,
        device_id: int | None = None,
        content: str | None = None,
        id: str | None = None,
    ) -> dict[str, Any]:
        """A volume, detached or attached to ``vm_id`` (device 0 makes it ROOT)."""
        body: dict[str, Any] = {"name": name, "size_gb": size_gb}
        for key, value in (
            ("vm_id", vm_id),
            ("device_id", device_id),
            ("content", content),
            ("id", id),
        ):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = await self._request("POST", "volumes", json=body)
        return result

    async def reset(self) -> None:
        """A fresh world (same seed ids), no faults, no latency, empty call log."""
        await self._request("POST", "reset")
