"""Settings against hostile or careless configuration (failover/settings.py, directly): only
http(s) URLs for the outside systems, a warning for plain http to a host that is not this one,
and secrets that never show in an error, a repr or the start-up summary."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from failover.settings import ConnectionSettings, Settings, redact_url

SECRET = "SeCrEt-9f8e7d-DO-NOT-LEAK"
DB_PASSWORD = "Pw#7c6b5a/DO-NOT-LEAK"
DB_URL = "mysql+asyncmy://failover:Pw%237c6b5a%2FDO-NOT-LEAK@db.internal:3306/failover"
REQUIRED = {
    "FAILOVER_CLOUDSTACK_URL": "https://cloud.example.com/client/api",
    "FAILOVER_CLOUDSTACK_API_KEY": "api-key",
    "FAILOVER_CLOUDSTACK_SECRET_KEY": SECRET,
    "FAILOVER_ZONE": "zone1",
    "FAILOVER_TEMPLATE_ID": "template",
    "FAILOVER_SERVICE_OFFERING_ID": "offering",
    "FAILOVER_NETWORK_ID": "network",
    "FAILOVER_APPLIANCE_VM_ID": "appliance",
    "FAILOVER_DATABASE_URL": DB_URL,
    "FAILOVER_AMQP_URL": "amqps://failover:amqp-Pw-DO-NOT-LEAK@mq.internal:5671/migratekit",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)  # no .env from the working directory
    for key in [k for k in __import__("os").environ if k.startswith("FAILOVER_")]:
        monkeypatch.delenv(key)
    for key, value in REQUIRED.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def _no_secret(text: str) -> None:
    for secret in (SECRET, DB_PASSWORD, "Pw%237c6b5a", "amqp-Pw-DO-NOT-LEAK"):
        assert secret not in text, f"{secret!r} in {text!r}"


@pytest.mark.parametrize("name", ["FAILOVER_CLOUDSTACK_URL", "FAILOVER_VOLUME_DAEMON_URL"])
@pytest.mark.parametrize("url", [
    "ftp://cloud.example.com/client/api", "file:///etc/passwd", "javascript:alert(1)",
    "cloud.example.com/client/api", "//cloud.example.com/client/api", "http:///client/api", "gopher://x/",
    "ws://cloud.example.com/", "", "   ",
])
def test_an_outside_system_url_must_be_http_or_https_with_a_host(env: pytest.MonkeyPatch, name: str,
                                                                  url: str) -> None:
    env.setenv(name, url)
    with pytest.raises(ValidationError) as caught:
        Settings()
    text = str(caught.value)
    assert name.removeprefix("FAILOVER_").lower() in text and "http" in text
    _no_secret(text)


@pytest.mark.parametrize("url", ["http://cloud.example.com:8080/client/api", "http://10.0.0.5/client/api",
                                 "http://cloudstack/client/api", "http://127.0.0.1.nip.io/client/api"])
def test_plain_http_to_another_host_is_warned_about(env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                    url: str) -> None:
    env.setenv("FAILOVER_CLOUDSTACK_URL", url)
    with caplog.at_level(logging.WARNING, logger="failover.settings"):
        settings = Settings()
    assert settings.cloudstack_url == url.rstrip("/")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("FAILOVER_CLOUDSTACK_URL" in w and "plain http" in w for w in warnings), warnings
    for warning in warnings:
        _no_secret(warning)


@pytest.mark.parametrize("url", ["https://cloud.example.com/client/api", "http://localhost:8080/client/api",
                                 "http://127.0.0.1:8080/client/api", "http://[::1]:8080/client/api",
                                 "http://127.0.0.53/client/api", "HTTPS://Cloud.Example.com/client/api"])
def test_https_or_this_host_is_not_warned_about(env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                url: str) -> None:
    env.setenv("FAILOVER_CLOUDSTACK_URL", url)
    env.setenv("FAILOVER_VOLUME_DAEMON_URL", "http://127.0.0.1:8090")
    with caplog.at_level(logging.WARNING, logger="failover.settings"):
        Settings()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_volume_daemon_over_plain_http_to_another_host_is_warned_about(
        env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    env.setenv("FAILOVER_VOLUME_DAEMON_URL", "http://appliance.example.com:8090")
    with caplog.at_level(logging.WARNING, logger="failover.settings"):
        Settings()
    assert any("FAILOVER_VOLUME_DAEMON_URL" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("name", "value"), [
    ("FAILOVER_AMQP_URL", "http://guest:amqp-Pw-DO-NOT-LEAK@mq/"),
    ("FAILOVER_AMQP_URL", "redis://:amqp-Pw-DO-NOT-LEAK@mq/"),
    ("FAILOVER_DATABASE_URL", "postgresql://failover:Pw%237c6b5a%2FDO-NOT-LEAK@db/failover"),
    ("FAILOVER_DATABASE_URL", "sqlite:///tmp/Pw%237c6b5a.db"),
])
def test_broker_and_database_urls_of_the_wrong_kind_are_refused_without_showing_them(
        env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        ConnectionSettings()
    _no_secret(str(caught.value))
    _no_secret(repr(caught.value.errors(include_input=False)))  # what failoverctl prints


def test_secrets_never_show_in_repr_or_the_start_up_summary(env: pytest.MonkeyPatch) -> None:
    env.setenv("FAILOVER_VOLUME_DAEMON_URL", "https://daemon:d-DO-NOT-LEAK@appliance.example.com:8090")
    settings = Settings()
    assert settings.cloudstack_secret_key.get_secret_value() == SECRET
    for text in (repr(settings), str(settings), str(settings.safe_summary()), repr(settings.model_dump())):
        _no_secret(text)
    summary = settings.safe_summary()  # the start-up log line
    assert "d-DO-NOT-LEAK" not in str(summary)
    assert summary["database_url"] == "mysql+asyncmy://failover:***@db.internal:3306/failover"
    assert summary["amqp_url"] == "amqps://failover:***@mq.internal:5671/migratekit"


@pytest.mark.parametrize(("url", "shown"), [
    ("mysql+asyncmy://u:p%40ss@h/db", "mysql+asyncmy://u:***@h/db"),
    ("amqp://u:p@ss@host/", "amqp://u:***@host/"),  # a raw "@" in the password
    ("mysql+asyncmy://u@h/db?password=DO-NOT-LEAK&ssl_ca=/ca.pem", "mysql+asyncmy://u@h/db?password=***&ssl_ca=/ca.pem"),
    ("mysql+asyncmy://u@h/db?ssl_key_password=DO-NOT-LEAK", "mysql+asyncmy://u@h/db?ssl_key_password=***"),
    ("mysql+asyncmy://root@h/db", "mysql+asyncmy://root@h/db"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# --- where serve takes commands: FAILOVER_INTAKE_THREAD's default gives way, an explicit true does not

ALL_ROLES = ("orchestrator", "relay", "projector")


@pytest.mark.parametrize(("how", "explicit"), [("default", False), ("env", True), ("dotenv", True), ("kwarg", True)])
def test_the_intake_thread_is_explicit_only_when_set(env: pytest.MonkeyPatch, tmp_path: Path, how: str,
                                                      explicit: bool) -> None:
    kwargs = {}
    if how == "env":
        env.setenv("FAILOVER_INTAKE_THREAD", "true")
    elif how == "dotenv":
        (tmp_path / ".env").write_text("FAILOVER_INTAKE_THREAD=true\n")
    elif how == "kwarg":
        kwargs["intake_thread"] = True
    settings = Settings(**kwargs)  # type: ignore[call-arg]
    assert settings.intake_thread is True
    assert settings.intake_thread_explicit is explicit


@pytest.mark.parametrize(("extra", "roles", "thread", "problem"), [
    ({}, ALL_ROLES, True, None),
    ({}, ("orchestrator", "projector"), False, None),  # the default gives way: serve starts
    ({}, ("relay", "projector"), False, None),
    ({"FAILOVER_INTAKE_PROCESS": "true"}, ALL_ROLES, False, None),  # the process asked for wins
    ({"FAILOVER_INTAKE_THREAD": "false"}, ALL_ROLES, False, None),
    ({"FAILOVER_INTAKE_THREAD": "true"}, ("orchestrator", "projector"), False, "FAILOVER_INTAKE_THREAD=true"),
    ({"FAILOVER_INTAKE_PROCESS": "true"}, ("orchestrator", "projector"), False, "FAILOVER_INTAKE_PROCESS=true"),
])
def test_the_intake_thread_runs_by_default_wherever_it_can(env: pytest.MonkeyPatch, extra: dict[str, str],
                                                           roles: tuple[str, ...], thread: bool,
                                                           problem: str | None) -> None:
    from failover.service import roles_problem

    for key, value in extra.items():
        env.setenv(key, value)
    settings = Settings()  # type: ignore[call-arg]
    assert settings.intake_thread_wanted(roles) is thread
    said = roles_problem(settings, roles)
    if problem is None:
        assert said is None, said
    else:
        assert said is not None and problem in said and "relay" in said, said


def test_an_explicit_intake_thread_beside_the_intake_process_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("FAILOVER_INTAKE_PROCESS", "true")
    env.setenv("FAILOVER_INTAKE_THREAD", "true")
    with pytest.raises(ValidationError, match="both true"):
        Settings()  # type: ignore[call-arg]


def test_cloudstacks_event_bus_url_must_be_amqp_and_never_shows(env: pytest.MonkeyPatch) -> None:
    """FAILOVER_CLOUDSTACK_EVENTS_AMQP_URL: amqp(s) only, refused without showing it, and
    redacted in the start-up summary."""
    env.setenv("FAILOVER_CLOUDSTACK_EVENTS_EXCHANGE", "cloudstack-events")
    env.setenv("FAILOVER_CLOUDSTACK_EVENTS_AMQP_URL", "http://cs:amqp-Pw-DO-NOT-LEAK@cloud-mq.internal/")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "cloudstack_events_amqp_url" in str(caught.value)
    _no_secret(str(caught.value))
    env.setenv("FAILOVER_CLOUDSTACK_EVENTS_AMQP_URL", "amqps://cs:amqp-Pw-DO-NOT-LEAK@cloud-mq.internal:5671/")
    settings = Settings()
    for text in (repr(settings), str(settings.safe_summary())):
        _no_secret(text)
    summary = settings.safe_summary()
    assert summary["cloudstack_events_exchange"] == "cloudstack-events"
    assert summary["cloudstack_events_amqp_url"] == "amqps://cs:***@cloud-mq.internal:5671/"
