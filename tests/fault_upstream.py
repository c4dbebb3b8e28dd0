"""A scriptable OpenAI/Anthropic-compatible upstream, for fault injection only.

It speaks ``POST /v1/chat/completions`` and ``POST /v1/messages`` (streamed and
not) on raw asyncio streams rather than a framework, because its job is to
misbehave byte-precisely: hang before or after the headers, stop mid-stream,
cut a chunked body inside a chunk, send broken SSE or JSON. It runs its own
event loop in a background thread, so synchronous and asyncio tests alike can
use it, and ``stop()`` closes every connection, hung ones included. A hung
behaviour still notices when the client gives up, so ``open_connections`` and
``disconnects`` show whether a cancelled or timed-out call really let go.

Usage::

    with FaultUpstream() as up:
        up.script(Status(503, retry_after=2), Ok(tokens=["a", "b"]))
        ...  # point a worker at up.openai_url or up.url
        assert len(up.calls) == 2

Each request takes the next behaviour from the script, or ``default`` when it
is empty. With no tokens given, ``Ok`` echoes the last user message word by
word. ``Shaped`` answers with an OpenAI reply given whole (tool calls, a
refusal, logprobs, ``system_fingerprint``), streamed as the deltas given.
Every call is recorded (arrival ``time.monotonic()``, path, JSON body,
headers) so tests can count upstream calls, measure the gaps between them,
and check that a request arrived exactly as its client sent it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgspec

from tests import _fault_wire as wire

__all__ = [
    "AnthropicError",
    "Behaviour",
    "Call",
    "DropAfter",
    "FaultUpstream",
    "Hang",
    "HangAfterHeaders",
    "InvalidJSON",
    "MalformedSSE",
    "Ok",
    "Shaped",
    "StallAfter",
    "Status",
    "TruncatedChunked",
]


@dataclass(frozen=True)
class Ok:
    """A normal reply: ``tokens``, or ``text`` split into words, or the echo.

    ``usage=False`` leaves usage out (as some OpenAI-compatible servers do);
    ``cached_tokens`` is reported as prompt-cache hits.
    """

    tokens: list[str] | None = None
    text: str | None = None
    token_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    finish_reason: str = "stop"
    usage: bool = True
    cached_tokens: int = 0


@dataclass(frozen=True)
class Shaped:
    """An OpenAI reply with structure, as given.

    ``message`` is the assistant message of a reply that is not streamed;
    ``deltas`` are a stream's, one chunk each (after the role chunk). Every
    chunk and the completion carry ``extra`` at the top (``system_fingerprint``)
    and ``logprobs`` in their choice; ``usage`` replaces the usual counts.
    """

    message: dict[str, Any] | None = None
    deltas: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"
    extra: dict[str, Any] | None = None
    logprobs: Any = None
    usage: dict[str, Any] | None = None


@dataclass(frozen=True)
class Status:
    """Answer ``code`` with a JSON error body of the request's API, or with
    ``body`` as given (``Status(200, body=..., content_type="text/event-stream")``
    sends a hand-made stream)."""

    code: int
    retry_after: str | float | None = None
    body: bytes | None = None
    content_type: str = "application/json"


@dataclass(frozen=True)
class Hang:
    """Read the request and never answer."""


@dataclass(frozen=True)
class HangAfterHeaders:
    """Send the 200's headers, then nothing more."""


@dataclass(frozen=True)
class DropAfter:
    """Send ``n_tokens`` tokens, then close the socket without ending the body."""

    n_tokens: int


@dataclass(frozen=True)
class StallAfter:
    """Send ``n_tokens`` tokens, then keep the socket open and silent."""

    n_tokens: int


@dataclass(frozen=True)
class MalformedSSE:
    """One good token, then a line that is not SSE (an HTML page's)."""


@dataclass(frozen=True)
class InvalidJSON:
    """An event (or a whole body) whose JSON does not parse."""


@dataclass(frozen=True)
class TruncatedChunked:
    """A chunked body cut inside a chunk: the size says more than ever comes."""


@dataclass(frozen=True)
class AnthropicError:
    """Anthropic's in-stream ``error`` event after ``after_tokens`` tokens, or its
    status and error body when the request is not a stream (or is OpenAI's)."""

    type: str = "overloaded_error"
    after_tokens: int = 0


Behaviour = (
    Ok
    | Shaped
    | Status
    | Hang
    | HangAfterHeaders
    | DropAfter
    | StallAfter
    | MalformedSSE
    | InvalidJSON
    | TruncatedChunked
    | AnthropicError
)


