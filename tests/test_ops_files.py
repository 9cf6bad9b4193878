"""Operations files: alert rules, their unit tests, the Prometheus config, the Grafana dashboard, runbooks.

Metric names are checked against what the gateway really exports; promtool checks run when it is
on PATH (Debian: `apt-get install prometheus`) and are required with GATEWAY_REQUIRE_PROMTOOL=1.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import Metrics
from tests.conftest import MODEL, ROOT, good_row, make_client

PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboard.json"
RUNBOOKS = ROOT / "docs" / "runbooks"
RUNBOOK_URL = re.compile(r"https://github\.com/example/gateway/blob/main/docs/runbooks/([a-z0-9-]+\.md)")

#: Metrics the ops files may use before the gateway exports them, and the feature that brings each.
NOT_YET_EXPORTED: dict[str, str] = {}  # metric -> the feature that will export it (none pending)

EXPECTED_ALERTS = {
    "GatewayDriftAlert", "GatewayDriftWarn", "GatewayBreakerOpen", "GatewayErrorRateHigh", "GatewayP99OverSLO",
    "GatewayFallbackRateHigh", "GatewayVolumeAnomaly", "GatewayShadowDisagreementHigh", "GatewayOutcomeAlert",
    "GatewayAuditBacklog", "GatewayNotReady", "GatewayPolicyProblems", "GatewayShadowDropping", "GatewayStateStoreDown",
}
SEVERITIES = {"critical", "warning", "info"}

#: Grafana's variables, replaced by something PromQL accepts before an expression is checked.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$model": ".+",
                     "$instance": ".+"}


# ------------------------------------------------------------------------------------------ helpers

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml, from every group."""
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Panels, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_expressions(node: Any) -> Iterator[str]:
    """Every `expr` anywhere in the dashboard (panel targets, annotations, variables)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from dashboard_expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_expressions(item)


def variable_queries(board: dict[str, Any]) -> list[str]:
    """Template variable queries (a string, or an object with `query`)."""
    queries = []
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            queries.append(query)
    return queries


def used_expressions() -> dict[str, str]:
    """Every PromQL expression of the ops files, keyed by where it is."""
    found = {f"alerts.yml {rule['alert']}": str(rule["expr"]) for rule in alert_rules()}
    board = dashboard()
    found.update({f"dashboard.json expr #{i}": expr for i, expr in enumerate(dashboard_expressions(board))})
    found.update({f"dashboard.json variable #{i}": query for i, query in enumerate(variable_queries(board))})
    return found


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan", "Inf", "NaN"}
_SELECTOR = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a `label_values(metric, label)` query)."""
    label_values = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)\s*", expr)
    if label_values:
        return {label_values.group(1)}
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    return {name for name in _NAME.findall(text) if name not in _KEYWORDS}


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its matchers) for every `metric{...}` selector."""
    text = _STRING.sub('""', expr)
    return [(name, set(_MATCHER_LABEL.findall(matchers))) for name, matchers in _SELECTOR.findall(text)]


def registered_names() -> dict[str, set[str]]:
    """Sample names the gateway's registry exposes (with _total, _bucket, ...), each with its labels."""
    metrics = Metrics()
    labels: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                labels[family.name] = set(collector._labelnames)
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        own = labels.get(family.name, set())  # process_* series (prometheus_client's ProcessCollector) have none
        if family.type == "counter":
            names.update({f"{family.name}_total": own, f"{family.name}_created": own})
        elif family.type == "histogram":
            names.update({f"{family.name}_bucket": own | {"le"}, f"{family.name}_sum": own,
                          f"{family.name}_count": own, f"{family.name}_created": own})
        elif family.type == "summary":
            names.update({f"{family.name}_sum": own, f"{family.name}_count": own, f"{family.name}_created": own})
        else:
            names[family.name] = own
    return names


@pytest.fixture(scope="module")
def exposition() -> dict[str, set[str]]:
    """Families in the real /metrics of an in-process app that answered a request, with their sample names."""
    with make_client() as client:
        answer = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]})
        assert answer.status_code == 200, answer.text
        response = client.get("/metrics")
    assert response.status_code == 200
    return {family.name: {sample.name for sample in family.samples}
            for family in text_string_to_metric_families(response.text)}


