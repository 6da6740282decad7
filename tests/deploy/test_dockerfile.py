"""The Dockerfile, read instruction by instruction (no engine is needed)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tomllib
from pathlib import PurePosixPath

import pytest

from failover.health import start_health_server

from .support import DOCKERFILE, REPO, TOOL_TIMEOUT_SECONDS

Instruction = tuple[str, str]


def _instructions() -> list[Instruction]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _stages() -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for keyword, arguments in _instructions():
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, arguments))
    return stages


def _final_stage() -> list[Instruction]:
    return _stages()[-1]


def _only(stage: list[Instruction], keyword: str) -> str:
    found = [arguments for k, arguments in stage if k == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def test_every_stage_is_python_311_slim() -> None:
    for stage in _stages():
        image = stage[0][1].split()[0]
        assert image == "python:3.11-slim"


def test_installs_the_project_with_pip() -> None:
    runs = [a for stage in _stages() for k, a in stage if k == "RUN"]
    assert any("pip install ." in command for command in runs)


def test_copies_every_package_the_project_lists() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["setuptools"]["packages"]
    top_level = {name.split(".")[0] for name in packages}
    copied: set[str] = set()
    for stage in _stages():
        for keyword, arguments in stage:
            if keyword == "COPY" and not arguments.startswith("--from"):
                *sources, _target = arguments.split()
                copied |= {PurePosixPath(s).parts[0] for s in sources}
    assert "pyproject.toml" in copied
    assert top_level <= copied
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"


def test_runs_as_an_unprivileged_user() -> None:
    user = _only(_final_stage(), "USER").split(":")[0]
    assert user not in {"root", "0"}


def test_entrypoint_is_failoverctl_serving_by_default() -> None:
    stage = _final_stage()
    assert json.loads(_only(stage, "ENTRYPOINT")) == ["failoverctl"]
    assert json.loads(_only(stage, "CMD")) == ["serve"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["failoverctl"] == "failover.cli:main"


def test_exposes_the_metrics_port() -> None:
    assert _only(_final_stage(), "EXPOSE").split() == ["9108"]


@pytest.mark.parametrize("needle", ["/healthz", "FAILOVER_METRICS_PORT", "9108"])
def test_health_check_probes_liveness_on_the_metrics_port(needle: str) -> None:
    healthcheck = _only(_final_stage(), "HEALTHCHECK")
    assert "CMD" in healthcheck
    assert needle in healthcheck


def _healthcheck_argv() -> list[str]:
    healthcheck = _only(_final_stage(), "HEALTHCHECK")
    exec_form = healthcheck[healthcheck.index("CMD") + len("CMD") :].strip()
    argv: list[str] = json.loads(exec_form)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


async def _exit_code(argv: list[str], env: dict[str, str]) -> int:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(TOOL_TIMEOUT_SECONDS):
        return await process.wait()


async def test_health_check_command_passes_while_alive_and_fails_after() -> None:
    """Run the image's HEALTHCHECK command against a real health server."""

    async def not_ready() -> dict[str, bool]:
        return {"broker": False}

    # Liveness only: a process that is not ready is still healthy.
    server = await start_health_server("127.0.0.1", 0, not_ready)
    env = {**os.environ, "FAILOVER_METRICS_PORT": str(server.port)}
    try:
        assert await _exit_code(_healthcheck_argv(), env) == 0
    finally:
        await server.close()
    assert await _exit_code(_healthcheck_argv(), env) != 0
