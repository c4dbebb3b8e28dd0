"""One HTTP exchange as a handler sees it: the ``Request``, and the ``Response`` it answers with.

Kept apart from the connection code (``server.py``) so that routes depend on
these few types only; a handler never sees a transport, a parser or a timer.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

JSON = "application/json"
# Nginx's 499 "client closed request" is not in http.HTTPStatus.
_PHRASES = {s.value: s.phrase for s in http.HTTPStatus} | {499: "Client Closed Request"}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    # Lower-case names; repeated headers joined with ", " (RFC 9110 5.3).
    headers: dict[str, str]
    body: bytes = b""
    keep_alive: bool = True
    # When its first byte was parsed (monotonic ns): request durations start here.
    arrived_ns: int = 0

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete response, for answers decided before or instead of a handler."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = JSON


class App(Protocol):
    def precheck(self, request: Request) -> Reply | None:
        """Answer from the head alone (body empty), or None to read the body."""

    async def handle(self, request: Request, response: Response) -> None:
        """Answer one request through ``response``."""

    def error_reply(self, path: str, status: int, message: str) -> Reply:
        """The error body the route at ``path`` uses (protocol errors, crashes)."""

    def upgrade(self, request: Request) -> Reply | Switch | None:
        """Where an ``Upgrade`` request that passed ``precheck`` goes.

        A refusal, the protocol to switch the connection to, or None to answer
        it as plain HTTP (the connection then closes).
        """


class Wire(Protocol):
    """What a ``Response`` needs from its connection."""

    @property
    def closing(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Wait while the client reads slower than we write.

        :raises ReaderStalled: if the client read nothing for the stall timeout
        :raises ConnectionResetError: if the client has gone
        """

    def date(self) -> bytes: ...


class Upgraded(Protocol):
    """The protocol a connection switched to (a WebSocket): it gets every byte from then on.

    The connection stays the transport's protocol and forwards to this one, so
    the server still counts it, drains it and aborts it when it stops.
    """

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def shutdown(self) -> None:
        """The server is stopping: finish what is in progress, then close."""

    def abort(self) -> asyncio.Task[None] | None:
        """Drop the connection now; returns a task to await for the work it cancels."""


# Starts the new protocol once the head is read: the transport, and the
# connection as the ``Wire`` to write through (it tracks write backpressure).
Switch = Callable[[asyncio.Transport, Wire], Upgraded]


class Response:
    """One answer: ``send`` a whole body, or ``start_stream``, ``write``..., ``end``."""

    def __init__(self, conn: Wire, request: Request) -> None:
        self._conn = conn
        self._head_only = request.method == "HEAD"
        self.keep_alive = request.keep_alive
        self.started = False
        self.finished = False
        self.status = 0
        self._chunked = False

    def _head(self, status: int, headers: Iterable[tuple[str, str]], content_type: str) -> bytes:
        phrase = _PHRASES.get(status, "Unknown")
        lines = [f"HTTP/1.1 {status} {phrase}", f"content-type: {content_type}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if not self.keep_alive or self._conn.closing:
            self.keep_alive = False
            lines.append("connection: close")
        head = "\r\n".join(lines).encode("latin-1")
        return head + b"\r\ndate: " + self._conn.date() + b"\r\n"

    def send_reply(self, reply: Reply) -> None:
        self.send(reply.status, reply.body, reply.headers, reply.content_type)

    def send(
        self,
        status: int,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = JSON,
    ) -> None:
        """Write a complete response (a few kB at most: no backpressure wait)."""
        assert not self.started, "response already started"
        self.started = self.finished = True
        self.status = status
        head = self._head(status, headers, content_type)
        length = b"content-length: %d\r\n\r\n" % len(body)
        self._conn.write(head + length + (b"" if self._head_only else body))

    def start_stream(
        self, status: int, headers: Iterable[tuple[str, str]] = (), content_type: str = JSON
    ) -> None:
        assert not self.started, "response already started"
        self.started = self._chunked = True
        self.status = status
        self._conn.write(
            self._head(status, headers, content_type) + b"transfer-encoding: chunked\r\n\r\n"
        )

    async def write(self, data: bytes) -> None:
        """Send one piece of a stream; waits while the client reads slower than we write."""
        if data and not self._head_only:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        await self._conn.drain()

    def write_nowait(self, data: bytes) -> None:
        """Queue a last piece of a stream without waiting (an error before a cut)."""
        if data and not self._head_only and self._chunked:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def end(self) -> None:
        if self._chunked and not self.finished:
            self._conn.write(b"0\r\n\r\n")
        self.finished = True
        await self._conn.drain()
