"""Phase timeouts around one upstream call: first token, between tokens, total, deadline.

A single total timeout cannot tell a slow model from a dead one: a stream that
stalls after three tokens (scenario 27) would hold its client for the whole
``total_s``. So a streamed call gets one limit per phase, and whichever ends
first (or the request's deadline) fails the call with a message naming it.

Cost: one timer per call, not one per token. Each token only moves the
due time forward (a float store); the timer, when it fires early, re-arms
itself for the current due time, so a fast stream re-arms about once per
``between_tokens_s`` instead of cancelling and scheduling a ``TimerHandle`` per
token as ``asyncio.timeout`` would. The timer cancels the task only while it
waits on the upstream, never while the consumer handles a token, so the
consumer's time never counts against the upstream and its own awaits are
never interrupted.

Phase timeouts raise ``UpstreamFailure(code=UPSTREAM_TIMEOUT, retryable=True,
counts=True)``: a silent upstream is an unhealthy one. The request's deadline
raises ``code=DEADLINE_EXCEEDED``, neither retryable (no time is left) nor
counted (a client's short deadline says nothing about the upstream).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

from mpipeline.config import TimeoutsConfig
from mpipeline.errors import ErrorCode, UpstreamFailure

T = TypeVar("T")

FIRST, BETWEEN, TOTAL, DEADLINE = "first token", "between tokens", "total", "deadline"


class _Watch:
    """The one timer of a streamed call; cancels ``task`` only while ``waiting``."""

    __slots__ = ("armed_at", "due", "fired", "handle", "loop", "phase", "task", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object]) -> None:
        self.loop = loop
        self.task = task
        self.due = 0.0
        self.phase = FIRST
        self.armed_at = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.waiting = False
        self.fired = False

    def set_due(self, due: float, phase: str) -> None:
        self.due = due
        self.phase = phase
        # A later due time needs nothing: the timer re-arms itself when it fires.
        if self.handle is None or due < self.armed_at:
            if self.handle is not None:
                self.handle.cancel()
            self.armed_at = due
            self.handle = self.loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self.handle = None
        if self.loop.time() < self.due:
            self.armed_at = self.due
            self.handle = self.loop.call_at(self.due, self._fire)
        elif self.waiting and not self.fired:
            self.fired = True
            self.task.cancel()
        # Not waiting: the consumer has the token; the next wait checks the due time.

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def _loop_deadline(loop: asyncio.AbstractEventLoop, deadline_ns: int) -> float:
    """``deadline_ns`` (``time.monotonic_ns``) on the loop's clock, which uvloop keeps apart."""
    return loop.time() + (deadline_ns - time.monotonic_ns()) / 1e9


def _failure(phase: str, timeouts: TimeoutsConfig, upstream: str) -> UpstreamFailure:
    if phase == DEADLINE:
        return UpstreamFailure(
            f"{upstream}: the request's deadline passed during the call",
            code=ErrorCode.DEADLINE_EXCEEDED,
            retryable=False,
            counts=False,
        )
    message = {
        FIRST: f"no first token within {timeouts.first_token_s:g} s",
        BETWEEN: f"no token for {timeouts.between_tokens_s:g} s mid-stream",
        TOTAL: f"call took longer than its total {timeouts.total_s:g} s",
    }[phase]
    return UpstreamFailure(
        f"{upstream} timed out: {message}",
        code=ErrorCode.UPSTREAM_TIMEOUT,
        retryable=True,
        counts=True,
    )


async def phased(
    stream: AsyncIterator[str], timeouts: TimeoutsConfig, deadline_ns: int, *, upstream: str
) -> AsyncGenerator[str, None]:
    """``stream``'s tokens, failing it when a phase timeout or the deadline passes.

    ``stream`` is closed (``aclose``) however this ends. ``deadline_ns`` is a
    ``time.monotonic_ns`` instant; 0 means none.

    :raises UpstreamFailure: ``upstream_timeout`` naming the phase, or
        ``deadline_exceeded``; whatever ``stream`` raises passes through
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None, "phased() must run inside a task"
    start = loop.time()
    end, end_phase = start + timeouts.total_s, TOTAL
    if deadline_ns:
        deadline = _loop_deadline(loop, deadline_ns)
        if deadline < end:
            end, end_phase = deadline, DEADLINE
    watch = _Watch(loop, task)
    first = start + timeouts.first_token_s
    if first < end:
        watch.set_due(first, FIRST)
    else:
        watch.set_due(end, end_phase)
    between = timeouts.between_tokens_s
    cancelling = task.cancelling()
    next_token = stream.__anext__
    try:
        while True:
            watch.waiting = True
            try:
                token = await next_token()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if watch.fired and task.uncancel() <= cancelling:
                    raise _failure(watch.phase, timeouts, upstream) from None
                raise
            finally:
                watch.waiting = False
            if watch.fired:  # the stream swallowed our cancellation: the time is up all the same
                task.uncancel()
                raise _failure(watch.phase, timeouts, upstream)
            yield token
            # The gap is timed from here: the consumer's time is not the upstream's.
            now = loop.time()
            if now >= end:
                raise _failure(end_phase, timeouts, upstream)
            if now + between < end:
                watch.set_due(now + between, BETWEEN)
            else:
                watch.set_due(end, end_phase)
    finally:
        watch.stop()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def bounded(
    call: Awaitable[T], timeouts: TimeoutsConfig, deadline_ns: int, *, upstream: str
) -> T:
    """Await a non-streamed call within ``total_s`` and the deadline.

    ``first_token_s`` does not apply: a non-streamed reply's first byte comes
    only once the whole reply is generated.

    :raises UpstreamFailure: ``upstream_timeout`` or ``deadline_exceeded``
    """
    loop = asyncio.get_running_loop()
    end, phase = loop.time() + timeouts.total_s, TOTAL
    if deadline_ns:
        deadline = _loop_deadline(loop, deadline_ns)
        if deadline < end:
            end, phase = deadline, DEADLINE
    cm = asyncio.timeout_at(end)
    try:
        async with cm:
            return await call
    except TimeoutError:
        if cm.expired():
            raise _failure(phase, timeouts, upstream) from None
        raise
