"""Phase timeouts: each phase fails with its own message, the consumer's time is not
the upstream's, outside cancellation passes through, and the inner stream is closed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

import pytest
import uvloop

from mpipeline.config import TimeoutsConfig
from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.resilience.timeouts import bounded, phased

SHORT = 0.05
LONG = 30.0


def limits(first: float = LONG, between: float = LONG, total: float = LONG) -> TimeoutsConfig:
    return TimeoutsConfig(first_token_s=first, between_tokens_s=between, total_s=total)


class Upstream:
    """A scripted token stream: ``delays[i]`` seconds before token i, then maybe a stall."""

    def __init__(self, delays: list[float], stall: bool = False) -> None:
        self.delays = delays
        self.stall = stall
        self.closed = False

    async def stream(self) -> AsyncIterator[str]:
        try:
            for i, delay in enumerate(self.delays):
                await asyncio.sleep(delay)
                yield f"t{i}"
            if self.stall:
                await asyncio.sleep(LONG)
        finally:
            self.closed = True


async def collect(
    up: Upstream, cfg: TimeoutsConfig, deadline_ns: int = 0, pause: float = 0.0
) -> list[str]:
    out: list[str] = []
    async for token in phased(up.stream(), cfg, deadline_ns, upstream="fake"):
        out.append(token)
        if pause:
            await asyncio.sleep(pause)
    return out


def timed_failure(coro: Awaitable[object]) -> tuple[UpstreamFailure, float]:
    async def go() -> tuple[UpstreamFailure, float]:
        start = time.monotonic()
        with pytest.raises(UpstreamFailure) as info:
            await coro
        return info.value, time.monotonic() - start

    return asyncio.run(go())


def test_a_healthy_stream_passes_through_and_is_closed() -> None:
    up = Upstream([0, 0, 0])
    assert asyncio.run(collect(up, limits(first=SHORT, between=SHORT))) == ["t0", "t1", "t2"]
    assert up.closed


def test_first_token_timeout() -> None:
    up = Upstream([LONG])
    exc, took = timed_failure(collect(up, limits(first=SHORT)))
    assert "no first token within 0.05 s" in str(exc) and "fake" in str(exc)
    assert exc.code == ErrorCode.UPSTREAM_TIMEOUT and exc.retryable and exc.counts
    assert SHORT <= took < 1.0
    assert up.closed


def test_a_stall_mid_stream_hits_the_between_tokens_timeout() -> None:
    up = Upstream([0, 0, 0], stall=True)
    seen: list[str] = []

    async def go() -> None:
        async for token in phased(up.stream(), limits(between=SHORT), 0, upstream="fake"):
            seen.append(token)  # noqa: PERF401 - keeps what came before the failure

    exc, took = timed_failure(go())
    assert seen == ["t0", "t1", "t2"]
    assert "mid-stream" in str(exc) and exc.counts
    assert took < 1.0 and up.closed


def test_total_timeout_on_a_slow_but_steady_stream() -> None:
    up = Upstream([0.01] * 1000)
    exc, took = timed_failure(collect(up, limits(between=1.0, total=0.1)))
    assert "total 0.1 s" in str(exc) and exc.code == ErrorCode.UPSTREAM_TIMEOUT
    assert 0.1 <= took < 1.0


def test_the_request_deadline_is_not_the_upstreams_fault() -> None:
    up = Upstream([LONG])
    deadline = time.monotonic_ns() + int(SHORT * 1e9)
    exc, took = timed_failure(collect(up, limits(), deadline_ns=deadline))
    assert exc.code == ErrorCode.DEADLINE_EXCEEDED
    assert not exc.retryable and not exc.counts
    assert took < 1.0


def test_time_the_consumer_takes_does_not_count() -> None:
    up = Upstream([0, 0, 0])
    # Each token waits 2x the between-tokens limit in the consumer, not upstream.
    out = asyncio.run(collect(up, limits(first=SHORT, between=SHORT / 2), pause=SHORT))
    assert out == ["t0", "t1", "t2"]


def test_outside_cancellation_passes_through() -> None:
    up = Upstream([LONG])

    async def go() -> None:
        task = asyncio.create_task(collect(up, limits(first=LONG)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert up.closed


def test_stopping_early_closes_the_upstream() -> None:
    up = Upstream([0] * 10)

    async def go() -> None:
        tokens = phased(up.stream(), limits(), 0, upstream="fake")
        async for _ in tokens:
            break
        await tokens.aclose()

    asyncio.run(go())
    assert up.closed


def test_a_stream_that_swallows_the_cancellation_still_times_out() -> None:
    async def stubborn() -> AsyncIterator[str]:
        try:
            await asyncio.sleep(LONG)
        except asyncio.CancelledError:
            pass
        yield "late"

    async def go() -> None:
        async for _ in phased(stubborn(), limits(first=SHORT), 0, upstream="fake"):
            pass

    exc, _ = timed_failure(go())
    assert "first token" in str(exc)


def test_bounded_non_streamed_calls() -> None:
    async def reply(delay: float) -> str:
        await asyncio.sleep(delay)
        return "done"

    assert asyncio.run(bounded(reply(0), limits(total=1.0), 0, upstream="fake")) == "done"
    exc, took = timed_failure(bounded(reply(LONG), limits(total=SHORT), 0, upstream="fake"))
    assert exc.code == ErrorCode.UPSTREAM_TIMEOUT and "total" in str(exc) and took < 1.0
    deadline = time.monotonic_ns() + int(SHORT * 1e9)
    exc, _ = timed_failure(bounded(reply(LONG), limits(), deadline, upstream="fake"))
    assert exc.code == ErrorCode.DEADLINE_EXCEEDED


def test_bounded_lets_a_calls_own_timeout_error_through() -> None:
    async def own() -> str:
        raise TimeoutError("the call's own")

    with pytest.raises(TimeoutError, match="the call's own"):
        asyncio.run(bounded(own(), limits(), 0, upstream="fake"))


def test_uvloop_clock_and_deadline() -> None:
    """uvloop keeps its own clock (libuv's, in ms): deadlines are converted, not compared raw."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        up = Upstream([0, 0])
        assert runner.run(collect(up, limits(first=SHORT, between=SHORT))) == ["t0", "t1"]
        deadline = time.monotonic_ns() + int(SHORT * 1e9)
        start = time.monotonic()
        with pytest.raises(UpstreamFailure) as info:
            runner.run(collect(Upstream([LONG]), limits(), deadline_ns=deadline))
        assert info.value.code == ErrorCode.DEADLINE_EXCEEDED
        assert SHORT - 0.005 <= time.monotonic() - start < 1.0
