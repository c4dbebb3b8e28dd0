"""Rate-limit micro-benchmarks: one ``acquire`` per request, the gateway's hot path.

Run: ``.venv/bin/pytest bench/micro/test_ratelimit.py``. The shared limiter
pays a ``flock`` lock/unlock pair per call on top of the bucket arithmetic;
the private one (a gateway without a supervisor) shows the arithmetic alone.
Rates are high enough that every call is admitted, which is the common and
the dearer path (a refusal writes nothing but a counter). Sessions rotate
through ``SESSIONS`` ids so the table lookup is not always the same slot.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from itertools import cycle

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from mpipeline import _shm
from mpipeline.config import RateLimitConfig
from mpipeline.gateway.ratelimit import RateLimiter

SESSIONS = 1000
UNLIMITED = 1e9  # the highest rate the config allows: never refuses here


def config(sessions: bool) -> RateLimitConfig:
    return RateLimitConfig(
        requests_per_s=UNLIMITED,
        burst=1 << 30,
        session_requests_per_s=UNLIMITED if sessions else 0.0,
        session_burst=1 << 30,
    )


@pytest.fixture(params=["shared", "private"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def make(kind: str, cfg: RateLimitConfig) -> Iterator[RateLimiter]:
    """A private limiter, or a shared segment removed afterwards."""
    name = f"mpl-bench-rl-{uuid.uuid4().hex[:12]}"
    limiter = RateLimiter.private(cfg) if kind == "private" else RateLimiter.create(name, cfg)
    try:
        yield limiter
    finally:
        limiter.close()
        limiter.unlink()
    assert not _shm.segment_path(name).exists()


@pytest.mark.parametrize("sessions", [False, True], ids=["global", "global+session"])
def test_acquire(benchmark: BenchmarkFixture, kind: str, sessions: bool) -> None:
    with make(kind, config(sessions)) as limiter:
        ids = cycle([f"session-{i}" for i in range(SESSIONS)] if sessions else [None])
        acquire = limiter.acquire

        def call() -> float:
            return acquire(next(ids))

        benchmark.group = "ratelimit acquire"
        assert benchmark(call) == 0.0
        assert limiter.refused == 0 and limiter.admitted > 0


def test_acquire_refused(benchmark: BenchmarkFixture, kind: str) -> None:
    """The overload path: an empty bucket, nothing written but the refusal count."""
    cfg = RateLimitConfig(requests_per_s=1e-6, burst=1, session_requests_per_s=1e-6)
    with make(kind, cfg) as limiter:
        limiter.acquire("s")
        benchmark.group = "ratelimit acquire"
        assert benchmark(limiter.acquire, "s") > 0
