"""``/metrics`` of a live ``mpipeline run``, driven through its HTTP gateway.

One supervisor (gateway, metrics on port 0, a slow echo, an ``assemble``
fault for inputs holding ``BOOM``) serves the module; every test reads
counters before and after what it does and holds the difference to what it
sent, so the tests do not depend on each other's traffic. A counter can be
bumped just after the client has its answer, so reads poll to a deadline.
The last test stops that supervisor and checks that the block and the port
go with it; the run with metrics off gets a supervisor of its own.
``test_prometheus_live.py`` holds the exposition to the contract and to a
real Prometheus; this file checks the numbers.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mpipeline import _shm
from mpipeline.config import STAGE_ORDER
from mpipeline.control import R_RESTARTS
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.pipeline import Pipeline
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    faults_env,
    run_segments,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

# 20 ms per token: a stream waits for its first token; a 30 ms deadline passes in inference.
TOKEN_DELAY_MS = 20.0
OVERRIDES: dict[str, object] = {
    "metrics.enabled": True,
    "metrics.port": 0,
    "gateway.replicas": 1,
    "stages.inference.echo.token_delay_ms": TOKEN_DELAY_MS,
}
POISON = "BOOM"
HTTP_TIMEOUT_S = 20.0
COUNT_TIMEOUT_S = 10.0
N = 8

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """One exposition, as ``{(sample name, labels): value}``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, Labels], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(self, name: str, **labels: str) -> float:
        """The series with exactly ``labels``; 0 when absent (sparse families)."""
        return self.samples.get(("mpipeline_" + name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` that carries ``labels``."""
        want = set(labels.items())
        return sum(
            v
            for (n, got), v in self.samples.items()
            if n == "mpipeline_" + name and want <= set(got)
        )

    def series(self, name: str) -> dict[Labels, float]:
        return {got: v for (n, got), v in self.samples.items() if n == "mpipeline_" + name}


@dataclass
class Live:
    sp: SupervisorProcess
    metrics_url: str
    client: httpx.Client

    def scrape(self) -> Scrape:
        response = httpx.get(self.metrics_url, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        return Scrape(response.text)

    def wait(
        self,
        what: str,
        get: Callable[[Scrape], float],
        at_least: float,
        timeout: float = COUNT_TIMEOUT_S,
    ) -> tuple[Scrape, float]:
        """Scrape until ``get`` reaches ``at_least``; the scrape and the value."""
        found: list[tuple[Scrape, float]] = []

        def reached() -> bool:
            s = self.scrape()
            found[:] = [(s, get(s))]
            return found[0][1] >= at_least

        try:
            wait_until(reached, timeout, f"{what} >= {at_least}", poll=0.05)
        except AssertionError as exc:
            got = found[0][1] if found else None
            raise AssertionError(f"{exc} (last value {got})") from None
        return found[0]

    def prompt(self, text: str, **fields: object) -> httpx.Response:
        return self.client.post("/v1/prompt", json={"input": text, **fields})


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    configs = ConfigFactory(tmp_path_factory.mktemp("metrics"))
    factory = SupervisorFactory(configs)
    try:
        sp = factory(OVERRIDES, env=faults_env(f"assemble:raise_on={POISON}"))
        url = sp.state["metrics_url"]
        assert url and url.startswith("http://127.0.0.1:") and not url.endswith(":0/metrics"), url
        with httpx.Client(base_url=sp.url, timeout=HTTP_TIMEOUT_S) as client:
            yield Live(sp, str(url), client)
    finally:
        factory.stop_all()


# The gateway's requests


def _count(scrape: Scrape, route: str, status: str) -> float:
    return scrape.value("requests_total", route=route, status=status)


def test_requests_are_counted_by_route_and_status(live: Live) -> None:
    with live.sp.explain():
        before = live.scrape()
        for i in range(N):
            response = live.prompt(f"route {i}")
            assert response.status_code == 200, response.text
        assert live.client.get("/nope?secret=hunter2").status_code == 404
        assert live.client.get("/healthz").status_code == 200
        chat = live.client.post(
            "/v1/chat/completions",
            json={"model": "mpipeline-echo", "messages": [{"role": "user", "content": "chat"}]},
        )
        assert chat.status_code == 200, chat.text
        bad = live.client.post(
            "/v1/prompt", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400

        ok = before.value("requests_total", route="/v1/prompt", status="200")
        after, _ = live.wait(
            "200s on /v1/prompt",
            lambda s: s.value("requests_total", route="/v1/prompt", status="200"),
            ok + N,
        )
        after, _ = live.wait(
            "the 400",
            lambda s: s.value("requests_total", route="/v1/prompt", status="400"),
            before.value("requests_total", route="/v1/prompt", status="400") + 1,
        )
        after, _ = live.wait(
            "the 404",
            lambda s: s.value("requests_total", route="other", status="404"),
            before.value("requests_total", route="other", status="404") + 1,
        )
        for route in ("/healthz", "/v1/chat/completions"):
            live.wait(
                f"the 200 on {route}",
                functools.partial(_count, route=route, status="200"),
                _count(before, route, "200") + 1,
            )
        after, _ = live.wait(
            "request durations",
            lambda s: s.value("request_duration_seconds_count", route="/v1/prompt"),
            before.value("request_duration_seconds_count", route="/v1/prompt") + N + 1,
        )
        # Exactly: one count per answer, none twice.
        assert after.value("requests_total", route="/v1/prompt", status="200") == ok + N
        assert after.value("request_duration_seconds_count", route="/v1/prompt") == (
            before.value("request_duration_seconds_count", route="/v1/prompt") + N + 1
        )
        assert after.value("request_duration_seconds_sum", route="/v1/prompt") > before.value(
            "request_duration_seconds_sum", route="/v1/prompt"
        )
        # A path is user input: it never becomes a label value.
        assert "nope" not in after.text and "hunter2" not in after.text
        routes = {dict(k)["route"] for k in after.series("requests_total")}
        assert "/nope" not in routes and "other" in routes


def _stage_count(scrape: Scrape, stage: str) -> float:
    return scrape.total("stage_duration_seconds_count", stage=stage)


def test_every_stage_times_its_messages_and_inference_counts_calls_and_tokens(live: Live) -> None:
    with live.sp.explain():
        before = live.scrape()
        for i in range(N):
            assert live.prompt(f"stage timing {i} x y").status_code == 200
        for stage in STAGE_ORDER:
            live.wait(
                f"{stage} durations",
                functools.partial(_stage_count, stage=stage),
                _stage_count(before, stage) + N,
            )
        after, _ = live.wait(
            "echo calls",
            lambda s: s.value("upstream_calls_total", upstream="echo"),
            before.value("upstream_calls_total", upstream="echo") + N,
        )
        tokens_out = after.value("tokens_total", direction="out")
        assert tokens_out - before.value("tokens_total", direction="out") >= 4 * N
        assert after.value("tokens_total", direction="in") > before.value(
            "tokens_total", direction="in"
        )
        # Inference ran at least one token delay per message: its time shows in the sum.
        took = after.total("stage_duration_seconds_sum", stage="inference") - before.total(
            "stage_duration_seconds_sum", stage="inference"
        )
        assert took >= N * TOKEN_DELAY_MS / 1000 * 0.9
        # Liveness and process figures for every replica, the gateway included.
        names = {*live.sp.replica_names(), "gateway-0"}
        for name in ("replica_up", "process_cpu_seconds_total", "event_loop_lag_seconds"):
            got = {dict(k)["replica"] for k in after.series(name)}
            assert got == names, name
        assert all(v == 1 for v in after.series("replica_up").values())
        assert all(0 <= v < 5 for v in after.series("event_loop_lag_seconds").values())


def test_a_stream_counts_its_time_to_first_token(live: Live) -> None:
    with live.sp.explain():
        early = live.scrape()
        before = early.value("time_to_first_token_seconds_count")
        with live.client.stream(
            "POST", "/v1/prompt", json={"input": "first token please", "stream": True}
        ) as response:
            assert response.status_code == 200
            response.read()
        after, _ = live.wait(
            "time to first token",
            lambda s: s.value("time_to_first_token_seconds_count"),
            before + 1,
        )
        assert after.value("time_to_first_token_seconds_count") == before + 1
        # The first token came after one token delay (20 ms): above the 16.8 ms bucket.
        below = {"le": repr(2**24 / 1e9)}
        assert after.value("time_to_first_token_seconds_bucket", **below) == (
            early.value("time_to_first_token_seconds_bucket", **below)
        )


def test_identical_prompts_are_answered_from_the_cache(live: Live) -> None:
    with live.sp.explain():
        before = live.scrape()
        for _ in range(3):
            response = live.prompt("the very same prompt, thrice")
            assert response.status_code == 200
            assert response.json()["text"] == "the very same prompt, thrice"
        after, _ = live.wait(
            "cache hits",
            lambda s: s.value("dedup_hits_total", kind="cached"),
            before.value("dedup_hits_total", kind="cached") + 2,
        )
        assert after.value("dedup_hits_total", kind="cached") == (
            before.value("dedup_hits_total", kind="cached") + 2
        )
        calls = after.value("upstream_calls_total", upstream="echo")
        assert calls == before.value("upstream_calls_total", upstream="echo") + 1


def test_a_client_that_hangs_up_mid_stream_is_still_counted(live: Live) -> None:
    words = " ".join(f"w{i}" for i in range(16))  # 16 tokens x 20 ms: 320 ms of stream
    with live.sp.explain():
        before = live.scrape().total("requests_total", route="/v1/prompt")
        with httpx.Client(base_url=live.sp.url, timeout=HTTP_TIMEOUT_S) as once:
            body = {"input": words, "stream": True, "max_tokens": 16}
            with once.stream("POST", "/v1/prompt", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("event: chunk"):
                        break  # hang up after the first token
        # The gateway notices the hang-up within milliseconds; 3 s is plenty.
        live.wait(
            "the hung-up request",
            lambda s: s.total("requests_total", route="/v1/prompt"),
            before + 1,
            timeout=3.0,
        )


# Errors


def test_a_failing_stage_is_counted_by_stage_and_code(live: Live) -> None:
    with live.sp.explain():
        before = live.scrape()
        response = live.prompt(f"this one goes {POISON}")
        assert response.status_code == 500, response.text
        assert response.json()["error"]["type"] == "stage_error"
        after, _ = live.wait(
            "the assemble error",
            lambda s: s.value("errors_total", stage="assemble", code="stage_error"),
            before.value("errors_total", stage="assemble", code="stage_error") + 1,
        )
        assert after.total("errors_total") == before.total("errors_total") + 1
        live.wait(
            "the 500",
            lambda s: s.value("requests_total", route="/v1/prompt", status="500"),
            before.value("requests_total", route="/v1/prompt", status="500") + 1,
        )


def test_a_deadline_passed_in_the_pipeline_is_an_error_once(live: Live) -> None:
    with live.sp.explain():
        before = live.scrape()
        late = live.prompt("a b c d e f g h", deadline_ms=30)
        assert late.status_code == 504, late.text
        code = str(ErrorCode.DEADLINE_EXCEEDED)
        after, _ = live.wait(
            "deadline errors",
            lambda s: s.total("errors_total", code=code),
            before.total("errors_total", code=code) + 1,
        )
        assert after.total("errors_total") == before.total("errors_total") + 1
        live.wait(
            "the 504",
            lambda s: s.value("requests_total", route="/v1/prompt", status="504"),
            before.value("requests_total", route="/v1/prompt", status="504") + 1,
        )


def test_requests_already_late_are_counted_as_expired_where_they_arrive(live: Live) -> None:
    k = 5

    async def submit_late() -> list[BaseException | object]:
        async with Pipeline.attach(live.sp.run_dir) as p:
            jobs = [p.submit(f"late {i}", deadline_ms=0.001) for i in range(k)]
            return list(await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 30))

    with live.sp.explain():
        before = live.scrape()
        outcomes = asyncio.run(submit_late())
        assert all(isinstance(o, RequestFailed) for o in outcomes), outcomes
        # A microsecond is gone before the first stage reads the ring: rag refuses them all.
        after, _ = live.wait(
            "expired at rag",
            lambda s: s.value("expired_total", stage="rag"),
            before.value("expired_total", stage="rag") + k,
        )
        assert after.total("expired_total") == before.total("expired_total") + k
        # The Python API client is not a gateway: its errors are not HTTP errors.
        assert after.total("errors_total") == before.total("errors_total")


# Restarts


def test_counters_survive_a_replica_restart(live: Live) -> None:
    sp = live.sp
    victim = "post-0"
    labels = {"stage": "post", "replica": victim}
    with sp.explain():
        for i in range(3):
            assert live.prompt(f"before the kill {i}").status_code == 200
        before, counted = live.wait(
            "post durations",
            lambda s: s.value("stage_duration_seconds_count", **labels),
            3,
        )
        assert before.value("stage_restarts_total", **labels) == 0
        old_pid = sp.replica_pid(victim)
        os.kill(old_pid, signal.SIGKILL)
        new_pid = sp.wait_replaced(victim, old_pid)
        assert new_pid != old_pid
        with sp.control() as ctl:
            assert ctl.get(sp.slot(victim), R_RESTARTS) == 1

        after, _ = live.wait("the restart", lambda s: s.value("stage_restarts_total", **labels), 1)
        assert after.value("stage_restarts_total", **labels) == 1
        assert after.value("replica_up", **labels) == 1
        # The region lives in the supervisor's segment: nothing went back to zero.
        assert after.value("stage_duration_seconds_count", **labels) >= counted
        for i in range(3):
            assert live.prompt(f"after the kill {i}").status_code == 200
        final, _ = live.wait(
            "post durations after the restart",
            lambda s: s.value("stage_duration_seconds_count", **labels),
            counted + 3,
        )
        assert final.value("stage_restarts_total", **labels) == 1
        others = {
            dict(k)["replica"]: v
            for k, v in final.series("stage_restarts_total").items()
            if dict(k)["replica"] != victim
        }
        assert others and all(v == 0 for v in others.values()), others


def test_stopping_removes_the_block_and_closes_the_port(live: Live) -> None:
    """Last in the module: it stops the shared supervisor."""
    sp = live.sp
    name = sp.state["metrics"]
    assert name == f"mpl-{sp.run_id}-metrics"
    path = _shm.segment_path(name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sp.send(signal.SIGTERM)
    assert sp.wait_exit(30) == 0, sp.log()
    assert not path.exists()
    assert run_segments(sp.run_id) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(live.metrics_url, timeout=5)


# Metrics off


@pytest.fixture(scope="module")
def metrics_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("off")))
    try:
        yield factory({"metrics.enabled": False, "gateway.replicas": 1})
    finally:
        factory.stop_all()


def test_metrics_off_serves_nothing(metrics_off: SupervisorProcess) -> None:
    sp = metrics_off
    with sp.explain():
        assert sp.state["metrics_url"] is None
        # The gateway and the stages run without a region to count in.
        response = httpx.post(f"{sp.url}/v1/prompt", json={"input": "no metrics"}, timeout=20)
        assert response.status_code == 200 and response.json()["text"] == "no metrics"


def test_metrics_off_makes_no_block(metrics_off: SupervisorProcess) -> None:
    sp = metrics_off
    segments = run_segments(sp.run_id)
    assert f"mpl-{sp.run_id}-control" in segments
    assert not [s for s in segments if s.startswith(f"mpl-{sp.run_id}-metrics")], segments
    assert sp.state["metrics"] is None