@dataclass(frozen=True)
class Call:
    """One request as it arrived."""

    at: float
    path: str
    body: Any
    headers: dict[str, str]
    behaviour: Behaviour
    # Which connection it came on (1, 2, ...): equal numbers mean keep-alive reuse.
    connection: int


class _Closed(Exception):  # noqa: N818 - control flow inside the handler only
    """The behaviour ended the connection."""


class FaultUpstream:
    """The server; a context manager that starts and stops it."""

    def __init__(self, default: Behaviour | None = None) -> None:
        self.default: Behaviour = default if default is not None else Ok()
        self._script: collections.deque[Behaviour] = collections.deque()
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._connections = 0
        self._disconnects: list[tuple[int, float]] = []
        self.port = 0

    @property
    def url(self) -> str:
        """The root: an Anthropic ``base_url``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        """An OpenAI ``base_url`` (``/v1`` included)."""
        return self.url + "/v1"

    @property
    def open_connections(self) -> int:
        """Client connections open right now (hung and idle keep-alive ones included)."""
        return len(self._writers)

    @property
    def disconnects(self) -> list[tuple[int, float]]:
        """``(connection, time.monotonic())`` for each connection that has ended,
        so a test can tell when a cancelled call reached the upstream."""
        with self._lock:
            return list(self._disconnects)

    @property
    def calls(self) -> list[Call]:
        """A snapshot of every call so far, in arrival order."""
        with self._lock:
            return list(self._calls)

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, one each."""
        with self._lock:
            self._script.extend(behaviours)

    def _next(self) -> Behaviour:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def start(self) -> FaultUpstream:
        self._thread = threading.Thread(target=self._run, name="fault-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault upstream did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every connection (hung ones too), then the loop."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        fut.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> FaultUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._connection, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self._connections += 1
        conn = self._connections
        try:
            while await self._request(reader, writer, conn):
                pass
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels these; ending quietly keeps asyncio (3.11) from
            # logging the cancelled callback task as an error.
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()
            with self._lock:
                self._disconnects.append((conn, time.monotonic()))

    async def _request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int
    ) -> bool:
        """Serve one request; False when the connection should end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        _method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            body = None
        arrived = time.monotonic()
        # /v1/completions and /v1/embeddings are the openai API's too (scripted with Status).
        api = {"completions": "openai", "embeddings": "openai", "messages": "anthropic"}.get(
            path.rpartition("/")[2]
        )
        # A request neither API would take does not use up a scripted behaviour.
        behaviour: Behaviour
        if api is None:
            behaviour = Status(404)
        elif not isinstance(body, dict):
            behaviour = Status(400)
        else:
            behaviour = self._next()
        with self._lock:
            self._calls.append(Call(arrived, path, body, headers, behaviour, conn))
        stream = isinstance(body, dict) and bool(body.get("stream"))
        reply = wire.Exchange(api or "openai", stream, body, headers, reader, writer)
        if not isinstance(body, dict):
            body = reply.body = {}
        reply.model = str(body.get("model", reply.model))
        options = body.get("stream_options")
        reply.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        await _behave(reply, behaviour)
        return True


async def _until_closed(reply: wire.Exchange) -> None:
    """Say nothing more, until the client gives up and closes the connection."""
    while await reply.reader.read(65536):
        pass
    raise _Closed


def _drop(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()
    raise _Closed


async def _behave(reply: wire.Exchange, b: Behaviour) -> None:
    writer = reply.writer
    if isinstance(b, Hang):
        await _until_closed(reply)
    if isinstance(b, Status):
        body = b.body if b.body is not None else wire.error_body(reply, b.code)
        extra = () if b.retry_after is None else (("retry-after", str(b.retry_after)),)
        await wire.send(writer, b.code, body, extra, b.content_type)
        return
    if isinstance(b, Shaped):
        await _shaped(reply, b)
        return
    if isinstance(b, AnthropicError) and not (reply.stream and reply.api == "anthropic"):
        status = wire.ERROR_STATUS.get(b.type, 500)
        await wire.send(writer, status, wire.anthropic_error(b.type))
        return
    if isinstance(b, InvalidJSON) and not reply.stream:
        await wire.send(writer, 200, b'{"choices": [{"message": {"content": "x"}')
        return
    if not reply.stream:
        await _unary(reply, b)
        return
    await wire.start_stream(writer)
    if isinstance(b, HangAfterHeaders):
        await _until_closed(reply)
    if isinstance(b, TruncatedChunked):
        writer.write(b"400\r\n" + b"data: {" + b"x" * 40)
        await writer.drain()
        _drop(writer)
    if isinstance(b, InvalidJSON):
        await wire.chunk(writer, b"data: {not json\n\n")
        await wire.end_chunked(writer)
        return
    ok = b if isinstance(b, Ok) else Ok()
    tokens = _tokens(reply, ok)
    events = _render(reply, ok, tokens)
    await wire.chunk(writer, events.opening())
    limit: int | None = None
    if isinstance(b, DropAfter | StallAfter):
        limit = b.n_tokens
    elif isinstance(b, MalformedSSE):
        limit = 1
    elif isinstance(b, AnthropicError):
        limit = b.after_tokens
    for i, token in enumerate(tokens):
        if limit is not None and i >= limit:
            break
        delay = ok.first_token_delay_s if i == 0 else ok.token_delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        await wire.chunk(writer, events.token(token))
    if isinstance(b, DropAfter):
        _drop(writer)
    if isinstance(b, StallAfter):
        await _until_closed(reply)
    if isinstance(b, MalformedSSE):
        await wire.chunk(writer, b"<html><body>502 Bad Gateway</body></html>\n\n")
        await wire.end_chunked(writer)
        return
    if isinstance(b, AnthropicError):
        await wire.chunk(writer, b"event: error\ndata: " + wire.anthropic_error(b.type) + b"\n\n")
        await wire.end_chunked(writer)
        return
    await wire.chunk(writer, events.closing())
    await wire.end_chunked(writer)


def _render(reply: wire.Exchange, ok: Ok, tokens: list[str]) -> wire.Render:
    finish = ok.finish_reason
    if ok.tokens is None and ok.text is None and len(tokens) < len(wire.words(reply.body)):
        finish = "length"  # the echo was cut at the request's max_tokens
    return wire.Render(reply, tokens, finish=finish, usage=ok.usage, cached=ok.cached_tokens)


def _tokens(reply: wire.Exchange, ok: Ok) -> list[str]:
    if ok.tokens is not None:
        tokens = list(ok.tokens)
    elif ok.text is not None:
        tokens = wire.TOKEN.findall(ok.text)
    else:
        tokens = wire.words(reply.body)
    limit = reply.body.get("max_tokens")
    if isinstance(limit, int) and len(tokens) > limit:
        tokens = tokens[:limit]
    return tokens


async def _unary(reply: wire.Exchange, b: Behaviour) -> None:
    """A non-streamed reply, with the stream faults mapped onto a plain body."""
    writer = reply.writer
    ok = b if isinstance(b, Ok) else Ok()
    tokens = _tokens(reply, ok)
    delay = ok.first_token_delay_s + ok.token_delay_s * max(0, len(tokens) - 1)
    if delay > 0:
        await asyncio.sleep(delay)
    body = _render(reply, ok, tokens).whole()
    if isinstance(b, HangAfterHeaders):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        writer.write(b"content-length: %d\r\n\r\n" % len(body))
        await writer.drain()
        await _until_closed(reply)
    if isinstance(b, DropAfter | StallAfter):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        writer.write(b"content-length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
        await writer.drain()
        if isinstance(b, StallAfter):
            await _until_closed(reply)
        _drop(writer)
    if isinstance(b, TruncatedChunked):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n" % (len(body) + 100) + body)
        await writer.drain()
        _drop(writer)
    if isinstance(b, MalformedSSE):
        await wire.send(
            writer, 200, b"<html><body>502 Bad Gateway</body></html>", ctype="text/html"
        )
        return
    await wire.send(writer, 200, body)


async def _shaped(reply: wire.Exchange, b: Shaped) -> None:
    """A ``Shaped`` reply: the completion, or its chunks then usage (if asked) and [DONE]."""
    usage = b.usage or {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    head = {"id": "chatcmpl-shaped", "created": 1700000000, "model": reply.model, **(b.extra or {})}
    writer = reply.writer
    if not reply.stream:
        whole = {"index": 0, "message": b.message, "logprobs": b.logprobs}
        doc = {
            **head,
            "object": "chat.completion",
            "choices": [whole | {"finish_reason": b.finish_reason}],
        }
        await wire.send(writer, 200, msgspec.json.encode(doc | {"usage": usage}))
        return

    def event(choices: list[dict[str, Any]], **more: Any) -> bytes:
        doc = {**head, "object": "chat.completion.chunk", "choices": choices, **more}
        return b"data: " + msgspec.json.encode(doc) + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": b.logprobs, "finish_reason": finish}

    await wire.start_stream(writer)
    await wire.chunk(writer, event([choice({"role": "assistant", "content": None})]))
    for delta in b.deltas or []:
        await wire.chunk(writer, event([choice(delta)]))
    await wire.chunk(writer, event([choice({}, b.finish_reason)]))
    if reply.include_usage:
        await wire.chunk(writer, event([], usage=usage))
    await wire.chunk(writer, b"data: [DONE]\n\n")
    await wire.end_chunked(writer)
