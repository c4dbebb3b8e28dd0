"""One client connection of the gateway's HTTP server: parsing, limits, timers, serving in order.

The connection protocol is most of the raw HTTP layer (``server.py``), so it
lives in a module of its own; ``HttpServer`` accepts the sockets, counts the
connections and drains them, and each ``Connection`` turns bytes into
``Request``s for the app, one at a time and in order (pipelining), then
writes their answers. Why the layer is hand-made, and what it guarantees, is
in ``server.py``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from mpipeline.errors import ReaderStalled
from mpipeline.gateway.exchange import App, Reply, Request, Response, Switch, Upgraded

# The logger keeps the name it had when this code lived in server.py.
log = logging.getLogger("mpipeline.gateway.server")

# Request line plus headers; more is answered 431.
MAX_HEAD_BYTES = 64 * 1024
# After an early error reply, input is read and dropped this long before the
# close, so the client reads the reply instead of a reset (nginx's lingering close).
LINGER_S = 1.0
# Requests parsed ahead of the one being served; beyond this, reading pauses.
MAX_PIPELINED = 8
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Host(Protocol):
    """What a connection needs of its server (``server.HttpServer`` is the one).

    ``answered`` is told of every answer (path, status, arrival ns); ``added``
    and ``removed`` let the server wait for its connections when it stops.
    """

    app: App
    max_body: int
    request_timeout_s: float
    keepalive_timeout_s: float
    # A response write that waits this long for the client to read cuts the connection.
    stall_timeout_s: float
    answered: Callable[[str, int, int], None] | None

    def date(self) -> bytes: ...

    def added(self, conn: Connection) -> None: ...

    def removed(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One client connection: parses requests and serves them one at a time, in order."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self.closing = False
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._writable = asyncio.Event()
        self._writable.set()
        self._queue: collections.deque[Request | Reply] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._discarding = False
        self._upgrade = False
        self._switch: Switch | None = None
        self._upgraded: Upgraded | None = None
        # The request being parsed.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_head = False
        self._head_bytes = 0
        self._head_size = 0
        self._abort: Reply | None = None
        self._current: Request | None = None
        self._begun_ns = 0
        # A write waited past the stall timeout: the connection is cut, not reused.
        self._stalled = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self.server.added(self)
        self._arm(self.server.keepalive_timeout_s, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._disarm()
        self._writable.set()
        self._queue.clear()
        if self._upgraded is not None:
            self._upgraded.connection_lost(exc)
        if self._task is not None:
            self._task.cancel()  # the client left: stop working for it
        self.server.removed(self)

    def eof_received(self) -> bool:
        # A client that half-closes is treated as gone (as uvicorn does): HTTP
        # clients do not half-close to wait for an answer, and a stream whose
        # reader left must stop rather than run on for nobody.
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._upgraded is not None:
            self._upgraded.data_received(data)
            return
        if self._discarding or self._upgrade:
            return
        if self._current is None:  # between requests, or in a head
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._switch is not None and self._abort is None:
                self._switch_to(self._switch, data[exc.args[0] :])
                return
            # A switch the app does not serve: answer the request, then close.
            self._upgrade = True
        except httptools.HttpParserError as exc:
            self._reject(self._error(400, f"malformed HTTP request: {exc}"))
            return
        if self._abort is not None:
            self._reject(self._abort)
            return
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._reject(self._error(431, f"request head over {MAX_HEAD_BYTES} bytes"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._begun_ns = time.monotonic_ns()
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._in_head = True
        self._head_size = 0
        self._current = None
        self._arm(self.server.request_timeout_s, self._request_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._head_size > MAX_HEAD_BYTES:
            self._stop_parsing(self._error(431, f"request head over {MAX_HEAD_BYTES} bytes"))
            return
        url = httptools.parse_url(self._url)
        request = Request(
            method=self._parser.get_method().decode("latin-1"),
            path=url.path.decode("latin-1"),
            query=(url.query or b"").decode("latin-1"),
            headers=self._headers,
            keep_alive=bool(self._parser.should_keep_alive()),
            arrived_ns=self._begun_ns,
        )
        self._current = request
        length = request.header("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._stop_parsing(self._too_large(request.path))
            return
        early = self.server.app.precheck(request)
        if early is not None:
            self._stop_parsing(early)
            return
        if self._parser.should_upgrade():
            switch = self.server.app.upgrade(request)
            if isinstance(switch, Reply):
                self._stop_parsing(switch)
                return
            self._switch = switch
        if (request.header("expect") or "").lower() == "100-continue":
            self.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._abort is not None:
            return
        self._body_size += len(body)
        if self._body_size > self.server.max_body:
            assert self._current is not None
            self._stop_parsing(self._too_large(self._current.path))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._abort is not None:
            return
        request = self._current
        assert request is not None
        self._current = None
        request.body = b"".join(self._body)
        self._body = []
        self._disarm()
        if self._switch is not None:
            return  # data_received switches once the parser stops at the upgrade
        self._queue.append(request)
        if self._task is None:
            self._next()
        elif len(self._queue) >= MAX_PIPELINED and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()

    # Serving

    def _next(self) -> None:
        item = self._queue.popleft()
        if isinstance(item, Reply):
            self._reply_and_close(item)
            return
        self._task = self._loop.create_task(self._serve(item))

    async def _serve(self, request: Request) -> None:
        response = Response(self, request)
        try:
            await self.server.app.handle(request, response)
        except asyncio.CancelledError:
            # The client hung up (or the server is aborting): nginx's 499, so a slow
            # request its caller gave up on still shows in the counts and latencies.
            answered = self.server.answered
            if answered is not None:
                answered(request.path, 499, request.arrived_ns)
            raise
        except ConnectionError:
            response.keep_alive = False  # the client went away mid-stream
        except Exception:
            # A bug in one handler must not take the connection loop down with it.
            log.exception("unhandled error answering %s %s", request.method, request.path)
            if not response.started:
                response.send_reply(self._error(500, "internal error", request.path))
            else:
                response.keep_alive = False
        if not response.finished:
            if response.started:
                response.keep_alive = False  # a stream cut short: only a close tells the client
            else:
                response.send_reply(self._error(500, "no response", request.path))
        self._task = None
        answered = self.server.answered
        if answered is not None:
            answered(request.path, response.status, request.arrived_ns)
        self._served(response.keep_alive and not self._upgrade)

    def _served(self, keep_alive: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if self._stalled:
            # What is buffered (the error event) leaves if the client reads again soon.
            self.closing = True
            self._transport.close()
            self._loop.call_later(LINGER_S, self._transport.abort)
            return
        if not keep_alive:
            self.closing = True
            self._transport.close()
            return
        if self._paused and len(self._queue) < MAX_PIPELINED:
            self._paused = False
            self._transport.resume_reading()
        if self._queue:
            self._next()
        elif self.closing:
            self._transport.close()
        elif not self._reading():
            self._arm(self.server.keepalive_timeout_s, self._idle_timeout)

    def _switch_to(self, switch: Switch, rest: bytes) -> None:
        """Hand the connection, and ``rest`` (bytes after the head), to the new protocol."""
        self._switch = None
        if self._task is not None or self._queue or self._transport is None:
            self._reject(self._error(400, "an Upgrade request must not be pipelined"))
            return
        self._disarm()
        answered = self.server.answered
        if answered is not None:
            path = self._url.split(b"?", 1)[0].decode("latin-1")
            answered(path, 101, self._begun_ns)
        self._upgraded = switch(self._transport, self)
        if self.closing:
            self._upgraded.shutdown()  # switched while the server stops
        if rest:
            self._upgraded.data_received(rest)

    def _stop_parsing(self, reply: Reply) -> None:
        """Refuse the request being parsed; ``data_received`` answers once the feed returns."""
        if self._abort is None:
            self._abort = reply

    def _reject(self, reply: Reply) -> None:
        """Answer an unreadable or refused request early, then close after lingering."""
        answered = self.server.answered
        if answered is not None:
            path = self._current.path if self._current is not None else ""
            answered(path, reply.status, self._begun_ns)
        self._discarding = True
        self._disarm()
        if self._task is not None:
            self._queue.append(reply)  # after the response in progress
        else:
            self._reply_and_close(reply)

    def _reply_and_close(self, reply: Reply) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self.closing = True
        self._discarding = True
        response = Response(self, Request("GET", "", "", {}, keep_alive=False))
        response.send_reply(reply)
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER_S, transport.close)

    def _error(self, status: int, message: str, path: str | None = None) -> Reply:
        if path is None:
            path = self._current.path if self._current is not None else ""
        return self.server.app.error_reply(path, status, message)

    def _too_large(self, path: str) -> Reply:
        return self._error(413, f"request body over {self.server.max_body} bytes", path)

    def _reading(self) -> bool:
        """A request is partly read (its head, or its body)."""
        return self._in_head or self._current is not None

    # Transport helpers

    # exchange.Wire

    def date(self) -> bytes:
        return self.server.date()

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        if not self._writable.is_set():
            limit = self.server.stall_timeout_s
            try:
                await asyncio.wait_for(self._writable.wait(), limit)
            except TimeoutError:
                self._stalled = True
                raise ReaderStalled(f"the client read nothing for {limit:g} s") from None
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the client closed the connection")

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_timeout(self) -> None:
        if self._task is None and not self._queue and self._transport is not None:
            self.closing = True
            self._transport.close()

    def _request_timeout(self) -> None:
        limit = self.server.request_timeout_s
        self._reject(self._error(408, f"request not received within {limit:g}s"))

    def shutdown(self) -> None:
        """Finish the response in progress, if any, then close."""
        self.closing = True
        if self._upgraded is not None:
            self._upgraded.shutdown()
            return
        if self._task is None and self._transport is not None:
            self._transport.close()

    def abort(self) -> asyncio.Task[None] | None:
        """Drop the connection now; returns the handler task it cancels, to await."""
        if self._upgraded is not None:
            return self._upgraded.abort()
        if self._transport is not None:
            self._transport.abort()
        return self._task
