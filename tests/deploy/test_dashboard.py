"""The Grafana dashboard and its provisioning: queries, metric names and PromQL syntax."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from failover.metrics import ALL_METRIC_NAMES

from .support import (
    GRAFANA_DIR,
    base_metric_name,
    load_yaml,
    metric_names_in,
    promtool,
    run,
    undefined_metric_names,
)

DASHBOARD = GRAFANA_DIR / "dashboards" / "failover.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"

# Grafana's built-in range variables, replaced by a duration to make plain PromQL.
_GRAFANA_DURATIONS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
_DASHBOARD_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows, except the rows themselves."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels += panel.get("panels", [])
        else:
            panels.append(panel)
    return panels


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def _variable_queries(dashboard: dict[str, Any]) -> list[str]:
    queries: list[str] = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def _as_plain_promql(expr: str) -> str:
    for variable, duration in _GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    return _DASHBOARD_VARIABLE.sub(".*", expr)


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "failover-overview"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    ids += [nested["id"] for p in dashboard["panels"] for nested in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_query(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    assert len(panels) >= 10
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has an empty query"
            assert target.get("refId"), panel["title"]
        assert panel["datasource"]["type"] == "prometheus", panel["title"]


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_metric_name_is_defined(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for expr in _exprs(dashboard) + _variable_queries(dashboard):
        used |= metric_names_in(expr)
    assert undefined_metric_names(used) == set()


def test_every_defined_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    used = {base_metric_name(n) for e in _exprs(dashboard) for n in metric_names_in(e)}
    assert ALL_METRIC_NAMES - used == set()


def test_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool parses every expression of a rule file: make each query a recording rule.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _as_plain_promql(expr)}
        for i, expr in enumerate(_exprs(dashboard))
    ]
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    result = run([promtool(), "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "pattern",
    [
        # failovers per minute by outcome, and the success rate
        r"sum by \(outcome\) \(rate\(failover_jobs_ended_total\{.*\* 60",
        r'increase\(failover_jobs_ended_total\{[^}]*outcome="completed".*/.*'
        r"increase\(failover_jobs_ended_total",
        # job duration percentiles per job type; step duration per step, and a heat map
        r"histogram_quantile\(0\.5, sum by \(job_type, le\) \(rate\(failover_job_duration_seconds_bucket",
        r"histogram_quantile\(0\.99, sum by \(job_type, le\) \(rate\(failover_job_duration_seconds_bucket",
        r"histogram_quantile\(0\.95, sum by \(step, le\) \(rate\(failover_step_duration_seconds_bucket",
        r"sum by \(le\) \(increase\(failover_step_duration_seconds_bucket",
        # jobs in progress by state, rollbacks
        r"sum by \(state\) \(failover_jobs_in_progress",
        r"failover_rollbacks_total",
        # adapter error rates and latency
        r'rate\(failover_adapter_calls_total\{[^}]*outcome="error".*/.*rate\(failover_adapter_calls_total',
        r"histogram_quantile\(0\.95, sum by \(adapter, operation, le\) \(rate\(failover_adapter_call_duration_seconds_bucket",
        # commands by outcome, outbox backlog and oldest unsent age, projector lag p50/p99
        r"sum by \(outcome\) \(rate\(failover_commands_total",
        r"max\(failover_outbox_backlog",
        r"max\(failover_outbox_oldest_unsent_age_seconds",
        r"histogram_quantile\(0\.5, sum by \(le\) \(rate\(failover_projector_lag_seconds_bucket",
        r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(failover_projector_lag_seconds_bucket",
    ],
)
def test_required_view_is_on_the_dashboard(dashboard: dict[str, Any], pattern: str) -> None:
    assert any(re.search(pattern, expr) for expr in _exprs(dashboard)), pattern


def test_heat_map_reads_buckets_as_a_heat_map(dashboard: dict[str, Any]) -> None:
    heatmaps = [p for p in _panels(dashboard) if p["type"] == "heatmap"]
    assert heatmaps
    for panel in heatmaps:
        for target in panel["targets"]:
            assert target["format"] == "heatmap"
            assert "_bucket" in target["expr"]


def test_default_data_source_is_the_provisioned_one(dashboard: dict[str, Any]) -> None:
    provisioned = load_yaml(DATASOURCES)["datasources"]
    (source,) = [s for s in provisioned if s["type"] == "prometheus"]
    assert source["url"] == "http://prometheus:9090"
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"
    assert variable["current"]["value"] == source["uid"]
    for panel in _panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_provider_loads_from_a_folder(dashboard: dict[str, Any]) -> None:
    (provider,) = load_yaml(PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
