"""One keep-alive HTTP/1.1 connection to an upstream: a uvloop protocol around httptools.

A connection carries one exchange at a time, as HTTP/1.1 without pipelining
does. The client (``_client.Client``) writes a request with ``start``; the
caller awaits the head (``head``), then body bytes as they come (``read``):
one wake-up per network read, however many chunks or SSE events it held, so
the tokens of a stream that arrive together are handled together. Body
bytes go straight from the parser to the reader's list; nothing sits between
them (a StreamReader, a response object, an iterator per chunk): that
machinery is what the HTTP libraries cost per call (``_client`` has the
numbers).

Every failure is an ``UpstreamFailure`` from the start: a read timeout, a
connection that ended or broke HTTP before its body was whole. The read
timeout is a backstop behind the shard's phase timers, so it is one timer per
exchange, re-armed lazily from the time of the last byte (a float store per
read), not a timer per read. Bytes wait between reads up to ``HIGH_WATER``,
then the socket is paused until the reader catches up (and the wait is not
the upstream's fault, so the timeout does not run meanwhile).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import httptools

from mpipeline.errors import UpstreamFailure
from mpipeline.workers._failures import broken_failure, read_timeout_failure

__all__ = ["HIGH_WATER", "Conn"]

# Unread body bytes at which the socket is paused; it resumes once they are read.
HIGH_WATER = 256 * 1024


class _SecondAnswer(Exception):  # noqa: N818 - stops the parser; never leaves this module
    """A second response began on one exchange."""


class Conn(asyncio.Protocol):
    """A connection and the state of its current exchange."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[Conn], None] | None = None
    ) -> None:
        self.loop = loop
        self._time = loop.time
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        # The exchange: every field below is reset by ``start``.
        self.busy = False
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self.keep_alive = False
        self.failure: UpstreamFailure | None = None
        self._interim = False
        self._framed = True
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._last_rx = 0.0
        self.closed = False

    def __repr__(self) -> str:
        return f"Conn(busy={self.busy}, status={self.status}, closed={self.closed})"

    # The exchange, as its caller sees it

    def start(self, request: bytes, read_timeout: float) -> None:
        """Send ``request`` (whole: head and body) and begin waiting for its answer."""
        self.busy = True
        self.status = 0
        self._headers = []
        self.head_done = self.done = self.keep_alive = self._interim = False
        self.failure = None
        self._body = []
        self._buffered = 0
        self._read_timeout = read_timeout
        self._last_rx = now = self._time()
        self._timer = self.loop.call_at(now + read_timeout, self._check)
        transport = self.transport
        if transport is None:
            self._fail(broken_failure(in_body=False))
            return
        transport.write(request)

    async def head(self) -> None:
        """Wait for the status and headers.

        :raises UpstreamFailure: the connection broke or timed out first
        """
        while not self.head_done:
            if self.failure is not None:
                raise self.failure
            await self._wait()

    async def read(self) -> bytes:
        """The body bytes that came since the last read; ``b""`` once the body is whole.

        :raises UpstreamFailure: the body was cut short, or the upstream went silent
        """
        while True:
            body = self._body
            if body:
                self._body = []
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return body[0] if len(body) == 1 else b"".join(body)
            if self.failure is not None:
                raise self.failure
            if self.done:
                return b""
            await self._wait()

    def header(self, name: bytes) -> str | None:
        """The last value of header ``name`` (lower case), or None."""
        for key, value in reversed(self._headers):
            if key == name:
                return value.decode("latin-1")
        return None

    def headers(self) -> dict[str, str]:
        """Every header, names in lower case (the last value of a repeated one)."""
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self._headers}

    @property
    def reusable(self) -> bool:
        """The exchange ended cleanly and the server keeps the connection open."""
        return self.done and self.keep_alive and self.failure is None and not self.closed

    def end(self) -> None:
        """The exchange is over (the connection goes idle, or is about to be closed)."""
        self.busy = False
        self._body = []
        self._stop_timer()

    def abort(self) -> None:
        """Close now, mid-exchange or not: the upstream sees the connection end at once."""
        self.busy = False
        self._stop_timer()
        self.closed = True
        transport = self.transport
        if transport is not None:
            transport.abort()

    def close(self) -> None:
        """Close after what was written has been sent."""
        self.busy = False
        self._stop_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # The protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            # Bytes nobody asked for (a late error page on an idle connection):
            # whatever comes next on it could be mistaken for the next reply.
            self.abort()
            return
        self._last_rx = self._time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self.done:
                # Bytes after the whole answer (``on_message_begin`` stopped the
                # parser): the answer stands; the connection is not reused.
                self.keep_alive = False
                return
            self._fail(broken_failure(in_body=self.head_done, protocol=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.busy and not self.done and self.failure is None:
            if self.head_done and not self._framed:
                self.done = True  # a body without length or chunks ends with the connection
            else:
                self.failure = broken_failure(in_body=self.head_done)
        self._stop_timer()
        self._wake()
        if self._on_lost is not None:
            self._on_lost(self)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.done:
            raise _SecondAnswer

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the answer follows
            return
        self.status = status
        self.head_done = True
        names = [k for k, _ in self._headers]
        self._framed = b"content-length" in names or b"transfer-encoding" in names
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._headers = []
            return
        self.done = True
        self.keep_alive = self._parser.should_keep_alive()
        self._stop_timer()
        self._wake()

    # Waiting and the read timeout

    async def _wait(self) -> None:
        waiter = self.loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, failure: UpstreamFailure) -> None:
        if self.failure is None:
            self.failure = failure
        busy = self.busy
        self.abort()
        self.busy = busy  # still the caller's exchange: it reads the failure next
        self._wake()

    def _check(self) -> None:
        self._timer = None
        if not self.busy or self.done or self.failure is not None:
            return
        now = self._time()
        # A paused socket waits for our reader, not for the upstream.
        due = now + self._read_timeout if self._paused else self._last_rx + self._read_timeout
        if now < due:
            self._timer = self.loop.call_at(due, self._check)
            return
        self._fail(read_timeout_failure())

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
