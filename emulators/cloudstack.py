"""The CloudStack API stand-in: ``/client/api``, GET or POST form, signed like CloudStack.

Order of checks, as CloudStack's servlet: signature (401), command (432), then the command's
parameters and rules (431). Programmed faults are checked once the request is authenticated.
Responses are JSON whatever ``response`` says.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from emulators.control import WORLD, add_control_routes
from emulators.cs_commands import COMMANDS
from emulators.cs_params import Params
from emulators.faults import Fault, lost_answer_response
from emulators.model import (
    API_LIMIT_EXCEED,
    CS_CLOUD_RUNTIME,
    CS_INVALID_PARAMETER,
    CS_SERVER_API,
    INTERNAL_ERROR,
    PARAM_ERROR,
    UNAUTHORIZED,
    UNSUPPORTED_ACTION_ERROR,
    CloudStackError,
)
from emulators.signing import verify_request
from emulators.world import World

log = logging.getLogger(__name__)

API_PATH = "/client/api"
CONTROL_PARAMS = frozenset(
    {"command", "apikey", "signature", "signatureversion", "expires", "response"}
)
_REASONS = {
    UNAUTHORIZED: "Unauthorized",
    API_LIMIT_EXCEED: "Too Many Requests",
    PARAM_ERROR: "Param Error",
    UNSUPPORTED_ACTION_ERROR: "Unsupported Action",
    INTERNAL_ERROR: "Internal Error",
}
AUTH_FAILED = "unable to verify user credentials and/or request signature"
# what CloudStack says with a server error's code (ApiErrorCode), for a programmed fault
_SERVER_ERRORS = {
    531: "Injected fault: the account of the API key has no permission to operate on what {command} names",
    533: "Injected fault: Insufficient capacity to deploy ({command}): unable to find a host with enough capacity",
    535: "Maximum number of resources of type 'user_vm' for account name=admin in domain id=1 has been exceeded.",
}


def _server_error_text(code: int, command: str) -> str:
    return _SERVER_ERRORS.get(code, "Injected fault: internal error executing {command}").format(command=command)


def create_cloudstack_app(world: World) -> web.Application:
    """The aiohttp app serving the CloudStack API and the control routes."""
    app = web.Application()
    app[WORLD] = world
    app.router.add_route("GET", API_PATH, handle_api)
    app.router.add_route("POST", API_PATH, handle_api)
    add_control_routes(app)
    return app


async def _read_params(request: web.Request) -> dict[str, str]:
    """The request's parameters, query string then form body, first value of each name."""
    params: dict[str, str] = {}
    for name, value in request.query.items():
        params.setdefault(name, value)
    if request.method == "POST" and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        for name, field in (await request.post()).items():
            if isinstance(field, str):
                params.setdefault(name, field)
    return params


def _json(status: int, body: Any, entry: dict[str, Any]) -> web.Response:
    entry["status"] = status
    return web.Response(
        status=status,
        reason=_REASONS.get(status),
        text=json.dumps(body, ensure_ascii=False),
        content_type="application/json",
        charset="UTF-8",
    )


def _error(
    entry: dict[str, Any], name: str, code: int, text: str, cserrorcode: int | None
) -> web.Response:
    inner: dict[str, Any] = {"uuidList": [], "errorcode": code}
    if cserrorcode is not None:
        inner["cserrorcode"] = cserrorcode
    inner["errortext"] = text
    return _json(code, {name: inner}, entry)


def _malformed(entry: dict[str, Any], name: str, inner: Any, fault: Fault) -> web.Response:
    entry["status"] = 200
    if fault.variant == "wrong_shape":
        text = json.dumps({name: ["unexpected", "shape"]})
    else:
        full = json.dumps({name: inner}, ensure_ascii=False)
        text = full[: max(1, len(full) // 2)]
    return web.Response(text=text, content_type="application/json", charset="UTF-8")


async def handle_api(request: web.Request) -> web.Response:
    """Serve one CloudStack API call."""
    world = request.app[WORLD]
    raw = await _read_params(request)
    if world.latency.api_seconds > 0:
        await asyncio.sleep(world.latency.api_seconds)
    command = raw.get("command", "")
    params = Params(command, {k: v for k, v in raw.items() if k.lower() not in CONTROL_PARAMS})
    entry = world.calls.record("cloudstack", command, dict(params.values))
    spec = COMMANDS.get(command)
    name = f"{command.lower()}response" if spec else "errorresponse"
    if not command or not verify_request(raw, world.api_keys):
        return _error(entry, name, UNAUTHORIZED, AUTH_FAILED, None)
    if spec is None:
        text = f"Unknown API command: {command}"
        return _error(entry, name, UNSUPPORTED_ACTION_ERROR, text, CS_SERVER_API)
    # the rate-limit plugin's API checker, as CloudStack words its refusal
    wait = world.api_limit.check(raw.get("apikey", ""), time.monotonic())
    if wait is not None:
        text = f"The given user has reached his/her account api limit, please retry after [{int(wait * 1000)}] ms."
        return _error(entry, name, API_LIMIT_EXCEED, text, CS_SERVER_API)

    fault = world.faults.check("cloudstack", command, params.values)
    kind = fault.kind if fault else None
    if kind == "refuse":
        text = f"Injected fault: {command} refused"
        return _error(entry, name, PARAM_ERROR, text, CS_INVALID_PARAMETER)
    if kind == "unavailable":  # as CloudStack answers a command the key's role may not call
        text = f"The given command:{command} does not exist or it is not available for user"
        return _error(entry, name, UNSUPPORTED_ACTION_ERROR, text, CS_SERVER_API)
    if kind == "server_error" or (kind == "async_fail" and not spec.is_async):
        code = fault.errorcode if fault is not None and fault.errorcode else INTERNAL_ERROR
        return _error(entry, name, code, _server_error_text(code, command), CS_CLOUD_RUNTIME)
    if kind == "timeout" and not spec.is_async:
        entry["status"] = "timeout"
        await world.runner.hang()
        raise web.HTTPServiceUnavailable(text="emulator shutting down")

    try:
        inner = spec.handler(world, params, kind if spec.is_async else None)
    except CloudStackError as exc:
        return _error(entry, name, exc.errorcode, exc.errortext, exc.cserrorcode)
    except Exception as exc:  # an emulator bug must still answer like CloudStack
        log.exception("%s failed", command)
        return _error(entry, name, INTERNAL_ERROR, f"Internal error: {exc}", CS_CLOUD_RUNTIME)
    if fault is not None and kind == "async_fail" and fault.errorcode and isinstance(inner.get("jobid"), str):
        job = world.runner.jobs[inner["jobid"]]  # it fails as CloudStack's command would with that code
        job.failure = CloudStackError(fault.errorcode, _server_error_text(fault.errorcode, command), CS_CLOUD_RUNTIME)
    if fault is not None and kind == "malformed":
        return _malformed(entry, name, inner, fault)
    if kind == "lost_answer":  # done, and the answer lost on its way
        return lost_answer_response(entry)
    return _json(200, {name: inner}, entry)
