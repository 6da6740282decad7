"""The health and metrics HTTP server of a ``failoverctl serve`` process.

Three routes, on ``FAILOVER_METRICS_PORT`` (9108 by default):

- ``GET /metrics``: the Prometheus exposition of the process' registry;
- ``GET /healthz``: liveness, 200 ``{"status": "alive"}`` for as long as the event loop answers;
- ``GET /readyz``: readiness, 200 when every check the ``readiness`` callable reports is true,
  else 503; the JSON body lists every check. A readiness call that raises, returns something
  other than a mapping of names to booleans, or takes longer than ``readiness_timeout`` counts
  as not ready (the body then shows ``{"readiness": false}`` and an ``error``).

``named_checks`` turns several independent checks (the broker, the database) into one
``readiness`` callable that runs them concurrently and marks each one that raises or times out
as false, so the body still names the check that failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

__all__ = [
    "READINESS_CALL_TIMEOUT_SECONDS",
    "READINESS_TIMEOUT_SECONDS",
    "HealthServer",
    "Readiness",
    "named_checks",
    "start_health_server",
]

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[dict[str, bool]]]
"""Returns each readiness check's name and whether it passed, e.g. ``{"broker": True}``."""

READINESS_TIMEOUT_SECONDS: Final = 2.0
"""A check slower than this counts as failed (``named_checks`` enforces it per check)."""

READINESS_CALL_TIMEOUT_SECONDS: Final = READINESS_TIMEOUT_SECONDS + 0.5
"""The whole readiness call is abandoned after this; a little above the per-check limit so
that ``named_checks`` reports which check was slow before the call as a whole times out."""

_READINESS_KEY: Final[web.AppKey[Readiness]] = web.AppKey("readiness")
_TIMEOUT_KEY: Final = web.AppKey("readiness_timeout", float)
_REGISTRY_KEY: Final = web.AppKey("registry", CollectorRegistry)


@dataclass
class HealthServer:
    """A running health server; ``port`` is the bound port (useful when asked for port 0)."""

    host: str
    port: int
    _runner: web.AppRunner

    async def close(self) -> None:
        """Stop accepting connections and release the port."""
        await self._runner.cleanup()


async def start_health_server(
    host: str,
    port: int,
    readiness: Readiness,
    *,
    readiness_timeout: float = READINESS_CALL_TIMEOUT_SECONDS,
    registry: CollectorRegistry = REGISTRY,
) -> HealthServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` until closed.

    ``port`` 0 binds an ephemeral port; the returned server's ``port`` tells which. Build
    ``readiness`` with ``named_checks`` so that each check gets the 2 s limit on its own;
    ``readiness_timeout`` bounds the whole call (then every check counts as failed).
    """
    app = web.Application()
    app[_READINESS_KEY] = readiness
    app[_TIMEOUT_KEY] = readiness_timeout
    app[_REGISTRY_KEY] = registry
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    # Scrapes and probes every few seconds would drown the service's own log lines.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = _bound_port(runner, fallback=port)
    log.info("health server listening on %s:%d", host, bound_port)
    return HealthServer(host=host, port=bound_port, _runner=runner)


def named_checks(
    checks: Mapping[str, Callable[[], Awaitable[bool]]],
    timeout: float = READINESS_TIMEOUT_SECONDS,
) -> Readiness:
    """Combine named checks into one ``readiness`` callable.

    The checks run concurrently; one that raises, returns a non-true value or takes longer than
    ``timeout`` seconds is reported as ``False``. Keep ``timeout`` below the server's
    ``readiness_timeout`` (the defaults are 2 s and 2.5 s) so that the names survive a slow check.
    """

    async def run_one(check: Callable[[], Awaitable[bool]]) -> bool:
        try:
            async with asyncio.timeout(timeout):
                return bool(await check())
        except Exception:  # a readiness probe reports failure, it does not propagate it
            log.debug("readiness check failed", exc_info=True)
            return False

    async def readiness() -> dict[str, bool]:
        names = list(checks)
        results = await asyncio.gather(*(run_one(checks[name]) for name in names))
        return dict(zip(names, results, strict=True))

    return readiness


def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    """Return the port the runner's first socket is bound to."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
            return address[1]
    return fallback


async def _metrics(request: web.Request) -> web.Response:
    """Serve the Prometheus text exposition."""
    body = generate_latest(request.app[_REGISTRY_KEY])
    response = web.Response(body=body)
    # CONTENT_TYPE_LATEST carries a charset parameter that aiohttp's content_type refuses.
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def _healthz(_request: web.Request) -> web.Response:
    """Answer liveness: reaching this handler means the event loop is serving."""
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    """Answer readiness from the readiness callable, within the timeout."""
    readiness = request.app[_READINESS_KEY]
    timeout = request.app[_TIMEOUT_KEY]
    error: str | None = None
    checks: dict[str, bool] = {}
    try:
        async with asyncio.timeout(timeout):
            reported = await readiness()
        checks = _as_checks(reported)
    except TimeoutError:
        error = f"readiness did not answer within {timeout:g} s"
    except Exception as exc:  # a readiness probe reports failure, it does not propagate it
        # Only the type: an exception text may carry a URL or a credential.
        error = f"readiness failed: {type(exc).__name__}"
        log.warning("readiness check raised", exc_info=True)
    if error is not None:
        checks = {"readiness": False}
    ready = error is None and all(checks.values())
    body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": checks}
    if error is not None:
        body["error"] = error
    return web.json_response(body, status=200 if ready else 503)


def _as_checks(reported: object) -> dict[str, bool]:
    """Validate a readiness result: a mapping of check names to booleans."""
    if not isinstance(reported, Mapping):
        raise TypeError(f"readiness returned {type(reported).__name__}, not a mapping")
    checks: dict[str, bool] = {}
    for name, passed in reported.items():
        checks[str(name)] = passed is True
    return checks
