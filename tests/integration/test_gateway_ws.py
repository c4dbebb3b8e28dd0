"""``GET /v1/stream`` against a live pipeline, with the ``websockets`` client.

The gateways run as in ``test_gateway.py`` (``LiveGateways``: a ``Pipeline``
client and two ``Gateway``s on their own uvloop thread); the WebSocket
clients run on the test's own loop. The echo worker sleeps before each
token so a stream lasts long enough to be cut in the middle.
Covers RELIABILITY §3 #21 (WebSocket abuse, disconnect mid-stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import CloseCode

from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    wait_until,
)
from tests.integration.test_gateway import BODY_LIMIT, TOKEN, LiveGateways

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TOKEN_DELAY_MS = 40.0
# Echo tokens per reply: a long prompt streams for about 200 x 40 ms = 8 s.
ECHO_TOKENS = 200
# A hang-up cancels the request (RELIABILITY: within 1 s); generous for a busy
# 2-core box, and still well short of the 8 s the stream would have run.
CANCEL_WITHIN_S = 4.0
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("gateway_ws")))
    try:
        yield factory(
            {
                "stages.inference.echo.token_delay_ms": TOKEN_DELAY_MS,
                "stages.inference.echo.max_tokens": ECHO_TOKENS,
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


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/v1/stream"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


async def receive(ws: ClientConnection) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(await ws.recv())
    return out


async def until_done(ws: ClientConnection) -> list[dict[str, Any]]:
    messages = [await receive(ws)]
    while messages[-1]["type"] not in ("done", "error"):
        messages.append(await receive(ws))
    return messages


def test_one_prompt_streams_chunks_then_done(live: LiveGateways) -> None:
    async def main() -> list[dict[str, Any]]:
        async with connect(ws_url(live.open_url)) as ws:
            assert ws.response is not None
            assert "sec-websocket-extensions" not in ws.response.headers  # no deflate
            await ws.send(json.dumps({"input": "hello web socket", "ref": "one"}))
            return await until_done(ws)

    messages = run(main())
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "accepted" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"chunk"}
    assert {m["ref"] for m in messages} == {"one"}
    assert len({m["request_id"] for m in messages}) == 1
    chunks = messages[1:-1]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    done = messages[-1]
    assert "".join(c["text"] for c in chunks) == done["text"] == "hello web socket"
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] > 0
    assert done["timings"]


def test_three_concurrent_requests_on_one_connection(live: LiveGateways) -> None:
    prompts = {"a": "alpha one", "b": "bravo two three", "c": "charlie"}

    async def main() -> dict[str, list[dict[str, Any]]]:
        got: dict[str, list[dict[str, Any]]] = {ref: [] for ref in prompts}
        async with connect(ws_url(live.open_url)) as ws:
            for ref, text in prompts.items():
                await ws.send(json.dumps({"input": text, "ref": ref}))
            finished = 0
            while finished < len(prompts):
                message = await receive(ws)
                got[message["ref"]].append(message)
                finished += message["type"] == "done"
        return got

    got = run(main())
    ids = set()
    for ref, text in prompts.items():
        messages = got[ref]
        assert messages[0]["type"] == "accepted" and messages[-1]["type"] == "done"
        chunks = messages[1:-1]
        assert [c["index"] for c in chunks] == list(range(len(chunks)))  # in order
        assert "".join(c["text"] for c in chunks) == messages[-1]["text"] == text
        ids.add(messages[0]["request_id"])
    assert len(ids) == 3


def test_bad_message_then_a_good_one_on_the_same_connection(live: LiveGateways) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        async with connect(ws_url(live.open_url)) as ws:
            await ws.send("{broken")
            broken = await receive(ws)
            await ws.send(json.dumps({"input": "x", "priority": "urgent", "ref": "p"}))
            priority = await receive(ws)
            await ws.send(json.dumps({"input": "after all that", "ref": "ok"}))
            return broken, priority, await until_done(ws)

    broken, priority, good = run(main())
    assert broken["type"] == "error" and broken["error"]["type"] == "invalid_request"
    assert (priority["ref"], priority["error"]["field"]) == ("p", "priority")
    assert good[-1]["type"] == "done" and good[-1]["text"] == "after all that"


def test_message_over_the_body_limit_closes_1009(live: LiveGateways) -> None:
    async def main() -> int | None:
        async with connect(ws_url(live.open_url)) as ws:
            await ws.send(json.dumps({"input": "x" * BODY_LIMIT}))
            with pytest.raises(ConnectionClosedError) as closed:
                await ws.recv()
            return closed.value.rcvd.code if closed.value.rcvd else None

    assert run(main()) == CloseCode.MESSAGE_TOO_BIG


def test_token_is_checked_before_the_upgrade(live: LiveGateways) -> None:
    async def main() -> tuple[int, str]:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(live.auth_url)):
                pass
        response = refused.value.response
        good = {"authorization": f"Bearer {TOKEN}"}
        async with connect(ws_url(live.auth_url), additional_headers=good) as ws:
            await ws.send(json.dumps({"input": "let me in"}))
            text = (await until_done(ws))[-1]["text"]
        return response.status_code, text

    status, text = run(main())
    assert (status, text) == (401, "let me in")


def test_plain_get_is_426(live: LiveGateways) -> None:
    response = httpx.get(f"{live.open_url}/v1/stream", timeout=TIMEOUT_S)
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert response.json()["error"]["type"] == "upgrade_required"


def test_disconnect_mid_stream_leaves_the_gateway_serving(live: LiveGateways) -> None:
    """RELIABILITY #21: the socket goes away mid-stream; the request is cancelled."""
    assert live.pipeline is not None
    words = " ".join(f"w{i}" for i in range(ECHO_TOKENS))

    async def cut() -> int:
        async with connect(ws_url(live.open_url)) as ws:
            await ws.send(json.dumps({"input": words}))
            seen = 0
            while seen < 3:
                seen += (await receive(ws))["type"] == "chunk"
            ws.transport.abort()  # no close frame: the socket just goes
        return seen

    assert run(cut()) == 3
    wait_until(
        lambda: live.inflight() == 0,
        CANCEL_WITHIN_S,
        "the cut stream's request to leave the in-flight table",
    )

    async def again() -> str:
        async with connect(ws_url(live.open_url)) as ws:
            await ws.send(json.dumps({"input": "still here"}))
            text: str = (await until_done(ws))[-1]["text"]
            return text

    assert run(again()) == "still here"
