"""Helpers for the emulator tests: waiting on conditions, running async jobs, raw requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from cs import AIOCloudStack, CloudStack
from cs.client import CloudStackApiException, transform

T = TypeVar("T")


async def wait_until(
    probe: Callable[[], Awaitable[T | None]], timeout: float = 5.0, what: str = "condition"
) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def wait_job(cs: AIOCloudStack, jobid: str, timeout: float = 5.0) -> dict[str, Any]:
    """Poll queryAsyncJobResult until the job has ended; its last answer."""

    async def done() -> dict[str, Any] | None:
        job: dict[str, Any] = await cs.queryAsyncJobResult(jobid=jobid)
        return job if job["jobstatus"] != 0 else None

    return await wait_until(done, timeout, f"job {jobid}")


async def run_job(cs: AIOCloudStack, command: str, **params: Any) -> dict[str, Any]:
    """Call an async command and wait for its job; the job's final answer."""
    answer = await getattr(cs, command)(**params)
    return await wait_job(cs, answer["jobid"])


async def succeed(cs: AIOCloudStack, command: str, **params: Any) -> dict[str, Any]:
    """Run an async command that must succeed; its jobresult."""
    job = await run_job(cs, command, **params)
    assert job["jobstatus"] == 1, job
    assert job["jobresultcode"] == 0
    result: dict[str, Any] = job["jobresult"]
    return result


async def refused(call: Awaitable[Any]) -> tuple[int, dict[str, Any]]:
    """Await a cs call that must be refused; (HTTP status, error body)."""
    try:
        await call
    except CloudStackApiException as exc:
        return exc.response.status, exc.error
    raise AssertionError("the call was not refused")


async def raw_call(
    session: aiohttp.ClientSession,
    endpoint: str,
    key: str,
    secret: str,
    command: str,
    **params: Any,
) -> tuple[int, str, Any]:
    """A request signed by the ``cs`` package itself; (status, content type, whole JSON body).

    For the checks cs hides (it unwraps the top-level ``<command>response`` key).
    """
    signer = CloudStack(endpoint, key, secret)
    _, prepared = signer._prepare_request(command, **params)  # type: ignore[no-untyped-call]
    transform(prepared)
    signer._sign(prepared)  # type: ignore[no-untyped-call]
    async with session.get(endpoint, params=prepared) as response:
        return response.status, response.headers["Content-Type"], await response.json()
