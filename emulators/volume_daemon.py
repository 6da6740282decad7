"""The MigrateKit Volume Daemon stand-in: attach, attach-root and detach as operations.

An attach or detach answers 201 with an operation at once (``pending``); the operation goes
``executing`` on the next loop turn and ``completed`` or ``failed`` after the operation
latency, applying the same World rules as CloudStack's attachVolume/detachVolume. Unknown
volumes or VMs are a 404 at once; a rule broken when the operation runs fails it.
Errors are ``{"error", "code"}`` with codes INVALID_REQUEST (400), NOT_FOUND (404),
CONFLICT (409, a ``refuse`` fault) and INTERNAL_ERROR (500).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from emulators import views
from emulators.control import WORLD, add_control_routes
from emulators.faults import Fault, lost_answer_response
from emulators.jobs import OperationAction
from emulators.model import Volume
from emulators.world import World

API = "volume-daemon"


def create_volume_daemon_app(world: World) -> web.Application:
    """The aiohttp app serving the Volume Daemon API and the control routes."""
    app = web.Application()
    app[WORLD] = world
    router = app.router
    router.add_get("/health", health)
    router.add_get("/api/v1/health", health)
    router.add_post("/api/v1/volumes/{volume_id}/attach", attach)
    router.add_post("/api/v1/volumes/{volume_id}/attach-root", attach_root)
    router.add_post("/api/v1/volumes/{volume_id}/detach", detach)
    router.add_get("/api/v1/volumes/{volume_id}", get_volume)
    router.add_get("/api/v1/operations", list_operations)
    router.add_get("/api/v1/operations/{operation_id}", get_operation)
    add_control_routes(app)
    return app


def _respond(entry: dict[str, Any], status: int, body: Any) -> web.Response:
    entry["status"] = status
    return web.json_response(body, status=status)


def _error(entry: dict[str, Any], status: int, code: str, message: str) -> web.Response:
    return _respond(entry, status, {"error": message, "code": code})


async def _begin(request: web.Request, command: str, params: dict[str, Any]) -> dict[str, Any]:
    world = request.app[WORLD]
    if world.latency.api_seconds > 0:
        await asyncio.sleep(world.latency.api_seconds)
    return world.calls.record(API, command, params)


async def _fault_answer(
    request: web.Request, entry: dict[str, Any], fault: Fault | None, *, is_operation: bool
) -> web.Response | None:
    """The answer a fault imposes before the request is served, or None to serve it."""
    if fault is None:
        return None
    kind = fault.kind
    if kind == "refuse":
        return _error(entry, 409, "CONFLICT", f"Injected fault: {entry['command']} refused")
    if kind == "server_error" or (kind == "async_fail" and not is_operation):
        return _error(entry, 500, "INTERNAL_ERROR", "Injected fault: internal error")
    if kind == "timeout" and not is_operation:
        entry["status"] = "timeout"
        await request.app[WORLD].runner.hang()
        return _error(entry, 503, "SERVICE_UNAVAILABLE", "emulator shutting down")
    return None


def _served(entry: dict[str, Any], status: int, body: Any, fault: Fault | None) -> web.Response:
    """The normal answer, its garbled form under a ``malformed`` fault, or a proxy's 502 under
    ``lost_answer`` (the request served all the same)."""
    if fault is not None and fault.kind == "lost_answer":
        return lost_answer_response(entry)
    if fault is None or fault.kind != "malformed":
        return _respond(entry, status, body)
    entry["status"] = status
    if fault.variant == "wrong_shape":
        text = json.dumps(["unexpected", "shape"])
    else:
        full = json.dumps(body)
        text = full[: max(1, len(full) // 2)]
    return web.Response(status=status, text=text, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """GET /health."""
    entry = await _begin(request, "health", {})
    fault = request.app[WORLD].faults.check(API, "health", {})
    early = await _fault_answer(request, entry, fault, is_operation=False)
    return early or _served(entry, 200, {"status": "healthy"}, fault)


async def _operation(request: web.Request, op_type: str) -> web.Response:
    world = request.app[WORLD]
    volume_id = request.match_info["volume_id"]
    entry = await _begin(request, op_type, {"volume_id": volume_id})
    body: Any = {}
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                return _error(entry, 400, "INVALID_REQUEST", "the body must be JSON")
    if not isinstance(body, dict):
        return _error(entry, 400, "INVALID_REQUEST", "the body must be a JSON object")
    vm_id = body.get("vm_id")
    if op_type != "detach":
        if not isinstance(vm_id, str) or not vm_id:
            return _error(entry, 400, "INVALID_REQUEST", "vm_id is required (a string)")
        entry["params"]["vm_id"] = vm_id
    fault = world.faults.check(API, op_type, entry["params"])
    early = await _fault_answer(request, entry, fault, is_operation=True)
    if early is not None:
        return early
    volume = world.volumes.get(volume_id)
    if volume is None or volume.destroyed:
        return _error(entry, 404, "NOT_FOUND", f"volume {volume_id} not found")
    if op_type == "detach":
        vm_id = volume.vm_id
        run = _detach_action(world, volume)
    else:
        vm = world.vms.get(str(vm_id))
        if vm is None or vm.destroyed:
            return _error(entry, 404, "NOT_FOUND", f"VM {vm_id} not found")
        run = _attach_action(world, volume, vm.id, 0 if op_type == "attach-root" else None)
    request_body = {"volume_id": volume.id, "vm_id": vm_id}
    kind = fault.kind if fault else None
    op = world.runner.submit_operation(op_type, volume.id, vm_id, request_body, run, kind)
    return _served(entry, 201, views.operation_json(op), fault)


def _attach_action(
    world: World, volume: Volume, vm_id: str, device_id: int | None
) -> OperationAction:
    def run() -> dict[str, Any]:
        device = world.apply_attach(volume, world.vms[vm_id], device_id)
        return {"device_id": device, "device_path": world.device_path(volume)}

    return run


def _detach_action(world: World, volume: Volume) -> OperationAction:
    def run() -> dict[str, Any]:
        world.apply_detach(volume)
        return {"device_id": None, "device_path": None}

    return run


async def attach(request: web.Request) -> web.Response:
    """POST /api/v1/volumes/{id}/attach {"vm_id"}: as a data disk, lowest free device >= 1."""
    return await _operation(request, "attach")


async def attach_root(request: web.Request) -> web.Response:
    """POST /api/v1/volumes/{id}/attach-root {"vm_id"}: as device 0, the VM's ROOT."""
    return await _operation(request, "attach-root")


