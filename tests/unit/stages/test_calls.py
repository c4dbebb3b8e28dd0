"""The shard's call path (stages/calls.py) over scripted upstreams.

The upstream here is a fault injector in the process: each attempt plays the
next step of a script (tokens, or a classified failure after some tokens).
The real HTTP upstreams are tested against a real server and a fault server
elsewhere; this file pins down the decisions: when to retry, when not, what
the circuit does, and what coalesced waiters receive.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from mpipeline.config import (
    BreakerConfig,
    DedupConfig,
    InferenceConfig,
    PoolConfig,
    RetryConfig,
    TimeoutsConfig,
)
from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled, PromptRequest
from mpipeline.resilience import BreakerBoard
from mpipeline.stages.calls import ShardCalls
from mpipeline.workers.base import Generation

FAST_RETRY = RetryConfig(backoff_initial_s=0.001, backoff_max_s=0.002, budget_min_per_s=100)
NO_DEDUP = DedupConfig(coalesce=False, cache_entries=0)


@dataclass
class Step:
    tokens: Sequence[str] = ("hello ", "world")
    fail: UpstreamFailure | None = None
    delay_s: float = 0.0


def retryable(status: int = 503, retry_after: float | None = None) -> UpstreamFailure:
    return UpstreamFailure(
        f"upstream answered {status}", status=status, retryable=True, retry_after_s=retry_after
    )


@dataclass
class Scripted:
    """An upstream that plays ``script`` one step per attempt, then succeeds."""

    name: str = "up"
    script: list[Step] = field(default_factory=list)
    remote: bool = True
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    max_concurrency: int = 64
    calls: list[float] = field(default_factory=list)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def _next(self) -> Step:
        self.calls.append(time.monotonic())
        return self.script.pop(0) if self.script else Step()

    async def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        step = self._next()
        gen.prompt_tokens = 3
        for token in step.tokens:
            if step.delay_s:
                await asyncio.sleep(step.delay_s)
            gen.completion_tokens += 1
            yield token
        if step.fail is not None:
            raise step.fail

    async def complete(self, job: Assembled, gen: Generation) -> str:
        step = self._next()
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        if step.fail is not None:
            raise step.fail
        gen.prompt_tokens, gen.completion_tokens = 3, len(step.tokens)
        return "".join(step.tokens)


def _calls(
    upstreams: Sequence[Scripted],
    *,
    retry: RetryConfig = FAST_RETRY,
    dedup: DedupConfig = NO_DEDUP,
    breaker: BreakerConfig | None = None,
) -> ShardCalls:
    cfg = InferenceConfig(
        worker="pool",
        retry=retry,
        dedup=dedup,
        breaker=breaker or BreakerConfig(),
        pool=PoolConfig(strategy="round_robin"),
    )
    board = BreakerBoard.private(cfg.breaker)
    return ShardCalls(cfg, upstreams, board, rng=random.Random(7))


def _job(text: str = "hi", deadline_s: float | None = None, key: str | None = None) -> Assembled:
    deadline = time.monotonic_ns() + int(deadline_s * 1e9) if deadline_s else 0
    req = PromptRequest(request_id="r", input=text, deadline_ns=deadline)
    return Assembled(request=req, prompt=text, dedup_key=key or text)


async def _run(calls: ShardCalls, job: Assembled, stream: bool = True) -> tuple[str, Generation]:
    gen = Generation()
    text = "".join([piece async for piece in calls.tokens(job, gen, stream)])
    return text, gen


def test_a_retryable_failure_is_retried_until_it_succeeds() -> None:
    up = Scripted(script=[Step(tokens=(), fail=retryable()), Step(tokens=(), fail=retryable())])
    calls = _calls([up])
    text, gen = asyncio.run(_run(calls, _job()))
    assert (text, gen.completion_tokens, gen.prompt_tokens) == ("hello world", 2, 3)
    assert len(up.calls) == 3 and calls.stats.retries == 2


def test_no_retry_once_a_token_has_been_passed_on() -> None:
    up = Scripted(script=[Step(tokens=("par",), fail=retryable())])
    calls = _calls([up])

    async def go() -> list[str]:
        got: list[str] = []
        with pytest.raises(UpstreamFailure):
            async for piece in calls.tokens(_job(), Generation(), True):
                got.append(piece)  # noqa: PERF401 - kept when the stream then fails
        return got

    assert asyncio.run(go()) == ["par"]
    assert len(up.calls) == 1


def test_a_client_error_is_not_retried_and_keeps_its_code() -> None:
    bad = UpstreamFailure("upstream refused the request (400)", status=400, counts=False)
    up = Scripted(script=[Step(tokens=(), fail=bad)])
    with pytest.raises(UpstreamFailure) as info:
        asyncio.run(_run(_calls([up]), _job(), stream=False))
    assert info.value is bad and len(up.calls) == 1


def test_retries_stop_at_max_retries() -> None:
    up = Scripted(script=[Step(tokens=(), fail=retryable()) for _ in range(10)])
    retry = RetryConfig(max_retries=2, backoff_initial_s=0.001, budget_min_per_s=100)
    with pytest.raises(UpstreamFailure):
        asyncio.run(_run(_calls([up], retry=retry), _job()))
    assert len(up.calls) == 3


def test_an_empty_retry_budget_refuses_retries() -> None:
    up = Scripted(script=[Step(tokens=(), fail=retryable()) for _ in range(10)])
    retry = RetryConfig(backoff_initial_s=0.001, budget_ratio=0, budget_min_per_s=0)
    calls = _calls([up], retry=retry)
    with pytest.raises(UpstreamFailure):
        asyncio.run(_run(calls, _job()))
    assert len(up.calls) == 1 and calls.stats.retries_refused == 1


def test_retry_after_is_waited_out_by_every_call_to_that_upstream() -> None:
    up = Scripted(script=[Step(tokens=(), fail=retryable(429, retry_after=0.3))])
    calls = _calls([up])

    async def go() -> None:
        first = asyncio.create_task(_run(calls, _job("one")))
        await asyncio.sleep(0.05)
        # A second request arriving during the hold waits too: no call before it ends.
        await _run(calls, _job("two"))
        await first

    asyncio.run(go())
    assert len(up.calls) == 3
    assert min(up.calls[1:]) - up.calls[0] >= 0.3 - 0.01


def test_a_retry_that_cannot_finish_before_the_deadline_is_not_made() -> None:
    up = Scripted(script=[Step(tokens=(), fail=retryable(503, retry_after=5.0))])
    with pytest.raises(UpstreamFailure) as info:
        asyncio.run(_run(_calls([up]), _job(deadline_s=1.0)))
    assert len(up.calls) == 1 and info.value.retry_after_s == 5.0


def test_the_circuit_opens_and_then_fails_fast_without_calling() -> None:
    breaker = BreakerConfig(consecutive_failures=3, open_s=30)
    up = Scripted(script=[Step(tokens=(), fail=retryable()) for _ in range(3)])
    calls = _calls([up], retry=RetryConfig(max_retries=0), breaker=breaker)

    async def go() -> UpstreamFailure:
        for _ in range(3):
            with pytest.raises(UpstreamFailure):
                await _run(calls, _job())
        started = time.monotonic()
        with pytest.raises(UpstreamFailure) as info:
            await _run(calls, _job())
        # Fast is shown by the call count below (no fourth call); this only rules
        # out waiting for the circuit (open_s = 30), with room for a loaded box.
        assert time.monotonic() - started < breaker.open_s / 10
        return info.value

    refused = asyncio.run(go())
    assert refused.code == ErrorCode.CIRCUIT_OPEN and refused.retry_after_s
    assert len(up.calls) == 3


def test_a_pool_retries_on_another_member() -> None:
    a = Scripted(name="a", script=[Step(tokens=(), fail=retryable())])
    b = Scripted(name="b")
    text, _ = asyncio.run(_run(_calls([a, b]), _job()))
    assert text == "hello world" and len(a.calls) == 1 and len(b.calls) == 1


def test_a_pool_skips_a_member_whose_circuit_is_open() -> None:
    breaker = BreakerConfig(consecutive_failures=1, open_s=30)
    a = Scripted(name="a", script=[Step(tokens=(), fail=retryable())])
    b = Scripted(name="b")
    calls = _calls([a, b], retry=RetryConfig(max_retries=0), breaker=breaker)

    async def go() -> None:
        with pytest.raises(UpstreamFailure):
            await _run(calls, _job("x"))  # round robin: a first; it fails and opens
        for i in range(4):
            assert (await _run(calls, _job(f"y{i}")))[0] == "hello world"

    asyncio.run(go())
    assert len(a.calls) == 1 and len(b.calls) == 4


# Coalescing and the cache


def test_identical_requests_in_flight_share_one_call_and_get_the_same_tokens() -> None:
    up = Scripted(script=[Step(tokens=("a ", "b ", "c"), delay_s=0.02)])
    calls = _calls([up], dedup=DedupConfig(cache_entries=0))

    async def go() -> list[tuple[str, Generation]]:
        return await asyncio.gather(*(_run(calls, _job(), stream=i % 2 == 0) for i in range(100)))

    results = asyncio.run(go())
    assert len(up.calls) == 1
    assert {text for text, _ in results} == {"a b c"}
    assert {(g.prompt_tokens, g.completion_tokens) for _, g in results} == {(3, 3)}
    assert calls.stats.coalesced == 99


def test_identical_requests_in_flight_all_get_the_one_error() -> None:
    bad = UpstreamFailure("upstream answered 401", status=401, retryable=False)
    up = Scripted(script=[Step(tokens=(), fail=bad, delay_s=0.02)])
    calls = _calls([up], dedup=DedupConfig(cache_entries=0))

    async def go() -> list[BaseException | tuple[str, Generation]]:
        runs = (_run(calls, _job(), stream=False) for _ in range(100))
        return await asyncio.gather(*runs, return_exceptions=True)

    results = asyncio.run(go())
    assert len(up.calls) == 1
    assert all(r is bad for r in results)


def test_followers_leaving_do_not_stop_the_call_and_its_maker_leaving_does() -> None:
    up = Scripted(script=[Step(tokens=("a ",) * 100, delay_s=0.01)])
    calls = _calls([up], dedup=DedupConfig(cache_entries=0))
    seen: list[str] = []

    async def consume() -> None:
        async for piece in calls.tokens(_job(), Generation(), True):
            seen.append(piece)  # noqa: PERF401 - each piece as it comes, to count after a cancel

    async def go() -> None:
        maker = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        followers = [asyncio.create_task(consume()) for _ in range(2)]
        await asyncio.sleep(0.05)
        followers[0].cancel()
        await asyncio.sleep(0.03)
        assert not maker.done() and not followers[1].done()  # the others still stream
        maker.cancel()
        await asyncio.gather(maker, followers[0], return_exceptions=True)
        # The streaming follower cannot start over: it ends with "cancelled".
        with pytest.raises(UpstreamFailure) as info:
            await followers[1]
        assert info.value.code == ErrorCode.CANCELLED
        before = len(seen)
        await asyncio.sleep(0.05)
        assert len(seen) == before

    asyncio.run(go())
    assert len(up.calls) == 1 and len(seen) < 3 * 100


def test_a_follower_that_got_nothing_yet_makes_the_call_again_when_its_maker_leaves() -> None:
    up = Scripted(script=[Step(tokens=("slow",), delay_s=1.0), Step(tokens=("again",))])
    calls = _calls([up], dedup=DedupConfig(cache_entries=0))

    async def go() -> str:
        maker = asyncio.create_task(_run(calls, _job(), stream=False))
        await asyncio.sleep(0.02)
        follower = asyncio.create_task(_run(calls, _job(), stream=False))
        await asyncio.sleep(0.02)
        maker.cancel()
        return (await follower)[0]

    assert asyncio.run(go()) == "again"
    assert len(up.calls) == 2


def test_a_cached_result_is_replayed_without_a_call_streaming_or_not() -> None:
    up = Scripted(script=[Step(tokens=("a ", "b"))])
    calls = _calls([up], dedup=DedupConfig(coalesce=True))

    async def go() -> None:
        assert (await _run(calls, _job()))[0] == "a b"
        gen = Generation()
        pieces = [p async for p in calls.tokens(_job(), gen, True)]
        assert pieces == ["a ", "b"] and gen.completion_tokens == 2
        assert (await _run(calls, _job(), stream=False))[0] == "a b"

    asyncio.run(go())
    assert len(up.calls) == 1 and calls.stats.cache_hits == 2


def test_failures_are_not_cached() -> None:
    up = Scripted(script=[Step(tokens=(), fail=UpstreamFailure("401", status=401))])
    calls = _calls([up], dedup=DedupConfig())

    async def go() -> None:
        with pytest.raises(UpstreamFailure):
            await _run(calls, _job())
        assert (await _run(calls, _job()))[0] == "hello world"

    asyncio.run(go())
    assert len(up.calls) == 2
