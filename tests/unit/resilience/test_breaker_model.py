"""The circuit breaker against a plain model, driven by hypothesis on an injected clock.

``CircuitModel`` is the state machine as the breaker's docstring states it,
with no shared memory, generation words or locks: closed opens on
``consecutive_failures`` in a row or on a failure rate over the window's time
buckets; open refuses until ``open_s`` has passed; half-open grants one probe at
a time, up to ``probes``, closes once every probe reported and enough succeeded,
and reopens as soon as enough can no longer succeed; a probe whose lease ran
out counts as failed; a verdict on a permit from an earlier state is ignored;
a Retry-After hold defers every call. ``BreakerMachine`` makes random calls,
verdicts, holds and clock steps, and after each step the breaker's decisions
and state must be the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mpipeline.config import BreakerConfig
from mpipeline.resilience.breaker import (
    DEFAULT_LEASE_S,
    Breaker,
    BreakerBoard,
    Permit,
    Refusal,
)

T0 = 1_000_000.0
BUCKETS = 8  # the window slides in steps of window_s / 8 (see BreakerConfig.window_s)
State = Literal["closed", "open", "half_open"]
# Clock steps: zero, tiny, and the open_s and bucket boundaries the configs below use.
STEPS = st.sampled_from([0.0, 0.001, 0.125, 0.25, 0.5, 1.0, 2.0, 5.0]) | st.floats(0.0, 3.0)
LEASES = st.sampled_from([None, 0.0, 0.3, 1.0])
configs = st.builds(
    BreakerConfig,
    consecutive_failures=st.integers(1, 4),
    failure_rate=st.sampled_from([0.5, 1.0]),
    window_s=st.sampled_from([1.0, 8.0]),
    min_calls=st.integers(1, 6),
    open_s=st.sampled_from([0.5, 2.0]),
    probes=st.integers(1, 3),
    probe_success_rate=st.sampled_from([0.34, 0.5, 1.0]),
)


@dataclass
class Granted:
    """A permit as the model sees it: the state it was granted in, and its probe number."""

    generation: int
    probe: int


@dataclass
class CircuitModel:
    cfg: BreakerConfig
    state: State = "closed"
    generation: int = 0
    transitions: int = 0
    opens: int = 0
    opened_at: float = 0.0
    not_before: float = 0.0
    consecutive: int = 0
    # Closed-state verdicts as (bucket, failed); cleared when the circuit closes.
    verdicts: list[tuple[int, bool]] = field(default_factory=list)
    granted: int = 0
    reported: int = 0
    succeeded: int = 0
    lease: float = 0.0  # when the probe out expires; 0: none out
    probe_seq: int = 0

    @property
    def need(self) -> int:
        return max(1, math.ceil(self.cfg.probe_success_rate * self.cfg.probes - 1e-9))

    def bucket(self, now: float) -> int:
        return int(now / (self.cfg.window_s / BUCKETS))

    def window(self, now: float) -> tuple[int, int]:
        current = self.bucket(now)
        inside = [failed for b, failed in self.verdicts if current - BUCKETS < b <= current]
        return len(inside), sum(inside)

    def move(self, new: State, now: float) -> None:
        self.generation += 1
        self.transitions += 1
        self.state = new
        if new == "open":
            self.opened_at = now
            self.opens += 1
        elif new == "half_open":
            self.granted = self.reported = self.succeeded = 0
            self.lease = 0.0
        else:
            self.consecutive = 0
            self.verdicts.clear()

    def judge(self, now: float) -> State:
        """After a probe's verdict: reopen once enough can no longer succeed, close
        once every probe reported; returns the state it leaves."""
        if self.succeeded + self.cfg.probes - self.reported < self.need:
            self.move("open", now)
        elif self.reported >= self.cfg.probes:
            self.move("closed", now)
        return self.state

    def allow(self, now: float, lease_s: float | None) -> Granted | tuple[str, float]:
        """A permit, or ``(reason, wait_s)`` of the refusal."""
        cfg = self.cfg
        if self.state == "open":
            until = self.opened_at + cfg.open_s
            if now < until:
                return "open", max(until, self.not_before) - now
            self.move("half_open", now)
        elif self.state == "half_open" and self.lease:
            if now < self.lease:  # the holder is this process: alive
                return "probing", min(self.lease - now, cfg.open_s)
            self.lease = 0.0  # lost: counts as a failed probe
            self.reported += 1
            if self.judge(now) == "open":
                return "open", max(now + cfg.open_s, self.not_before) - now
        if now < self.not_before:
            return "deferred", self.not_before - now
        if self.state == "closed":
            return Granted(self.generation, 0)
        if self.granted >= cfg.probes:
            return "probing", cfg.open_s
        self.granted += 1
        self.probe_seq += 1
        self.lease = now + (DEFAULT_LEASE_S if lease_s is None else max(lease_s, 1e-3))
        return Granted(self.generation, self.probe_seq)

    def record(self, permit: Granted, ok: bool | None, now: float) -> None:
        if (ok is None and not permit.probe) or permit.generation != self.generation:
            return
        if not permit.probe:
            if self.state == "closed":
                self.count(ok is True, now)
        elif permit.probe == self.probe_seq and self.lease:
            self.lease = 0.0
            if ok is None:
                self.granted -= 1  # no verdict: another probe takes its place
            else:
                self.reported += 1
                self.succeeded += ok
                self.judge(now)

    def count(self, ok: bool, now: float) -> None:
        self.verdicts.append((self.bucket(now), not ok))
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        calls, failures = self.window(now)
        if self.consecutive >= self.cfg.consecutive_failures or (
            calls >= self.cfg.min_calls and failures >= self.cfg.failure_rate * calls
        ):
            self.move("open", now)


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.board: BreakerBoard | None = None
        self.permits: list[tuple[Permit, Granted]] = []

    @initialize(cfg=configs)
    def start(self, cfg: BreakerConfig) -> None:
        self.board = BreakerBoard.private(cfg)
        self.model = CircuitModel(cfg)

    @property
    def breaker(self) -> Breaker:
        assert self.board is not None
        return self.board.breaker("upstream")

    @rule(step=STEPS)
    def time_passes(self, step: float) -> None:
        self.now += step

    @rule(lease_s=LEASES)
    def ask(self, lease_s: float | None) -> None:
        got = self.breaker.allow(self.now, lease_s)
        expected = self.model.allow(self.now, lease_s)
        if isinstance(expected, Granted):
            assert isinstance(got, Permit), (got, expected)
            assert (got.probe > 0) == (expected.probe > 0), (got, expected)
            self.permits.append((got, expected))
        else:
            assert isinstance(got, Refusal), (got, expected)
            assert (got.reason, got.wait_s) == expected

    @precondition(lambda self: self.permits)
    @rule(pick=st.integers(0, 1 << 16), ok=st.sampled_from([True, False, None]))
    def report(self, pick: int, ok: bool | None) -> None:
        got, expected = self.permits.pop(pick % len(self.permits))
        self.breaker.record(got, ok, self.now)
        self.model.record(expected, ok, self.now)

    @rule(hold=st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    def retry_after(self, hold: float) -> None:
        self.breaker.defer(self.now + hold)
        self.model.not_before = max(self.model.not_before, self.now + hold)

    @invariant()
    def state_matches_the_model(self) -> None:
        if self.board is None:
            return
        m = self.model
        got = self.breaker.state(self.now)
        calls, failures = m.window(self.now)
        assert got.state == m.state
        assert (got.transitions, got.opens) == (m.transitions, m.opens)
        assert got.consecutive_failures == m.consecutive
        assert (got.window_calls, got.window_failures) == (calls, failures)
        assert got.opened_at == (m.opened_at if m.opens else 0.0)
        assert got.retry_at == (m.opened_at + m.cfg.open_s if m.state == "open" else 0.0)
        assert got.not_before == m.not_before
        if m.state == "half_open":
            assert (got.probes_granted, got.probes_reported, got.probes_succeeded) == (
                m.granted,
                m.reported,
                m.succeeded,
            )
            assert m.reported <= m.granted <= m.cfg.probes

    def teardown(self) -> None:
        if self.board is not None:
            self.board.close()


BreakerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_breaker_matches_the_model = BreakerMachine.TestCase
