"""The rate limiter against plain token buckets, driven by hypothesis on an injected clock.

``BucketsModel`` keeps one global bucket and one bucket per session, as the
module docstring of ``gateway/ratelimit.py`` states them: a bucket refills at
its rate up to its size and never rewinds on an older clock; a request needs a
token from both buckets and takes from neither when one is short; the wait is
the longer of the two. With at most three sessions and at least four slots the
session table never has to share a bucket (sharing is tested by example in
test_ratelimit.py), so every session's bucket must behave as its own. The
machine's requests, clock steps and late clocks must get exactly the model's
answers and counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mpipeline.config import RateLimitConfig
from mpipeline.gateway.ratelimit import RateLimiter

T0 = 1_000_000.0
# A lone surrogate too: a header may carry anything (test_ratelimit.py).
SESSIONS = st.sampled_from([None, "alice", "bob", "\ud800"])
STEPS = st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 1.0, 3.0]) | st.floats(0.0, 2.0)
configs = st.builds(
    RateLimitConfig,
    requests_per_s=st.sampled_from([0.0, 0.5, 2.0, 10.0]),
    burst=st.sampled_from([0, 1, 3]),
    session_requests_per_s=st.sampled_from([0.0, 1.0, 4.0]),
    session_burst=st.sampled_from([0, 2]),
    session_slots=st.sampled_from([4, 8, 64]),
)


def size(rate: float, burst: int) -> float:
    """What a full bucket holds: ``burst``, or one second's worth (at least 1)."""
    return float(burst) if burst > 0 else float(max(1, math.ceil(rate)))


@dataclass
class Bucket:
    rate: float
    size: float
    tokens: float
    last: float = -math.inf

    def refilled(self, now: float) -> tuple[float, float]:
        """Tokens and stamp at ``now``; an older clock neither refills nor rewinds."""
        if now <= self.last:
            return self.tokens, self.last
        return min(self.size, self.tokens + (now - self.last) * self.rate), now


@dataclass
class BucketsModel:
    cfg: RateLimitConfig
    sessions: dict[str, Bucket] = field(default_factory=dict)
    admitted: int = 0
    refused: int = 0

    def __post_init__(self) -> None:
        rate = self.cfg.requests_per_s
        self.total = Bucket(rate, size(rate, self.cfg.burst), size(rate, self.cfg.burst))

    def session(self, name: str) -> Bucket:
        rate = self.cfg.session_requests_per_s
        full = size(rate, self.cfg.session_burst)
        return self.sessions.setdefault(name, Bucket(rate, full, full))

    def acquire(self, name: str | None, now: float) -> tuple[float, str | None]:
        """``(wait, refusing bucket)``; ``(0.0, None)`` when the request may go on."""
        wait, by = 0.0, None
        buckets: list[tuple[Bucket, float, float]] = []
        if self.total.rate > 0:
            tokens, last = self.total.refilled(now)
            buckets.append((self.total, tokens, last))
            if tokens < 1.0:
                wait, by = (1.0 - tokens) / self.total.rate, "global"
        if self.cfg.session_requests_per_s > 0 and name is not None:
            own = self.session(name)
            tokens = own.refilled(now)[0]
            # A bucket new to the table is stamped now; a known one only moves forward.
            buckets.append((own, tokens, now if own.last == -math.inf else max(own.last, now)))
            if tokens < 1.0 and (1.0 - tokens) / own.rate >= wait:
                wait, by = (1.0 - tokens) / own.rate, "session"
        if wait > 0.0:
            self.refused += 1
            return max(wait, 1e-9), by
        for bucket, tokens, last in buckets:
            bucket.tokens, bucket.last = tokens - 1.0, last
        self.admitted += 1
        return 0.0, None


class LimiterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.limiter: RateLimiter | None = None

    @initialize(cfg=configs)
    def start(self, cfg: RateLimitConfig) -> None:
        self.limiter = RateLimiter.private(cfg)
        self.model = BucketsModel(cfg)

    def _acquire(self, session: str | None, now: float) -> None:
        assert self.limiter is not None
        wait = self.limiter.acquire(session, now)
        expected, by = self.model.acquire(session, now)
        assert wait == expected, (wait, expected)
        if by is not None:
            assert self.limiter.refused_by == by

    @rule(step=STEPS)
    def time_passes(self, step: float) -> None:
        self.now += step

    @rule(session=SESSIONS)
    def request(self, session: str | None) -> None:
        self._acquire(session, self.now)

    @rule(session=SESSIONS, n=st.integers(2, 6))
    def burst_of_requests(self, session: str | None, n: int) -> None:
        for _ in range(n):
            self._acquire(session, self.now)

    @rule(session=SESSIONS, behind=st.sampled_from([0.001, 0.5, 5.0]))
    def request_on_a_late_clock(self, session: str | None, behind: float) -> None:
        """A process whose clock read came before another's stamp (read outside the lock)."""
        self._acquire(session, self.now - behind)

    @invariant()
    def counts_match_the_model(self) -> None:
        if self.limiter is None:
            return
        assert (self.limiter.admitted, self.limiter.refused) == (
            self.model.admitted,
            self.model.refused,
        )

    def teardown(self) -> None:
        if self.limiter is not None:
            self.limiter.close()


LimiterMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_rate_limiter_matches_the_model = LimiterMachine.TestCase
