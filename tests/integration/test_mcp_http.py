"""MCP over streamable HTTP at the gateway's ``/mcp``, driven by the MCP SDK's own client.

A real supervisor with two gateway replicas on one socket, a bearer token, the
echo model (assemble fails prompts with POISON in them), and the run's only API
client slot held by the test: every tool must run over the serving replica's
own pipeline client, never attach one. ``streamable_http_client`` and
``ClientSession`` speak MCP to it; the raw refusals are checked with httpx.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from mpipeline.pipeline import Pipeline
from tests.integration._mcp import CALL_TIMEOUT_S, call, check_infer, error, ok
from tests.integration.conftest import SupervisorFactory, faults_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN = "mcp-Http-Token-4321"
TOKEN_ENV = "MPIPELINE_TEST_MCP_TOKEN"
MAX_BODY = 64 * 1024
ADMIN_TOKEN = "mcp-Admin-Token-8765"
ADMIN_ENV = "MPIPELINE_TEST_MCP_ADMIN"
TOOLS = {"infer", "batch_infer", "pipeline_status", "dlq_list", "dlq_replay"}
CONFIG = {
    "gateway.replicas": 2,
    "gateway.auth_token_env": TOKEN_ENV,
    "gateway.admin_token_env": ADMIN_ENV,
    "gateway.api_clients": 1,
    "gateway.max_body_bytes": MAX_BODY,
    # A few ms per token: an infer streams its words one chunk at a time.
    "stages.inference.echo.token_delay_ms": 5.0,
    # Two prompts per session, then a wait far longer than the test: the third is refused.
    "gateway.rate_limit.session_requests_per_s": 0.05,
    "gateway.rate_limit.session_burst": 2,
}
# Calls made before both replicas have answered one (the kernel picks, per connection).
MAX_SPREAD_CALLS = 60
MCP_ACCEPT = "application/json, text/event-stream"


def _http(*, keepalive: bool = True, token: str = TOKEN) -> httpx2.AsyncClient:
    """The SDK's HTTP client with the token; without keep-alive each POST is a new
    connection, which the kernel may hand to either replica."""
    limits = httpx2.Limits() if keepalive else httpx2.Limits(max_keepalive_connections=0)
    return httpx2.AsyncClient(
        headers={"authorization": f"Bearer {token}"}, timeout=CALL_TIMEOUT_S, limits=limits
    )


@asynccontextmanager
async def _session(url: str, http: httpx2.AsyncClient) -> AsyncIterator[ClientSession]:
    async with (
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        yield s


def test_tools_over_streamable_http_on_two_gateways(start_supervisor: SupervisorFactory) -> None:
    env = {TOKEN_ENV: TOKEN, ADMIN_ENV: ADMIN_TOKEN, **faults_env("assemble:raise_on=POISON")}
    sp = start_supervisor(CONFIG, env=env)
    gateways = {f"{sp.replica_pid(f'gateway-{g}'):x}": g for g in range(2)}

    async def run() -> None:
        # The run's one API client slot is taken for the whole test: /mcp must not need it.
        async with Pipeline.attach(sp.run_dir) as held:
            async with _http() as http, _session(sp.url, http) as s:
                await _tools(s)
                await _infer(s, gateways)
                await _batch(s)
                await _status(s)
                await _dlq(s)
                await _config(s)
                await _rate_limited(s)
                await _not_admin(s)
            async with _http(token=ADMIN_TOKEN) as http, _session(sp.url, http) as s:
                await _configure(s)
            await _spread(sp.url, gateways)
            assert (await held.submit("slot still mine")).text == "slot still mine"

    with sp.explain():
        asyncio.run(run())
        _refusals(sp.url)


async def _tools(s: ClientSession) -> None:
    tools = {t.name: t for t in (await s.list_tools()).tools}
    assert set(tools) == TOOLS
    assert tools["infer"].input_schema["required"] == ["prompt"]


async def _infer(s: ClientSession, gateways: dict[str, int]) -> None:
    # Progress travels on the POST's own SSE response.
    done = await check_infer(s)
    # Served by a gateway replica's own client: its request ids carry that pid.
    assert any(done["request_id"].startswith(pid) for pid in gateways)


async def _batch(s: ClientSession) -> None:
    prompts = ["first", "", "POISON second", "third words"]
    out = ok(await call(s, "batch_infer", {"prompts": prompts, "concurrency": 2}))
    results = out["results"]
    assert [r["index"] for r in results] == list(range(len(prompts)))
    assert [r["ok"] for r in results] == [True, False, False, True]
    assert [r["text"] for r in results if r["ok"]] == ["first", "third words"]
    assert results[1]["error"]["type"] == "invalid_request"
    assert results[2]["error"]["type"] == "stage_error"
    assert (out["completed"], out["failed"]) == (2, 2)


async def _status(s: ClientSession) -> None:
    status = ok(await call(s, "pipeline_status", {}))
    assert status["state"] == "RUNNING"
    names = {r["name"] for r in status["replicas"]}
    assert {"gateway-0", "gateway-1", "inference-0"} <= names
    assert "`max_tokens`" in error(await call(s, "infer", {"prompt": "x", "max_tokens": 0}))
    text = error(await call(s, "infer", {"prompt": "POISON pill"}))
    assert text.startswith("stage_error in assemble")


async def _dlq(s: ClientSession) -> None:
    listed = ok(await call(s, "dlq_list", {}))
    # The poisoned batch prompt and the poisoned infer, each recorded by its replica.
    assert listed["total"] == 2 == listed["not_replayed"]
    assert {r["reason"] for r in listed["records"]} == {"stage_error"}
    assert {r["request"]["input"] for r in listed["records"]} == {"POISON second", "POISON pill"}
    assert "`since`" in error(await call(s, "dlq_list", {"since": "a while"}))


async def _config(s: ClientSession) -> None:
    config = (await s.read_resource("mpipeline://config/effective")).contents[0]
    assert isinstance(config, types.TextResourceContents)
    assert "token_delay_ms = 5.0" in config.text


async def _rate_limited(s: ClientSession) -> None:
    """The gateway's limits hold for MCP as for ``POST /v1/prompt``: no way around them."""
    for _ in range(2):
        ok(await call(s, "infer", {"prompt": "within", "session_id": "limited"}))
    text = error(await call(s, "infer", {"prompt": "over", "session_id": "limited"}))
    assert text.startswith("rate_limited: this session's rate limit is exhausted")
    out = ok(await call(s, "batch_infer", {"prompts": ["x"], "session_id": "limited"}))
    assert out["results"][0]["error"]["type"] == "rate_limited"


