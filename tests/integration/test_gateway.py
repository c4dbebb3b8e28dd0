"""The HTTP gateway against a live pipeline: REST, SSE, the OpenAI SDK, admission, auth.

One supervisor serves the whole module. The gateways run on a ``Pipeline``
client in a thread of their own (uvloop, as in production), so a test can
use blocking clients (httpx, the official ``openai`` SDK) as well as async
ones without sharing the gateway's event loop. Two gateways share that
client: an open one with a small body limit, and one that wants a token.
Covers RELIABILITY §3 #18, #19, #22 (disconnect), #23, #33, #36, #37.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import pytest

from mpipeline.config import STAGE_ORDER, GatewayConfig
from mpipeline.gateway import Gateway, bind
from mpipeline.pipeline import Pipeline
from tests.integration._live import Gateways
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    run_segments,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T = TypeVar("T")
TOKEN = "gw-Test-Token-1234"
TOKEN_ENV = "MPIPELINE_TEST_GATEWAY_TOKEN"
BODY_LIMIT = 64 * 1024
# Sleep before each echoed token: long enough that a stream waits for its first one.
TOKEN_DELAY_MS = 20.0
KEEPALIVE_S = 0.005
MODEL = "mpipeline-echo"
HTTP_TIMEOUT_S = 20.0


class LiveGateways(Gateways):
    """The module's two gateways: an open one with a small body limit, one that wants a token."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(
            run_dir,
            [
                (GatewayConfig(max_body_bytes=BODY_LIMIT), None),
                (GatewayConfig(auth_token_env=TOKEN_ENV), {TOKEN_ENV: TOKEN}),
            ],
            keepalive_s=KEEPALIVE_S,
        )
        self.open_url, self.auth_url = self.urls


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("gateway")))
    try:
        yield factory(
            {
                "stages.inference.replicas": 2,
                "stages.inference.echo.token_delay_ms": TOKEN_DELAY_MS,
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def live(supervisor: SupervisorProcess) -> Iterator[LiveGateways]:
    gateways = LiveGateways(supervisor.run_dir)
    try:
        yield gateways
    finally:
        gateways.close()


@pytest.fixture
def client(live: LiveGateways) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.open_url, timeout=HTTP_TIMEOUT_S) as c:
        yield c


def _sse(text: str) -> list[tuple[str | None, str]]:
    """``(event name, data)`` pairs of an SSE body; comments come back as ``(":", line)``."""
    out: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        name = None
        for line in block.splitlines():
            if line.startswith(":"):
                out.append((":", line))
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, line[6:]))
    return out


# Probes, status, routing


def test_probes_status_and_routing(live: LiveGateways, client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    head = client.head("/healthz")
    assert head.status_code == 200 and head.content == b""

    status = client.get("/v1/status").json()
    assert status["gateway"]["ready"] is True
    assert status["pipeline"]["state"] == "RUNNING"
    names = {r["name"] for r in status["pipeline"]["replicas"]}
    assert {"inference-0", "inference-1", "post-0"} <= names

    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]

    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    wrong = client.get("/v1/prompt")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


# POST /v1/prompt


