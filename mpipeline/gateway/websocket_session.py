"""One WebSocket connection after its handshake: frames in, the message protocol, requests out.

``websocket.py`` checks the handshake and is the gateway's WebSocket style;
this is what runs once the connection has switched, kept apart because a
session is most of the code and none of it is about HTTP. The protocol it
speaks (messages, ``ref``, errors, cancelling on close) is described in
``websocket.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, cast

import msgspec
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from mpipeline.errors import ErrorCode, MPipelineError, ReaderStalled, RequestFailed
from mpipeline.gateway import schemas
from mpipeline.gateway.exchange import Reply, Wire
from mpipeline.gateway.schemas import ErrorBody, ErrorDetail, Problem
from mpipeline.gateway.websocket_messages import (
    DECODE,
    AcceptedOut,
    ErrorOut,
    Event,
    StreamBody,
    ref_of,
    render,
)
from mpipeline.messages import TokenChunk
from mpipeline.pipeline import RequestOptions

# The session's logger keeps the name it had when it lived in websocket.py.
log = logging.getLogger("mpipeline.gateway.websocket")

# Requests one connection may run at once; more get an error (rate_limited).
MAX_IN_FLIGHT = 64
# Once our close frame (or EOF) is out, the client gets this long to close TCP.
CLOSE_TIMEOUT_S = 2.0
# Bytes waiting to go out above which reading stops: a client that writes
# (pings, bad messages) without reading must not grow our buffer forever.
MAX_UNSENT = 1024 * 1024

# Defaults of the keep-alive timers (``KeepAlive``; gateway.ws_* in the config).
PING_INTERVAL_S = 20.0
IDLE_TIMEOUT_S = 120.0

# The gateway's admission (rate limits) for one request of a session: None, or
# the HTTP refusal it would send, whose error becomes the message's.
Admit = Callable[[str | None], Reply | None]
# The gateway's models: a message's ``model`` ("" for none) to the key its
# request carries, or the 404 ``model_not_found`` its error gets.
Resolve = Callable[[str], str | Problem]


_DECODE_ERROR = msgspec.json.Decoder(ErrorBody)
_ENCODE = msgspec.json.Encoder().encode


class Streams(Protocol):
    """What a session needs of the pipeline client (``Pipeline`` is one)."""

    def stream_events(
        self, text: str, options: RequestOptions | None = None, /
    ) -> AsyncIterator[Event]: ...

    def cancel(self, request_id: str, reason: str, code: ErrorCode) -> bool: ...


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """When a quiet connection is pinged, and when an idle one is closed.

    Every ``ping_interval_s`` a connection that sent nothing since the last
    tick gets a ping; one that stays silent for another interval (no pong)
    is dead and is closed 1011. One with no request in flight and no message
    for ``idle_timeout_s`` is closed 1001 (pongs do not count: an idle client
    that answers pings would otherwise hold its file descriptor forever).
    """

    ping_interval_s: float = PING_INTERVAL_S
    idle_timeout_s: float = IDLE_TIMEOUT_S


KEEPALIVE = KeepAlive()


class Session:
    """One WebSocket connection after the handshake (``exchange.Upgraded``)."""

    def __init__(
        self,
        transport: asyncio.Transport,
        wire: Wire,
        protocol: ServerProtocol,
        switching: bytes,
        streams: Streams,
        admit: Admit | None = None,
        keepalive: KeepAlive = KEEPALIVE,
        resolve: Resolve | None = None,
    ) -> None:
        self._transport = transport
        self._wire = wire
        self._protocol = protocol
        self._streams = streams
        self._admit = admit
        self._resolve = resolve
        self._loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        # The message being received, fragment by fragment.
        self._parts: list[bytes] = []
        self._binary = False
        self._stopping = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._resume: asyncio.Task[None] | None = None
        self._keepalive = keepalive
        # Loop times of the last bytes and the last message received.
        self._heard = self._spoke = self._loop.time()
        # When the last ping went out (0: none yet); answered once ``_heard`` passes it.
        self._pinged = 0.0
        self._ticker = self._loop.call_later(keepalive.ping_interval_s, self._tick)
        wire.write(switching)  # 101 Switching Protocols

    # exchange.Upgraded

    def data_received(self, data: bytes) -> None:
        self._heard = self._loop.time()
        self._protocol.receive_data(data)
        for event in self._protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        self._flush()
        transport = self._transport
        if (
            self._resume is None
            and not transport.is_closing()
            and transport.get_write_buffer_size() > MAX_UNSENT
        ):
            transport.pause_reading()
            self._resume = self._loop.create_task(self._resume_reading())

    def connection_lost(self, exc: Exception | None) -> None:
        self._ticker.cancel()
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._protocol.receive_eof()  # now CLOSED: nothing more is sent
        self._protocol.data_to_send()
        self._cancel_all()

    def shutdown(self) -> None:
        self._stopping = True
        if not self.tasks:
            self._close(CloseCode.GOING_AWAY, "the gateway is shutting down")

    def abort(self) -> asyncio.Task[None] | None:
        # The close frame is written straight to the socket when nothing is
        # queued before it, so the client usually still learns why.
        self._close(CloseCode.GOING_AWAY, "the gateway is shutting down")
        self._transport.abort()
        tasks = list(self.tasks)
        self._cancel_all()
        if not tasks:
            return None
        return self._loop.create_task(_settle(tasks))

    # Keep-alive

    def _tick(self) -> None:
        """Ping a quiet client, close a dead or idle one (``KeepAlive``)."""
        if self._protocol.state is not State.OPEN:
            return
        now = self._loop.time()
        interval = self._keepalive.ping_interval_s
        idle = self._keepalive.idle_timeout_s
        if not self.tasks and now - self._spoke >= idle:
            self._close(CloseCode.GOING_AWAY, f"idle for {idle:g} s")
            return
        pinged = self._pinged
        if pinged and self._heard < pinged and now - pinged >= interval:
            # Nothing at all, not even the pong, for a whole interval after our ping.
            self._close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            self._transport.abort()
            return
        if now - self._heard >= interval and (not pinged or self._heard >= pinged):
            self._protocol.send_ping(b"")
            self._flush()
            self._pinged = now
        self._ticker = self._loop.call_later(interval, self._tick)

    def _cut(self, why: str) -> None:
        """The client stopped reading: close, and drop the socket if it does not read soon."""
        self._close(CloseCode.POLICY_VIOLATION, why)
        self._transport.close()
        self._loop.call_later(CLOSE_TIMEOUT_S, self._transport.abort)

    # Receiving

    def _frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
            self._binary = frame.opcode is Opcode.BINARY
            self._parts = [bytes(frame.data)]
        elif frame.opcode is Opcode.CONT:
            self._parts.append(bytes(frame.data))
        else:
            return  # ping, pong, close: the protocol has answered them
        if not frame.fin or self._protocol.state is not State.OPEN:
            return
        data = b"".join(self._parts)
        self._parts = []
        if self._binary:
            self._refuse(None, "binary messages are not accepted; send JSON as text")
            return
        try:
            data.decode()
        except UnicodeDecodeError as exc:
            self._protocol.fail(CloseCode.INVALID_DATA, f"invalid UTF-8 at byte {exc.start}")
            return
        self._message(data)

    def _message(self, data: bytes) -> None:
        self._spoke = self._loop.time()
        body = schemas.decode(DECODE, data)
        if isinstance(body, Problem):
            self._refuse(ref_of(data), body.message, body.field)
            return
        if self._stopping:
            kind = ErrorCode.SHUTTING_DOWN
            self._refuse(body.ref, "the gateway is shutting down", kind=kind)
            return
        if len(self.tasks) >= MAX_IN_FLIGHT:
            message = f"over {MAX_IN_FLIGHT} requests in flight on this connection"
            self._refuse(body.ref, message, kind=ErrorCode.RATE_LIMITED)
            return
        # Before the rate limits, as the chat route does: a refused model costs no token.
        model = self._resolve(body.model or "") if self._resolve is not None else None
        if isinstance(model, Problem):
            code = model.code or ErrorCode.INVALID_REQUEST
            self._refuse(body.ref, model.message, model.field, code)
            return
        refused = self._admit(body.session_id) if self._admit is not None else None
        if refused is not None:
            # The limiter speaks HTTP; its error body is the message's error.
            detail = _DECODE_ERROR.decode(refused.body).error
            self._write(_ENCODE(ErrorOut(ref=body.ref, error=detail)))
            return
        task = self._loop.create_task(self._serve(body, model))
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _refuse(
        self,
        ref: str | None,
        message: str,
        field: str | None = None,
        kind: str = ErrorCode.INVALID_REQUEST,
    ) -> None:
        detail = ErrorDetail(type=kind, message=message, field=field)
        self._write(_ENCODE(ErrorOut(ref=ref, error=detail)))

    async def _resume_reading(self) -> None:
        try:
            await self._wire.drain()
        except ReaderStalled as stalled:
            self._cut(str(stalled))
            return
        except ConnectionError:
            return
        finally:
            self._resume = None
        self._transport.resume_reading()

    # One request

    async def _serve(self, body: StreamBody, model: str | None) -> None:
        try:
            await self._stream(body, model)
        except ConnectionError:
            pass  # the socket is going away: connection_lost cancels the rest
        except Exception:
            # A bug in one request must not take the connection's others down.
            log.exception("WebSocket request failed")
            detail = ErrorDetail(type=ErrorCode.INTERNAL, message="internal error")
            self._write(_ENCODE(ErrorOut(ref=body.ref, error=detail)))

    async def _stream(self, body: StreamBody, model: str | None) -> None:
        """Run one request; ``model`` is the key its ``model`` resolved to (None:
        unresolved, the shard resolves it)."""
        ref = body.ref
        options = schemas.request_options(body, body.session_id, model=model)
        events = cast(AsyncGenerator[Event, None], self._streams.stream_events(body.input, options))
        request_id: str | None = None
        try:
            async for event in events:
                if request_id is None:
                    request_id = event.request_id
                    await self._send(_ENCODE(AcceptedOut(ref=ref, request_id=request_id)))
                if isinstance(event, TokenChunk) and not event.text:
                    continue  # structure with no text (a tool-call delta): not ours to show
                await self._send(_ENCODE(render(event, ref)))
        except ReaderStalled as stalled:
            # Cut slow_client, with its DLQ record; the connection closes.
            if request_id is not None:
                self._streams.cancel(request_id, str(stalled), ErrorCode.SLOW_CLIENT)
            self._cut(str(stalled))
            raise
        except RequestFailed as exc:
            detail = ErrorDetail(type=str(exc.code), message=schemas.failure_message(exc))
            rid = exc.request_id or request_id
            await self._send(_ENCODE(ErrorOut(ref=ref, request_id=rid, error=detail)))
        except MPipelineError as exc:
            # The pipeline client is closed or closing: the gateway is going down.
            detail = ErrorDetail(type=ErrorCode.SHUTTING_DOWN, message=str(exc))
            await self._send(_ENCODE(ErrorOut(ref=ref, request_id=request_id, error=detail)))
        finally:
            # Closing the iterator is what tells the pipeline client the reader left.
            await events.aclose()

    async def _send(self, message: bytes) -> None:
        """Send one message and wait while the client reads slower than we write.

        :raises ConnectionResetError: once the WebSocket is closing or closed
        """
        if self._protocol.state is not State.OPEN:
            raise ConnectionResetError("the WebSocket is closing")
        self._write(message)
        await self._wire.drain()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._spoke = self._loop.time()  # idle counts from the last request's end
        if self._stopping and not self.tasks:
            self._close(CloseCode.GOING_AWAY, "the gateway is shutting down")

    # Sending

    def _write(self, message: bytes) -> None:
        if self._protocol.state is State.OPEN:
            self._protocol.send_text(message)
            self._flush()

    def _close(self, code: CloseCode, reason: str) -> None:
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(code, reason)
            self._flush()

    def _flush(self) -> None:
        """Write what the protocol has to send; after a close, end the requests."""
        transport = self._transport
        for data in self._protocol.data_to_send():
            if data:
                self._wire.write(data)
            elif not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()  # the close handshake is done: the client closes TCP
        if self._protocol.close_expected() and self._close_timer is None:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT_S, transport.abort)
        if self._protocol.state is not State.OPEN:
            self._cancel_all()  # no data message can be sent any more

    def _cancel_all(self) -> None:
        for task in self.tasks:
            task.cancel()


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    await asyncio.wait(tasks)