def exposed_names(exposition: dict[str, set[str]]) -> set[str]:
    return set(exposition).union(*exposition.values())


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool's path; skipped when it is missing, unless GATEWAY_REQUIRE_PROMTOOL=1."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("GATEWAY_REQUIRE_PROMTOOL") == "1":
            pytest.fail("GATEWAY_REQUIRE_PROMTOOL=1 but promtool is not on PATH")
        pytest.skip("promtool is not on PATH (Debian/Ubuntu: apt-get install prometheus); "
                    "set GATEWAY_REQUIRE_PROMTOOL=1 to make this a failure")
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------- (a) structure

def test_alert_rules_are_the_expected_ones_in_group_gateway() -> None:
    groups = load_yaml(ALERTS)["groups"]
    assert [group["name"] for group in groups] == ["gateway"]
    names = [rule.get("alert") for rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) == EXPECTED_ALERTS


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule.get("alert")))
def test_alert_has_severity_annotations_and_an_existing_runbook(rule: dict[str, Any]) -> None:
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert str(annotations.get(key, "")).strip(), f"{rule['alert']}: annotation {key} is missing"
    match = RUNBOOK_URL.fullmatch(annotations["runbook_url"])
    assert match, f"{rule['alert']}: runbook_url {annotations['runbook_url']!r} is not a docs/runbooks page"
    assert (RUNBOOKS / match.group(1)).is_file(), f"{rule['alert']}: {match.group(1)} does not exist"


def test_runbook_pages_link_only_to_existing_pages() -> None:
    for page in RUNBOOKS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"
        for name in re.findall(r"`([a-z0-9-]+\.md)`", page.read_text()):
            assert (RUNBOOKS / name).is_file() or (ROOT / name).is_file(), f"{page.name} names missing {name}"


def test_prometheus_config_scrapes_both_replicas_and_loads_the_alerts() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    rule_files = [PROMETHEUS_CONFIG.parent / name for name in config["rule_files"]]
    assert ALERTS in rule_files
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = jobs["gateway"]
    assert gateway.get("metrics_path", "/metrics") == "/metrics"
    assert gateway.get("scrape_interval", config.get("global", {}).get("scrape_interval")) == "15s"
    targets = {target for static in gateway["static_configs"] for target in static["targets"]}
    assert targets == {"gateway-1:8080", "gateway-2:8080"}


# ------------------------------------------------------------------------------ (b) metric names

def test_metric_name_extraction() -> None:
    expr = ('sum by (model, reason) (rate(gateway_fallbacks_total{model=~"$model",reason!="x y"}[$__rate_interval]))\n'
            '/ on (model) group_left sum by (model) (rate(gateway_requests_total[5m])) > 0.05 '
            'and histogram_quantile(0.99, sum by (le) (rate(some_seconds_bucket[1m]))) > 1e3 '
            'unless absent(up) or vector(1)')
    assert metric_names(expr) == {"gateway_fallbacks_total", "gateway_requests_total", "some_seconds_bucket", "up"}
    assert metric_names("label_values(gateway_requests_total, model)") == {"gateway_requests_total"}
    assert selector_labels('rate(x_total{a="1", b=~"2|3"}[5m]) / y{c!=""}') == [("x_total", {"a", "b"}),
                                                                                ("y", {"c"})]


def test_registry_is_what_the_app_exposes(exposition: dict[str, set[str]]) -> None:
    """The app serves Metrics().registry: the same families (a family without samples has no sample names)."""
    # the text parser reports a counter's or histogram's `_created` samples as a family of their own
    families = {name for name in exposition
                if not (name.endswith("_created") and name.removesuffix("_created") in exposition)}
    assert families == {family.name for family in Metrics().registry.collect()}
    assert "gateway_requests_total" in exposition["gateway_requests"], "the in-process request was not counted"
    assert "gateway_request_duration_seconds_bucket" in exposition["gateway_request_duration_seconds"]
    assert exposed_names(exposition) - {"gateway_requests", "gateway_request_duration_seconds"} <= (
        set(registered_names()) | set(exposition)), "a sample name the registry does not predict"


