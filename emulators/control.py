"""The control routes ``/_emulator/...``, mounted on both apps over the same world.

They set the world up (VMs, volumes), program faults and latency, show the state and the
call log, and take the driver-injection stand-in's write. JSON in, JSON out; a bad request
is a 400 ``{"error": ...}``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from emulators import views
from emulators.faults import FaultSpecError, parse_fault
from emulators.world import World

WORLD = web.AppKey("emulator_world", World)
PREFIX = "/_emulator"
INJECT_MESSAGES = {
    "exit_nonzero": "injected fault: virtio driver injection failed",
    "refuse": "injected fault: virtio driver injection refused",
    "server_error": "injected fault: internal error during virtio driver injection",
    "hang": "injected fault: the injection hangs",
    "timeout": "injected fault: the injection hangs",
}


def add_control_routes(app: web.Application) -> None:
    """Mount the control routes on an app whose ``app[WORLD]`` is set."""
    router = app.router
    router.add_get(f"{PREFIX}/state", state)
    router.add_get(f"{PREFIX}/calls", calls)
    router.add_post(f"{PREFIX}/reset", reset)
    router.add_post(f"{PREFIX}/vms", create_vm)
    router.add_post(f"{PREFIX}/volumes", create_volume)
    router.add_get(f"{PREFIX}/faults", list_faults)
    router.add_post(f"{PREFIX}/faults", add_fault)
    router.add_delete(f"{PREFIX}/faults", clear_faults)
    router.add_get(f"{PREFIX}/latency", get_latency)
    router.add_post(f"{PREFIX}/latency", set_latency)
    router.add_post(f"{PREFIX}/api-limit", set_api_limit)
    router.add_post(f"{PREFIX}/inject", inject)
    router.add_post(f"{PREFIX}/event-bus", set_event_bus)
    router.add_post(f"{PREFIX}/volume-daemon/restart", restart_volume_daemon)


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise _bad_request("the body must be JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("the body must be a JSON object")
    return body


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad_request(f"{key} must be a string")
    return value


async def state(request: web.Request) -> web.Response:
    """GET /_emulator/state: the whole world."""
    return web.json_response(request.app[WORLD].state())


async def calls(request: web.Request) -> web.Response:
    """GET /_emulator/calls?api=&command=&since=: the call log."""
    query = request.query
    try:
        since = int(query.get("since", "0"))
    except ValueError:
        raise _bad_request("since must be an integer") from None
    found = request.app[WORLD].calls.find(query.get("api"), query.get("command"), since)
    return web.json_response(found)


async def reset(request: web.Request) -> web.Response:
    """POST /_emulator/reset: a fresh world with the same seed ids."""
    request.app[WORLD].reset()
    return web.json_response({"ok": True})


async def create_vm(request: web.Request) -> web.Response:
    """POST /_emulator/vms {"name", "state"?, "id"?}: a VM with no volumes."""
    body = await _body(request)
    world = request.app[WORLD]
    try:
        vm = world.add_vm(
            _optional_str(body, "name") or "",
            _optional_str(body, "state") or "Running",
            _optional_str(body, "id"),
        )
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    return web.json_response(views.vm_json(world, vm), status=201)


async def create_volume(request: web.Request) -> web.Response:
    """POST /_emulator/volumes {"name", "size_gb", "vm_id"?, "device_id"?, "content"?, "id"?}."""
    body = await _body(request)
    world = request.app[WORLD]
    size = body.get("size_gb", 10)
    device = body.get("device_id")
    if not isinstance(size, int | float) or isinstance(size, bool) or size <= 0:
        raise _bad_request("size_gb must be a positive number")
    if device is not None and (not isinstance(device, int) or isinstance(device, bool)):
        raise _bad_request("device_id must be an integer")
    try:
        volume = world.add_volume(
            _optional_str(body, "name") or "",
            size,
            vm_id=_optional_str(body, "vm_id"),
            device_id=device,
            content=_optional_str(body, "content"),
            volume_id=_optional_str(body, "id"),
        )
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    return web.json_response(views.volume_state_json(world, volume), status=201)


async def list_faults(request: web.Request) -> web.Response:
    """GET /_emulator/faults."""
    return web.json_response(request.app[WORLD].faults.list())


async def add_fault(request: web.Request) -> web.Response:
    """POST /_emulator/faults: program a fault; answers {"id"}."""
    try:
        fault = parse_fault(await _body(request))
    except FaultSpecError as exc:
        raise _bad_request(str(exc)) from None
    request.app[WORLD].faults.add(fault)
    return web.json_response({"id": fault.id}, status=201)


async def clear_faults(request: web.Request) -> web.Response:
    """DELETE /_emulator/faults."""
    request.app[WORLD].faults.clear()
    return web.json_response({"ok": True})


async def get_latency(request: web.Request) -> web.Response:
    """GET /_emulator/latency."""
    return web.json_response(request.app[WORLD].latency.as_json())


async def set_latency(request: web.Request) -> web.Response:
    """POST /_emulator/latency: set any of async_job_seconds, operation_seconds, api_seconds."""
    body = await _body(request)
    latency = request.app[WORLD].latency
    known = latency.as_json()
    for key, value in body.items():
        if key not in known:
            raise _bad_request(f"unknown setting {key}; known: {', '.join(known)}")
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise _bad_request(f"{key} must be a number >= 0")
    for key, value in body.items():
        setattr(latency, key, float(value))
    return web.json_response(latency.as_json())


async def set_api_limit(request: web.Request) -> web.Response:
    """POST /_emulator/api-limit {"max_calls", "interval_seconds"?}: CloudStack's API throttling
    per account (`api.throttling.max` calls in `api.throttling.interval`); max_calls 0 turns it
    off. Answers the settings and how many calls it has refused."""
    body = await _body(request)
    limit = request.app[WORLD].api_limit
    max_calls, interval = body.get("max_calls"), body.get("interval_seconds", limit.interval_seconds)
    if not isinstance(max_calls, int) or isinstance(max_calls, bool) or max_calls < 0:
        raise _bad_request("max_calls must be a whole number >= 0")
    if not isinstance(interval, int | float) or isinstance(interval, bool) or interval <= 0:
        raise _bad_request("interval_seconds must be a number > 0")
    limit.max_calls, limit.interval_seconds = max_calls, float(interval)
    return web.json_response(limit.as_json())


async def restart_volume_daemon(request: web.Request) -> web.Response:
    """POST /_emulator/volume-daemon/restart: the daemon restarted, knowing no operation any
    more (a poll of one is a 404); those under way never finish."""
    return web.json_response({"forgotten": request.app[WORLD].runner.forget_operations()})


async def set_event_bus(request: web.Request) -> web.Response:
    """POST /_emulator/event-bus {"publish": bool}: publish the async jobs' ends on the emulated
    CloudStack event bus, or stop (the emulators must have been started with one)."""
    body = await _body(request)
    publish = body.get("publish")
    if not isinstance(publish, bool):
        raise _bad_request("publish must be true or false")
    world = request.app[WORLD]
    if world.event_bus is None:
        raise _bad_request("these emulators have no event bus: start them with --event-bus-url amqp://...")
    world.runner.on_job_end = world.event_bus.job_ended if publish else None
    return web.json_response({"publish": publish, "exchange": world.event_bus.exchange_name,
                              "published": world.event_bus.published})


async def inject(request: web.Request) -> web.Response:
    """POST /_emulator/inject {"device_path", "job_id"}: the injection script's write."""
    body = await _body(request)
    device_path = _optional_str(body, "device_path")
    job_id = _optional_str(body, "job_id")
    if not device_path or not job_id:
        raise _bad_request("device_path and job_id are required")
    world = request.app[WORLD]
    params = {"device_path": device_path, "job_id": job_id}
    entry = world.calls.record("inject", "inject", params)
    fault = world.faults.check("inject", "inject", params)
    if fault is not None:
        entry["status"] = fault.kind
        message = INJECT_MESSAGES.get(fault.kind, f"injected fault: {fault.kind}")
        return web.json_response({"ok": False, "fault": fault.kind, "message": message})
    volume = world.inject_write(device_path, job_id)
    if volume is None:
        entry["status"] = 404
        message = f"no volume is attached to the appliance VM at {device_path}"
        return web.json_response({"ok": False, "error": message}, status=404)
    entry["status"] = "ok"
    return web.json_response({"ok": True, "volume_id": volume.id, "content": volume.content})
