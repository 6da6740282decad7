"""docker-compose.yml: validated by the Compose CLI, then its wiring checked service by service."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from emulators.runner import start_emulators
from failover.health import start_health_server

from .support import (
    COMPOSE_FILE,
    DEPLOY,
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    REPO,
    TOOL_TIMEOUT_SECONDS,
    compose_command,
    load_yaml,
    run,
)

EXPECTED_SERVICES = {
    "rabbitmq",
    "mariadb",
    "migrate",
    "failover",
    "prometheus",
    "grafana",
    "emulators",
    "demo",
}
PROJECT_SERVICES = ("migrate", "failover", "emulators", "demo")
CONFIGURED_SERVICES = ("migrate", "failover", "demo")
# The emulators' seed flags, and the service setting each one must agree with.
EMULATOR_SEED_FLAGS = {
    "--api-key": "FAILOVER_CLOUDSTACK_API_KEY",
    "--secret-key": "FAILOVER_CLOUDSTACK_SECRET_KEY",
    "--appliance-vm-id": "FAILOVER_APPLIANCE_VM_ID",
    "--template-id": "FAILOVER_TEMPLATE_ID",
    "--service-offering-id": "FAILOVER_SERVICE_OFFERING_ID",
    "--network-id": "FAILOVER_NETWORK_ID",
}
DEMO_SERVICES = {"emulators", "demo"}

# CONTRACT.md section 3: every setting without a usable default in a container. The database,
# broker and Volume Daemon defaults point at 127.0.0.1, which inside a container is itself.
CONTAINER_SETTINGS = {
    "FAILOVER_AMQP_URL",
    "FAILOVER_DATABASE_URL",
    "FAILOVER_CLOUDSTACK_URL",
    "FAILOVER_CLOUDSTACK_API_KEY",
    "FAILOVER_CLOUDSTACK_SECRET_KEY",
    "FAILOVER_ZONE",
    "FAILOVER_TEMPLATE_ID",
    "FAILOVER_SERVICE_OFFERING_ID",
    "FAILOVER_NETWORK_ID",
    "FAILOVER_APPLIANCE_VM_ID",
    "FAILOVER_VOLUME_DAEMON_URL",
    "FAILOVER_VIRTIO_INJECT_COMMAND",
    "FAILOVER_METRICS_PORT",
}
OPTIONAL_SETTINGS = {"FAILOVER_DISK_OFFERING_ID"}

_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?-(?P<default>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def _interpolate(value: str) -> str:
    """Resolve ``${NAME:-default}`` as Compose does with no variable set."""
    return _INTERPOLATION.sub(lambda m: m.group("default") or "", value)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _clean_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A process environment and an empty env file, so no local setting leaks into the test."""
    prefixes = ("FAILOVER_", "MARIADB_", "RABBITMQ_", "GRAFANA_", "PROMETHEUS_", "COMPOSE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env_file = tmp_path / "empty.env"
    env_file.write_text("", encoding="utf-8")
    return env, env_file


PINNED_CONTRACT_SETTINGS = {
    "FAILOVER_AMQP_URL": "`amqp://guest:guest@127.0.0.1:5672/`",
    "FAILOVER_DATABASE_URL": "`mysql+asyncmy://root@127.0.0.1:3306/failover`",
    "FAILOVER_CLOUDSTACK_URL": "(required)",
    "FAILOVER_CLOUDSTACK_API_KEY": "(required)",
    "FAILOVER_CLOUDSTACK_SECRET_KEY": "(required)",
    "FAILOVER_ZONE": "(required)",
    "FAILOVER_TEMPLATE_ID": "(required)",
    "FAILOVER_SERVICE_OFFERING_ID": "(required)",
    "FAILOVER_DISK_OFFERING_ID": "(optional)",
    "FAILOVER_NETWORK_ID": "(required)",
    "FAILOVER_APPLIANCE_VM_ID": "(required)",
    "FAILOVER_VOLUME_DAEMON_URL": "`http://127.0.0.1:8090`",
    "FAILOVER_VIRTIO_INJECT_COMMAND": "`sudo /opt/migratekit/bin/inject-virtio-drivers.sh`",
    "FAILOVER_METRICS_PORT": "`9108`",
}


def _contract_settings() -> dict[str, str] | None:
    """Section 3 of CONTRACT.md (name -> default column), when shared/ is beside the repo."""
    for candidate in (REPO.parent / "shared" / "CONTRACT.md", Path("/work/shared/CONTRACT.md")):
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8")
            break
    else:
        return None
    section = text.split("## 3.", 1)[1].split("\n## ", 1)[0]
    settings: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`FAILOVER_"):
            for name in re.findall(r"`(FAILOVER_[A-Z0-9_]+)`", cells[0]):
                settings[name] = cells[1]
    return settings


# --- the Compose CLI ------------------------------------------------------------------------


def test_compose_cli_validates_the_file(tmp_path: Path) -> None:
    env, env_file = _clean_env(tmp_path)
    cli = compose_command()
    for profile_args in ([], ["--profile", "demo"]):
        command = [*cli, "--env-file", str(env_file), *profile_args, "-f", str(COMPOSE_FILE)]
        result = run([*command, "config", "-q"], env=env)
        assert result.returncode == 0, result.stdout + result.stderr


def test_compose_cli_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is no rubber stamp: a bad depends_on condition fails it."""
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    broken.write_text(
        text.replace("service_completed_successfully", "service_finished"), encoding="utf-8"
    )
    env, env_file = _clean_env(tmp_path)
    result = run(
        [*compose_command(), "--env-file", str(env_file), "-f", str(broken), "config", "-q"],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode != 0


def test_compose_cli_resolves_the_demo_defaults(tmp_path: Path) -> None:
    env, env_file = _clean_env(tmp_path)
    command = [*compose_command(), "--env-file", str(env_file), "--profile", "demo"]
    result = run([*command, "-f", str(COMPOSE_FILE), "config"], env=env)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    failover_env = _environment(resolved["failover"])
    assert failover_env["FAILOVER_CLOUDSTACK_URL"] == "http://emulators:8080/client/api"
    assert failover_env["FAILOVER_VOLUME_DAEMON_URL"] == "http://emulators:8090"
    assert failover_env["FAILOVER_DATABASE_URL"].startswith(
        "mysql+asyncmy://failover:failover-dev@mariadb:3306/failover"
    )


# --- services and their order ---------------------------------------------------------------


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == EXPECTED_SERVICES


def test_project_services_share_one_image_built_here(
    services: dict[str, dict[str, Any]],
) -> None:
    images = {services[name]["image"] for name in PROJECT_SERVICES}
    assert len(images) == 1
    for name in PROJECT_SERVICES:
        assert services[name]["build"] == ".", name


@pytest.mark.parametrize(
    ("service", "command"),
    [
        ("migrate", ["db", "upgrade"]),
        ("failover", ["serve"]),
        ("emulators", ["emulate", "--host", "0.0.0.0"]),
        ("demo", ["demo"]),
    ],
)
def test_project_service_commands(
    services: dict[str, dict[str, Any]], service: str, command: list[str]
) -> None:
    assert services[service]["command"][: len(command)] == command
    if service != "emulators":
        assert services[service]["command"] == command


@pytest.mark.parametrize(
    ("service", "dependencies"),
    [
        ("migrate", {"mariadb": "service_healthy"}),
        (
            "failover",
            {
                "migrate": "service_completed_successfully",
                "mariadb": "service_healthy",
                "rabbitmq": "service_healthy",
            },
        ),
        ("demo", {"emulators": "service_healthy", "failover": "service_healthy"}),
        ("grafana", {"prometheus": "service_started"}),
    ],
)
def test_start_order(
    services: dict[str, dict[str, Any]], service: str, dependencies: dict[str, str]
) -> None:
    depends_on = services[service]["depends_on"]
    assert {name: spec["condition"] for name, spec in depends_on.items()} == dependencies


def test_every_health_condition_has_a_health_check(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                check = services[dependency].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (name, dependency)


def test_one_shots_run_once(services: dict[str, dict[str, Any]]) -> None:
    for name in ("migrate", "demo"):
        assert services[name]["restart"] == "no", name
        assert services[name]["healthcheck"] == {"disable": True}, name
    for name in ("rabbitmq", "mariadb", "failover", "prometheus", "grafana", "emulators"):
        assert services[name]["restart"] == "unless-stopped", name


def test_demo_profile(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        expected = ["demo"] if name in DEMO_SERVICES else None
        assert service.get("profiles") == expected, name
    # A service outside the profile must not need one inside it, or plain `up` breaks.
    for name, service in services.items():
        if name not in DEMO_SERVICES:
            assert not set(service.get("depends_on", {})) & DEMO_SERVICES, name


# --- settings -------------------------------------------------------------------------------


def test_contract_settings_are_the_ones_checked() -> None:
    # CONTRACT.md sits beside the repository on development and CI machines; a clone without
    # it checks against the copy of section 3 pinned here
    contract = _contract_settings() or PINNED_CONTRACT_SETTINGS
    optional = {name for name, default in contract.items() if "optional" in default}
    assert set(contract) - optional == CONTAINER_SETTINGS
    assert optional == OPTIONAL_SETTINGS


@pytest.mark.parametrize("service", CONFIGURED_SERVICES)
def test_every_required_setting_is_set(services: dict[str, dict[str, Any]], service: str) -> None:
    env = _environment(services[service])
    assert CONTAINER_SETTINGS <= env.keys()
    for name in CONTAINER_SETTINGS:
        assert _interpolate(env[name]).strip(), f"{service}: {name} resolves to nothing"


def test_database_url_uses_the_stack_user_and_password(
    services: dict[str, dict[str, Any]],
) -> None:
    env = _environment(services["failover"])
    mariadb = _environment(services["mariadb"])
    url = env["FAILOVER_DATABASE_URL"]
    password = mariadb["MARIADB_PASSWORD"]
    assert password.startswith("${MARIADB_PASSWORD:-") and password.endswith("}")
    assert url == f"mysql+asyncmy://failover:{password}@mariadb:3306/failover"
    assert mariadb["MARIADB_DATABASE"] == "failover"
    assert mariadb["MARIADB_USER"] == "failover"
    assert "MARIADB_ROOT_PASSWORD" not in mariadb or mariadb.get("MARIADB_RANDOM_ROOT_PASSWORD")


def test_amqp_url_uses_the_stack_user_and_password(
    services: dict[str, dict[str, Any]],
) -> None:
    env = _environment(services["failover"])
    rabbitmq = _environment(services["rabbitmq"])
    user, password = rabbitmq["RABBITMQ_DEFAULT_USER"], rabbitmq["RABBITMQ_DEFAULT_PASS"]
    assert user != "guest", "guest may only connect from localhost"
    assert env["FAILOVER_AMQP_URL"] == f"amqp://{user}:{password}@rabbitmq:5672/"


def test_demo_defaults_point_at_the_emulators(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["failover"])
    cloudstack = _interpolate(env["FAILOVER_CLOUDSTACK_URL"])
    daemon = _interpolate(env["FAILOVER_VOLUME_DAEMON_URL"])
    assert cloudstack == "http://emulators:8080/client/api"
    assert daemon == "http://emulators:8090"
    exposed = {str(port) for port in services["emulators"]["expose"]}
    assert {"8080", "8090"} <= exposed
    inject = _interpolate(env["FAILOVER_VIRTIO_INJECT_COMMAND"]).split()
    assert inject == ["python", "-m", "emulators.inject", "--control-url", "http://emulators:8080"]


def test_emulators_are_seeded_with_the_service_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    """Each seed flag carries the same ``${VAR:-default}`` as the service's setting."""
    env = _environment(services["failover"])
    command = services["emulators"]["command"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags.keys() == EMULATOR_SEED_FLAGS.keys()
    for flag, setting in EMULATOR_SEED_FLAGS.items():
        assert flags[flag] == env[setting], flag


def test_emulator_command_lines_accept_the_flags_compose_passes(
    services: dict[str, dict[str, Any]],
) -> None:
    usage = run([sys.executable, "-m", "emulators", "--help"])
    assert usage.returncode == 0, usage.stderr
    for flag in ["--host", *EMULATOR_SEED_FLAGS]:
        assert flag in usage.stdout, f"`failoverctl emulate` has no {flag} option"
    inject = run([sys.executable, "-m", "emulators.inject", "--help"])
    assert inject.returncode == 0, inject.stderr
    assert "--control-url" in inject.stdout


async def test_emulator_zone_is_the_default_zone(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["failover"])
    handle = await start_emulators(host="127.0.0.1")
    try:
        assert handle.zone_name == _interpolate(env["FAILOVER_ZONE"])
    finally:
        await handle.close()


def test_env_example_lists_every_setting_a_user_fills_in() -> None:
    example = (DEPLOY / "failover.env.example").read_text(encoding="utf-8")
    listed = set(re.findall(r"^(FAILOVER_[A-Z0-9_]+)=", example, flags=re.MULTILINE))
    # The URLs of the stack's own broker and database, and the port, are the stack's business.
    own = {"FAILOVER_AMQP_URL", "FAILOVER_DATABASE_URL", "FAILOVER_METRICS_PORT"}
    assert listed == CONTAINER_SETTINGS - own


# --- the metrics port -----------------------------------------------------------------------


def test_metrics_port_is_wired_end_to_end(services: dict[str, dict[str, Any]]) -> None:
    failover = services["failover"]
    assert _environment(failover)["FAILOVER_METRICS_PORT"] == "9108"
    assert "9108" in {str(port) for port in failover["expose"]}
    assert "ports" not in failover, "a fixed host port would stop `--scale failover=N`"
    assert "container_name" not in failover, "a fixed name would stop `--scale failover=N`"
    assert "127.0.0.1:9108/readyz" in " ".join(failover["healthcheck"]["test"])
    scrape = load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "failover"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["failover"]
    assert sd["port"] == 9108


# --- mounted files --------------------------------------------------------------------------


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target -> source of every bind mount (sources starting with ./) of a service."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source
    return mounts


def test_every_bind_mount_source_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, source in _bind_mounts(service).items():
            assert (REPO / source).exists(), f"{name}: {source} -> {target}"


def test_prometheus_mounts_its_config_and_the_rules_it_names(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = _bind_mounts(services["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    for rule_file in config["rule_files"]:
        target = str(PurePosixPath("/etc/prometheus") / rule_file)
        assert target in mounts, f"{rule_file} is named but not mounted"
        assert (REPO / mounts[target]).is_file()
    assert all(v.endswith(":ro") for v in services["prometheus"]["volumes"] if v.startswith("./"))


def test_grafana_mounts_provisioning_and_dashboards(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = _bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    (provider,) = load_yaml(GRAFANA_DIR / "provisioning/dashboards/dashboards.yml")["providers"]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == "./deploy/grafana/dashboards"
    assert list((REPO / mounts[dashboards_dir]).glob("*.json"))
    home = _environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    relative = PurePosixPath(home).relative_to(dashboards_dir)
    assert (REPO / mounts[dashboards_dir] / relative).is_file()
    (source,) = load_yaml(GRAFANA_DIR / "provisioning/datasources/prometheus.yml")["datasources"]
    assert source["url"] == "http://prometheus:9090"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    used: set[str] = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("./", "/")):
                used.add(source)
    assert used == declared


async def test_failover_health_check_is_readiness(services: dict[str, dict[str, Any]]) -> None:
    """Run the service's Compose health check against a real health server."""
    test = services["failover"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    ready = {"broker": True, "database": True}

    async def readiness() -> dict[str, bool]:
        return dict(ready)

    server = await start_health_server("127.0.0.1", 0, readiness)
    # The same command, aimed at the test server's port instead of 9108.
    argv = [sys.executable, *(arg.replace(":9108/", f":{server.port}/") for arg in test[2:])]
    try:
        assert await _exit_code(argv) == 0
        ready["database"] = False
        assert await _exit_code(argv) != 0
    finally:
        await server.close()


async def _exit_code(argv: list[str]) -> int:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(TOOL_TIMEOUT_SECONDS):
        return await process.wait()
