"""What ``mpipeline bench --upstream`` sends: chat bodies for wrk, and sequential probes.

wrk drives the full-speed phases from C with a Lua script that cycles through
prebuilt ``POST /v1/chat/completions`` bodies, each with a unique prompt (a
thread id and counter), so no cache could answer one even if it were on. The
probes send one request at a time over one keep-alive connection, to the
system or straight to the fake upstream, so the difference between the two
is what the proxy adds: end to end for JSON, and for a stream the time to
its first *content* token (a proxy's role-only opening chunk does not count,
as it carries nothing the model said).

The probe client is raw asyncio streams that parse just enough HTTP/1.1
(status, Content-Length or chunked framing), because an HTTP library's own
cost per request would be a large part of the sub-millisecond latency under
test.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from array import array
from collections.abc import Coroutine
from typing import Any

import msgspec
import uvloop

from mpipeline.bench.cpu import pin
from mpipeline.bench.load import Latency, prompt_body, summarize
from mpipeline.bench.wrk import body_script

PATH = "/v1/chat/completions"
MODEL = "fake-model"
# The TTFB probe's streams: short, as only the first token is timed.
TTFB_TOKENS = 8
# A request that takes longer failed: the probe must never hang the bench.
REQUEST_TIMEOUT_S = 10.0
# An SSE chunk that carries part of the reply: a content delta that is not empty.
_CONTENT = re.compile(rb'"content":\s*"[^"]')
# The fake upstream's token text (``fake_upstream.TOKEN``), counted in streamed replies.
_TOKEN = b"tok "


class Sequential(msgspec.Struct, frozen=True, kw_only=True):
    """One probe: latencies of requests sent one at a time, and how many failed."""

    kind: str  # "latency" (send to last byte) | "ttfb" (send to first content token)
    target: str  # "direct" or the system's name
    failed: int
    latency: Latency
    # Streams: the fewest and most tokens a reply carried, so a proxy that drops or
    # repeats tokens is caught (every reply should carry ``max_tokens``).
    tokens_min: int = 0
    tokens_max: int = 0


def chat_json(text: str, *, stream: bool, max_tokens: int) -> bytes:
    """An OpenAI chat completion request body."""
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    return msgspec.json.encode(body)


def chat_script(*, stream: bool, max_tokens: int) -> str:
    """A wrk Lua script: POSTs of chat bodies with unique prompts; ``done()`` prints JSON.

    ``bench.wrk.body_script`` with OpenAI's request shape around the prompt,
    so ``parse_wrk`` reads the line it prints.
    """
    head = '{"model":"' + MODEL + '","messages":[{"role":"user","content":"'
    tail = f'"}}],"max_tokens":{max_tokens},"stream":{"true" if stream else "false"}}}'
    return body_script(head, prompt_body(), tail)


class _Conn:
    """One keep-alive HTTP/1.1 connection: a request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> _Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def exchange(self, raw: bytes) -> tuple[int, int | None, int]:
        """Send ``raw``, read the whole answer: its status, and for a chunked (SSE)
        answer when (``monotonic_ns``) the first content token came and how many
        tokens came in all."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = head.lower()
        first: int | None = None
        tokens = 0
        if b"transfer-encoding: chunked" in headers:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    return status, first, tokens
                data = await self.reader.readexactly(size + 2)
                if first is None and _CONTENT.search(data):
                    first = time.monotonic_ns()
                tokens += data.count(_TOKEN)
        at = headers.find(b"content-length:")
        length = int(headers[at + 15 : headers.find(b"\r\n", at)]) if at >= 0 else 0
        await self.reader.readexactly(length)
        return status, first, tokens

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def sequential(
    port: int, target: str, *, requests: int, stream: bool, max_tokens: int
) -> Sequential:
    """``requests`` chat completions one after another on one connection.

    JSON: send to last byte. Stream: send to the first chunk with content.
    A request that fails is counted and its connection replaced.
    """
    body = prompt_body()
    samples = array("q")
    failed = 0
    counts: list[int] = []
    conn = await _Conn.open(port)
    try:
        for i in range(requests):
            payload = chat_json(f"{i:010d} {body}", stream=stream, max_tokens=max_tokens)
            raw = (
                f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
            ).encode() + payload
            t0 = time.monotonic_ns()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, first, tokens = await conn.exchange(raw)
                end = first if stream else time.monotonic_ns()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                status, end, tokens = 0, None, 0
                await conn.close()
                conn = await _Conn.open(port)
            if status == 200 and end is not None:
                samples.append(end - t0)
                counts.append(tokens)
            else:
                failed += 1
    finally:
        await conn.close()
    return Sequential(
        kind="ttfb" if stream else "latency",
        target=target,
        failed=failed,
        latency=summarize(samples),
        tokens_min=min(counts, default=0) if stream else 0,
        tokens_max=max(counts, default=0) if stream else 0,
    )


def probes(
    port: int, target: str, cpus: list[int], requests: int, json_tokens: int
) -> tuple[Sequential, Sequential]:
    """The JSON latency probe and the TTFB probe, each on a fresh loop pinned to ``cpus``."""
    latency = _pinned(
        cpus, sequential(port, target, requests=requests, stream=False, max_tokens=json_tokens)
    )
    ttfb = _pinned(
        cpus, sequential(port, target, requests=requests, stream=True, max_tokens=TTFB_TOKENS)
    )
    return latency, ttfb


def _pinned(cpus: list[int], probe: Coroutine[Any, Any, Sequential]) -> Sequential:
    restore = pin(cpus)
    try:
        return uvloop.run(probe)
    finally:
        restore()