async def _not_admin(s: ClientSession) -> None:
    """The gateway's token is not the admin's: configure is neither listed nor allowed."""
    assert "configure" not in {t.name for t in (await s.list_tools()).tools}
    text = error(await call(s, "configure", {"settings": {"gateway.timeout_s": 5}}))
    assert text.startswith("configure needs admin") and "gateway.admin_token_env" in text
    assert ADMIN_TOKEN not in text and TOKEN not in text
    assert ok(await call(s, "pipeline_status", {}))["config_version"] == 0


async def _configure(s: ClientSession) -> None:
    """The admin token alone (not the gateway's) gets in, sees configure and applies it."""
    tools = {t.name: t for t in (await s.list_tools()).tools}
    assert set(tools) == TOOLS | {"configure"}
    settings = tools["configure"].input_schema["properties"]["settings"]
    assert "gateway.timeout_s" in settings["properties"]
    assert "gateway.replicas" not in settings["properties"]
    done = ok(await call(s, "configure", {"settings": {"gateway.timeout_s": 45}}))
    assert (done["state"], done["version"]) == ("applied", 1)
    assert done["live"] == ["gateway.timeout_s"] and done["restarted"] == []
    assert done["settings"] == {"gateway.timeout_s": 45}
    assert done["summary"].startswith("config version 1 applied")
    # Both replicas run the new version (configure answers once every replica took it).
    status = ok(await call(s, "pipeline_status", {}))
    assert status["config_version"] == 1
    # Not live, or a value the config refuses: an error naming the field; nothing changes.
    text = error(await call(s, "configure", {"settings": {"gateway.max_connections": 9}}))
    assert "`gateway.max_connections`" in text and "only live settings" in text
    text = error(await call(s, "configure", {"settings": {"gateway.timeout_s": -1}}))
    assert "gateway.timeout_s" in text and "nothing was changed" in text
    assert ok(await call(s, "pipeline_status", {}))["config_version"] == 1


async def _spread(url: str, gateways: dict[str, int]) -> None:
    """One session whose requests reach both replicas: stateless, each is served whole."""
    served: set[int] = set()
    async with _http(keepalive=False) as http, _session(url, http) as s:
        for i in range(MAX_SPREAD_CALLS):
            done = ok(await call(s, "infer", {"prompt": f"spread {i}"}))
            assert done["text"] == f"spread {i}"
            served |= {g for pid, g in gateways.items() if done["request_id"].startswith(pid)}
            if served == {0, 1}:
                return
    raise AssertionError(f"{MAX_SPREAD_CALLS} calls all reached gateway-{served}")


def _refusals(url: str) -> None:
    """What the gateway and the SDK refuse before any tool runs, each with a clear body."""
    mcp = f"{url}/mcp"
    hello = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"accept": MCP_ACCEPT}
    auth = {"authorization": f"Bearer {TOKEN}", **accept}
    with httpx.Client(timeout=CALL_TIMEOUT_S) as client:
        for headers in (accept, {"authorization": "Bearer wrong", **accept}):
            r = client.post(mcp, json=hello, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["message"] == "missing or wrong bearer token"
        # Stateless: no session for a GET stream or a DELETE to end.
        for method in ("GET", "DELETE"):
            r = client.request(method, mcp, headers=auth)
            assert r.status_code == 405 and r.headers["allow"] == "POST"
            assert r.json()["jsonrpc"] == "2.0"
        r = client.post(mcp, json={"x": "y" * MAX_BODY}, headers=auth)
        assert r.status_code == 413
        # Bad JSON-RPC: the SDK's own parse error.
        bad = {**auth, "content-type": "application/json"}
        r = client.post(mcp, content=b"{not json", headers=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == types.PARSE_ERROR
        # The admin token passes the gateway's check on /mcp only.
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}", **accept}
        assert client.post(mcp, json=hello, headers=admin).status_code == 200
        assert client.get(f"{url}/v1/status", headers=admin).status_code == 401
        # A stateless request outside a session still works: one POST, one answer.
        r = client.post(mcp, json=hello, headers=auth)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        assert '"name":"infer"' in r.text.replace(" ", "")
