"""Upstream resilience for the inference shards: circuit breakers shared through
shared memory, the retry policy and budget, in-flight coalescing with a result
cache, and phase timeouts. Pure mechanism: ``stages/calls.py`` decides the order
(cache, coalescing, circuit, limits, timeouts, retries)."""

from mpipeline.resilience.breaker import (
    Breaker,
    BreakerBoard,
    BreakerState,
    Permit,
    Refusal,
    StateName,
)
from mpipeline.resilience.dedup import CachedResult, Coalescer, Flight, ResultCache
from mpipeline.resilience.retry import (
    RetryBudget,
    backoff_cap_s,
    backoff_s,
    delay_s,
    fits_deadline,
    remaining_s,
)
from mpipeline.resilience.timeouts import bounded, phased

__all__ = [
    "Breaker",
    "BreakerBoard",
    "BreakerState",
    "CachedResult",
    "Coalescer",
    "Flight",
    "Permit",
    "Refusal",
    "ResultCache",
    "RetryBudget",
    "StateName",
    "backoff_cap_s",
    "backoff_s",
    "bounded",
    "delay_s",
    "fits_deadline",
    "phased",
    "remaining_s",
]
