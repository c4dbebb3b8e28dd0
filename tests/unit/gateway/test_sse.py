"""SSE plumbing: keep-alive ticks, closing the source, errors before and after the head."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import cast

import pytest

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import sse
from mpipeline.gateway.exchange import Response
from mpipeline.messages import Completed, Failed, TokenChunk, Usage


class FakeResponse:
    def __init__(self) -> None:
        self.status: int | None = None
        self.data = b""
        self.ended = False

    def start_stream(self, status: int, headers: object, content_type: str) -> None:
        self.status = status

    async def write(self, data: bytes) -> None:
        self.data += data

    async def end(self) -> None:
        self.ended = True


class Lines:
    def opening(self) -> bytes:
        return b"open\n"

    def render(self, event: sse.Event) -> bytes:
        return f"{type(event).__name__}\n".encode()

    def failure(self, exc: RequestFailed) -> bytes:
        return f"failed {exc.code}\n".encode()


def _chunk(i: int) -> TokenChunk:
    return TokenChunk(request_id="r", session_id=None, reply_to=0, index=i, text="t")


def _done() -> Completed:
    usage = Usage(prompt_tokens=1, completion_tokens=1)
    return Completed(request_id="r", session_id=None, reply_to=0, text="t", usage=usage)


def _failure() -> RequestFailed:
    return RequestFailed(
        Failed(
            request_id="r",
            session_id=None,
            reply_to=0,
            code=ErrorCode.DEADLINE_EXCEEDED,
            reason="late",
            stage="inference",
        )
    )


def test_event_format() -> None:
    assert sse.event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert sse.event(b"{}", "done") == b"event: done\ndata: {}\n\n"


def test_keepalive_ticks_while_waiting_and_closes_the_source() -> None:
    closed = []

    async def slow() -> AsyncGenerator[int, None]:
        try:
            await asyncio.sleep(0.1)
            yield 1
            yield 2
        finally:
            closed.append(True)

    async def main() -> list[int | None]:
        return [item async for item in sse.with_keepalive(slow(), 0.02)]

    items = asyncio.run(main())
    assert items[-2:] == [1, 2] and None in items and set(items[:-2]) == {None}
    assert closed == [True]


def test_closing_early_cancels_a_pending_item() -> None:
    closed = []

    async def never() -> AsyncGenerator[int, None]:
        try:
            await asyncio.sleep(30)
            yield 1
        finally:
            closed.append(True)

    async def main() -> None:
        ticks = sse.with_keepalive(never(), 0.01)
        assert await anext(ticks) is None
        await ticks.aclose()

    asyncio.run(asyncio.wait_for(main(), 5))
    assert closed == [True]


def test_failure_before_the_first_event_sends_nothing() -> None:
    async def refused() -> AsyncGenerator[sse.Event, None]:
        raise _failure()
        yield _done()  # pragma: no cover - makes this a generator

    response = FakeResponse()
    with pytest.raises(RequestFailed):
        asyncio.run(sse.respond(cast(Response, response), refused(), Lines(), 1.0))
    assert response.status is None and response.data == b""


def test_stream_then_failure_becomes_an_event() -> None:
    async def broken() -> AsyncGenerator[sse.Event, None]:
        yield _chunk(0)
        await asyncio.sleep(0.05)
        raise _failure()

    response = FakeResponse()
    asyncio.run(sse.respond(cast(Response, response), broken(), Lines(), 0.01))
    assert response.status == 200 and response.ended
    lines = response.data.decode().splitlines()
    assert lines[:2] == ["open", "TokenChunk"]
    assert lines[-1] == "failed deadline_exceeded"
    assert sse.KEEPALIVE.decode().strip() in lines


def test_stream_ends_at_completed() -> None:
    async def ok() -> AsyncGenerator[sse.Event, None]:
        yield _chunk(0)
        yield _done()

    response = FakeResponse()
    asyncio.run(sse.respond(cast(Response, response), ok(), Lines(), 1.0))
    assert response.data == b"open\nTokenChunk\nCompleted\n" and response.ended
