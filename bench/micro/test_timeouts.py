"""Phase-timeout overhead per streamed token: ``phased`` against the bare stream and
against the obvious alternative, a fresh ``asyncio.timeout`` around every token.

Run: ``.venv/bin/pytest bench/micro/test_timeouts.py``; ``scripts/test.sh`` runs it
with ``--benchmark-disable`` as a smoke test. One round streams ``TOKENS``
tokens that are ready at once (an async generator that never suspends), on
uvloop as the shards run, so the figures are the wrapper's cost: divide by
``TOKENS`` for the cost per token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from pytest_benchmark.fixture import BenchmarkFixture

from mpipeline.config import TimeoutsConfig
from mpipeline.resilience.timeouts import phased

TOKENS = 10_000
LIMITS = TimeoutsConfig(first_token_s=30.0, between_tokens_s=30.0, total_s=600.0)


async def tokens() -> AsyncIterator[str]:
    for _ in range(TOKENS):
        yield "tok"


async def bare() -> int:
    return sum([1 async for _ in tokens()])


async def wrapped() -> int:
    return sum([1 async for _ in phased(tokens(), LIMITS, 0, upstream="bench")])


async def timeout_per_token() -> int:
    loop = asyncio.get_running_loop()
    it = tokens().__aiter__()
    n = 0
    while True:
        try:
            async with asyncio.timeout_at(loop.time() + LIMITS.between_tokens_s):
                await it.__anext__()
        except StopAsyncIteration:
            return n
        n += 1


VARIANTS: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
    "bare": bare,
    "phased": wrapped,
    "timeout-per-token": timeout_per_token,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stream(benchmark: BenchmarkFixture, variant: str) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        benchmark.group = f"{TOKENS} tokens"
        assert benchmark(lambda: runner.run(VARIANTS[variant]())) == TOKENS
