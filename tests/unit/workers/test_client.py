"""The workers' own HTTP client: keep-alive, framing, timeouts, TLS, proxies, no leaks.

Servers here are a few lines of asyncio each, scripted byte by byte; the
fault upstream (``tests/fault_upstream.py``) covers the model APIs' faults
through the workers in the other test files.
"""

from __future__ import annotations

import asyncio
import base64
import pickle
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from mpipeline.errors import ConfigError, ErrorCode, UpstreamFailure
from mpipeline.workers._client import Client, RequestHead, Timeouts, proxy_for

T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
CANARY = "sk-canary-0b1c2d3e4f"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# The loop every test runs on: the shards' (uvloop) and the standard one.
_loop: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"factory": uvloop.new_event_loop}


@pytest.fixture(autouse=True, params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    monkeypatch.setitem(_loop, "factory", factory)
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def _run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 10)

    with asyncio.Runner(loop_factory=_loop["factory"]) as runner:
        return runner.run(bounded())


@asynccontextmanager
async def _server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """Serve ``handler`` on a free port; on leaving, wait for (or cancel) every handler
    and close every connection, so no socket outlives the test."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    first, *lines = head.split(b"\r\n")
    pairs = [line.split(b": ", 1) for line in lines if line]
    headers = {name.lower(): value for name, value in pairs}
    await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return first, headers


def _client(url: str, read_s: float = 2.0, **headers: str) -> Client:
    return Client(
        url, headers=headers, max_connections=4, timeout=Timeouts(connect=2.0, read=read_s)
    )


async def _call(client: Client, body: bytes = b"{}") -> tuple[int, bytes]:
    conn = await client.open(client.request_head("/x", {}).render(body))
    try:
        parts = []
        while data := await conn.read():
            parts.append(data)
        return conn.status, b"".join(parts)
    finally:
        client.release(conn)


def test_keep_alive_reuses_one_connection_and_drops_one_the_server_closed() -> None:
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        for _ in range(2):  # two requests, then the server closes the idle connection
            await _request(reader)
            writer.write(OK)
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with _server(handler) as port, _client(f"http://127.0.0.1:{port}") as client:
            assert await _call(client) == (200, b"{}")
            assert await _call(client) == (200, b"{}")
            await asyncio.sleep(0.1)  # the close reaches the pool, which forgets the connection
            assert await _call(client) == (200, b"{}")
        assert connections == [0, 1]

    _run(main)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabcde",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabcde",  # ends with the connection
    ],
    ids=["chunked", "interim-100", "close-delimited"],
)
def test_body_framings(reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(reply)
        await writer.drain()
        if b"connection: close" in reply:
            writer.close()
        else:
            await reader.read()

    async def main() -> None:
        async with _server(handler) as port, _client(f"http://127.0.0.1:{port}") as client:
            assert await _call(client) == (200, b"abcde")

    _run(main)


def test_a_large_body_comes_whole_through_pauses() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: the socket pauses at the high-water mark

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with _server(handler) as port, _client(f"http://127.0.0.1:{port}") as client:
            conn = await client.open(client.request_head("/x", {}).render(b""))
            got = bytearray()
            while data := await conn.read():
                got += data
                await asyncio.sleep(0.001)  # a slow reader
            client.release(conn)
            assert bytes(got) == body

    _run(main)


@pytest.mark.parametrize(
    ("reply", "message", "code"),
    [
        (b"", "read timed out", ErrorCode.UPSTREAM_TIMEOUT),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "read timed out", None),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc|close", "truncated", None),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "truncated", None),
        (b"SMTP ready\r\n\r\n", "broke the HTTP protocol", None),
        (b"|close", "connection broke", None),
    ],
    ids=["silent", "stalled-body", "cut-body", "bad-chunk", "not-http", "closed"],
)
def test_failures_are_upstream_failures(reply: bytes, message: str, code: ErrorCode | None) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        data, _, close = reply.partition(b"|")
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()
        else:
            await reader.read()

    async def main() -> None:
        async with _server(handler) as port:
            async with _client(f"http://127.0.0.1:{port}", read_s=0.2) as client:
                with pytest.raises(UpstreamFailure, match=message) as info:
                    await _call(client)
                assert info.value.retryable and info.value.counts
                if code is not None:
                    assert info.value.code == code

    _run(main)


def test_cancelling_a_call_closes_its_connection_at_once() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # EOF: the client went away
        closed.set()

    async def main() -> None:
        async with _server(handler) as port, _client(f"http://127.0.0.1:{port}") as client:
            task = asyncio.create_task(_call(client))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(closed.wait(), 1.0)

    _run(main)


def test_bytes_on_an_idle_connection_retire_it() -> None:
    seen = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        await _request(reader)
        writer.write(OK + b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with _server(handler) as port, _client(f"http://127.0.0.1:{port}") as client:
            assert await _call(client) == (200, b"{}")
            await asyncio.sleep(0.05)
            assert await _call(client) == (200, b"{}")
        assert seen == 2

    _run(main)


def test_the_request_head_and_its_guards() -> None:
    client = _client("http://127.0.0.1:8000/v1/", authorization=f"Bearer {CANARY}")
    head = client.request_head("/chat/completions", {"accept": "text/event-stream"})
    raw = head.render(b"{}")
    assert raw.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n")
    assert raw.endswith(b"accept: text/event-stream\r\ncontent-length: 2\r\n\r\n{}")
    assert CANARY not in repr(head) and CANARY not in repr(client)
    assert CANARY not in repr(vars(client))  # a traceback's locals print no key either
    with pytest.raises(TypeError):
        pickle.dumps(head)
    with pytest.raises(ConfigError, match="line break"):
        client.request_head("/x", {"x-version": "1\r\nx-evil: 1"})
    for url in ("ftp://host/v1", "127.0.0.1:8000", "http:///v1"):
        with pytest.raises(ConfigError, match="http:// or https://"):
            _client(url)
    with pytest.raises(ConfigError, match="credentials"):
        _client("https://user:secret@host/v1")
    assert isinstance(head, RequestHead)


# Proxies


def test_proxies_come_from_the_environment_but_never_for_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "skip.example,.corp")
    found = proxy_for("https", "api.openai.com", 443)
    assert found is not None and (found.hostname, found.port) == ("proxy.internal", 3128)
    assert proxy_for("http", "api.openai.com", 80) is None  # no HTTP_PROXY, no ALL_PROXY
    assert proxy_for("https", "skip.example", 443) is None
    assert proxy_for("https", "vllm.corp", 443) is None
    for host in ("127.0.0.1", "localhost", "::1", "127.8.9.10"):
        assert proxy_for("https", host, 443) is None
    monkeypatch.setenv("ALL_PROXY", "proxy.internal:8080")
    found = proxy_for("http", "api.openai.com", 80)
    assert found is not None and found.port == 8080
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:secret@proxy.internal:1080")
    with pytest.raises(ConfigError, match="not an http:// URL") as info:
        proxy_for("https", "api.openai.com", 443)
    assert "secret" not in str(info.value)


def test_plain_http_goes_to_the_proxy_in_absolute_form(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, dict[bytes, bytes]]] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _request(reader))
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with _server(proxy) as port:
            monkeypatch.setenv("HTTP_PROXY", f"http://me:pa%20ss@127.0.0.1:{port}")
            async with _client("http://upstream.test:8000/v1") as client:
                assert client.proxied
                shown = repr(vars(client))
                assert "pa ss" not in shown and "pa%20ss" not in shown
                assert base64.b64encode(b"me:pa ss").decode() not in shown
                assert await _call(client) == (200, b"{}")

    _run(main)
    [(line, headers)] = seen
    assert line == b"POST http://upstream.test:8000/v1/x HTTP/1.1"
    assert headers[b"host"] == b"upstream.test:8000"
    assert headers[b"proxy-authorization"] == b"Basic " + base64.b64encode(b"me:pa ss")


# TLS: a CA and a certificate for 127.0.0.1 and upstream.test, made with openssl


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    new_key = ("-newkey", "rsa:2048", "-nodes")
    openssl("req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test-ca")
    openssl("req", "-new", *new_key, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=up")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:upstream.test\n")
    openssl(
        "x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf",
    )  # fmt: skip
    return d


def _tls_server_context(certs: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "srv.pem", certs / "srv.key")
    return ctx


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _request(reader)
    writer.write(OK)
    await writer.drain()
    await reader.read()


def _trust(monkeypatch: pytest.MonkeyPatch, ca: Path | None) -> None:
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    if ca is None:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    else:
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))


def test_tls_verifies_the_certificate(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main(trusted: bool) -> Any:
        _trust(monkeypatch, certs / "ca.pem" if trusted else None)
        async with _server(_answer, _tls_server_context(certs)) as port:
            async with _client(f"https://127.0.0.1:{port}/v1") as client:
                return await _call(client)

    assert _run(lambda: main(True)) == (200, b"{}")
    with pytest.raises(UpstreamFailure, match="certificate could not be verified") as info:
        _run(lambda: main(False))
    assert not info.value.retryable


def test_https_through_a_proxy_is_a_connect_tunnel(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _trust(monkeypatch, certs / "ca.pem")
    asked: list[bytes] = []

    async def main(refuse: bool) -> Any:
        async with _server(_answer, _tls_server_context(certs)) as tls_port:

            async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                line, _ = await _request(reader)
                asked.append(line)
                if refuse:
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                    await writer.drain()
                    return
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", tls_port)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

                async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                    dst.close()

                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

            async with _server(proxy) as proxy_port:
                monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
                async with _client(f"https://upstream.test:{tls_port}/v1") as client:
                    return await _call(client), tls_port

    (reply, port) = _run(lambda: main(False))
    assert reply == (200, b"{}")
    assert asked == [f"CONNECT upstream.test:{port} HTTP/1.1".encode()]
    with pytest.raises(UpstreamFailure, match=r"proxy refused the tunnel \(HTTP 407\)"):
        _run(lambda: main(True))