async def detach(request: web.Request) -> web.Response:
    """POST /api/v1/volumes/{id}/detach."""
    return await _operation(request, "detach")


async def get_volume(request: web.Request) -> web.Response:
    """GET /api/v1/volumes/{id}: where the volume is attached, and its device path."""
    world = request.app[WORLD]
    volume_id = request.match_info["volume_id"]
    entry = await _begin(request, "get-volume", {"volume_id": volume_id})
    fault = world.faults.check(API, "get-volume", entry["params"])
    early = await _fault_answer(request, entry, fault, is_operation=False)
    if early is not None:
        return early
    volume = world.volumes.get(volume_id)
    if volume is None or volume.destroyed:
        return _error(entry, 404, "NOT_FOUND", f"volume {volume_id} not found")
    body = {
        "volume_id": volume.id,
        "vm_id": volume.vm_id,
        "device_id": volume.device_id,
        "device_path": world.device_path(volume),
        "type": volume.type,
        "state": "attached" if volume.vm_id else "detached",
    }
    return _served(entry, 200, body, fault)


async def get_operation(request: web.Request) -> web.Response:
    """GET /api/v1/operations/{id}."""
    world = request.app[WORLD]
    op_id = request.match_info["operation_id"]
    entry = await _begin(request, "get-operation", {"operation_id": op_id})
    fault = world.faults.check(API, "get-operation", entry["params"])
    early = await _fault_answer(request, entry, fault, is_operation=False)
    if early is not None:
        return early
    op = world.operations.get(op_id)
    if op is None:
        return _error(entry, 404, "NOT_FOUND", f"operation {op_id} not found")
    return _served(entry, 200, views.operation_json(op), fault)


async def list_operations(request: web.Request) -> web.Response:
    """GET /api/v1/operations?volume_id=&vm_id=&status=&type=: operations, oldest first."""
    world = request.app[WORLD]
    filters = {
        k: v for k, v in request.query.items() if k in ("volume_id", "vm_id", "status", "type")
    }
    entry = await _begin(request, "list-operations", dict(filters))
    # the ones not ended are kept apart: a poller asking for them reads no finished ones
    pool = world.runner.unended if filters.get("status") in ("pending", "executing") else world.operations
    found = [
        views.operation_json(op)
        for op in pool.values()
        if all(getattr(op, key) == value for key, value in filters.items())
    ]
    return _respond(entry, 200, found)
