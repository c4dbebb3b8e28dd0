"""Run an ASGI application for one gateway request: the bridge to ASGI-only libraries.

The gateway is not an ASGI server (``server.py`` says why it is hand-made),
but the MCP SDK's streamable HTTP transport is an ASGI app. This adapter
serves one ``Request`` through such an app and writes what it sends through
the request's ``Response``:

* the scope is the request's method, path, query and headers (HTTP/1.1);
  the body was already read and bounded by the server (``max_body``);
* ``receive`` gives that body once, then waits: a client that leaves
  cancels the handler task (``connection.py``), which is how the app hears of
  it, so there is no ``http.disconnect`` to deliver while the request lives;
* ``send``: a response whose first body message is its last becomes one
  ``Response.send`` with a length; one that says ``more_body`` (an SSE stream)
  is sent chunked, each piece written as it comes and waited on while the
  client reads slower than we write (``Response.write``'s backpressure).

The gateway's ``Response`` writes its own ``content-length``,
``transfer-encoding`` and ``connection`` headers, so the app's are dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mpipeline.gateway.exchange import Request, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Framing the gateway writes itself; the app's would contradict it.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_DEFAULT_TYPE = "application/octet-stream"


def scope_for(request: Request) -> Scope:
    """The ASGI HTTP scope of ``request``."""
    raw_path = request.path.encode("latin-1")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": raw_path,
        "query_string": request.query.encode("latin-1"),
        "root_path": "",
        "headers": [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in request.headers.items()
        ],
        "client": None,
        "server": None,
        "state": {},
    }


class _Exchange:
    """The ``receive`` and ``send`` of one request, writing through its ``Response``."""

    def __init__(self, request: Request, response: Response) -> None:
        self._body: bytes | None = request.body
        self._response = response
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._content_type = _DEFAULT_TYPE
        self._streaming = False

    async def receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        # Nothing more will come: the app is cancelled if the client leaves.
        await asyncio.Future()
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start(message)
        elif kind == "http.response.body":
            await self._body_part(bytes(message.get("body", b"")), message.get("more_body", False))
        # Other messages (trailers, push) have no meaning here: ignored, as the spec allows.

    def _start(self, message: Message) -> None:
        if self._status:
            raise RuntimeError("the ASGI app started its response twice")
        self._status = int(message["status"])
        for raw_name, raw_value in message.get("headers", ()):
            name = bytes(raw_name).decode("latin-1").lower()
            value = bytes(raw_value).decode("latin-1")
            if name == "content-type":
                self._content_type = value
            elif name not in _OWN_HEADERS:
                self._headers.append((name, value))

    async def _body_part(self, body: bytes, more: bool) -> None:
        response = self._response
        if not self._status:
            raise RuntimeError("the ASGI app sent a body before its response started")
        if response.finished:
            return  # a body after the last one: nothing can carry it
        if not self._streaming and not more:
            response.send(self._status, body, self._headers, self._content_type)
            return
        if not self._streaming:
            self._streaming = True
            response.start_stream(self._status, self._headers, self._content_type)
        await response.write(body)
        if not more:
            await response.end()


async def serve(app: AsgiApp, request: Request, response: Response) -> None:
    """Answer ``request`` through ``response`` with the ASGI ``app``.

    A response the app started but never ended is left unfinished: the
    connection then closes, the only way to tell the client it was cut short.
    """
    exchange = _Exchange(request, response)
    await app(scope_for(request), exchange.receive, exchange.send)
