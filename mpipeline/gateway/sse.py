"""Server-sent events: a pipeline stream turned into ``text/event-stream`` over time.

The status line is held back until the request's first event (or the first
keep-alive interval) so that a request refused at once (shed, invalid,
shutting down) still gets a real HTTP status; after that, errors travel as an
event. While the model has not produced a token, a comment line is sent every
``keepalive_s`` so proxies and clients do not time the connection out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Protocol, TypeVar

from mpipeline.errors import ErrorCode, ReaderStalled, RequestFailed
from mpipeline.gateway.exchange import Response
from mpipeline.messages import Completed, TokenChunk
from mpipeline.pipeline import Pipeline, RequestOptions

T = TypeVar("T")

CONTENT_TYPE = "text/event-stream; charset=utf-8"
HEADERS = (
    ("cache-control", "no-cache"),
    # nginx buffers responses unless told not to; a buffered stream is no stream.
    ("x-accel-buffering", "no"),
)
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

Event = TokenChunk | Completed


class Renderer(Protocol):
    """Turns pipeline events into SSE bytes for one route's format."""

    def opening(self) -> bytes: ...

    def render(self, event: Event) -> bytes: ...

    def failure(self, exc: RequestFailed) -> bytes: ...


def event(data: bytes, name: str | None = None) -> bytes:
    """One SSE event; ``data`` is single-line JSON (msgspec never writes a newline)."""
    head = b"event: %b\n" % name.encode() if name else b""
    return head + b"data: " + data + b"\n\n"


async def with_keepalive(
    source: AsyncGenerator[T, None], interval: float
) -> AsyncGenerator[T | None, None]:
    """Items of ``source``, and None whenever ``interval`` passes without one.

    The pending ``anext`` is awaited through ``asyncio.wait``, never cancelled by
    a timeout: cancelling it would end ``source`` in the middle of a stream.
    ``source`` is closed when this generator is.
    """
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait((pending,), timeout=interval)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait((pending,))
            if not pending.cancelled():
                pending.exception()  # retrieved: a late failure is not "never retrieved"
        await source.aclose()


def pipeline_events(
    pipeline: Pipeline, text: str, options: RequestOptions
) -> AsyncGenerator[Event, None]:
    """The request's chunks, then its ``Completed`` (``Pipeline.stream_events``).

    The pipeline's own generator, not a wrapper around it: closing it (a client
    that hung up) cancels the request at once, not when the loop collects an
    abandoned inner generator.

    :raises RequestFailed: as ``Pipeline.stream``, possibly after some chunks
    """
    return pipeline.stream_events(text, options)


# How a route stops a request whose reader stalled (``Pipeline.cancel``).
Cancel = Callable[[str, str, ErrorCode], bool]


async def respond(
    response: Response,
    events: AsyncGenerator[Event, None],
    renderer: Renderer,
    keepalive_s: float,
    cancel: Cancel | None = None,
) -> None:
    """Send ``events`` as an SSE response.

    A client that reads nothing for the stall timeout (``ReaderStalled``
    from a write) has its request cut ``slow_client`` through ``cancel``,
    with a DLQ record; its error event is queued without waiting, and the
    connection closes.

    :raises RequestFailed: if the request fails before its first event; nothing
        has been sent then, so the caller answers with an HTTP error status
    :raises ReaderStalled: after such a cut, so the connection is not reused
    """
    ticks = with_keepalive(events, keepalive_s)
    request_id = ""
    try:
        item = await anext(ticks)
        response.start_stream(200, HEADERS, CONTENT_TYPE)
        try:
            await response.write(renderer.opening())
            while True:
                if item is not None:
                    request_id = item.request_id
                await response.write(KEEPALIVE if item is None else renderer.render(item))
                if isinstance(item, Completed):
                    break
                try:
                    item = await anext(ticks)
                except RequestFailed as exc:
                    await response.write(renderer.failure(exc))
                    break
                except StopAsyncIteration:
                    break
        except ReaderStalled as stalled:
            if cancel is not None and request_id:
                cancel(request_id, str(stalled), ErrorCode.SLOW_CLIENT)
                with contextlib.suppress(StopAsyncIteration):
                    try:
                        await anext(ticks)
                    except RequestFailed as exc:  # the cut, once its DLQ record is written
                        response.write_nowait(renderer.failure(exc))
            raise
        await response.end()
    finally:
        await ticks.aclose()
