"""The alert rules, the example Prometheus config and the Grafana dashboard are valid.

These files are configuration for other programs, so nothing in mpipeline
ever loads them: without these tests a typo in PromQL or a renamed metric
would first show up as an alert that never fires. ``promtool`` (Debian package
``prometheus``, installed by scripts/setup.sh) checks the syntax and runs the
rule unit tests in ``tests/prometheus/alerts_test.yml``; the metric names are
held to the contract in ``tests/prometheus``.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_binary
from tests.prometheus import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD,
    METRICS,
    PROMETHEUS_CONFIG,
    family,
    metric_names,
)

PROMTOOL_TIMEOUT_S = 60.0
DATASOURCE_UID = "${DS_PROMETHEUS}"
GRID_WIDTH = 24
# Values for Grafana's variables when a panel query is checked as plain PromQL;
# any other "$var" stands in a label matcher's regex, where ".*" fits.
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
_GRAFANA_VAR = re.compile(r"\$\{?(\w+)\}?")
_RULES_FOUND = re.compile(r"SUCCESS: (\d+) rules found")
_LABEL_VALUES = re.compile(r"label_values\(\s*(.+?)\s*,\s*\w+\s*\)")
_ALERT = re.compile(r"\s*- alert:\s*(\S+)\s*$")
_EXPR = re.compile(r"(\s*)expr:\s*(.*?)\s*$")
_BLOCK = ("|", "|-", ">", ">-")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; its output is the failure message when it disagrees.

    Skips where promtool is missing, and fails under CI (``tests.conftest.missing``).
    """
    binary = require_binary("promtool", "apt-get install prometheus (scripts/setup.sh)")
    return subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def alert_exprs(text: str) -> dict[str, str]:
    """``alert name -> expr`` of a rules file, read without a YAML library.

    PyYAML is not a dependency, and our rules file only needs two shapes of
    ``expr``: a block scalar (``expr: |``) or one line. ``test_alert_rules_are_valid``
    compares the count with promtool's, so a rule this misses fails the suite.
    """
    lines = text.splitlines()
    exprs: dict[str, str] = {}
    name: str | None = None
    for i, line in enumerate(lines):
        if m := _ALERT.match(line):
            name = m[1]
        elif (m := _EXPR.match(line)) and name is not None:
            indent, rest = len(m[1]), m[2]
            if rest in _BLOCK:
                body = []
                for nxt in lines[i + 1 :]:
                    if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                        break
                    body.append(nxt.strip())
                rest = " ".join(body)
            exprs[name] = rest.strip("'\"")
            name = None
    return exprs


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def dashboard_exprs(dashboard: dict[str, Any]) -> dict[str, str]:
    """``where -> PromQL`` of every panel target and every query variable."""
    exprs = {
        f"panel {panel['id']} {panel['title']!r} target {target['refId']}": target["expr"]
        for panel in panels(dashboard)
        for target in panel.get("targets", ())
    }
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = _LABEL_VALUES.fullmatch(var["query"])
            assert m, f"variable {var['name']}: expected label_values(metric, label)"
            exprs[f"variable {var['name']}"] = m[1]
    return exprs


def as_promql(expr: str) -> str:
    """A Grafana query with its variables replaced, so promtool can parse it."""
    return _GRAFANA_VAR.sub(lambda m: GRAFANA_VARS.get(m[1], ".*"), expr)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    model: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return model


# The contract helpers


def test_metric_names_finds_series_not_functions_labels_or_variables() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (stage, le) (rate(a_seconds_bucket{stage=~"$stage"}'
        "[$__rate_interval]))) / ignoring(kind) group_left() (sum(rate(b_total[5m] offset 1h))"
        ' + on (x) c:recorded) > bool 1e3 and d{edge="x{y}"} unless up'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c:recorded", "d", "up"}


def test_family_maps_histogram_series_to_their_metric() -> None:
    assert family("mpipeline_stage_duration_seconds_bucket") == "mpipeline_stage_duration_seconds"
    assert family("mpipeline_requests_total") == "mpipeline_requests_total"
    assert family("up") == "up"
    assert family("mpipeline_requests_total_count") is None  # a counter has no _count
    assert family("mpipeline_request_seconds") is None


# Alerts


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    found = _RULES_FOUND.search(result.stdout)
    assert found, result.stdout
    assert int(found[1]) == len(alert_exprs(ALERTS.read_text(encoding="utf-8")))


def test_alert_rule_unit_tests_pass() -> None:
    """Each alert fires on its synthetic series and stays silent on a healthy pipeline."""
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    tests = ALERTS_TEST.read_text(encoding="utf-8")
    for name in alert_exprs(ALERTS.read_text(encoding="utf-8")):
        silent = re.search(rf"alertname: {name}, exp_alerts: \[\]", tests)
        firing = re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", tests)
        assert silent and firing, f"{ALERTS_TEST.name} must show {name} silent and firing"


def test_alerts_use_only_exported_metrics() -> None:
    exprs = alert_exprs(ALERTS.read_text(encoding="utf-8"))
    assert exprs
    for name, expr in exprs.items():
        used = metric_names(expr)
        assert used, f"{name}: no metric in {expr!r}"
        unknown = sorted(n for n in used if family(n) is None)
        assert not unknown, f"{name} uses series nobody exports: {unknown}"


def test_example_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


# The Grafana dashboard


def test_dashboard_is_an_importable_grafana_model(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        where = f"panel {panel['id']} {panel.get('title')!r}"
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= GRID_WIDTH, where
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, where
        assert panel["targets"], f"{where} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, where
            assert target["expr"].strip(), where
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == DATASOURCE_UID, var["name"]


def test_dashboard_uses_only_exported_metrics_and_shows_them_all(
    dashboard: dict[str, Any],
) -> None:
    shown: set[str] = set()
    for where, expr in dashboard_exprs(dashboard).items():
        used = metric_names(expr)
        assert used, f"{where}: no metric in {expr!r}"
        unknown = sorted(n for n in used if family(n) is None)
        assert not unknown, f"{where} uses series nobody exports: {unknown}"
        shown |= {f for n in used if (f := family(n)) is not None}
    assert not set(METRICS) - shown, f"no panel shows {sorted(set(METRICS) - shown)}"


def test_dashboard_queries_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every panel query, each checked as a recording rule."""
    exprs = dashboard_exprs(dashboard)
    rules = [
        {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
        for i, expr in enumerate(exprs.values())
    ]
    path = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, (
        result.stdout
        + result.stderr
        + "\n".join(f"query_{i}: {where}" for i, where in enumerate(exprs))
    )
