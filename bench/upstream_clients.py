"""CPU per request of the HTTP clients an inference shard could call its upstream with.

Run: ``.venv/bin/python -m bench.upstream_clients [--requests 5000] [--concurrency 32]
[--rounds 3] [--tokens 16] [--clients httpx,aiohttp,...] [--json FILE]``

The real job of a shard is a proxied call, so the client library is its main
cost. This measures it alone: one process pinned to one core, ``concurrency``
calls in flight over keep-alive connections to the fast fake upstream
(``mpipeline.bench.fake_upstream``, pinned to another core), ``requests`` calls
per round, after a warm-up. CPU per request is this process's user + system
time over the round divided by its calls, so it holds everything the client
does, its event-loop work included, and nothing of the server. Every client
does the same work per call: *json* POSTs a chat body and reads the whole
reply; *stream* POSTs with ``"stream": true`` and feeds every body chunk to the
workers' own SSE decoder until ``[DONE]`` (a reply of ``tokens`` content
events, which the fake writes one by one, so a stream takes a few reads; the
worker rows decode every chunk's JSON too). Rounds alternate the clients, so each one meets
the same state of a shared box; the table keeps each client's best round.

Clients:

* ``httpx``: ``httpx.AsyncClient`` (httpcore's pool, anyio), as the workers used it.
* ``httpx+aiohttp``: httpx's API over ``httpx_aiohttp.AiohttpTransport``.
* ``httpx2``: pydantic's httpx successor (installed by the ``openai`` SDK, a dev tool).
* ``aiohttp``: ``aiohttp.ClientSession`` used plainly.
* ``worker``: the shard's real client, ``OpenAIUpstream`` (``complete``/``generate``),
  so its own request building and reply decoding (every chunk's JSON) are in
  the figure; ``worker-reads`` streams with ``generate_reads`` (one piece per read).
* ``raw``: a bare uvloop protocol with httptools, no TLS, proxies or timeouts:
  not a candidate, the floor that says what the HTTP work itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, cast

import aiohttp
import httptools
import httpx
import msgspec
import uvloop

from mpipeline.config import OpenAIConfig
from mpipeline.messages import Assembled, PromptRequest, Turn
from mpipeline.workers.base import Generation
from mpipeline.workers.openai import OpenAIUpstream
from mpipeline.workers.sse import SSEDecoder

PATH = "/v1/chat/completions"
CLIENTS = ("httpx", "httpx+aiohttp", "httpx2", "aiohttp", "worker", "worker-reads", "raw")
WARMUP = 500
_DONE = b"[DONE]"

Call = Callable[[bool], Awaitable[int]]


def _body(stream: bool) -> bytes:
    messages = [{"role": "user", "content": "x" * 480}]
    body: dict[str, Any] = {"model": "fake-model", "messages": messages, "stream": stream}
    return msgspec.json.encode(body)


BODIES = {False: _body(False), True: _body(True)}
HEADERS = {"content-type": "application/json"}


def _events(decoder: SSEDecoder, chunk: bytes) -> tuple[int, bool]:
    events = decoder.feed(chunk)
    done = bool(events) and events[-1].data == _DONE
    return len(events), done


# The candidates: each is set up in ``stack`` and returns one call.


async def _httpx(url: str, limit: int, stack: AsyncExitStack, transport: Any = None) -> Call:
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    if transport is None:
        transport = httpx.AsyncHTTPTransport(retries=0, limits=limits)
    client = await stack.enter_async_context(httpx.AsyncClient(transport=transport))

    async def call(stream: bool) -> int:
        if not stream:
            r = await client.post(url, content=BODIES[False], headers=HEADERS)
            return len(r.content)
        async with client.stream("POST", url, content=BODIES[True], headers=HEADERS) as r:
            decoder = SSEDecoder(strict=True)
            n = 0
            async for chunk in r.aiter_bytes():
                k, done = _events(decoder, chunk)
                n += k
            return n

    return call


async def _httpx_aiohttp(url: str, limit: int, stack: AsyncExitStack) -> Call:
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    return await _httpx(url, limit, stack, AiohttpTransport(limits=limits))


async def _httpx2(url: str, limit: int, stack: AsyncExitStack) -> Call:
    import httpx2

    limits = httpx2.Limits(max_connections=limit, max_keepalive_connections=limit)
    transport = httpx2.AsyncHTTPTransport(retries=0, limits=limits)
    client = await stack.enter_async_context(httpx2.AsyncClient(transport=transport))

    async def call(stream: bool) -> int:
        if not stream:
            r = await client.post(url, content=BODIES[False], headers=HEADERS)
            return len(r.content)
        async with client.stream("POST", url, content=BODIES[True], headers=HEADERS) as r:
            decoder = SSEDecoder(strict=True)
            n = 0
            async for chunk in r.aiter_bytes():
                n += _events(decoder, chunk)[0]
            return n

    return call


async def _aiohttp(url: str, limit: int, stack: AsyncExitStack) -> Call:
    connector = aiohttp.TCPConnector(limit=limit)
    session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))

    async def call(stream: bool) -> int:
        async with session.post(url, data=BODIES[stream], headers=HEADERS) as r:
            if not stream:
                return len(await r.read())
            decoder = SSEDecoder(strict=True)
            n = 0
            async for chunk in r.content.iter_any():
                n += _events(decoder, chunk)[0]
            return n

    return call


async def _worker(url: str, limit: int, stack: AsyncExitStack, reads: bool = False) -> Call:
    base = url.removesuffix(PATH) + "/v1"
    upstream = OpenAIUpstream(
        OpenAIConfig(base_url=base, model="fake-model", api_key_env="", max_concurrency=limit)
    )
    await upstream.start()
    stack.push_async_callback(upstream.stop)
    request = PromptRequest(request_id="r", input="x" * 480)
    job = Assembled(
        request=request, prompt="", dedup_key="", messages=[Turn(role="user", content="x" * 480)]
    )

    async def call(stream: bool) -> int:
        gen = Generation()
        if not stream:
            return len(await upstream.complete(job, gen))
        stream_of = upstream.generate_reads if reads else upstream.generate
        return sum([1 async for _ in stream_of(job, gen)])

    return call


async def _worker_reads(url: str, limit: int, stack: AsyncExitStack) -> Call:
    return await _worker(url, limit, stack, reads=True)


class _Raw(asyncio.Protocol):
    """One keep-alive connection of the floor client: a request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.decoder: SSEDecoder | None = None
        self.size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        if self.decoder is not None:
            self.size += len(self.decoder.feed(body))
        else:
            self.size += len(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.size)


