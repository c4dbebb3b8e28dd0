"""Remote upstreams through the whole supervised pipeline when they misbehave
(RELIABILITY scenarios 24-29 and I7).

The upstream is ``tests/fault_upstream.py``: a test server that speaks the
OpenAI and Anthropic wire formats and fails on purpose, running in this
process on loopback. The happy path against a real model server is in
test_upstream_llama.py. Clients go through a supervised gateway over HTTP.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mpipeline.config import AnthropicConfig, OpenAIConfig, PoolUpstreamConfig, TimeoutsConfig
from tests.fault_upstream import (
    AnthropicError,
    FaultUpstream,
    Hang,
    MalformedSSE,
    Ok,
    StallAfter,
    Status,
)
from tests.integration.conftest import SupervisorFactory, SupervisorProcess, wait_until

pytestmark = pytest.mark.timeout(180)

CANARY = "sk-canary-7f3a9c1e5b2d4f60"
FAST_RETRY = {
    "stages.inference.retry.backoff_initial_s": 0.01,
    "stages.inference.retry.backoff_max_s": 0.05,
}


@pytest.fixture
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


def _openai(server: FaultUpstream, **timeouts: float) -> OpenAIConfig:
    return OpenAIConfig(
        base_url=server.openai_url,
        model="fault-model",
        api_key_env="MPL_TEST_UPSTREAM_KEY",
        timeouts=TimeoutsConfig(**timeouts),
    )


def _start(
    start_supervisor: SupervisorFactory, server: FaultUpstream, **overrides: object
) -> SupervisorProcess:
    timeouts = overrides.pop("timeouts", {})
    assert isinstance(timeouts, dict)
    cfg = {
        "gateway.replicas": 1,
        "stages.inference.worker": "openai",
        "stages.inference.openai": _openai(server, **timeouts),
        **FAST_RETRY,
        **overrides,
    }
    return start_supervisor(cfg, env={"MPL_TEST_UPSTREAM_KEY": CANARY})


def _circuits(client: httpx.Client) -> dict[str, dict[str, Any]]:
    body = client.get("/v1/status").json()
    return {c["upstream"]: c for c in body["pipeline"]["circuits"]}


def test_the_circuit_opens_for_every_shard_fails_fast_then_probes_and_closes(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    """Scenario 24: a 500 storm opens the shared circuit; 503 circuit_open in
    milliseconds on both shards; after recovery the probes close it."""
    upstream.default = Status(500)
    sp = _start(
        start_supervisor,
        upstream,
        **{
            "stages.inference.replicas": 2,
            "stages.inference.retry.max_retries": 0,
            "stages.inference.breaker.consecutive_failures": 3,
            "stages.inference.breaker.open_s": 1.0,
            "stages.inference.breaker.probes": 2,
            "stages.inference.dedup.cache_entries": 0,
        },
    )
    with sp.explain(), httpx.Client(base_url=sp.url, timeout=10) as client:
        codes = [
            client.post("/v1/prompt", json={"input": f"q{i}", "session_id": f"s{i}"}).status_code
            for i in range(3)
        ]
        assert codes == [502, 502, 502]
        assert _circuits(client)["openai"]["state"] == "open"
        # Both shards now refuse at once, without calling the upstream.
        calls = len(upstream.calls)
        for i in range(10):
            started = time.monotonic()
            reply = client.post("/v1/prompt", json={"input": f"r{i}", "session_id": f"t{i}"})
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["type"] == "circuit_open"
            assert 1 <= int(reply.headers["retry-after"]) <= 2
            assert time.monotonic() - started < 0.5
        assert len(upstream.calls) == calls
        # Recovery: after open_s the half-open probes go through one at a time.
        upstream.default = Ok(text="back again")
        time.sleep(1.1)
        for i in range(2):
            reply = client.post("/v1/prompt", json={"input": f"p{i}"})
            assert reply.status_code == 200, reply.text
        circuit = _circuits(client)["openai"]
        assert circuit["state"] == "closed" and circuit["opens"] == 1


def test_retry_after_is_honoured_with_jitter_and_the_client_gets_the_answer(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    """Scenario 25: no call before Retry-After has passed; then the answer."""
    upstream.script(Status(429, retry_after=1), Status(503, retry_after=1))
    sp = _start(start_supervisor, upstream)
    with sp.explain(), httpx.Client(base_url=sp.url, timeout=20) as client:
        reply = client.post("/v1/prompt", json={"input": "hello there"})
        assert reply.status_code == 200, reply.text
        at = [c.at for c in upstream.calls]
        assert len(at) == 3
        assert at[1] - at[0] >= 1.0 - 0.05 and at[2] - at[1] >= 1.0 - 0.05


def test_a_retry_after_beyond_the_limit_reaches_the_client(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    upstream.default = Status(429, retry_after=120)
    sp = _start(start_supervisor, upstream)
    with sp.explain(), httpx.Client(base_url=sp.url, timeout=20) as client:
        reply = client.post("/v1/prompt", json={"input": "hello"})
        assert reply.status_code == 429, reply.text
        assert reply.json()["error"]["type"] == "upstream_rate_limited"
        assert reply.headers["retry-after"] == "120"
        assert len(upstream.calls) == 1


def test_a_stall_mid_stream_ends_in_an_error_event_and_is_not_retried(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    """Scenario 27: the between-token timeout fires after three tokens."""
    upstream.default = StallAfter(3)
    # One chunk per token (not per read), so the three before the stall are counted.
    sp = _start(
        start_supervisor,
        upstream,
        timeouts={"between_tokens_s": 0.5},
        **{"stages.inference.coalesce_reads": False},
    )
    body = {"input": "one two three four five", "stream": True}
    with sp.explain(), httpx.Client(base_url=sp.url, timeout=20) as client:
        with client.stream("POST", "/v1/prompt", json=body) as reply:
            assert reply.status_code == 200
            events = _sse(reply.iter_lines())
    names = [name for name, _ in events]
    assert names == ["chunk", "chunk", "chunk", "error"], events
    error = events[-1][1]
    assert error["error"]["type"] == "upstream_timeout"
    assert "mid-stream" in error["error"]["message"]
    assert len(upstream.calls) == 1


def test_a_hung_upstream_gives_504_and_a_malformed_one_502(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    """Scenarios 26 and 28: the first-token timeout, then a broken SSE stream."""
    upstream.script(StallAfter(0))
    sp = _start(
        start_supervisor,
        upstream,
        timeouts={"first_token_s": 0.5},
        **{"stages.inference.retry.max_retries": 0},
    )
    with sp.explain(), httpx.Client(base_url=sp.url, timeout=20) as client:
        started = time.monotonic()
        reply = client.post("/v1/prompt", json={"input": "a", "stream": True})
        assert "upstream_timeout" in reply.text and "first token" in reply.text
        assert time.monotonic() - started < 5
        upstream.script(MalformedSSE())
        reply = client.post("/v1/prompt", json={"input": "b"})
        assert reply.status_code == 502
        assert "malformed" in reply.json()["error"]["message"]


def test_one_hundred_identical_requests_make_one_upstream_call(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    """Scenario 29: coalescing across a burst; then the same when the call fails."""
    upstream.script(Ok(text="shared answer", first_token_delay_s=3.0))
    sp = _start(
        start_supervisor,
        upstream,
        timeouts={"total_s": 4.0},
        **{
            "stages.inference.replicas": 2,
            "stages.inference.retry.max_retries": 0,
            "stages.inference.dedup.cache_entries": 0,
        },
    )

    def burst(text: str) -> list[httpx.Response]:
        with httpx.Client(base_url=sp.url, timeout=30) as client:
            send = lambda _: client.post("/v1/prompt", json={"input": text})  # noqa: E731
            with concurrent.futures.ThreadPoolExecutor(100) as pool:
                return list(pool.map(send, range(100)))

    with sp.explain():
        replies = burst("the same question")
        assert [r.status_code for r in replies] == [200] * 100
        assert {r.json()["text"] for r in replies} == {"shared answer"}
        assert len(upstream.calls) == 1
        # The one call hangs until its total timeout: every waiter gets that error.
        upstream.script(Hang())
        failed = burst("another question")
        assert [r.status_code for r in failed] == [504] * 100
        assert {r.json()["error"]["type"] for r in failed} == {"upstream_timeout"}
        assert len(upstream.calls) == 2


def test_the_api_key_reaches_the_upstream_and_nothing_else(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    """I7: the canary key is sent upstream but never shows in errors, status, logs, the
    DLQ or the metrics (which count the failure without naming the upstream's URL)."""
    upstream.default = Status(401, body=f'{{"error": {{"message": "key {CANARY}"}}}}'.encode())
    sp = _start(start_supervisor, upstream)
    with sp.explain(), httpx.Client(base_url=sp.url, timeout=10) as client:
        reply = client.post("/v1/prompt", json={"input": "hello"})
        assert reply.status_code == 502
        status = client.get("/v1/status").text
    assert upstream.calls[0].headers["authorization"] == f"Bearer {CANARY}"
    assert len(upstream.calls) == 1  # a 401 is not retried
    dlq = (sp.run_dir / "dlq.jsonl").read_text()
    assert "upstream answered HTTP 401" in dlq
    state = json.loads((sp.run_dir / "state.json").read_text())
    metrics = httpx.get(state["metrics_url"], timeout=10).text
    assert 'mpipeline_errors_total{code="upstream_error",stage="inference"} 1.0' in metrics
    assert 'mpipeline_upstream_calls_total{upstream="openai"} 1.0' in metrics
    assert upstream.url not in metrics
    for seen in (reply.text, status, sp.log(), dlq, metrics):
        assert CANARY not in seen


def test_anthropic_streams_through_the_pipeline(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    upstream.script(
        Ok(tokens=["Bonjour", " tout", " le monde"]), AnthropicError("overloaded_error")
    )
    cfg = AnthropicConfig(
        base_url=upstream.url, model="claude-test", api_key_env="MPL_TEST_UPSTREAM_KEY"
    )
    sp = start_supervisor(
        {
            "gateway.replicas": 1,
            "stages.inference.worker": "anthropic",
            "stages.inference.anthropic": cfg,
            "stages.inference.retry.max_retries": 0,
            # One chunk per token, as the upstream sent them.
            "stages.inference.coalesce_reads": False,
        },
        env={"MPL_TEST_UPSTREAM_KEY": CANARY},
    )
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    body = {"input": "Say hello in French", "stream": True, "history": history}
    with sp.explain(), httpx.Client(base_url=sp.url, timeout=20) as client:
        with client.stream("POST", "/v1/prompt", json=body) as reply:
            events = _sse(reply.iter_lines())
        assert [e[1]["text"] for e in events if e[0] == "chunk"] == [
            "Bonjour",
            " tout",
            " le monde",
        ]
        done = events[-1][1]
        assert done["text"] == "Bonjour tout le monde" and done["usage"]["completion_tokens"] > 0
        sent = upstream.calls[0]
        assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == CANARY
        assert [m["role"] for m in sent.body["messages"]] == ["user", "assistant", "user"]
        assert "system" in sent.body
        reply2 = client.post("/v1/prompt", json={"input": "again"})
        assert reply2.status_code == 502 and "overloaded_error" in reply2.text


def test_a_pool_ejects_a_dead_member_and_probes_it_back(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    with FaultUpstream(default=Status(500)) as dead:
        members = [
            PoolUpstreamConfig(name="dead", base_url=dead.openai_url, model="m"),
            PoolUpstreamConfig(name="alive", base_url=upstream.openai_url, model="m"),
        ]
        sp = start_supervisor(
            {
                "gateway.replicas": 1,
                "stages.inference.worker": "pool",
                "stages.inference.pool.strategy": "round_robin",
                "stages.inference.pool.upstreams": members,
                "stages.inference.breaker.consecutive_failures": 2,
                "stages.inference.breaker.open_s": 1.0,
                "stages.inference.breaker.probes": 1,
                "stages.inference.dedup.cache_entries": 0,
                **FAST_RETRY,
            }
        )
        with sp.explain(), httpx.Client(base_url=sp.url, timeout=10) as client:
            for i in range(10):
                reply = client.post("/v1/prompt", json={"input": f"q{i}"})
                assert reply.status_code == 200, reply.text
            assert len(dead.calls) == 2  # then its circuit opened: no more traffic
            assert _circuits(client)["dead"]["state"] == "open"
            dead.default = Ok(text="recovered")
            time.sleep(1.1)
            texts = {
                client.post("/v1/prompt", json={"input": f"z{i}"}).json()["text"] for i in range(6)
            }
            assert "recovered" in texts
            wait_until(lambda: _circuits(client)["dead"]["state"] == "closed", 5, "dead closes")


def _sse(lines: Iterator[str]) -> list[tuple[str, dict[str, Any]]]:
    events = []
    name = "message"
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
            name = "message"
    return events