def test_every_metric_in_alerts_and_dashboard_is_exported(exposition: dict[str, set[str]]) -> None:
    known = exposed_names(exposition) | set(registered_names())
    missing: dict[str, list[str]] = {}
    for where, expr in used_expressions().items():
        for name in metric_names(expr) - known - NOT_YET_EXPORTED.keys():
            missing.setdefault(name, []).append(where)
    assert not missing, f"metrics the gateway does not export: {missing}"


def test_allowed_missing_metrics_are_used() -> None:
    """Every exception in NOT_YET_EXPORTED is for a metric an ops file really uses."""
    used = set().union(*(metric_names(expr) for expr in used_expressions().values()))
    assert NOT_YET_EXPORTED.keys() <= used
    assert "gateway_audit_backlog" in used  # the audit log's backlog is watched


def test_selectors_only_match_labels_the_metric_has() -> None:
    registered = registered_names()
    scrape_labels = {"job", "instance"}
    for where, expr in used_expressions().items():
        for name, matched in selector_labels(expr):
            if name in NOT_YET_EXPORTED:
                continue
            assert name in registered, f"{where}: {name}"
            unknown = matched - registered[name] - scrape_labels
            assert not unknown, f"{where}: {name} has no label {sorted(unknown)}"


# ----------------------------------------------------------------------------------- (c) promtool

