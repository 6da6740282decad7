"""The Prometheus configuration and alerting rules, checked and unit-tested with promtool."""

from __future__ import annotations

from typing import Any

import pytest

from .support import (
    PROMETHEUS_DIR,
    load_yaml,
    metric_names_in,
    promtool,
    run,
    undefined_metric_names,
)

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"

# The situations an operator must hear about, and the alert that says so.
REQUIRED_ALERTS = {
    "FailoverIntakeProcessRestarting",
    "FailoverServiceDown",
    "FailoverInstanceDown",
    "FailoverJobStuck",
    "FailoverRollbackFailed",
    "FailoverOutboxBacklogGrowing",
    "FailoverOutboxStale",
    "FailoverCommandsDeadLettered",
    "FailoverAdapterErrorRateHigh",
    "FailoverCloudStackThrottled",
}


def _rules() -> list[dict[str, Any]]:
    document = load_yaml(ALERTS)
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_check_config() -> None:
    result = run([promtool(), "check", "config", str(CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run([promtool(), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run([promtool(), "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_cover_the_critical_alerts() -> None:
    tested = {
        case["alertname"]
        for test in load_yaml(ALERTS_TEST)["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {"FailoverRollbackFailed", "FailoverServiceDown"} <= tested
    assert tested <= REQUIRED_ALERTS


def test_every_required_alert_exists_with_guidance() -> None:
    rules = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert REQUIRED_ALERTS <= rules.keys()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        # The description must tell the operator what to do, not only what happened.
        assert len(annotations["description"].split()) >= 15, name


@pytest.mark.parametrize(
    ("alert", "needle"),
    [
        ("FailoverJobStuck", "failover_job_state_oldest_seconds"),
        ("FailoverRollbackFailed", 'failover_rollbacks_total{outcome="failed"}'),
        ("FailoverOutboxBacklogGrowing", "failover_outbox_backlog"),
        ("FailoverOutboxStale", "failover_outbox_oldest_unsent_age_seconds"),
        ("FailoverServiceDown", 'up{job="failover"}'),
        ("FailoverCommandsDeadLettered", 'outcome="dead_lettered"'),
        ("FailoverAdapterErrorRateHigh", 'failover_adapter_calls_total{outcome="error"}'),
        ("FailoverIntakeProcessRestarting", "failover_intake_process_restarts_total"),
    ],
)
def test_alert_watches_the_right_series(alert: str, needle: str) -> None:
    rules = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert needle in rules[alert]["expr"]


def test_alert_expressions_use_only_defined_metrics() -> None:
    used: set[str] = set()
    for rule in _rules():
        used |= metric_names_in(rule["expr"])
    assert used, "no failover_* metric found in alerts.yml"
    assert undefined_metric_names(used) == set()


def test_failover_job_scrapes_the_metrics_port() -> None:
    config = load_yaml(CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "failover"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets: list[str] = []
    for sd in job.get("dns_sd_configs", []):
        targets += [f"{name}:{sd['port']}" for name in sd["names"]]
    for static in job.get("static_configs", []):
        targets += static["targets"]
    assert targets == ["failover:9108"]
    assert config["rule_files"] == ["alerts.yml"]
