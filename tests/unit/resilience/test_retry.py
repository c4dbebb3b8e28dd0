"""Retry policy: full-jitter bounds and spread, Retry-After as a floor, deadlines, and the
Finagle-style budget on an injected clock."""

from __future__ import annotations

import random
import statistics

import pytest

from mpipeline.config import RetryConfig
from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.resilience.retry import (
    BUDGET_TTL_S,
    RetryBudget,
    backoff_cap_s,
    backoff_s,
    delay_s,
    fits_deadline,
    remaining_s,
)

CFG = RetryConfig(backoff_initial_s=0.2, backoff_max_s=10.0, max_retries=5)
T0 = 1_000_000.0


def failure(retry_after_s: float | None = None, retryable: bool = True) -> UpstreamFailure:
    return UpstreamFailure(
        "boom", code=ErrorCode.UPSTREAM_ERROR, retryable=retryable, retry_after_s=retry_after_s
    )


@pytest.mark.parametrize(("attempt", "cap"), [(0, 0.2), (1, 0.4), (3, 1.6), (6, 10.0), (500, 10.0)])
def test_backoff_cap_doubles_up_to_the_max(attempt: int, cap: float) -> None:
    assert backoff_cap_s(attempt, CFG) == pytest.approx(cap)


def test_full_jitter_stays_in_bounds_and_spreads() -> None:
    rng = random.Random(7)
    for attempt in range(8):
        samples = [backoff_s(attempt, CFG, rng) for _ in range(2000)]
        cap = backoff_cap_s(attempt, CFG)
        assert 0.0 <= min(samples) and max(samples) < cap
        # Uniform(0, cap) has a coefficient of variation of 1/sqrt(3), about 0.58.
        cv = statistics.pstdev(samples) / statistics.fmean(samples)
        assert cv > 0.2
        assert statistics.fmean(samples) == pytest.approx(cap / 2, rel=0.1)


def test_retry_after_is_a_floor_with_jitter_on_top() -> None:
    rng = random.Random(1)
    delays = [delay_s(0, failure(retry_after_s=2.0), CFG, rng) for _ in range(1000)]
    assert all(d is not None and 2.0 <= d < 2.0 + backoff_cap_s(0, CFG) for d in delays)
    # Shards told the same Retry-After must not come back at the same instant.
    spread = [d - 2.0 for d in delays if d is not None]
    assert statistics.pstdev(spread) / statistics.fmean(spread) > 0.2


def test_no_retry_when_refused_exhausted_or_asked_to_wait_too_long() -> None:
    rng = random.Random(2)
    assert delay_s(0, failure(retryable=False), CFG, rng) is None
    assert delay_s(CFG.max_retries, failure(), CFG, rng) is None
    assert delay_s(CFG.max_retries - 1, failure(), CFG, rng) is not None
    assert delay_s(0, failure(retry_after_s=CFG.max_retry_after_s + 1), CFG, rng) is None
    plain = delay_s(0, failure(retry_after_s=0.0), CFG, rng)
    assert plain is not None and plain < CFG.backoff_initial_s


def test_deadline_helpers() -> None:
    assert remaining_s(0) == float("inf")
    assert fits_deadline(0, 1e9)
    now = 10_000_000_000
    assert remaining_s(now + 2_000_000_000, now) == pytest.approx(2.0)
    assert fits_deadline(now + 2_000_000_000, 1.0, 0.5, now_ns=now)
    assert not fits_deadline(now + 2_000_000_000, 1.5, 0.5, now_ns=now)
    assert not fits_deadline(now - 1, 0.0, now_ns=now)


def test_budget_allows_the_reserve_then_the_ratio() -> None:
    cfg = RetryConfig(budget_ratio=0.2, budget_min_per_s=1.0)
    budget = RetryBudget(cfg)
    reserve = int(cfg.budget_min_per_s * BUDGET_TTL_S)
    # No traffic yet: only the reserve.
    assert sum(budget.try_withdraw(T0) for _ in range(reserve + 5)) == reserve
    assert budget.refused == 5
    # 100 requests earn 20 retries.
    for _ in range(100):
        budget.deposit(T0)
    assert sum(budget.try_withdraw(T0) for _ in range(50)) == 20
    assert budget.allowed == reserve + 20


def test_budget_forgets_after_its_window() -> None:
    budget = RetryBudget(RetryConfig(budget_ratio=1.0, budget_min_per_s=0.0))
    for _ in range(1000):
        budget.deposit(T0)
    assert budget.try_withdraw(T0 + 1.0)
    # A calm spell cannot bank a storm: the deposits expire.
    assert not budget.try_withdraw(T0 + BUDGET_TTL_S + 1.0)
    # So do the withdrawals: a spent budget recovers with the traffic.
    budget.deposit(T0 + 30.0)
    assert budget.try_withdraw(T0 + 30.0)


def test_budget_balance_is_bounded_by_recent_traffic() -> None:
    budget = RetryBudget(RetryConfig(budget_ratio=0.5, budget_min_per_s=0.0))
    for second in range(100):
        for _ in range(10):
            budget.deposit(T0 + second)
    # Only about the last 10 s of deposits count: ~50 retries, not 500.
    allowed = sum(budget.try_withdraw(T0 + 99.5) for _ in range(1000))
    assert 40 <= allowed <= 55
