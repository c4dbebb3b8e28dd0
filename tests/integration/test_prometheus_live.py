"""A real Prometheus scrapes /metrics, stores it and evaluates our alerts against it.

Two tests. The first serves a fixed exposition that breaks two alerts and
checks the whole loop without a pipeline: the scrape, the queries back, every
rule in alerts.yml loaded and evaluating cleanly, and the two alerts pending.
The second runs ``mpipeline run`` with metrics on, pushes requests through
the Python API, lints a scrape with ``promtool check metrics``, holds it to
the metrics contract (names, types, labels that cannot carry user data) and
reads it back through Prometheus. The supervisor binds /metrics on port 0
and names the port in its state file, so no other process can take it first.
Without prometheus or promtool both skip, and fail under CI (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mpipeline.messages import Completed
from mpipeline.pipeline import Pipeline
from tests.conftest import require_binary
from tests.integration.conftest import SupervisorFactory
from tests.prometheus import ALERTS, CORE_METRICS, LABELS, METRICS, family
from tests.prometheus_server import PrometheusServer, Sample, start_prometheus

__all__ = ["start_prometheus"]  # the fixture, imported to be used here

pytestmark = pytest.mark.integration

StartPrometheus = Callable[[str], PrometheusServer]
REQUESTS = 20
HANG_S = 30.0
# Labels Prometheus itself gives every series (target, histogram bucket bound).
SCRAPE_LABELS = frozenset({"job", "instance", "le"})

# Healthy traffic, plus one ring 90% full and one open circuit: two alerts go pending.
EXPOSITION = b"""\
# HELP mpipeline_requests_total Gateway responses by route and status.
# TYPE mpipeline_requests_total counter
mpipeline_requests_total{route="/v1/chat/completions",status="200"} 42
# HELP mpipeline_stage_duration_seconds Time a stage spends on one message.
# TYPE mpipeline_stage_duration_seconds histogram
mpipeline_stage_duration_seconds_bucket{stage="rag",replica="rag-0",le="0.01"} 42
mpipeline_stage_duration_seconds_bucket{stage="rag",replica="rag-0",le="+Inf"} 42
mpipeline_stage_duration_seconds_sum{stage="rag",replica="rag-0"} 0.2
mpipeline_stage_duration_seconds_count{stage="rag",replica="rag-0"} 42
# HELP mpipeline_ring_used_bytes Bytes waiting in a ring.
# TYPE mpipeline_ring_used_bytes gauge
mpipeline_ring_used_bytes{edge="assemble0-inference0"} 58982
mpipeline_ring_used_bytes{edge="rag0-assemble0"} 100
# HELP mpipeline_ring_capacity_bytes Size of a ring's data area.
# TYPE mpipeline_ring_capacity_bytes gauge
mpipeline_ring_capacity_bytes{edge="assemble0-inference0"} 65536
mpipeline_ring_capacity_bytes{edge="rag0-assemble0"} 65536
# HELP mpipeline_circuit_state Circuit breaker state per upstream: 0 closed, 1 open, 2 half open.
# TYPE mpipeline_circuit_state gauge
mpipeline_circuit_state{upstream="openai"} 1
# HELP mpipeline_replica_up 1 while a replica is ready.
# TYPE mpipeline_replica_up gauge
mpipeline_replica_up{stage="rag",replica="rag-0"} 1
"""
PENDING = {"MPipelineRingNearlyFull", "MPipelineCircuitOpen"}


def _alert_names() -> set[str]:
    return {
        line.split(":", 1)[1].strip()
        for line in ALERTS.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("- alert:")
    }


def _value(samples: list[Sample]) -> float:
    return sum(float(s["value"][1]) for s in samples)


class _Exposition(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(EXPOSITION)))
        self.end_headers()
        self.wfile.write(EXPOSITION)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one line per scrape would bury the test output."""


