"""The shard's retry policy: when to try again, how long to wait, and how many retries a
shard may spend.

Backoff uses *full* jitter, ``uniform(0, min(max, initial * 2**attempt))``: the
reference orchestrator backed off without jitter, so shards that failed
together retried together and hit a recovering upstream in waves. A server's
Retry-After is a floor, not a schedule: every shard that got the same
Retry-After would otherwise return at the same instant, so a jittered backoff
term is added on top. The retry budget (Finagle's ``RetryBudget``) bounds
retries to a share of the traffic, so a failing upstream sees at most
``1 + budget_ratio`` times the load instead of ``1 + max_retries`` times.
"""

from __future__ import annotations

import math
import random
import time

from mpipeline.config import RetryConfig
from mpipeline.errors import UpstreamFailure

# How long a deposit or a withdrawal stays in the retry budget, and the slices
# that age it out (Finagle's defaults: a 10 s window).
BUDGET_TTL_S = 10.0
BUDGET_SLICES = 10
# Budget arithmetic is in thousandths of a retry, in integers (as Finagle does):
# a float sum of 100 deposits of 0.2 is 19.999..., one retry short.
SCALE = 1000
# 2**62 overflows no float and exceeds every sensible cap.
_MAX_DOUBLINGS = 62


def backoff_cap_s(attempt: int, cfg: RetryConfig) -> float:
    """The upper bound of the ``attempt``-th backoff (0 for the first retry)."""
    doubled = math.ldexp(cfg.backoff_initial_s, min(max(attempt, 0), _MAX_DOUBLINGS))
    return min(cfg.backoff_max_s, doubled)


def backoff_s(attempt: int, cfg: RetryConfig, rng: random.Random) -> float:
    """Full jitter: uniform over ``[0, backoff_cap_s(attempt))``."""
    return rng.random() * backoff_cap_s(attempt, cfg)


def delay_s(
    attempt: int, failure: UpstreamFailure, cfg: RetryConfig, rng: random.Random
) -> float | None:
    """Seconds to wait before retry number ``attempt`` (0-based) after ``failure``,
    or None when it must not be retried.

    None when the failure is not retryable, when ``max_retries`` retries were
    already made, or when the server asks to wait longer than
    ``max_retry_after_s`` (waiting that long is worse than failing now). A
    Retry-After of ``r`` seconds gives ``r`` plus a full-jitter backoff term,
    never less than ``r``.
    """
    if not failure.retryable or attempt >= cfg.max_retries:
        return None
    after = failure.retry_after_s
    if after is None or after <= 0:
        return backoff_s(attempt, cfg, rng)
    if after > cfg.max_retry_after_s:
        return None
    return after + backoff_s(attempt, cfg, rng)


def remaining_s(deadline_ns: int, now_ns: int | None = None) -> float:
    """Seconds left before ``deadline_ns`` (``time.monotonic_ns``; 0: none, so infinite)."""
    if not deadline_ns:
        return math.inf
    return (deadline_ns - (time.monotonic_ns() if now_ns is None else now_ns)) / 1e9


def fits_deadline(
    deadline_ns: int, wait_s: float, need_s: float = 0.0, now_ns: int | None = None
) -> bool:
    """Whether waiting ``wait_s`` and then ``need_s`` more for the attempt ends before
    the deadline; a retry that cannot finish in time only spends the upstream's capacity."""
    return wait_s + need_s < remaining_s(deadline_ns, now_ns)


class RetryBudget:
    """Retries a shard may make, as a share of its requests (Finagle-style).

    Each request deposits ``budget_ratio`` tokens, each retry withdraws one,
    and ``budget_min_per_s`` retries per second are always allowed so a shard
    with little traffic can still retry. Deposits and withdrawals expire after
    ``BUDGET_TTL_S``, so the balance is bounded by the recent traffic: a long
    calm spell cannot bank a retry storm. One event-loop thread per object.
    """

    def __init__(self, cfg: RetryConfig, *, ttl_s: float = BUDGET_TTL_S) -> None:
        self._ratio = round(cfg.budget_ratio * SCALE)
        # Finagle's reserve: the floor of retries per second, over the whole window.
        self._reserve = round(cfg.budget_min_per_s * ttl_s * SCALE)
        self._width = ttl_s / BUDGET_SLICES
        self._slices = [0] * BUDGET_SLICES
        self._current = int(time.monotonic() / self._width)
        self._sum = 0
        self.allowed = 0
        self.refused = 0

    def deposit(self, now: float | None = None) -> None:
        """A request arrived: it earns ``budget_ratio`` of a retry."""
        slot = self._advance(time.monotonic() if now is None else now)
        self._slices[slot] += self._ratio
        self._sum += self._ratio

    def try_withdraw(self, now: float | None = None) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        slot = self._advance(time.monotonic() if now is None else now)
        if self._sum + self._reserve < SCALE:
            self.refused += 1
            return False
        self._slices[slot] -= SCALE
        self._sum -= SCALE
        self.allowed += 1
        return True

    @property
    def balance(self) -> float:
        """Retries that would be allowed now (deposits and reserve less recent retries)."""
        self._advance(time.monotonic())
        return (self._sum + self._reserve) / SCALE

    def _advance(self, now: float) -> int:
        """Age out the slices older than the window; returns the current slice."""
        current = int(now / self._width)
        steps = current - self._current
        if steps:
            if steps < 0 or steps >= BUDGET_SLICES:
                self._slices = [0] * BUDGET_SLICES
            else:
                for k in range(1, steps + 1):
                    self._slices[(self._current + k) % BUDGET_SLICES] = 0
            self._current = current
            self._sum = sum(self._slices)
        return current % BUDGET_SLICES