def test_prompt_returns_text_usage_and_stage_timings(client: httpx.Client) -> None:
    session = "sess-\u05e9\u05dc\u05d5\u05dd-🦀-e\u0301"
    body = {
        "input": "  hello there gateway  ",
        "session_id": session,
        "metadata": {"k": "v"},
        "priority": "high",
        "deadline_ms": 10_000,
    }
    response = client.post("/v1/prompt", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["text"] == "hello there gateway"
    assert result["session_id"] == session  # unicode round-trips byte-exact
    assert result["request_id"] == response.headers["x-request-id"]
    assert result["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == 3
    assert result["usage"]["total_tokens"] == sum(
        result["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )
    assert list(result["timings"]) == list(STAGE_ORDER)
    assert result["timings"]["inference"] >= TOKEN_DELAY_MS * 0.9

    limited = client.post("/v1/prompt", json={"input": "a b c d e", "max_tokens": 2}).json()
    assert (limited["text"], limited["finish_reason"]) == ("a b", "length")
    by_header = client.post(
        "/v1/prompt", json={"input": "x"}, headers={"x-session-id": "from-header"}
    )
    assert by_header.json()["session_id"] == "from-header"


def test_prompt_stream_sends_keepalives_chunks_and_a_final_event(client: httpx.Client) -> None:
    words = "one two three four"
    with client.stream("POST", "/v1/prompt", json={"input": words, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response.read().decode())
    names = [name for name, _ in events]
    # Keep-alive comments while the first token is on its way.
    assert names[0] == ":"
    chunks = [json.loads(data) for name, data in events if name == "chunk"]
    assert [c["index"] for c in chunks] == list(range(4))
    assert "".join(c["text"] for c in chunks).split() == words.split()
    assert names[-1] == "done"
    done = json.loads(events[-1][1])
    assert done["text"] == words and done["request_id"] == chunks[0]["request_id"]


def test_prompt_errors_map_to_statuses(client: httpx.Client) -> None:
    # Past its deadline inside the pipeline: 504 with the request id.
    late = client.post("/v1/prompt", json={"input": "a b c d e f g h", "deadline_ms": 30})
    assert late.status_code == 504, late.text
    error = late.json()["error"]
    assert error["type"] == "deadline_exceeded" and error["request_id"]

    # Under the body limit but over what a ring record holds: the client's 413.
    big = {"input": "x " * 20_000}
    assert client.post("/v1/prompt", json=big).status_code == 413
    streamed = client.post("/v1/prompt", json={**big, "stream": True})
    assert streamed.status_code == 413  # refused before the stream began: a real status
    assert streamed.json()["error"]["type"] == "too_large"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", None),
        (b"", None),
        (b'{"input": 5}', "input"),
        (b'{"input": "x", "metadata": ["a"]}', "metadata"),
        (b"{}", "input"),
        (b'{"input": "x", "priority": "urgent"}', "priority"),
        (b'{"input": "x", "deadline_ms": 0}', "deadline_ms"),
        (b'{"input": "x", "deadline_ms": -1}', "deadline_ms"),
        (b'{"input": "x", "deadline_ms": 1000000000}', "deadline_ms"),
        (b'{"input": "x", "deadline_ms": 1e999}', "deadline_ms"),
        (b'{"input": "\xff\xfe"}', None),
        (b'{"input": "\\ud800"}', None),
        (b'{"input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "input"),
    ],
    ids=[
        *("invalid-json", "empty", "wrong-type", "wrong-type-nested", "missing-input"),
        *("unknown-priority", "deadline-0", "deadline-negative", "deadline-huge"),
        *("deadline-inf", "invalid-utf8", "lone-surrogate", "deep-nesting"),
    ],
)
def test_malformed_prompts_are_400_with_the_field(
    client: httpx.Client, body: bytes, field: str | None
) -> None:
    response = client.post("/v1/prompt", content=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["message"]
    assert error.get("field") == field


def test_body_over_the_limit_is_413_without_reading_it(live: LiveGateways) -> None:
    host, port = live.open_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Claims 100 MB and sends none of it: the answer comes from the head alone.
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n"
            b"content-type: application/json\r\ncontent-length: 104857600\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in head
    error = json.loads(body)["error"]  # the OpenAI shape on the OpenAI route
    assert error["type"] == "invalid_request_error" and str(BODY_LIMIT) in error["message"]

    with httpx.Client(base_url=live.open_url, timeout=HTTP_TIMEOUT_S) as client:
        over = client.post("/v1/prompt", content=b"x" * (BODY_LIMIT + 1))
        assert over.status_code == 413 and over.json()["error"]["type"] == "invalid_request"
        assert client.get("/healthz").status_code == 200


# POST /v1/chat/completions with the official SDK


def test_openai_sdk_sync(live: LiveGateways) -> None:
    with openai.OpenAI(base_url=f"{live.open_url}/v1", api_key="unused", max_retries=0) as sdk:
        assert [m.id for m in sdk.models.list()] == [MODEL]
        completion = sdk.chat.completions.create(
            model="any-name",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello gateway"},
            ],
            user="chat-user-1",
        )
        assert completion.model == "any-name"
        choice = completion.choices[0]
        assert choice.message.role == "assistant"
        # Echo replies with the input: the last message (the system one is history).
        assert choice.message.content == "hello gateway"
        assert choice.finish_reason == "stop"
        assert completion.usage is not None and completion.usage.completion_tokens == 2

        cut = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a b STOP c"}], stop=["STOP"]
        )
        # The echo worker stops at "a b " (stop goes to the model now, not to a cut in
        # the gateway after post), and post trims the finished text.
        assert cut.choices[0].message.content == "a b"
        assert cut.choices[0].finish_reason == "stop"
        short = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a b c d"}], max_tokens=2
        )
        assert short.choices[0].finish_reason == "length"

        with pytest.raises(openai.BadRequestError) as bad:
            sdk.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": 5}],  # type: ignore[misc,list-item]
            )
        assert bad.value.status_code == 400
        assert isinstance(bad.value.body, dict)
        assert bad.value.body["param"] == "messages[0].content"
        assert set(bad.value.body) == {"message", "type", "param", "code"}


def test_openai_sdk_async_concurrent(live: LiveGateways) -> None:
    async def main() -> list[str | None]:
        async with openai.AsyncOpenAI(
            base_url=f"{live.open_url}/v1", api_key="unused", max_retries=0
        ) as sdk:
            calls = [
                sdk.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"async {i}"}],
                    user=f"user-{i % 3}",
                )
                for i in range(20)
            ]
            done = await asyncio.gather(*calls)
            return [c.choices[0].message.content for c in done]

    assert asyncio.run(main()) == [f"async {i}" for i in range(20)]


def test_openai_sdk_streaming(live: LiveGateways) -> None:
    with openai.OpenAI(base_url=f"{live.open_url}/v1", api_key="unused", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream these four words"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "stream these four words"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1

    async def main() -> str:
        async with openai.AsyncOpenAI(
            base_url=f"{live.open_url}/v1", api_key="unused", max_retries=0
        ) as sdk:
            stream = await sdk.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "a b STOP c d"}],
                stream=True,
                stop="STOP",
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert asyncio.run(main()) == "a b "


