"""HTTP/1.1 on a raw uvloop protocol with httptools: the gateway's socket layer.

Why not a framework: on one pinned core this costs 7 us of CPU per request
against 26 us for uvicorn with a bare ASGI app and 34-39 us for aiohttp,
Starlette or granian (bench/http_server_choice.md); the gateway's core also
runs the ring client, so that difference is its throughput. What a framework
would give is kept small and explicit here: keep-alive and pipelining, a body
limit enforced while reading (413 without buffering past it), a head size
limit, read and idle timeouts (slowloris), ``Expect: 100-continue``, chunked
streaming with write backpressure, and cancelling the handler when the
client goes away.

The application (``exchange.App``) sees a ``Request`` with the whole body and
a ``Response`` to answer it; ``precheck`` runs on the head alone so that a
request that will be refused (auth, unknown route) never gets its body read.
An ``Upgrade`` request that passes it and that ``App.upgrade`` accepts (the
WebSocket of ``websocket.py``) switches the connection: from then on its
bytes go to the new protocol and no HTTP is parsed.

This module holds the server (accepting, counting, draining) and ``bind``;
each connection's protocol is ``connection.py``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import cast

from mpipeline.errors import MPipelineError
from mpipeline.gateway.connection import LINGER_S, MAX_HEAD_BYTES, MAX_PIPELINED, Connection
from mpipeline.gateway.exchange import App, Reply

__all__ = [
    "BACKLOG",
    "MAX_CONNECTIONS",
    "STALL_TIMEOUT_S",
    "Busy",
    "KEEPALIVE_TIMEOUT_S",
    "LINGER_S",
    "MAX_HEAD_BYTES",
    "MAX_PIPELINED",
    "REQUEST_TIMEOUT_S",
    "HttpServer",
    "bind",
]

log = logging.getLogger(__name__)

# First byte of a request to its last: a client that trickles (slowloris) is cut off.
REQUEST_TIMEOUT_S = 10.0
# An idle keep-alive connection is closed after this long.
KEEPALIVE_TIMEOUT_S = 5.0
# A response write waiting this long for the client to read cuts the connection.
STALL_TIMEOUT_S = 30.0
# Connections one replica holds at once (HTTP and WebSocket); beyond, 503.
MAX_CONNECTIONS = 10_000
# Seconds a refused client is told to wait.
BUSY_RETRY_AFTER_S = 1
BACKLOG = 1024


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``: bound before anything else starts.

    :raises MPipelineError: naming the address when it is in use or not ours to bind
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MPipelineError(f"cannot listen on {where}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Rebinding over TIME_WAIT only; never SO_REUSEPORT (RELIABILITY 2.8).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise MPipelineError(
                f"{where} already in use (set gateway.port in the config, 0 for any free "
                "port, or stop what listens there)"
            ) from None
        raise MPipelineError(f"cannot listen on {where}: {exc.strerror}") from None
    return sock


class HttpServer:
    """Serves ``app`` on sockets handed to ``start``; ``stop`` drains, then closes."""

    def __init__(
        self,
        app: App,
        *,
        max_body: int,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.request_timeout_s = request_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.max_connections = max_connections
        # Connections refused because the server was full (503), since start.
        self.refused = 0
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._date = (0, b"")
        # Told of every answer (path, status, arrival ns): the gateway's metrics.
        self.answered: Callable[[str, int, int], None] | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, sock=sock)

    def _protocol(self) -> asyncio.Protocol:
        """A ``Connection``, or a ``Busy`` refusal once ``max_connections`` are open."""
        if len(self.connections) < self.max_connections:
            return Connection(self)
        self.refused += 1
        reply = self.app.error_reply(
            "", 503, f"the gateway has {self.max_connections} connections open; retry later"
        )
        return Busy(reply, self.date())

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def stop_accepting(self) -> None:
        """Close the listening socket (this process's copy); connections carry on."""
        if self._server is not None:
            self._server.close()

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in progress finish for ``grace_s``, close the rest."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            busy = len(self.connections)
            log.warning("closing %d connections still busy after %.1fs", busy, grace_s)
        tasks = [conn.abort() for conn in list(self.connections)]
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def added(self, conn: Connection) -> None:
        self.connections.add(conn)
        self._idle.clear()

    def removed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()

    def date(self) -> bytes:
        """The Date header's value, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
        return self._date[1]


class Busy(asyncio.Protocol):
    """A connection over ``max_connections``: 503 with Retry-After, then close.

    It costs no parser, no handler and no slot; the same for a plain request
    and a WebSocket handshake. The answer goes out once the client has sent
    something (clients read a response only after writing their request),
    or after ``LINGER_S`` if it sends nothing; input is then read and dropped
    for ``LINGER_S`` so the client reads the answer, not a reset.
    """

    def __init__(self, reply: Reply, date: bytes) -> None:
        self._reply = reply
        self._date = date
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, self._answer)

    def data_received(self, data: bytes) -> None:
        self._answer()  # later input is dropped: the answer is written

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _answer(self) -> None:
        t, self._transport = self._transport, None
        if self._timer is not None:
            self._timer.cancel()
        if t is None or t.is_closing():
            return
        reply = self._reply
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: {reply.content_type}\r\n"
            f"retry-after: {BUSY_RETRY_AFTER_S}\r\nconnection: close\r\n"
            f"content-length: {len(reply.body)}\r\ndate: "
        ).encode("latin-1")
        t.write(head + self._date + b"\r\n\r\n" + reply.body)
        if t.can_write_eof():
            t.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, t.close)
