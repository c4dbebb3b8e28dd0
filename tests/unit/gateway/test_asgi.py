"""The ASGI bridge (``gateway/asgi.py``): an ASGI app's messages as the gateway's bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from mpipeline.gateway import asgi
from mpipeline.gateway.exchange import Request, Response

Message = asgi.Message


class Wire:
    """The connection side of a ``Response``: what was written, nothing held back."""

    closing = False

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def date(self) -> bytes:
        return b"Thu, 01 Jan 1970 00:00:00 GMT"


def _request(body: bytes = b'{"a": 1}') -> Request:
    headers = {"content-type": "application/json", "x-many": "1, 2"}
    return Request("POST", "/mcp", "x=1", headers, body)


def _app(messages: Sequence[Message], seen: list[Message] | None = None) -> asgi.AsgiApp:
    async def app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if seen is not None:
            seen.append(dict(scope))
            seen.append(await receive())
        for message in messages:
            await send(message)

    return app


def _serve(app: asgi.AsgiApp, request: Request | None = None) -> tuple[Response, bytes]:
    request = request or _request()
    wire = Wire()
    response = Response(wire, request)
    asyncio.run(asgi.serve(app, request, response))
    return response, wire.data


def _start(status: int, *headers: tuple[bytes, bytes]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def _body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


def test_the_scope_and_the_body_are_the_requests() -> None:
    seen: list[Message] = []
    _serve(_app([_start(204), _body(b"")], seen))
    scope, first = seen
    assert (scope["type"], scope["method"], scope["path"]) == ("http", "POST", "/mcp")
    assert scope["query_string"] == b"x=1" and scope["raw_path"] == b"/mcp"
    assert (b"content-type", b"application/json") in scope["headers"]
    assert (b"x-many", b"1, 2") in scope["headers"]
    assert first == {"type": "http.request", "body": b'{"a": 1}', "more_body": False}


def test_a_whole_body_is_one_reply_with_the_gateways_own_length() -> None:
    start = _start(
        400,
        (b"Content-Type", b"text/plain"),
        (b"Content-Length", b"999"),
        (b"Connection", b"keep-alive"),
        (b"X-Kept", b"yes"),
    )
    response, data = _serve(_app([start, _body(b"bad")]))
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    lines = head.split(b"\r\n")
    assert b"content-type: text/plain" in lines and b"x-kept: yes" in lines
    # The app's framing is dropped: the gateway writes its own, and only once.
    assert [line for line in lines if line.startswith(b"content-length")] == [b"content-length: 3"]
    assert b"connection: keep-alive" not in lines
    assert body == b"bad" and response.finished and response.status == 400


def test_more_body_is_streamed_chunked_and_ended() -> None:
    start = _start(200, (b"content-type", b"text/event-stream"))
    messages = [start, _body(b"event: a\n\n", more=True), _body(b"b", more=True), _body(b"")]
    response, data = _serve(_app(messages))
    head, chunks = data.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head
    assert chunks == b"a\r\nevent: a\n\n\r\n1\r\nb\r\n0\r\n\r\n"
    assert response.finished


def test_a_stream_the_app_never_ends_is_left_unfinished() -> None:
    """The connection then closes: the only way to tell the client it was cut."""
    response, data = _serve(_app([_start(200), _body(b"part", more=True)]))
    assert response.started and not response.finished
    assert data.endswith(b"4\r\npart\r\n")


def test_a_body_before_the_start_is_a_bug_not_a_reply() -> None:
    with pytest.raises(RuntimeError, match="before its response started"):
        _serve(_app([_body(b"early")]))


def test_receive_after_the_body_waits_until_cancelled() -> None:
    """No ``http.disconnect`` while the request lives: a client that leaves cancels
    the handler, and a streaming app must not take an early one as a hang-up."""

    async def run() -> bool:
        request = _request()
        received: list[Message] = []

        async def app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
            received.append(await receive())
            received.append(await receive())

        task = asyncio.create_task(asgi.serve(app, request, Response(Wire(), request)))
        for _ in range(10):
            await asyncio.sleep(0)
        waiting = not task.done() and len(received) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return waiting

    assert asyncio.run(run())
