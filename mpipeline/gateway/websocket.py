"""``GET /v1/stream``: a WebSocket that carries several streamed prompts at once.

The connection stays on the gateway's own HTTP layer (``server.py``) up to
the head; the frames are the sans-I/O ``websockets.server.ServerProtocol``,
driven from the connection's callbacks. The library owns what is easy to get
wrong: the handshake checks and ``Sec-WebSocket-Accept``, masking, the size
limit (close 1009, checked from a frame's header, before its payload is
read), ping answers and the close handshake. This module owns what is ours:
joining fragments, UTF-8 (close 1007), the message protocol, one task per
request, and write backpressure. permessage-deflate is not offered: prompts
and chunks are small, and compression would cost CPU on the gateway's core
and open a decompression-bomb door for nothing.

Protocol. The client sends JSON text messages with the fields of
``POST /v1/prompt`` (``input``, and optionally ``session_id``, ``metadata``,
``priority``, ``deadline_ms``, ``max_tokens``; ``stream`` is accepted and
ignored) plus an optional ``ref``, any string of its own, echoed in every
message about that request. The server answers with JSON text messages::

    {"type":"accepted","ref":..,"request_id":..}        before the first chunk
    {"type":"chunk","request_id":..,"index":..,"text":..,"ref":..}
    {"type":"done","request_id":..,"session_id":..,"text":..,"finish_reason":..,
     "usage":{..},"timings":{..},"ref":..}                   (/v1/prompt's result)
    {"type":"error","ref":..,"request_id":..,"error":{"type":..,"message":..,"field":..}}

``ref`` is null when the client sent none. A request ends with exactly one
``done`` or ``error``. Messages of one request are in order; requests run
concurrently (each its own task, at most ``MAX_IN_FLIGHT`` per connection),
so messages of different requests interleave. A message that is not a valid
request (bad JSON, a wrong field, a binary message, a ``model`` there is none
of: ``model_not_found``, resolved here as ``POST /v1/prompt`` resolves it)
gets an ``error`` without ``request_id`` and the connection stays open: the
client may be mid-way through other requests. Binary messages get an ``error`` rather than a close
1003 for the same reason. Failures of the pipeline carry its error code as the
type (``deadline_exceeded``, ``ring_full``...), as the HTTP routes do.

A socket that goes away (or a close from the client) cancels every request of
the connection: each task is cancelled and its ``stream_events`` iterator
closed at once. When the gateway stops, new requests are refused
(``shutting_down``), those in flight finish, then the server closes with 1001.

The handshake (``accept``) and the gateway's WebSocket style (``WebSocketApi``)
are here; the session after the switch is ``websocket_session.py``. Handshake
refusals are HTTP answers in mpipeline's native error shape, and so is the
rate limits' refusal that a message's ``error`` carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

from mpipeline.errors import ErrorCode
from mpipeline.gateway import deadlines, schemas
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.exchange import Reply, Request, Switch, Wire
from mpipeline.gateway.models import Models
from mpipeline.gateway.style import Handler, Upgrade
from mpipeline.gateway.websocket_messages import Event
from mpipeline.gateway.websocket_session import (
    KEEPALIVE,
    MAX_IN_FLIGHT,
    Admit,
    KeepAlive,
    Resolve,
    Session,
    Streams,
)
from mpipeline.pipeline import RequestOptions

__all__ = [
    "MAX_IN_FLIGHT",
    "PATH",
    "VERSION",
    "Admit",
    "KeepAlive",
    "Refusal",
    "Resolve",
    "Session",
    "Streams",
    "WebSocketApi",
    "WithDeadline",
    "accept",
]

PATH = "/v1/stream"
VERSION = "13"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A handshake answered with an HTTP error instead of a switch."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def accept(
    request: Request,
    streams: Streams,
    *,
    max_message: int,
    admit: Admit | None = None,
    keepalive: KeepAlive = KEEPALIVE,
    resolve: Resolve | None = None,
) -> Refusal | Switch:
    """Check the handshake of ``request``; the switch that starts the session, or why not.

    ``max_message`` bounds a message, fragments together (close 1009 above it);
    ``admit`` is asked about every request before it reaches the pipeline;
    ``keepalive`` says when a quiet session is pinged and an idle one closed;
    ``resolve`` turns each message's ``model`` into its model's key, or refuses it.
    """
    version = request.header("sec-websocket-version")
    if version is not None and version != VERSION:
        # RFC 6455 4.4: 426 naming the versions we speak, so the client can retry.
        message = f"WebSocket version {version} is not supported; use {VERSION}"
        return Refusal(426, message, (("sec-websocket-version", VERSION),))
    # Our parser has read the head, so the library only checks it here; the
    # session's frames get a protocol of their own that starts OPEN (one made
    # CONNECTING would wait to parse the request from the socket).
    handshake = ServerProtocol()
    target = f"{request.path}?{request.query}" if request.query else request.path
    response = handshake.accept(WsRequest(target, Headers(request.headers.items())))
    if response.status_code != 101:
        text = bytes(response.body).decode(errors="replace").strip()
        message = text.splitlines()[0].removesuffix(".") if text else response.reason_phrase
        keep = {"upgrade", "allow"}
        headers = tuple(
            (k.lower(), v) for k, v in response.headers.raw_items() if k.lower() in keep
        )
        return Refusal(response.status_code, message, headers)

    def switch(transport: asyncio.Transport, wire: Wire) -> Session:
        protocol = ServerProtocol(state=State.OPEN, max_size=max_message)
        switching = response.serialize()
        return Session(transport, wire, protocol, switching, streams, admit, keepalive, resolve)

    return switch


class WebSocketApi(schemas.NativeErrors):
    """The WebSocket style (``style.ApiStyle``): the switch on ``GET /v1/stream``.

    It has no plain HTTP route of its own: a ``GET /v1/stream`` without
    ``Upgrade`` is the native style's 426. Its errors are in the native shape.
    """

    routes: Mapping[str, Mapping[str, Handler]] = {}
    prefixes: tuple[str, ...] = ()

    def __init__(
        self,
        streams: Streams,
        *,
        max_message: int,
        admission: Admission,
        keepalive: KeepAlive = KEEPALIVE,
        models: Models | None = None,
    ) -> None:
        self._streams = streams
        self._max_message = max_message
        self._admission = admission
        self._keepalive = keepalive
        # Resolves each message's ``model`` here, as POST /v1/prompt does; None: the shard does.
        self._models = models
        self.upgrades: dict[str, Upgrade] = {PATH: self.upgrade}

    def upgrade(self, request: Request) -> Reply | Switch:
        deadline_ms = deadlines.requested_ms(request, stream=True)
        if isinstance(deadline_ms, schemas.Problem):
            return self.error_reply(400, deadline_ms.message, field=deadline_ms.field)
        streams = self._streams
        if deadline_ms is not None:
            streams = WithDeadline(streams, deadline_ms)
        opened = accept(
            request,
            streams,
            max_message=self._max_message,
            admit=self.admit,
            keepalive=self._keepalive,
            resolve=None if self._models is None else self.resolve,
        )
        if isinstance(opened, Refusal):
            return self.error_reply(opened.status, opened.message, headers=opened.headers)
        return opened

    def admit(self, session: str | None) -> Reply | None:
        """The rate limits for one message's request: None, or the 429 whose error it gets."""
        refused = self._admission.check(session)
        return None if refused is None else self.rate_limited(refused)

    def resolve(self, name: str) -> str | schemas.Problem:
        """A message's ``model`` as its model's key, or the 404 ``model_not_found``."""
        assert self._models is not None
        model = self._models.resolve(name)
        return model if isinstance(model, schemas.Problem) else model.key


class WithDeadline:
    """The pipeline as one connection's requests see it: the handshake's
    ``X-Request-Timeout`` is the deadline of each that names none (``deadline_ms``)."""

    def __init__(self, streams: Streams, deadline_ms: float) -> None:
        self._streams = streams
        self._deadline_ms = deadline_ms

    def stream_events(
        self, text: str, options: RequestOptions | None = None, /
    ) -> AsyncIterator[Event]:
        if options is None:
            options = RequestOptions(deadline_ms=self._deadline_ms)
        elif options.deadline_ms is None:
            options = msgspec.structs.replace(options, deadline_ms=self._deadline_ms)
        return self._streams.stream_events(text, options)

    def cancel(self, request_id: str, reason: str, code: ErrorCode) -> bool:
        return self._streams.cancel(request_id, reason, code)
