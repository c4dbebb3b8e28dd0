"""The latency probes of ``mpipeline bench --http``: a small raw-socket HTTP/1.1 client.

wrk measures throughput under full load; these measure what one request
costs on an otherwise idle system. The client writes prebuilt requests on
keep-alive connections and parses just enough of the answer (status,
Content-Length or chunked framing) to know when it ended, because an HTTP
library's own per-request cost (httpx: hundreds of microseconds) would be
larger than the latency under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from array import array
from collections.abc import Iterator

import msgspec

from mpipeline.bench.load import prompt_body, prompts, summarize
from mpipeline.bench.servers import HOST, PATH

PROBE_CONNECTIONS = 4
# Pause between time-to-first-byte requests, so each meets an idle system.
TTFB_PAUSE_S = 0.005
# A request that takes longer failed: the probe must never hang the bench.
REQUEST_TIMEOUT_S = 10.0


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    """A latency probe: end to end at a low rate, or streaming time to first ``data``."""

    kind: str  # "latency" | "ttfb"
    offered_rps: float | None
    samples: int
    failed: int
    mean_us: float
    p50_us: float
    p99_us: float
    max_us: float
    # ttfb: the worker's time to first token (the echo delay), taken off the p50/p99 below.
    subtract_us: float = 0.0
    extra_p50_us: float = 0.0
    extra_p99_us: float = 0.0


class _Answer(msgspec.Struct, frozen=True):
    status: int
    first_data_ns: int | None
    end_ns: int


class _Conn:
    """One keep-alive HTTP/1.1 connection that sends prebuilt requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> _Conn:
        reader, writer = await asyncio.open_connection(HOST, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> _Answer:
        """Send ``raw``, read the whole answer; note when the first SSE ``data`` came."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = head.lower()
        first: int | None = None
        if b"transfer-encoding: chunked" in headers:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                data = await self.reader.readexactly(size + 2)
                # Keep-alive comments (": ...") carry no "data:"; every event does.
                if first is None and b"data:" in data:
                    first = time.monotonic_ns()
        else:
            at = headers.find(b"content-length:")
            length = int(headers[at + 15 : headers.find(b"\r\n", at)]) if at >= 0 else 0
            await self.reader.readexactly(length)
        return _Answer(status, first, time.monotonic_ns())

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _post(port: int, body: bytes) -> bytes:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _bodies(*, stream: bool, max_tokens: int | None = None) -> Iterator[bytes]:
    extra: dict[str, object] = {"stream": True} if stream else {}
    if max_tokens is not None:
        extra["max_tokens"] = max_tokens
    for text in prompts(prompt_body()):
        yield msgspec.json.encode({"input": text, **extra})


async def latency_probe(port: int, rate: float, duration_s: float) -> Probe:
    """Non-streaming end-to-end latency at ``rate`` req/s: send to last byte, nothing taken off.

    Requests leave on a fixed schedule (open loop) over a few keep-alive
    connections, so a slow answer does not delay the next request. Latency
    counts from the write, not from the schedule: uvloop's timers fire up to
    a millisecond late, which would swamp a sub-millisecond answer.
    """
    idle: asyncio.Queue[_Conn] = asyncio.Queue()
    for _ in range(PROBE_CONNECTIONS):
        idle.put_nowait(await _Conn.open(port))
    bodies = _bodies(stream=False)
    samples: list[int] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                conn = await idle.get()
        except TimeoutError:
            failed += 1
            return
        t0, answer, conn = await _exchange(conn, port, next(bodies))
        idle.put_nowait(conn)
        if answer is not None and answer.status == 200:
            samples.append(answer.end_ns - t0)
        else:
            failed += 1

    tasks = []
    total = max(1, int(rate * duration_s))
    start = time.monotonic()
    try:
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    finally:
        while not idle.empty():
            await idle.get_nowait().close()
    return _probe("latency", rate, samples, failed)


async def ttfb_probe(port: int, requests: int, token_delay_ms: float) -> Probe:
    """Streaming time from sending the request to the first SSE ``data`` bytes.

    One request at a time on one keep-alive connection, each asking for one
    token, so every stream meets an idle system. The worker sleeps
    ``token_delay_ms`` before its first token; that is taken off.
    """
    conn = await _Conn.open(port)
    bodies = _bodies(stream=True, max_tokens=1)
    samples: list[int] = []
    failed = 0
    try:
        for _ in range(requests):
            t0, answer, conn = await _exchange(conn, port, next(bodies))
            if answer is not None and answer.status == 200 and answer.first_data_ns is not None:
                samples.append(answer.first_data_ns - t0)
            else:
                failed += 1
            await asyncio.sleep(TTFB_PAUSE_S)
    finally:
        await conn.close()
    return _probe("ttfb", None, samples, failed, subtract_us=token_delay_ms * 1000.0)


async def _exchange(conn: _Conn, port: int, body: bytes) -> tuple[int, _Answer | None, _Conn]:
    """Send one request: when it went out, its answer (None: failed), a usable connection.

    A failed exchange leaves the connection in an unknown state, so it is
    replaced; if even that fails, the dead one is handed back and the next
    exchange on it fails too, which is counted rather than raised.
    """
    raw = _post(port, body)
    t0 = time.monotonic_ns()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            return t0, await conn.send(raw), conn
    except (
        OSError,
        TimeoutError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        ValueError,
    ):
        await conn.close()
        with contextlib.suppress(OSError):
            conn = await _Conn.open(port)
        return t0, None, conn


def _probe(
    kind: str, rate: float | None, samples: list[int], failed: int, *, subtract_us: float = 0.0
) -> Probe:
    lat = summarize(array("q", samples))
    return Probe(
        kind=kind,
        offered_rps=rate,
        samples=lat.samples,
        failed=failed,
        mean_us=lat.mean_us,
        p50_us=lat.p50_us,
        p99_us=lat.p99_us,
        max_us=lat.max_us,
        subtract_us=subtract_us,
        extra_p50_us=lat.p50_us - subtract_us if subtract_us else 0.0,
        extra_p99_us=lat.p99_us - subtract_us if subtract_us else 0.0,
    )
