"""Coalescing and the result cache: one leader per key, every waiter answered alike
(tokens, result or error), late joiners replay, abandoned flights are cancelled."""

from __future__ import annotations

import asyncio

import pytest

from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.resilience.dedup import CachedResult, Coalescer, Flight, ResultCache

WAITERS = 100
TOKENS = ["a", "b", "c", "d"]


async def follow(flight: Flight) -> tuple[list[str], CachedResult]:
    """What one waiter sees: the tokens, then the result."""
    try:
        seen = [token async for token in flight.tokens()]
        return seen, await flight.result()
    except asyncio.CancelledError:
        flight.leave()
        raise


async def lead(flight: Flight, calls: list[int], fail: BaseException | None = None) -> None:
    """A leader's call: four tokens, a loop turn between each, then the end."""
    calls.append(1)
    try:
        for token in TOKENS:
            await asyncio.sleep(0)
            flight.push(token)
        if fail is not None:
            raise fail
    except BaseException as exc:
        flight.fail(exc)
        if not isinstance(exc, Exception):
            raise
        return
    flight.finish(CachedResult(text="".join(TOKENS), tokens=tuple(TOKENS), completion_tokens=4))


async def request(
    coalescer: Coalescer, calls: list[int], fail: BaseException | None = None
) -> tuple[list[str], CachedResult]:
    """One request: lead the flight in a task of its own, or join it; then follow it."""
    flight, leader = coalescer.join("k")
    if not leader:
        return await follow(flight)
    task = asyncio.get_running_loop().create_task(lead(flight, calls, fail))
    flight.on_abandon(task.cancel)
    try:
        return await follow(flight)
    finally:
        await asyncio.gather(task, return_exceptions=True)


def test_concurrent_identical_requests_share_one_call() -> None:
    async def go() -> None:
        coalescer, calls = Coalescer(), list[int]()
        results = await asyncio.gather(*(request(coalescer, calls) for _ in range(WAITERS)))
        assert len(calls) == 1
        assert coalescer.led == 1 and coalescer.joined == WAITERS - 1
        assert all(seen == TOKENS for seen, _ in results)
        assert len({id(result) for _, result in results}) == 1
        assert results[0][1].text == "abcd"
        assert len(coalescer) == 0  # gone from the table as soon as it ended
        # The next request starts a new call.
        await request(coalescer, calls)
        assert len(calls) == 2

    asyncio.run(go())


def test_every_waiter_gets_the_same_error() -> None:
    async def go() -> None:
        coalescer, calls = Coalescer(), list[int]()
        boom = UpstreamFailure("upstream said 500", retryable=True)
        outcomes = await asyncio.gather(
            *(request(coalescer, calls, boom) for _ in range(WAITERS)), return_exceptions=True
        )
        assert len(calls) == 1
        assert all(o is boom for o in outcomes)
        assert len(coalescer) == 0

    asyncio.run(go())


def test_a_cancelled_leader_still_answers_every_waiter() -> None:
    async def go() -> None:
        coalescer, calls = Coalescer(), list[int]()
        outcomes = await asyncio.gather(
            *(request(coalescer, calls, asyncio.CancelledError()) for _ in range(10)),
            return_exceptions=True,
        )
        # Not a CancelledError: that would read as the waiter's own cancellation.
        assert all(isinstance(o, UpstreamFailure) for o in outcomes)
        first = outcomes[0]
        assert isinstance(first, UpstreamFailure) and first.code == ErrorCode.CANCELLED
        assert all(o is first for o in outcomes)

    asyncio.run(go())


def test_a_late_joiner_replays_the_tokens_already_pushed() -> None:
    async def go() -> None:
        coalescer = Coalescer()
        flight, leader = coalescer.join("k")
        assert leader
        flight.push("a")
        flight.push("b")
        late, leader = coalescer.join("k")
        assert late is flight and not leader
        waiter = asyncio.create_task(follow(late))
        await asyncio.sleep(0)
        flight.push("c")
        flight.finish(CachedResult(text="abc", tokens=("a", "b", "c")))
        seen, result = await waiter
        assert seen == ["a", "b", "c"] and result.text == "abc"
        # A flight that ended still answers anyone holding it.
        assert [t async for t in flight.tokens()] == ["a", "b", "c"]
        assert flight.done

    asyncio.run(go())


def test_the_last_waiter_leaving_cancels_the_call() -> None:
    async def go() -> None:
        coalescer = Coalescer()
        started = asyncio.Event()

        async def slow(flight: Flight) -> None:
            try:
                flight.push("a")
                started.set()
                await asyncio.sleep(60)
            except BaseException as exc:
                flight.fail(exc)
                raise

        flight, _ = coalescer.join("k")
        call = asyncio.create_task(slow(flight))
        flight.on_abandon(call.cancel)
        waiters = [asyncio.create_task(follow(flight))]
        waiters.append(asyncio.create_task(follow(coalescer.join("k")[0])))
        await started.wait()
        waiters[0].cancel()
        await asyncio.sleep(0)
        assert not call.cancelled() and flight.waiters == 1  # one still waits
        waiters[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert len(coalescer) == 0
        # A new request for the key starts afresh instead of joining the dying call.
        _, leader = coalescer.join("k")
        assert leader
        await asyncio.gather(*waiters, return_exceptions=True)

    asyncio.run(go())


def test_on_abandon_after_abandonment_runs_at_once() -> None:
    flight, _ = Coalescer().join("k")
    flight.leave()
    ran: list[int] = []
    flight.on_abandon(lambda: ran.append(1))
    assert ran == [1]


def test_the_end_is_final() -> None:
    async def go() -> None:
        flight = Flight("k")
        flight.finish(CachedResult(text="x"))
        flight.push("late")
        flight.fail(RuntimeError("late"))
        flight.leave()
        assert (await flight.result()).text == "x"
        assert [t async for t in flight.tokens()] == []

    asyncio.run(go())


# The cache


def result(text: str = "hello") -> CachedResult:
    return CachedResult(text=text, tokens=(text[:2], text[2:]), prompt_tokens=3)


def test_cache_hits_until_the_ttl() -> None:
    cache = ResultCache(entries=4, ttl_s=10.0, max_chars=100)
    assert cache.get("k", 0.0) is None
    assert cache.put("k", result(), 0.0)
    hit = cache.get("k", 9.9)
    assert hit is not None and hit.tokens == ("he", "llo")
    assert cache.get("k", 10.0) is None
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 0)


def test_cache_evicts_the_least_recently_used() -> None:
    cache = ResultCache(entries=2, ttl_s=10.0, max_chars=100)
    cache.put("a", result("a"), 0.0)
    cache.put("b", result("b"), 0.0)
    assert cache.get("a", 1.0) is not None  # a is now the most recent
    cache.put("c", result("c"), 1.0)
    assert cache.get("b", 1.0) is None
    assert cache.get("a", 1.0) is not None and cache.get("c", 1.0) is not None
    assert cache.evicted == 1 and len(cache) == 2


def test_cache_skips_long_results_and_can_be_off() -> None:
    cache = ResultCache(entries=2, ttl_s=10.0, max_chars=5)
    assert not cache.put("k", result("too long"), 0.0)
    assert cache.put("k", result("short"), 0.0)
    assert cache.skipped == 1
    off = ResultCache(entries=0, ttl_s=10.0, max_chars=5)
    assert not off.put("k", result("x"), 0.0) and off.get("k", 0.0) is None
