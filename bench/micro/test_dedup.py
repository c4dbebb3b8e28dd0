"""Dedup and breaker micro-benchmarks: the per-request checks of an inference shard.

Run: ``.venv/bin/pytest bench/micro/test_dedup.py`` (``--benchmark-group-by=group``
sets them side by side). ``scripts/test.sh`` runs it with ``--benchmark-disable``
as a smoke test; every test checks the outcome it timed.

* dedup check: what every request pays before any upstream work, a cache
  lookup plus a coalescer lookup. A miss also creates the flight; its
  ``leave`` (which drops it from the table) is included so the table stays
  one entry and the timing does not drift with its size.
* breaker: one ``allow`` + ``record`` pair on the closed path, the cost every
  remote call pays, on a private board and on a shared segment (the record
  takes the ``flock``); and the fail-fast refusal of an open breaker.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from itertools import count

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from mpipeline import _shm
from mpipeline.config import BreakerConfig
from mpipeline.resilience import BreakerBoard, CachedResult, Coalescer, Permit, ResultCache

ENTRIES = 4096
TTL_S = 3600.0


def cache_with(keys: int) -> ResultCache:
    cache = ResultCache(ENTRIES, TTL_S, 65536)
    now = time.monotonic()
    for i in range(keys):
        cache.put(f"key-{i}", CachedResult(text=f"reply {i}", tokens=("reply", f" {i}")), now)
    return cache


def test_check_cache_hit(benchmark: BenchmarkFixture) -> None:
    cache, coalescer = cache_with(ENTRIES), Coalescer()
    monotonic = time.monotonic

    def check() -> CachedResult | None:
        hit = cache.get("key-7", monotonic())
        if hit is None:
            coalescer.join("key-7")
        return hit

    benchmark.group = "dedup check"
    hit = benchmark(check)
    assert hit is not None and hit.text == "reply 7" and len(coalescer) == 0


def test_check_miss_new_flight(benchmark: BenchmarkFixture) -> None:
    cache, coalescer = cache_with(ENTRIES), Coalescer()
    monotonic = time.monotonic
    keys = count()

    def check() -> bool:
        key = f"new-{next(keys)}"
        if cache.get(key, monotonic()) is not None:
            return False
        flight, leader = coalescer.join(key)
        flight.leave()  # keeps the table at one entry; see the module docstring
        return leader

    benchmark.group = "dedup check"
    assert benchmark(check) is True
    assert len(coalescer) == 0 and cache.hits == 0


def test_check_join_existing_flight(benchmark: BenchmarkFixture) -> None:
    cache, coalescer = cache_with(ENTRIES), Coalescer()
    monotonic = time.monotonic
    flight, _ = coalescer.join("busy")  # a call in progress

    def check() -> bool:
        if cache.get("busy", monotonic()) is not None:
            return False
        joined, leader = coalescer.join("busy")
        joined.leave()
        return leader

    benchmark.group = "dedup check"
    assert benchmark(check) is False
    assert flight.waiters == 1 and coalescer.joined > 0


@contextlib.contextmanager
def make_board(kind: str, cfg: BreakerConfig) -> Iterator[BreakerBoard]:
    name = f"mpl-bench-br-{uuid.uuid4().hex[:12]}"
    board = BreakerBoard.private(cfg) if kind == "private" else BreakerBoard.create(name, cfg)
    try:
        yield board
    finally:
        board.close()
        board.unlink()
    assert not _shm.segment_path(name).exists()


@pytest.mark.parametrize("kind", ["private", "shared"])
def test_breaker_allow_record(benchmark: BenchmarkFixture, kind: str) -> None:
    with make_board(kind, BreakerConfig()) as board:
        breaker = board.breaker("openai")
        allow, record = breaker.allow, breaker.record

        def call() -> bool:
            permit = allow()
            if isinstance(permit, Permit):
                record(permit, True)
                return True
            return False

        benchmark.group = "breaker"
        assert benchmark(call) is True
        assert breaker.state().state == "closed" and breaker.state().window_calls > 0


@pytest.mark.parametrize("kind", ["private", "shared"])
def test_breaker_fail_fast(benchmark: BenchmarkFixture, kind: str) -> None:
    with make_board(kind, BreakerConfig(consecutive_failures=1, open_s=3600.0)) as board:
        breaker = board.breaker("openai")
        permit = breaker.allow()
        assert isinstance(permit, Permit)
        breaker.record(permit, False)

        benchmark.group = "breaker"
        refusal = benchmark(breaker.allow)
        assert not isinstance(refusal, Permit) and refusal.reason == "open"