def test_promtool_check_rules(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def run_tests_with_rules(promtool: str, rules: list[dict[str, Any]],
                         directory: Path) -> subprocess.CompletedProcess[str]:
    """Run alerts_test.yml against `rules` written as alerts.yml in `directory`."""
    (directory / "alerts.yml").write_text(yaml.safe_dump({"groups": [{"name": "gateway", "rules": rules}]},
                                                         sort_keys=False, width=1000))
    shutil.copy(ALERT_TESTS, directory / "alerts_test.yml")
    return run_promtool(promtool, "test", "rules", directory / "alerts_test.yml")


def test_rule_unit_tests_pass_on_rewritten_rules(promtool: str, tmp_path: Path) -> None:
    """The mutation tests below rewrite alerts.yml; unchanged, the rewrite must still pass."""
    result = run_tests_with_rules(promtool, alert_rules(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


#: (alert, field, text to replace or None for the whole field, replacement, what the tests must catch)
MUTATIONS = [
    ("GatewayDriftAlert", "expr", "== 2", ">= 1", "state 1 (warn) must not raise the alert"),
    ("GatewayDriftAlert", "for", None, "0s", "it must not fire before 5 minutes"),
    ("GatewayDriftAlert", "for", None, "10m", "it must fire after 5 minutes"),
    ("GatewayDriftWarn", "expr", "== 1", ">= 1", "state 2 is not a warning"),
    ("GatewayBreakerOpen", "expr", "== 2", ">= 1", "half-open is not open"),
    ("GatewayBreakerOpen", "for", None, "0s", "it must wait 1 minute"),
    ("GatewayErrorRateHigh", "expr", 'outcome=~"error|timeout|unavailable"', 'outcome!="ok"',
     "fallback and client errors are not errors"),
    ("GatewayErrorRateHigh", "expr", 'outcome=~"error|timeout|unavailable"', 'outcome=~"error|unavailable"',
     "timeouts are errors"),
    ("GatewayErrorRateHigh", "expr", "> 0.01", "> 0.004", "0.5 % is within the SLO"),
    ("GatewayFallbackRateHigh", "expr", "> 0.05", "> 0.01", "1.7 % is within the threshold"),
    ("GatewayFallbackRateHigh", "expr", "> 0.05", "> 0.2", "10 % is over the threshold"),
    ("GatewayFallbackRateHigh", "for", None, "5m", "it must wait 10 minutes"),
    ("GatewayP99OverSLO", "expr", "0.99", "0.5", "the p99, not the median"),
    ("GatewayShadowDisagreementHigh", "expr", "gateway_shadow_compared_rows_total", "gateway_shadow_requests_total",
     "disagreements are divided by compared rows"),
    ("GatewayShadowDropping", "expr", "> 0", ">= 0", "a flat dropped counter is not dropping"),
    ("GatewayOutcomeAlert", "expr", "== 2", "!= 0", "insufficient labels (-1) are not an alert"),
    ("GatewayAuditBacklog", "expr", "> 1000", ">= 1000", "exactly 1000 is not over the threshold"),
    ("GatewayNotReady", "for", None, "1m", "it must wait 2 minutes"),
    ("GatewayPolicyProblems", "expr", "> 0", "> 2", "2 problems are problems"),
    ("GatewayVolumeAnomaly", "for", None, "4m", "it must wait 5 minutes"),
]
MUTATIONS += [(name, "expr", None, "vector(1) == 0", "the alert must fire at all") for name in sorted(EXPECTED_ALERTS)]


@pytest.mark.parametrize(("alert", "field", "old", "new", "why"), MUTATIONS,
                         ids=[f"{m[0]}-{m[1]}-{m[3]}" for m in MUTATIONS])
def test_rule_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path, alert: str, field: str,
                                             old: str | None, new: str, why: str) -> None:
    rules = copy.deepcopy(alert_rules())
    rule = next(rule for rule in rules if rule["alert"] == alert)
    if old is None:
        rule[field] = new
    else:
        assert old in rule[field], f"{alert}: the mutation no longer applies to {rule[field]!r}"
        rule[field] = rule[field].replace(old, new)
    result = run_tests_with_rules(promtool, rules, tmp_path)
    assert result.returncode != 0, f"alerts_test.yml did not notice that {why} ({alert} {field}: {rule[field]!r})"
    assert alert in result.stdout + result.stderr


def test_dashboard_expressions_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each dashboard expression, its Grafana variables filled in, as a recording rule promtool parses."""
    rules = []
    for i, template in enumerate(dashboard_expressions(dashboard())):
        expr = template
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {template!r}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------- (d) dashboard

def test_dashboard_loads_with_unique_panel_ids_and_a_query_per_panel() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    panels = list(all_panels(board["panels"]))
    assert panels
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in panels:
        if panel.get("type") == "row":
            continue
        exprs = [target.get("expr", "") for target in panel.get("targets", [])]
        assert exprs and all(expr.strip() for expr in exprs), f"panel {panel['title']!r} has no query"
        ref_ids = [target.get("refId") for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {panel['title']!r}: duplicate refId"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard()["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_datasource_and_model_variable() -> None:
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    inputs = {item.get("name") for item in board.get("__inputs", [])}
    if "DS_PROMETHEUS" in inputs:
        datasource = "${DS_PROMETHEUS}"
    else:
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        datasource = "${datasource}"
    model = variables["model"]
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert re.fullmatch(r"label_values\(\s*gateway_requests_total\s*,\s*model\s*\)", query)
    for panel in all_panels(board["panels"]):
        for source in [panel.get("datasource"), *(target.get("datasource") for target in panel.get("targets", []))]:
            assert source is None or source.get("uid") == datasource, f"{panel['title']!r}: datasource {source}"


def test_dashboard_covers_the_operator_questions() -> None:
    """Requests, latency, fallbacks, breakers, canary, shadow, drift, outcomes, queues and volume."""
    used = set().union(*(metric_names(expr) for expr in dashboard_expressions(dashboard())))
    required = {
        "gateway_requests_total", "gateway_request_duration_seconds_bucket", "gateway_fallbacks_total",
        "gateway_breaker_state", "gateway_canary_ratio", "gateway_shadow_disagreements_total",
        "gateway_shadow_compared_rows_total", "gateway_drift_state", "gateway_drift_score", "gateway_outcome_quality",
        "gateway_inferences_in_flight", "gateway_shadow_queue_depth", "gateway_drift_queue_depth",
        "gateway_requests_per_minute",
    }
    assert required <= used, f"not on the dashboard: {sorted(required - used)}"


def test_dashboard_queries_follow_the_model_variable() -> None:
    """Every selector of a metric with a `model` label filters on $model."""
    registered = registered_names()
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            selectors = dict(selector_labels(target["expr"]))
            for name in metric_names(target["expr"]):
                if "model" in registered.get(name, set()):
                    assert "model" in selectors.get(name, set()), f"{panel['title']!r}: {name} ignores $model"
                    assert 'model=~"$model"' in target["expr"], panel["title"]
