"""The HTTP/1.1 layer over real loopback sockets, with a scripted app.

Raw sockets where the bytes matter (pipelining, limits, malformed input,
timeouts), so each test says exactly what the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from mpipeline.errors import MPipelineError
from mpipeline.gateway.exchange import Reply, Request, Response, Switch
from mpipeline.gateway.server import MAX_PIPELINED, HttpServer, bind

LIMIT = 1000


class ScriptedApp:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.waiting = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.bodies: list[bytes] = []

    def precheck(self, request: Request) -> Reply | None:
        if request.path == "/deny":
            return Reply(401, b'{"denied":true}')
        return None

    async def handle(self, request: Request, response: Response) -> None:
        self.bodies.append(request.body)
        if request.path == "/echo":
            response.send(200, request.body, (("x-method", request.method),))
        elif request.path == "/stream":
            response.start_stream(200, content_type="text/plain")
            for i in range(3):
                await response.write(b"part%d;" % i)
            await response.end()
        elif request.path == "/crash":
            raise RuntimeError("boom")
        elif request.path == "/wait":
            self.waiting.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        elif request.path == "/slow":
            self.slow_started.set()
            await asyncio.sleep(0.2)
            response.send(200, b"slow")
        # any other path: no response at all

    def error_reply(self, path: str, status: int, message: str) -> Reply:
        return Reply(status, json.dumps({"status": status, "message": message}).encode())

    def upgrade(self, request: Request) -> Reply | Switch | None:
        return None  # no protocol switch: answered as plain HTTP, then closed


@contextlib.asynccontextmanager
async def serving(app: ScriptedApp, **options: Any) -> AsyncIterator[HttpServer]:
    server = HttpServer(app, max_body=LIMIT, **options)
    await server.start(bind("127.0.0.1", 0))
    try:
        yield server
    finally:
        await server.stop(1.0)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = b""
    return status, headers, body


async def exchange(
    server: HttpServer, data: bytes, responses: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    host, port = server.address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return [await read_response(reader) for _ in range(responses)]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, limit_s: float = 5) -> bool:
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(), limit_s) == b""
    return True


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def test_keep_alive_and_pipelined_requests_answer_in_order() -> None:
    async def main() -> None:
        app = ScriptedApp()
        async with serving(app) as server:
            data = post("/slow", b"") + post("/echo", b"one") + post("/echo", b"two")
            (s1, _, b1), (s2, h2, b2), (s3, _, b3) = await exchange(server, data, 3)
            assert (s1, b1, s2, b2, s3, b3) == (200, b"slow", 200, b"one", 200, b"two")
            assert h2["x-method"] == "POST"
            assert "connection" not in h2 and "date" in h2
            # More than MAX_PIPELINED at once: reading pauses, then resumes.
            many = b"".join(post("/echo", b"%d" % i) for i in range(MAX_PIPELINED * 2))
            replies = await exchange(server, many, MAX_PIPELINED * 2)
            assert [body for _, _, body in replies] == [b"%d" % i for i in range(MAX_PIPELINED * 2)]

    run(main)


def test_chunked_request_body_and_chunked_response() -> None:
    async def main() -> None:
        app = ScriptedApp()
        async with serving(app) as server:
            data = (
                b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n"
            )
            (s1, _, b1), (s2, h2, b2) = await exchange(server, data, 2)
            assert (s1, b1) == (200, b"abcde")
            assert (s2, h2["transfer-encoding"], b2) == (200, "chunked", b"part0;part1;part2;")

    run(main)


def test_head_gets_headers_only_and_http10_closes() -> None:
    async def main() -> None:
        async with serving(ScriptedApp()) as server:
            host, port = server.address
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"HEAD /echo HTTP/1.0\r\n\r\n")
            status, headers, _ = await read_response(reader)
            assert status == 200 and headers["connection"] == "close"
            assert headers["content-length"] == "0"
            assert await closed_by_server(reader)
            writer.close()

    run(main)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        # Content-Length over the limit: refused before any body byte is read.
        (b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 104857600\r\n\r\n", 413),
        # Chunked with no length: refused once the limit is passed.
        (
            b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"100\r\n"
            + b"x" * 256
            + b"\r\n"
            + b"400\r\n"
            + b"x" * 1024
            + b"\r\n",
            413,
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /deny HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello", 401),
    ],
    ids=["content-length", "chunked", "garbage", "two-lengths", "huge-head", "precheck"],
)
def test_refused_requests_get_a_reply_then_a_close(data: bytes, status: int) -> None:
    async def main() -> None:
        app = ScriptedApp()
        async with serving(app) as server:
            host, port = server.address
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(data)
            got, headers, body = await read_response(reader)
            assert got == status, body
            assert headers["connection"] == "close"
            assert await closed_by_server(reader)
            writer.close()
            assert app.bodies == []  # the handler never ran

    run(main)


def test_lying_content_length_leaves_the_rest_as_a_bad_request() -> None:
    async def main() -> None:
        async with serving(ScriptedApp()) as server:
            data = post("/echo", b"abc")[:-3] + b"abcdefgh garbage\r\n\r\n"
            (s1, _, b1), (s2, _, _) = await exchange(server, data, 2)
            assert (s1, b1, s2) == (200, b"abc", 400)

    run(main)


def test_expect_100_continue() -> None:
    async def main() -> None:
        async with serving(ScriptedApp()) as server:
            host, port = server.address
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                post("/echo", b"", "expect: 100-continue\r\n")[:-2].replace(
                    b"content-length: 0", b"content-length: 4"
                )
                + b"\r\n"
            )
            line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert line.startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"data")
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b"data")
            writer.close()

    run(main)


def test_handler_crash_or_silence_is_a_500_and_the_connection_lives_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with serving(ScriptedApp()) as server:
            data = post("/crash", b"") + post("/nothing", b"") + post("/echo", b"ok")
            (s1, _, b1), (s2, _, _), (s3, _, b3) = await exchange(server, data, 3)
            assert (s1, s2, s3, b3) == (500, 500, 200, b"ok")
            assert json.loads(b1)["message"] == "internal error"

    run(main)
    assert "unhandled error answering POST /crash" in caplog.text


def test_slow_client_is_cut_off_and_idle_connections_close() -> None:
    async def main() -> None:
        options = {"request_timeout_s": 0.2, "keepalive_timeout_s": 0.2}
        async with serving(ScriptedApp(), **options) as server:
            host, port = server.address
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /echo HTTP/1.1\r\nx-slow: ")  # and never the rest
            status, _, _ = await read_response(reader)
            assert status == 408
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            assert await closed_by_server(reader, 2)  # idle: closed without a word
            writer.close()

    run(main)


def test_client_disconnect_cancels_the_handler() -> None:
    async def main() -> None:
        app = ScriptedApp()
        async with serving(app) as server:
            host, port = server.address
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(post("/wait", b""))
            await asyncio.wait_for(app.waiting.wait(), 5)
            writer.transport.abort()
            await asyncio.wait_for(app.cancelled.wait(), 5)

    run(main)


def test_stop_lets_a_request_in_progress_finish_then_closes() -> None:
    async def main() -> None:
        app = ScriptedApp()
        server = HttpServer(app, max_body=LIMIT)
        await server.start(bind("127.0.0.1", 0))
        host, port = server.address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            slow = asyncio.ensure_future(client.post("/slow"))
            await asyncio.wait_for(app.slow_started.wait(), 10)  # in progress when stop begins
            await server.stop(5.0)
            response = await slow
            assert response.status_code == 200 and response.headers["connection"] == "close"
            with pytest.raises(httpx.ConnectError):
                await client.get("/echo")

    run(main)


def test_bind_names_a_busy_address() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(MPipelineError, match=f"127.0.0.1:{port} already in use"):
            bind("127.0.0.1", port)
    finally:
        sock.close()
