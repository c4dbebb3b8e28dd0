"""The peer of ``mpipeline bench --upstream``: the proxy a reader would write in 30 lines.

uvicorn (uvloop, httptools) and Starlette in front of one ``httpx.AsyncClient``:
``POST /v1/chat/completions`` is decoded, its ``model`` set to the configured
one (as a gateway maps its model names), and sent on to the upstream; the
reply goes back as it came, whole for JSON, streamed chunk by chunk for SSE.
This is the common shape of a Python LLM proxy, so it is the yardstick for
the real job: with 1 worker process, and with 2 (uvicorn's ``--workers``),
the way such a proxy is scaled on two cores.

The client is what such a proxy uses when written well: one per process,
made at startup, its pool large enough for every stream the bench opens and
no timeout shorter than a bench phase (httpx's defaults of 100 connections
and a 5 s pool timeout would fail requests, not measure speed).

Run as ``python -m mpipeline.bench.upstream_peer --upstream URL --port N
[--workers 2] [--model M]``; SIGTERM stops it. ``GET /readyz`` answers 200.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

# The settings reach uvicorn's worker processes through the environment.
UPSTREAM_ENV = "MPL_PEER_UPSTREAM"
MODEL_ENV = "MPL_PEER_MODEL"
POOL = 1024
TIMEOUT_S = 60.0
_client: httpx.AsyncClient | None = None


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global _client
    limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
    async with httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S) as client:
        _client = client
        yield
    _client = None


async def chat(request: Request) -> Response:
    assert _client is not None
    body: dict[str, Any] = msgspec.json.decode(await request.body())
    body["model"] = os.environ.get(MODEL_ENV, body.get("model"))
    url = os.environ[UPSTREAM_ENV] + "/chat/completions"
    headers = {"content-type": "application/json"}
    content = msgspec.json.encode(body)
    if not body.get("stream"):
        r = await _client.post(url, content=content, headers=headers)
        return Response(r.content, r.status_code, media_type="application/json")
    upstream = await _client.send(
        _client.build_request("POST", url, content=content, headers=headers), stream=True
    )
    return StreamingResponse(
        upstream.aiter_raw(),
        upstream.status_code,
        media_type="text/event-stream",
        background=BackgroundTask(upstream.aclose),
    )


async def readyz(request: Request) -> Response:
    return Response(b'{"status":"ready"}', media_type="application/json")


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/readyz", readyz, methods=["GET"]),
    ],
    lifespan=lifespan,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpipeline.bench.upstream_peer")
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, /v1 included")
    parser.add_argument("--model", default=None, help="model name sent upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ[UPSTREAM_ENV] = args.upstream.rstrip("/")
    if args.model:
        os.environ[MODEL_ENV] = args.model
    uvicorn.run(
        "mpipeline.bench.upstream_peer:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