async def _raw(url: str, limit: int, stack: AsyncExitStack) -> Call:
    loop = asyncio.get_running_loop()
    parsed = httptools.parse_url(url.encode())
    host, port = parsed.host.decode(), parsed.port
    idle: list[_Raw] = []
    heads = {
        s: (
            f"POST {PATH} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(BODIES[s])}\r\n\r\n"
        ).encode()
        + BODIES[s]
        for s in (False, True)
    }

    async def call(stream: bool) -> int:
        conn = idle.pop() if idle else (await loop.create_connection(_Raw, host, port))[1]
        conn.waiter = loop.create_future()
        conn.decoder = SSEDecoder(strict=True) if stream else None
        conn.size = 0
        assert conn.transport is not None
        conn.transport.write(heads[stream])
        n = await conn.waiter
        idle.append(conn)
        return n

    def close() -> None:
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()

    stack.callback(close)
    return call


FACTORIES: dict[str, Callable[[str, int, AsyncExitStack], Awaitable[Call]]] = {
    "httpx": _httpx,
    "httpx+aiohttp": _httpx_aiohttp,
    "httpx2": _httpx2,
    "aiohttp": _aiohttp,
    "worker": _worker,
    "worker-reads": _worker_reads,
    "raw": _raw,
}


async def _drive(call: Call, stream: bool, requests: int, concurrency: int) -> None:
    left = requests

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            if not await call(stream):
                raise RuntimeError("empty reply")

    await asyncio.gather(*(lane() for _ in range(concurrency)))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(name: str, url: str, stream: bool, requests: int, concurrency: int) -> float:
    """CPU microseconds per call of client ``name`` (after a warm-up)."""
    async with AsyncExitStack() as stack:
        call = await FACTORIES[name](url, concurrency, stack)
        await _drive(call, stream, WARMUP, concurrency)
        cpu0 = _cpu_s()
        await _drive(call, stream, requests, concurrency)
        return (_cpu_s() - cpu0) / requests * 1e6


def _start_upstream(port: int, tokens: int, core: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mpipeline.bench.fake_upstream", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--tokens", str(tokens)], preexec_fn=lambda: os.sched_setaffinity(0, [core])
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("the fake upstream did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()
    names = [c for c in args.clients.split(",") if c]
    cores = sorted(os.sched_getaffinity(0))
    client_core, server_core = cores[0], cores[-1]
    from mpipeline.bench.servers import free_port

    port = free_port()
    upstream = _start_upstream(port, args.tokens, server_core)
    url = f"http://127.0.0.1:{port}{PATH}"
    os.sched_setaffinity(0, [client_core])
    best: dict[tuple[str, bool], float] = {}
    try:
        for r in range(args.rounds):
            for name in names:
                for stream in (False, True):
                    us = uvloop.run(measure(name, url, stream, args.requests, args.concurrency))
                    key = (name, stream)
                    best[key] = min(best.get(key, us), us)
                    mode = "stream" if stream else "json"
                    print(f"round {r + 1} {name:<14} {mode:<6} {us:8.1f} µs/request", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(10)
    print(
        f"\nbest of {args.rounds} rounds, {args.requests} requests, {args.concurrency} in flight,"
    )
    print(f"client on core {client_core}, fake upstream on core {server_core}:\n")
    print("| client | JSON µs/request | stream µs/request |")
    print("|:--|--:|--:|")
    for name in names:
        print(f"| {name} | {best[(name, False)]:,.0f} | {best[(name, True)]:,.0f} |")
    if args.json:
        out = {f"{n}/{'stream' if s else 'json'}": v for (n, s), v in best.items()}
        with open(args.json, "wb") as f:
            f.write(msgspec.json.encode(out))


if __name__ == "__main__":
    main()
