"""The metrics contract that the dashboard, the alerts and the live scrape are checked against.

``config/grafana/mpipeline.json`` and ``config/prometheus/alerts.yml`` name
series the supervisor serves at ``/metrics``. Nothing checks a PromQL string
against the code that exports it, so a renamed metric would leave an empty
panel or an alert that can never fire. ``METRICS`` is the agreed list (issue 6);
the rule tests hold both files to it and the live test holds the scrape to it.
``promtool test rules`` unit tests for the alerts sit beside this file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"
ALERTS_TEST = HERE / "alerts_test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "mpipeline.json"

Kind = Literal["counter", "gauge", "histogram"]

# Every series the supervisor exports, by type; labels only from LABELS.
METRICS: dict[str, Kind] = {
    "mpipeline_requests_total": "counter",
    "mpipeline_request_duration_seconds": "histogram",
    "mpipeline_stage_duration_seconds": "histogram",
    "mpipeline_queue_depth": "gauge",
    "mpipeline_ring_used_bytes": "gauge",
    "mpipeline_ring_capacity_bytes": "gauge",
    "mpipeline_ring_high_water_bytes": "gauge",
    "mpipeline_ring_records_total": "counter",
    "mpipeline_shed_total": "counter",
    "mpipeline_expired_total": "counter",
    "mpipeline_errors_total": "counter",
    "mpipeline_upstream_retries_total": "counter",
    "mpipeline_circuit_state": "gauge",
    "mpipeline_circuit_opens_total": "counter",
    "mpipeline_dedup_hits_total": "counter",
    "mpipeline_upstream_calls_total": "counter",
    "mpipeline_tokens_total": "counter",
    "mpipeline_redactions_total": "counter",
    "mpipeline_time_to_first_token_seconds": "histogram",
    "mpipeline_stage_restarts_total": "counter",
    "mpipeline_event_loop_lag_seconds": "gauge",
    "mpipeline_process_cpu_seconds_total": "counter",
    "mpipeline_process_resident_memory_bytes": "gauge",
    "mpipeline_replica_up": "gauge",
    # Per client slot, from the control block: accepted = completed + failed + in flight.
    "mpipeline_requests_accepted_total": "counter",
    "mpipeline_requests_completed_total": "counter",
    "mpipeline_requests_failed_total": "counter",
    "mpipeline_requests_in_flight": "gauge",
    # Live reconfiguration: the run's config version and the one each replica applied.
    "mpipeline_config_version": "gauge",
    "mpipeline_replica_config_version": "gauge",
}
# The reference orchestrator's five series, kept under our prefix so its alerts translate.
CORE_METRICS = (
    "mpipeline_requests_total",
    "mpipeline_stage_duration_seconds",
    "mpipeline_queue_depth",
    "mpipeline_shed_total",
    "mpipeline_errors_total",
)
# The only label names an exported series may carry: none of them can hold user data.
# ("client" is a slot's name, gateway-N or api-N.)
LABELS = frozenset(
    "stage replica edge route status code reason upstream kind direction client".split()
)
# Series Prometheus makes itself for every scrape target.
SYNTHETIC = frozenset({"up"})
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

# What is not a metric name in a PromQL expression, removed before looking for names:
# string literals (label values, Grafana's "$stage"), label matchers, range and
# subquery brackets (durations, "$__rate_interval"), and grouping label lists.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
# An identifier not glued to a number, a Grafana "$var" or a longer name, and not
# a function call.
_IDENT = re.compile(r"(?<![\w$:.])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_KEYWORDS = frozenset(
    "and or unless bool offset by without on ignoring group_left group_right inf nan".split()
)


def metric_names(expr: str) -> set[str]:
    """Names of the series that the PromQL expression ``expr`` selects.

    A small lexer, not a parser: enough for the expressions we write (no
    ``__name__`` matchers, no nested braces). Functions and keywords are left out.
    """
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


def family(name: str) -> str | None:
    """The ``METRICS`` (or synthetic) family a series name belongs to; None if none.

    Histograms are exported as ``<name>_bucket``, ``_count`` and ``_sum``; a
    counter or gauge only under its own name.
    """
    if name in METRICS or name in SYNTHETIC:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and METRICS.get(base) == "histogram":
            return base
    return None


__all__ = [
    "ALERTS",
    "ALERTS_TEST",
    "CORE_METRICS",
    "DASHBOARD",
    "LABELS",
    "METRICS",
    "PROMETHEUS_CONFIG",
    "ROOT",
    "SYNTHETIC",
    "family",
    "metric_names",
]
