"""Deadlines through a supervised gateway: the defaults are no longer a fixed 30 s, a
request names its own with ``X-Request-Timeout`` (every route and the WebSocket) or the
openai SDK's timeout, and a field the echo worker cannot honour is refused (issue 14,
items 3 and 6).

One supervisor serves the module: the echo worker at 100 ms a token, so a request's
length in time is its number of words. ``test_slow_...`` is the one slow test of the
module (a stream of about 32 s); the rest take about a second each.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from websockets.asyncio.client import connect

from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN_DELAY_MS = 100
# A stream this many tokens long outlasts the 30 s that used to cut every request.
SLOW_TOKENS = 320


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("deadlines")))
    try:
        yield factory(
            {
                "gateway.replicas": 1,
                "stages.inference.echo.token_delay_ms": float(TOKEN_DELAY_MS),
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture
def client(supervisor: SupervisorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=supervisor.url, timeout=60) as c:
        yield c


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def _sse(lines: Iterator[str]) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    name = "message"
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            events.append((name, data if data == "[DONE]" else json.loads(data)))
            name = "message"
    return events


@pytest.mark.timeout(150)
def test_slow_a_stream_longer_than_30_s_completes(supervisor: SupervisorProcess) -> None:
    """SLOW (about 32 s): the one long test. A stream with no deadline of its own runs on
    the gateway's stream_timeout_s (an hour) and the inference stage's own timeout (as
    long), not the 30 s that cut every request before."""
    with openai.OpenAI(base_url=f"{supervisor.url}/v1", api_key="-", max_retries=0) as sdk:
        started = time.monotonic()
        stream = sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": _words(SLOW_TOKENS)}],
            max_tokens=SLOW_TOKENS,
            stream=True,
        )
        text = ""
        finish = None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
    took = time.monotonic() - started
    assert took > 30, took
    assert text == _words(SLOW_TOKENS) and finish == "stop"


def test_x_request_timeout_cuts_a_request_at_its_own_deadline(client: httpx.Client) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": _words(30)}], "max_tokens": 30}
    started = time.monotonic()
    reply = client.post("/v1/chat/completions", json=body, headers={"X-Request-Timeout": "0.5"})
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 2.5
    native = client.post(
        "/v1/prompt",
        json={"input": _words(30), "max_tokens": 30},
        headers={"X-Request-Timeout": "0.5"},
    )
    assert native.status_code == 504 and native.json()["error"]["type"] == "deadline_exceeded"
    # The body's own deadline wins over the header.
    body_wins = client.post(
        "/v1/prompt",
        json={"input": _words(3), "deadline_ms": 5000},
        headers={"X-Request-Timeout": "0.1"},
    )
    assert body_wins.status_code == 200, body_wins.text
    refused = client.post("/v1/chat/completions", json=body, headers={"X-Request-Timeout": "0"})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "X-Request-Timeout"


def test_a_stream_cut_by_its_deadline_ends_in_an_error_event(client: httpx.Client) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": _words(30)}],
        "max_tokens": 30,
        "stream": True,
    }
    with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"X-Request-Timeout": "1"}
    ) as reply:
        assert reply.status_code == 200
        events = _sse(reply.iter_lines())
    texts = [e[1]["choices"][0]["delta"].get("content") for e in events[:-1] if e[1]["choices"]]
    assert 3 <= len(texts) <= 12, texts
    assert events[-1][1]["error"]["code"] == "deadline_exceeded"


def test_the_openai_sdks_timeout_is_the_deadline_of_a_call_that_is_not_streamed(
    client: httpx.Client,
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": _words(30)}], "max_tokens": 30}
    sdk_header = {"x-stainless-read-timeout": "0.5"}
    started = time.monotonic()
    reply = client.post("/v1/chat/completions", json=body, headers=sdk_header)
    assert reply.status_code == 504 and time.monotonic() - started < 2.5
    short = {**body, "messages": [{"role": "user", "content": _words(3)}]}
    assert client.post("/v1/chat/completions", json=short, headers=sdk_header).status_code == 200


def test_the_websocket_handshake_sets_the_deadline_of_its_requests(
    supervisor: SupervisorProcess,
) -> None:
    url = supervisor.url.replace("http://", "ws://") + "/v1/stream"

    async def main() -> list[dict[str, Any]]:
        async with connect(url, additional_headers={"X-Request-Timeout": "0.5"}) as ws:
            await ws.send(json.dumps({"input": _words(30), "max_tokens": 30, "ref": "slow"}))
            await ws.send(json.dumps({"input": _words(2), "ref": "own", "deadline_ms": 5000}))
            out: list[dict[str, Any]] = []
            while len([m for m in out if m["type"] in ("done", "error")]) < 2:
                out.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            return out

    ends = {m["ref"]: m for m in asyncio.run(main()) if m["type"] in ("done", "error")}
    assert ends["slow"]["type"] == "error"
    assert ends["slow"]["error"]["type"] == "deadline_exceeded"
    assert ends["own"]["type"] == "done"


def test_a_field_echo_cannot_honour_is_refused_naming_it(supervisor: SupervisorProcess) -> None:
    with openai.OpenAI(base_url=f"{supervisor.url}/v1", api_key="-", max_retries=0) as sdk:
        messages: Any = [{"role": "user", "content": "a b STOP c"}]
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model="m", messages=messages, temperature=0.2)
        body = refused.value.body
        assert isinstance(body, dict)
        assert (body["param"], body["code"]) == ("temperature", "unsupported_parameter")
        with pytest.raises(openai.BadRequestError) as tools:
            sdk.chat.completions.create(
                model="m",
                messages=messages,
                tools=[{"type": "function", "function": {"name": "f"}}],
            )
        assert isinstance(tools.value.body, dict) and tools.value.body["param"] == "tools"
        # What echo honours goes through: stop, the SDK's defaults that ask nothing.
        cut = sdk.chat.completions.create(
            model="m", messages=messages, stop=["STOP"], n=1, logprobs=False
        )
        # Echo stops at "a b "; post trims the finished text (post.strip).
        assert cut.choices[0].message.content == "a b"
