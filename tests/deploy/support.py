"""Shared helpers of the deployment tests: paths, the external validators, PromQL names."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from failover.metrics import ALL_METRIC_NAMES, HISTOGRAM_METRIC_NAMES

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

# A subprocess that hangs must fail the test, not the CI run.
TOOL_TIMEOUT_SECONDS = 120

_METRIC_NAME = re.compile(r"\bfailover_[a-z0-9_]+\b")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def load_yaml(path: Path) -> Any:
    """Parse one YAML file (anchors and merge keys resolved)."""
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def promtool() -> str:
    """Return the path of promtool, failing (not skipping) the test when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run `apt-get install -y prometheus` "
            "(Debian's package ships promtool); CI installs it too."
        )
    return path


def compose_command() -> list[str]:
    """Return the Compose CLI to validate with: the docker plugin, else docker-compose.

    Both parse, interpolate and validate a Compose file against the Compose schema without a
    Docker engine. Fails (not skips) when neither exists.
    """
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_SECONDS,
            check=False,
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone is not None:
        return [standalone]
    pytest.fail(
        "neither `docker compose` nor `docker-compose` is available: run "
        "`apt-get install -y docker-compose` (or install the Docker Compose plugin)."
    )


def run(
    command: list[str], cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a validator with a deadline and return its result (never raises on failure)."""
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )


def metric_names_in(expr: str) -> set[str]:
    """Return the failover_* series names a PromQL expression reads."""
    return set(_METRIC_NAME.findall(expr))


def undefined_metric_names(names: set[str]) -> set[str]:
    """Return the names that are not series of a metric failover/metrics.py defines.

    A name is defined when it is in ``ALL_METRIC_NAMES`` (counters with ``_total``), or is a
    histogram's ``_bucket``, ``_count`` or ``_sum`` series.
    """
    undefined: set[str] = set()
    for name in names:
        if name in ALL_METRIC_NAMES:
            continue
        base = next(
            (name.removesuffix(s) for s in _HISTOGRAM_SUFFIXES if name.endswith(s)),
            None,
        )
        if base is not None and base in HISTOGRAM_METRIC_NAMES:
            continue
        undefined.add(name)
    return undefined


def base_metric_name(name: str) -> str:
    """Map a series name back to the ``ALL_METRIC_NAMES`` entry it belongs to."""
    for suffix in _HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in HISTOGRAM_METRIC_NAMES:
            return base
    return name
