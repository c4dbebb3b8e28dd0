"""The client library's own paths, without a pipeline: its outbox and its stream buffers.

Issue 15 found a request that wedged a gateway replica for good: a
``max_tokens`` of 2^64 passed the schema, the outbox's batch encode raised,
and the batch stayed at the head of the outbox, so every later request
waited out its deadline while ``/readyz`` stayed green. It also found that a
stream's chunks waited in an unbounded queue for a reader that never read.
These tests drive the outbox against a real ring and the in-flight table
with a recording board (the control block's pause and cancel boards).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import msgspec
import pytest

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import PromptRequest, TokenChunk
from mpipeline.pipeline._chunks import HARD_LIMIT, HIGH_WATER, LOW_WATER, ChunkBuffer
from mpipeline.pipeline._inflight import Inflight, Pending
from mpipeline.pipeline._outbox import Outbox
from mpipeline.ring import Ring


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (the suite has no async plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def _stats() -> dict[str, int]:
    return {"submitted": 0, "completed": 0, "failed": 0, "late": 0, "gone": 0}


def _request(i: int, **fields: object) -> PromptRequest:
    return PromptRequest(
        request_id=f"r{i}",
        session_id=None,
        input=f"hello {i}",
        deadline_ns=time.monotonic_ns() + 60 * 10**9,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring.create(64 * 1024)
    try:
        yield r
    finally:
        r.close()
        r.unlink()


def _pending(table: Inflight, req: PromptRequest, stream: bool = False) -> Pending:
    loop = asyncio.get_running_loop()
    p = Pending(req, req.deadline_ns, loop.create_future(), 0, ChunkBuffer() if stream else None)
    table.add(p)
    return p


def _written(ring: Ring) -> list[str]:
    ids = []
    decode = msgspec.msgpack.Decoder(list[PromptRequest]).decode
    while (view := ring.try_get()) is not None:
        ids += [r.request_id for r in decode(view)]
    return ids


@sync
async def test_outbox_fails_only_the_request_it_cannot_encode(ring: Ring) -> None:
    table = Inflight(_stats())
    outbox = Outbox([ring], "rag", table)
    loop = asyncio.get_running_loop()
    good = [_pending(table, _request(i)) for i in (1, 3)]
    # Past 2^64: msgpack has no such integer (it once poisoned the whole batch).
    bad = _pending(table, _request(2, max_tokens=2**64))
    for p in (good[0], bad, good[1]):
        outbox.put(p.request, loop)
    await asyncio.sleep(0)
    assert _written(ring) == ["r1", "r3"]
    with pytest.raises(RequestFailed) as info:
        await asyncio.wait_for(bad.future, 5)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert "cannot be encoded" in str(info.value)
    # The outbox is not wedged: the next request goes out at once.
    later = _pending(table, _request(4))
    outbox.put(later.request, loop)
    await asyncio.sleep(0)
    assert _written(ring) == ["r4"]
    assert outbox.stalled_s() == 0.0


@sync
async def test_outbox_answers_a_request_too_large_for_a_record_at_once(ring: Ring) -> None:
    table = Inflight(_stats())
    outbox = Outbox([ring], "rag", table)
    huge = _pending(table, _request(1, metadata={"k": "v" * ring.max_record}))
    small = _pending(table, _request(2))
    outbox.put(huge.request, asyncio.get_running_loop())
    outbox.put(small.request, asyncio.get_running_loop())
    await asyncio.sleep(0)
    assert _written(ring) == ["r2"]
    with pytest.raises(RequestFailed) as info:
        await asyncio.wait_for(huge.future, 5)
    assert info.value.code is ErrorCode.TOO_LARGE


@sync
async def test_outbox_reports_how_long_requests_wait_for_a_full_ring() -> None:
    tiny = Ring.create(4096)
    try:
        table = Inflight(_stats())
        outbox = Outbox([tiny], "rag", table)
        loop = asyncio.get_running_loop()
        for i in range(200):  # far more than 4 kB: nobody reads this ring
            outbox.put(_pending(table, _request(i)).request, loop)
        await asyncio.sleep(0.3)
        assert outbox.stalled_s() >= 0.25
        _written(tiny)  # a reader frees the ring: the outbox moves again
        await asyncio.sleep(0.1)
        assert outbox.stalled_s() < 0.25
    finally:
        table.fail_all(ErrorCode.SHUTTING_DOWN, "test over")
        await asyncio.sleep(0)
        tiny.close()
        tiny.unlink()


class Board:
    """Records what the table posts on the control block's boards."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def pause(self, client: int, request_id: str) -> None:
        self.calls.append(("pause", request_id))

    def resume(self, client: int, request_id: str) -> None:
        self.calls.append(("resume", request_id))

    def cancel(self, client: int, request_id: str) -> None:
        self.calls.append(("cancel", request_id))