@pytest.fixture
def static_target() -> Iterator[str]:
    """``host:port`` of a thread serving ``EXPOSITION`` at /metrics."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    thread = threading.Thread(target=server.serve_forever, name="exposition", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.timeout(90)
def test_prometheus_scrapes_and_evaluates_our_alerts(
    static_target: str, start_prometheus: StartPrometheus
) -> None:
    prom = start_prometheus(static_target)
    prom.wait_for('up{job="mpipeline"} == 1')
    got = prom.wait_for("mpipeline_requests_total")
    assert _value(got) == 42
    assert got[0]["metric"]["job"] == "mpipeline"
    assert got[0]["metric"]["instance"] == static_target
    assert _value(prom.query("sum(mpipeline_stage_duration_seconds_count)")) == 42

    rules = prom.wait_evaluated()
    assert {r["name"] for r in rules} == _alert_names()
    assert {r["group"] for r in rules} == {"mpipeline"}

    pending = prom.query('ALERTS{alertstate="pending"}')
    assert {s["metric"]["alertname"] for s in pending} == PENDING
    ring = next(s for s in pending if s["metric"]["alertname"] == "MPipelineRingNearlyFull")
    assert ring["metric"]["edge"] == "assemble0-inference0"


def _scrape(url: str) -> str:
    """The body of ``GET url``, which must answer 200."""
    response = httpx.get(url, timeout=5.0)
    assert response.status_code == 200, f"GET {url}: {response.status_code}"
    return response.text


def _is_created(name: str) -> bool:
    """A ``<counter or histogram>_created`` timestamp family, which prometheus_client adds."""
    base = name.removesuffix("_created")
    return base != name and (
        METRICS.get(f"{base}_total") == "counter" or METRICS.get(base) == "histogram"
    )


def _check_contract(exposition: str) -> None:
    """Every mpipeline_* family is in the contract with its type; labels carry no user data."""
    seen: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        if not fam.name.startswith("mpipeline_") or _is_created(fam.name):
            continue
        # The parser strips _total from counter family names; the contract keeps it.
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        assert name in METRICS, f"{name} is exported but not in the metrics contract"
        assert fam.type == METRICS[name], f"{name} is a {fam.type}, not a {METRICS[name]}"
        seen.add(name)
        for sample in fam.samples:
            assert family(sample.name) == name, f"{sample.name} in family {name}"
            extra = set(sample.labels) - LABELS - SCRAPE_LABELS
            assert not extra, f"{sample.name} has labels outside the contract: {sorted(extra)}"
    missing = set(CORE_METRICS) - seen
    assert not missing, f"the reference's core series are missing: {sorted(missing)}"


@pytest.mark.timeout(180)
def test_live_pipeline_metrics_scraped_by_prometheus(
    start_supervisor: SupervisorFactory, start_prometheus: StartPrometheus
) -> None:
    promtool = require_binary("promtool", "apt-get install prometheus (scripts/setup.sh)")
    # Port 0: the supervisor binds any free port and writes the URL in its state
    # file before it is ready, so /metrics already listens (no probe-then-bind race).
    sp = start_supervisor({"metrics.enabled": True, "metrics.port": 0})
    url = sp.state["metrics_url"]
    parsed = httpx.URL(url)
    target = f"{parsed.host}:{parsed.port}"

    async def push() -> None:
        async with Pipeline.attach(sp.run_dir) as p:
            tasks = [p.submit(f"metrics request {i}") for i in range(REQUESTS)]
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), HANG_S)
            assert all(isinstance(o, Completed) for o in outcomes)

    with sp.explain():
        asyncio.run(push())
        body = _scrape(url)

        # (a) The exposition passes promtool's lint and our contract.
        lint = subprocess.run(
            [promtool, "check", "metrics"],
            input=body,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"
        _check_contract(body)

        # (b) A real Prometheus scrapes it and reads it back.
        prom = start_prometheus(target)
        prom.wait_for('up{job="mpipeline"} == 1')
        prom.wait_for(
            'sum(mpipeline_stage_duration_seconds_count{stage="inference"})',
            lambda result: _value(result) >= REQUESTS,
        )
        # The ring alert's join finds one capacity per used-bytes series.
        fill = prom.wait_for("mpipeline_ring_used_bytes / mpipeline_ring_capacity_bytes")
        assert all(0 <= float(s["value"][1]) <= 1 for s in fill)
        assert _value(prom.query("sum(mpipeline_replica_up)")) == _value(
            prom.query("count(mpipeline_replica_up)")
        )

        prom.wait_evaluated()
        # Every rule has a `for`, so a few seconds in, trouble shows as pending.
        alerts = prom.query("ALERTS")
        assert not alerts, f"alerts pending or firing on a healthy pipeline: {alerts}"
