"""A Retry-After seen by one inference shard holds the calls of the other.

The circuit board is shared memory (``resilience.breaker``): a 429's
Retry-After sets the upstream's ``not_before`` there, and every shard's next
call waits it out (``Refusal("deferred")``) instead of going upstream early
and drawing another 429. Two shards are two processes under a real
supervisor; the upstream is the fault upstream, whose log of arrival times
(``time.monotonic()``, one clock for every process on the machine) is what
the test reads, so it asserts on what reached the upstream and when, never
on how long the client waited.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mpipeline.config import AnthropicConfig
from mpipeline.routing import shard_for
from tests.fault_upstream import FaultUpstream, Ok, Status
from tests.integration.conftest import SupervisorFactory

pytestmark = pytest.mark.timeout(120)

KEY_ENV = "MPL_TEST_UPSTREAM_KEY"
RETRY_AFTER_S = 3
# The second request leaves at least this long before the hold ends, so a shard
# that ignored the hold would reach the upstream early enough to fail the test.
MARGIN_S = 1.0
# The fault upstream stamps arrivals to the microsecond; the shard computes its
# hold from its own reading of the same clock, a hair before or after.
CLOCK_SLACK_S = 0.01


def _sessions_on_two_shards() -> tuple[str, str]:
    """Two session ids the pipeline routes to inference shards 0 and 1."""
    by_shard: dict[int, str] = {}
    for i in range(100):
        by_shard.setdefault(shard_for(f"session-{i}", 2), f"session-{i}")
    return by_shard[0], by_shard[1]


def _circuit(client: httpx.Client, name: str) -> dict[str, Any]:
    circuits = client.get("/v1/status").json()["pipeline"]["circuits"]
    found: dict[str, Any] = next(c for c in circuits if c["upstream"] == name)
    return found


@pytest.fixture
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


def test_a_retry_after_on_one_shard_holds_the_other(
    start_supervisor: SupervisorFactory, upstream: FaultUpstream
) -> None:
    first, second = _sessions_on_two_shards()
    upstream.script(Status(429, retry_after=RETRY_AFTER_S), Ok(text="worth the wait"))
    sp = start_supervisor(
        {
            "gateway.replicas": 1,
            "stages.inference.replicas": 2,
            "stages.inference.worker": "anthropic",
            "stages.inference.anthropic": AnthropicConfig(
                base_url=upstream.url, model="claude-test", api_key_env=KEY_ENV
            ),
            # The 429 goes straight back to its client: shard 0 does not wait it
            # out itself, so any later hold can only come from the shared board.
            "stages.inference.retry.max_retries": 0,
            "stages.inference.dedup.cache_entries": 0,
        },
        env={KEY_ENV: "sk-ant-test"},
    )
    with sp.explain(), httpx.Client(base_url=sp.url, timeout=30) as client:
        reply = client.post("/v1/prompt", json={"input": "first", "session_id": first})
        assert reply.status_code == 429, reply.text
        assert reply.json()["error"]["type"] == "upstream_rate_limited"
        [refused] = upstream.calls
        # The board holds the upstream (a 429 is pacing, not a failure: the circuit
        # stays closed). Shard 1 has called nothing yet and never saw the 429.
        circuit = _circuit(client, "anthropic")
        assert circuit["state"] == "closed"
        assert 0 < circuit["held_for_s"] <= RETRY_AFTER_S
        sent = time.monotonic()
        assert sent < refused.at + RETRY_AFTER_S - MARGIN_S, "too slow to test the hold"
        reply = client.post("/v1/prompt", json={"input": "second", "session_id": second})
        assert reply.status_code == 200, reply.text
        assert reply.json()["text"] == "worth the wait"
    refused, answered = upstream.calls
    assert refused.body["messages"][-1]["content"] == "first"
    assert answered.body["messages"][-1]["content"] == "second"
    # Held on the board until the Retry-After had passed, then sent at once:
    # not before, and not another 429 (the upstream got exactly two calls).
    assert answered.at >= refused.at + RETRY_AFTER_S - CLOCK_SLACK_S
    assert answered.at > sent