def _chunk(rid: str, i: int) -> TokenChunk:
    return TokenChunk(request_id=rid, session_id=None, reply_to=0, index=i, text=f"t{i} ")


@sync
async def test_a_slow_reader_pauses_its_stream_and_resumes_it_at_the_low_mark() -> None:
    table = Inflight(_stats())
    board = table.board = Board()
    p = _pending(table, _request(1, stream=True), stream=True)
    chunks = p.chunks
    assert chunks is not None
    for i in range(HIGH_WATER - 1):
        table.deliver(_chunk("r1", i))
    assert board.calls == []
    table.deliver(_chunk("r1", HIGH_WATER - 1))
    assert board.calls == [("pause", "r1")]
    assert "r1" in table.paused
    # The reader takes chunks; the pause holds until the low mark (hysteresis).
    while len(chunks) > LOW_WATER + 1:
        chunks.take()
        table.taken(p, chunks)
    assert board.calls == [("pause", "r1")]
    chunks.take()
    table.taken(p, chunks)
    assert board.calls == [("pause", "r1"), ("resume", "r1")]
    assert table.paused == {}


@sync
async def test_a_reader_that_stalls_past_the_timeout_is_cut_slow_client() -> None:
    table = Inflight(_stats())
    board = table.board = Board()
    p = _pending(table, _request(1, stream=True), stream=True)
    for i in range(HIGH_WATER):
        table.deliver(_chunk("r1", i))
    assert p.chunks is not None
    table.cut_stalled(p.chunks.paused_ns - 1, 30)  # not yet
    assert not p.future.done()
    table.cut_stalled(p.chunks.paused_ns + 1, 30)
    with pytest.raises(RequestFailed) as info:
        await asyncio.wait_for(p.future, 5)
    assert info.value.code is ErrorCode.SLOW_CLIENT
    assert "took nothing for 30 s" in str(info.value)
    # Its work is cancelled, its pause lifted, its unread chunks dropped for the error.
    assert board.calls == [("pause", "r1"), ("cancel", "r1"), ("resume", "r1")]
    assert len(p.chunks) == 0
    assert table.pending == {} and table.paused == {}


@sync
async def test_chunks_past_the_hard_limit_cut_the_stream() -> None:
    table = Inflight(_stats())
    table.board = Board()
    p = _pending(table, _request(1, stream=True), stream=True)
    for i in range(HARD_LIMIT + 1):  # a pause that did not take (a board collision)
        table.deliver(_chunk("r1", i))
    with pytest.raises(RequestFailed) as info:
        await asyncio.wait_for(p.future, 5)
    assert info.value.code is ErrorCode.SLOW_CLIENT
    assert "behind" in str(info.value)
    table.deliver(_chunk("r1", HARD_LIMIT + 1))  # late chunks find nothing: never twice
    assert table.stats["failed"] == 1


@sync
async def test_a_completed_stream_lifts_its_pause() -> None:
    table = Inflight(_stats())
    board = table.board = Board()
    p = _pending(table, _request(1, stream=True), stream=True)
    for i in range(HIGH_WATER):
        table.deliver(_chunk("r1", i))
    from mpipeline.messages import Completed, Usage

    done = Completed(
        request_id="r1",
        session_id=None,
        reply_to=0,
        text="",
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=HIGH_WATER),
    )
    table.deliver(done)
    assert board.calls == [("pause", "r1"), ("resume", "r1")]
    assert (await p.future) is done