def test_sse_client_disconnect_leaves_the_gateway_serving(live: LiveGateways) -> None:
    """RELIABILITY #22, gateway side: a reader that leaves mid-stream costs nothing more."""
    assert live.pipeline is not None
    before = live.call(_stats(live.pipeline))
    with httpx.Client(base_url=live.open_url, timeout=HTTP_TIMEOUT_S) as client:
        body = {"input": " ".join(f"w{i}" for i in range(16)), "stream": True}
        with client.stream("POST", "/v1/prompt", json=body) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("event: chunk")
                if seen == 3:
                    break  # leaving the block closes the connection
        assert client.post("/v1/prompt", json={"input": "still here"}).json()["text"] == (
            "still here"
        )

    def settled() -> bool:
        assert live.pipeline is not None
        stats = live.call(_stats(live.pipeline))
        # The abandoned request still ends in exactly one outcome inside the client.
        return stats["completed"] + stats["failed"] >= before["completed"] + before["failed"] + 2

    wait_until(settled, 10, "the abandoned stream to finish in the pipeline")


async def _stats(pipeline: Pipeline) -> dict[str, int]:
    return dict(pipeline.stats)


# Auth (RELIABILITY #37)


def test_bearer_token(live: LiveGateways) -> None:
    good = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=live.auth_url, timeout=HTTP_TIMEOUT_S) as client:
        # Probes stay open.
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        wrong_tokens = [None, "Bearer nope", f"Bearer {TOKEN.upper()}", f"Basic {TOKEN}"]
        for value in wrong_tokens:
            headers = {} if value is None else {"authorization": value}
            for method, path in (("POST", "/v1/prompt"), ("GET", "/v1/status")):
                response = client.request(method, path, json={"input": "x"}, headers=headers)
                assert response.status_code == 401, (value, path)
                assert response.headers["www-authenticate"] == "Bearer"
                assert TOKEN not in response.text
        # Refused from the head: a big body from a stranger is never read.
        huge = client.post("/v1/prompt", content=b"x" * (BODY_LIMIT * 4))
        assert huge.status_code == 401
        ok = client.post("/v1/prompt", json={"input": "let me in"}, headers=good)
        assert ok.status_code == 200 and ok.json()["text"] == "let me in"
        lower = {"authorization": f"bearer {TOKEN}"}
        assert client.get("/v1/status", headers=lower).status_code == 200

    with openai.OpenAI(base_url=f"{live.auth_url}/v1", api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as denied:
            sdk.models.list()
        assert isinstance(denied.value.body, dict)
        assert denied.value.body["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{live.auth_url}/v1", api_key=TOKEN, max_retries=0) as sdk:
        reply = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "hi"


# python -m mpipeline.gateway (RELIABILITY #33, #36)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_module_entry_serves_until_sigterm(configs: ConfigFactory) -> None:
    port = _free_port()
    path = configs.write({"gateway.port": port, "gateway.replicas": 1})
    log_path = configs.tmp_path / "gateway.log"
    cmd = [sys.executable, "-m", "mpipeline.gateway", "--config", str(path)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            return False

        wait_until(ready, 30, "the gateway to be ready")
        reply = httpx.post(f"{url}/v1/prompt", json={"input": "via the module"}, timeout=10)
        assert reply.json()["text"] == "via the module"
        run_id = json.loads((configs.run_dir / "state.json").read_text())["run_id"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
        assert run_segments(run_id) == []
        assert "gateway listening on http://127.0.0.1:" in log_path.read_text()
        # The port is free again at once (I5).
        bind("127.0.0.1", port).close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_module_entry_fails_fast_on_a_busy_port(configs: ConfigFactory) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = configs.write({"gateway.port": port, "gateway.replicas": 1})
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "mpipeline.gateway", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert f"127.0.0.1:{port} already in use" in done.stderr
    assert "set gateway.port in the config" in done.stderr
    assert time.monotonic() - started < 10
    # Nothing was started: no supervisor ever wrote its state.
    assert not (configs.run_dir / "state.json").exists()


def test_token_env_named_but_unset_refuses_to_start(configs: ConfigFactory) -> None:
    path = configs.write(
        {"gateway.auth_token_env": "MPIPELINE_TEST_UNSET_TOKEN", "gateway.replicas": 1}
    )
    env = {k: v for k, v in os.environ.items() if k != "MPIPELINE_TEST_UNSET_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "mpipeline.gateway", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 2
    assert "MPIPELINE_TEST_UNSET_TOKEN, which is not set" in done.stderr


def test_open_bind_without_token_warns(
    supervisor: SupervisorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with Pipeline.attach(supervisor.run_dir) as pipeline:
            gateway = Gateway(pipeline, GatewayConfig(host="0.0.0.0"))
            await gateway.start(bind("127.0.0.1", 0))
            await gateway.close()

    asyncio.run(main())
    assert "gateway listens on 0.0.0.0 with no auth token" in caplog.text
