"""Gateway rate limits against a live pipeline: 429 with Retry-After, per-session
isolation, one budget for several gateways sharing a segment, and the OpenAI SDK's
``RateLimitError``. RELIABILITY §3 #12 (overload at the gateway is refused, not queued).

As in ``test_gateway.py``, gateways run on a ``Pipeline`` client in a uvloop
thread of their own so the tests can use blocking clients. Each test starts
the gateways it needs, so no test spends another's tokens. Rates are far below
one token per test run, so no refill can blur an exact count.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import uvloop

from mpipeline import _shm
from mpipeline.config import GatewayConfig, RateLimitConfig
from mpipeline.gateway import Gateway, bind
from mpipeline.gateway.ratelimit import RateLimiter
from mpipeline.pipeline import Pipeline
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

T = TypeVar("T")
HTTP_TIMEOUT_S = 20.0
SLOW = 0.001  # tokens per second: none refill while a test runs
MODEL = "mpipeline-echo"


class Gateways:
    """A ``Pipeline`` client on a uvloop thread; ``start`` adds a ``Gateway`` to it."""

    def __init__(self, run_dir: Path) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._pipeline: Pipeline | None = None
        self._gateways: list[Gateway] = []
        self._run_dir = run_dir
        self._thread = threading.Thread(target=uvloop.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("the pipeline client did not start in 30 s")
        if self._error is not None:
            raise self._error

    async def _serve(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with Pipeline.attach(self._run_dir) as pipeline:
                self._pipeline = pipeline
                self._ready.set()
                try:
                    await self._stop.wait()
                finally:
                    for gateway in self._gateways:
                        await gateway.close()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(HTTP_TIMEOUT_S)

    def start(self, limits: RateLimitConfig, limiter: RateLimiter | None = None) -> str:
        """A new gateway with these limits (or ``limiter``); its base URL."""

        async def start() -> str:
            assert self._pipeline is not None
            cfg = GatewayConfig(rate_limit=limits)
            gateway = Gateway(self._pipeline, cfg, model=MODEL, drain_timeout_s=2, limiter=limiter)
            await gateway.start(bind("127.0.0.1", 0))
            self._gateways.append(gateway)
            return gateway.url

        return self.call(start())

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the gateway thread did not stop"


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("ratelimit")))
    try:
        yield factory()
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def live(supervisor: SupervisorProcess) -> Iterator[Gateways]:
    gateways = Gateways(supervisor.run_dir)
    try:
        yield gateways
    finally:
        gateways.close()


def prompt(url: str, session: str | None = None, **body: object) -> httpx.Response:
    payload = {"input": "hello limits", **body}
    if session is not None:
        payload["session_id"] = session
    return httpx.post(f"{url}/v1/prompt", json=payload, timeout=HTTP_TIMEOUT_S)


def test_a_burst_gets_through_then_429_with_retry_after(live: Gateways) -> None:
    url = live.start(RateLimitConfig(requests_per_s=0.1, burst=3))
    statuses = [prompt(url).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    refused = prompt(url)
    assert refused.status_code == 429
    # The next token is 10 s away at 0.1/s, less the time the burst took.
    assert int(refused.headers["retry-after"]) in (9, 10)
    error = refused.json()["error"]
    assert error["type"] == "rate_limited"
    assert "the gateway's rate limit" in error["message"]
    # Streams are refused the same way, before any event is sent.
    stream = prompt(url, stream=True)
    assert stream.status_code == 429
    assert stream.headers["content-type"].startswith("application/json")
    # Probes are never limited.
    for _ in range(5):
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_sessions_are_limited_apart(live: Gateways) -> None:
    url = live.start(RateLimitConfig(session_requests_per_s=SLOW, session_burst=2))
    alice, bob = f"alice-{uuid.uuid4().hex}", f"bob-{uuid.uuid4().hex}"
    assert [prompt(url, alice).status_code for _ in range(3)] == [200, 200, 429]
    refused = prompt(url, alice)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 60
    assert "this session's rate limit" in refused.json()["error"]["message"]
    # Bob has his own bucket; the header names a session as well as the body does.
    headers = {"x-session-id": bob}
    statuses = [
        httpx.post(f"{url}/v1/prompt", json={"input": "hi"}, headers=headers).status_code
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    # Without a session only the global limit applies, and it is off here.
    assert [prompt(url).status_code for _ in range(4)] == [200] * 4


def test_gateways_sharing_a_segment_share_one_budget(live: Gateways) -> None:
    """Two gateways on one segment stand for two replicas under one supervisor."""
    name = f"mpl-test-rl-{uuid.uuid4().hex[:12]}"
    owner = RateLimiter.create(name, RateLimitConfig(requests_per_s=SLOW, burst=4))
    replicas = [RateLimiter.attach(name), RateLimiter.attach(name)]
    try:
        urls = [live.start(RateLimitConfig(), limiter=r) for r in replicas]
        statuses = [prompt(urls[i % 2]).status_code for i in range(8)]
        assert statuses.count(200) == 4 and statuses[4:] == [429] * 4
        assert owner.admitted == 4 and owner.refused == 4
    finally:
        owner.unlink()
        owner.close()
    assert not _shm.segment_path(name).exists()


def test_openai_sdk_raises_rate_limit_error(live: Gateways) -> None:
    url = live.start(RateLimitConfig(requests_per_s=SLOW, burst=1))
    messages: list[Any] = [{"role": "user", "content": "hello"}]
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
        done = sdk.chat.completions.create(model=MODEL, messages=messages)
        assert done.choices[0].message.content
        with pytest.raises(openai.RateLimitError) as refused:
            sdk.chat.completions.create(model=MODEL, messages=messages)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model=MODEL, messages=messages, stream=True)
    error = refused.value
    assert error.status_code == 429
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.type == "rate_limit_error" and error.code == "rate_limited"


def test_openai_user_is_the_session(live: Gateways) -> None:
    url = live.start(RateLimitConfig(session_requests_per_s=SLOW, session_burst=1))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

    def chat(user: str) -> int:
        return httpx.post(
            f"{url}/v1/chat/completions", json={**body, "user": user}, timeout=HTTP_TIMEOUT_S
        ).status_code

    assert [chat("u1"), chat("u1"), chat("u2"), chat("u2")] == [200, 429, 200, 429]
