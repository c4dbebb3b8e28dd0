"""One upstream's circuit: the state machine over a slot of the breaker board.

Separate from ``breaker.py`` (the segment and its slots) so each module keeps
to one noun; ``breaker.py`` re-exports everything public here. See its
docstring for why the board is shared and how this differs from the
reference orchestrator's breaker.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from mpipeline import _shm
from mpipeline.config import BreakerConfig
from mpipeline.resilience._breaker_shm import (
    BUCKETS,
    CLOSED,
    HALF_OPEN,
    OPEN,
    S_BUCKETS,
    S_CHANGED,
    S_CONSEC,
    S_GRANTED,
    S_LEASE,
    S_NOT_BEFORE,
    S_OPENED,
    S_OPENS,
    S_PROBE_PID,
    S_PROBE_SEQ,
    S_REPORTED,
    S_STATE,
    S_SUCCEEDED,
    S_TRANSITIONS,
    window,
)

log = logging.getLogger("mpipeline.resilience.breaker")

StateName = Literal["closed", "open", "half_open"]
STATE_NAMES: tuple[StateName, ...] = ("closed", "open", "half_open")
# Called as (upstream, old state, new state) in the process that made the transition.
Transition = Callable[[str, str, str], None]
# A probe's lease when the caller gives none: long enough for a streamed reply,
# since an expired lease counts as a failure and a healthy upstream whose calls
# outlast it could never close again. The holder's death is noticed sooner.
DEFAULT_LEASE_S = 60.0
# How often a process checks /proc for the death of another process's probe holder.
HOLDER_CHECK_S = 0.05
_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; hand it back to ``Breaker.record`` with the verdict.

    ``probe`` is 0 for a call in the closed state, else the half-open probe's
    sequence number; ``generation`` is the state it was granted in.
    """

    generation: int
    probe: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """No call now. ``reason``: ``"open"`` (fail fast, 503 circuit_open),
    ``"probing"`` (half-open and the probe is out: the same for the caller) or
    ``"deferred"`` (the upstream's Retry-After holds: the caller may sleep
    ``wait_s`` if its deadline allows, else answer 429/503 with Retry-After).
    ``wait_s`` is when asking again may succeed."""

    reason: Literal["open", "probing", "deferred"]
    wait_s: float


@dataclass(frozen=True, slots=True)
class BreakerState:
    """One upstream's breaker as /v1/status and the metrics show it.

    ``retry_at``: when an open breaker lets a probe through (0 otherwise);
    times are ``time.monotonic()`` seconds, 0 for never.
    """

    name: str
    state: StateName
    consecutive_failures: int
    window_calls: int
    window_failures: int
    opened_at: float
    retry_at: float
    not_before: float
    transitions: int
    opens: int
    probes_granted: int
    probes_reported: int
    probes_succeeded: int


DISABLED = Permit(generation=-1)


class Board(Protocol):
    """What a circuit needs of its board (``breaker.BreakerBoard``): the words of
    its slot, the board's lock, and the shared config and transition hook."""

    cfg: BreakerConfig
    on_transition: Transition | None
    _q: memoryview[int]
    _d: memoryview[float]

    def lock(self) -> None: ...
    def unlock(self) -> None: ...
    def state_of(self, name: str, base: int, now: float | None = None) -> BreakerState: ...


def probes_needed(cfg: BreakerConfig) -> int:
    """Successful probes, out of ``cfg.probes``, that close the breaker (at least 1)."""
    return max(1, math.ceil(cfg.probe_success_rate * cfg.probes - 1e-9))


class Breaker:
    """One upstream's circuit: ``allow`` before each call, ``record`` its verdict after.

    Get it from ``BreakerBoard.breaker``. ``refused`` counts this process's
    refusals only: counting them in the segment would put the lock back on
    the fail-fast path.
    """

    def __init__(self, board: Board, name: str, base: int) -> None:
        cfg = board.cfg
        self.name = name
        self.refused = 0
        self._board = board
        self._base = base
        self._q = board._q
        self._d = board._d
        self._enabled = cfg.enabled
        self._open_s = cfg.open_s
        self._consecutive = cfg.consecutive_failures
        self._rate = cfg.failure_rate
        self._min_calls = cfg.min_calls
        self._width = cfg.window_s / BUCKETS
        self._probes = cfg.probes
        self._need = probes_needed(cfg)
        self._pid = os.getpid()
        self._permit = Permit(generation=-2)  # the closed state's permit, reused per generation
        self._holder_checked = -math.inf

    # The hot path

    def allow(self, now: float | None = None, lease_s: float | None = None) -> Permit | Refusal:
        """A ``Permit`` to call the upstream now, or a ``Refusal`` saying why not and how long.

        ``lease_s``: how long a half-open probe granted now may stay out
        before it counts as failed (``DEFAULT_LEASE_S``); pass the longest the
        call may take, such as the time left to the request's deadline.
        ``now`` (``time.monotonic`` seconds) is for tests.
        """
        if now is None:
            now = _monotonic()
        base = self._base
        not_before = self._d[base + S_NOT_BEFORE]
        if not self._enabled:
            if now < not_before:
                self.refused += 1
                return Refusal("deferred", not_before - now)
            return DISABLED
        word = self._q[base + S_STATE]
        state = word & 3
        if state == CLOSED:
            if now < not_before:
                self.refused += 1
                return Refusal("deferred", not_before - now)
            permit = self._permit
            if permit.generation != word >> 2:
                permit = self._permit = Permit(word >> 2)
            return permit
        if state == OPEN:
            until = self._d[base + S_OPENED] + self._open_s
            if now < until:
                self.refused += 1
                return Refusal("open", max(until, not_before) - now)
        # Half-open, or open long enough to probe: both change shared state.
        changes: list[tuple[int, int]] = []
        self._board.lock()
        try:
            decision = self._decide(now, lease_s, changes)
        finally:
            self._board.unlock()
        self._announce(changes)
        if isinstance(decision, Refusal):
            self.refused += 1
        return decision

    def record(self, permit: Permit, ok: bool | None, now: float | None = None) -> None:
        """Report how the call made under ``permit`` went.

        ``ok``: True for a success, False for a failure that says the upstream
        is unhealthy (``UpstreamFailure.counts``: timeouts and connection
        errors included), None when the call ended without a verdict (the
        client cancelled, the request itself was bad). A permit granted in a
        state that has since changed is ignored.
        """
        if permit.generation < 0 or (ok is None and not permit.probe):
            return
        if now is None:
            now = _monotonic()
        q, d, base = self._q, self._d, self._base
        changes: list[tuple[int, int]] = []
        self._board.lock()
        try:
            word = q[base + S_STATE]
            if word >> 2 == permit.generation:
                if not permit.probe:
                    if word & 3 == CLOSED:
                        self._count(bool(ok), now, changes)
                elif q[base + S_PROBE_SEQ] == permit.probe and d[base + S_LEASE]:
                    d[base + S_LEASE] = 0.0
                    if ok is None:
                        q[base + S_GRANTED] -= 1  # no verdict: the next probe takes its place
                    else:
                        q[base + S_REPORTED] += 1
                        q[base + S_SUCCEEDED] += ok
                        self._judge(now, changes)
        finally:
            self._board.unlock()
        self._announce(changes)

    def defer(self, until: float) -> None:
        """Hold every call to this upstream, on every shard, until ``until`` (monotonic s).

        A later hold wins; an earlier one never shortens it. Applies even with
        the breaker disabled: it is the upstream's own request (Retry-After).
        """
        d, slot = self._d, self._base + S_NOT_BEFORE
        self._board.lock()
        try:
            if until > d[slot]:
                d[slot] = until
        finally:
            self._board.unlock()

    @property
    def not_before(self) -> float:
        """The current Retry-After hold (monotonic s; in the past when none)."""
        return float(self._d[self._base + S_NOT_BEFORE])

    def state(self, now: float | None = None) -> BreakerState:
        """This breaker's slot as ``snapshot`` shows it (``now``: for tests)."""
        return self._board.state_of(self.name, self._base, now)

    # The state machine, always under the lock

    def _decide(
        self, now: float, lease_s: float | None, changes: list[tuple[int, int]]
    ) -> Permit | Refusal:
        q, d, base = self._q, self._d, self._base
        word = q[base + S_STATE]
        gen = word >> 2
        not_before = d[base + S_NOT_BEFORE]
        if word & 3 == CLOSED:  # another process closed it since our unlocked read
            if now < not_before:
                return Refusal("deferred", not_before - now)
            return Permit(gen)
        if word & 3 == OPEN:
            until = d[base + S_OPENED] + self._open_s
            if now < until:
                return Refusal("open", max(until, not_before) - now)
            gen = self._move(HALF_OPEN, now, changes)
        else:
            lease = d[base + S_LEASE]
            if lease:
                if now < lease and self._holder_alive(now):
                    return Refusal("probing", min(lease - now, self._open_s))
                # The probe's holder died or never reported: count it as a failure.
                log.warning("circuit %s: probe %d lost, counted as failed", self.name,
                            q[base + S_PROBE_SEQ])  # fmt: skip
                d[base + S_LEASE] = 0.0
                q[base + S_REPORTED] += 1
                verdict = self._judge(now, changes)
                if verdict == OPEN:
                    return Refusal("open", max(now + self._open_s, not_before) - now)
                if verdict == CLOSED:  # it was the last probe, and enough had succeeded
                    if now < not_before:
                        return Refusal("deferred", not_before - now)
                    return Permit(q[base + S_STATE] >> 2)
        if now < not_before:
            return Refusal("deferred", not_before - now)
        if q[base + S_GRANTED] >= self._probes:
            return Refusal("probing", self._open_s)
        q[base + S_GRANTED] += 1
        seq = q[base + S_PROBE_SEQ] + 1
        q[base + S_PROBE_SEQ] = seq
        q[base + S_PROBE_PID] = self._pid
        d[base + S_LEASE] = now + (DEFAULT_LEASE_S if lease_s is None else max(lease_s, 1e-3))
        return Permit(gen, seq)

    def _count(self, ok: bool, now: float, changes: list[tuple[int, int]]) -> None:
        """A verdict in the closed state: the window, the run of failures, maybe open."""
        q, base = self._q, self._base
        idx = int(now / self._width)
        b = base + S_BUCKETS + 3 * (idx % BUCKETS)
        stored = q[b]
        if stored != idx:
            if stored > idx:  # a clock read long before the lock: too old for the window
                idx = -1
            else:
                q[b], q[b + 1], q[b + 2] = idx, 0, 0
        if idx >= 0:
            q[b + 1] += 1
        if ok:
            if q[base + S_CONSEC]:
                q[base + S_CONSEC] = 0
            return
        if idx >= 0:
            q[b + 2] += 1
        run = q[base + S_CONSEC] + 1
        q[base + S_CONSEC] = run
        if run >= self._consecutive:
            self._move(OPEN, now, changes)
            return
        calls, failures = window(q, base, max(idx, stored))
        if calls >= self._min_calls and failures >= self._rate * calls:
            self._move(OPEN, now, changes)

    def _judge(self, now: float, changes: list[tuple[int, int]]) -> int:
        """After a probe's verdict: close once every probe reported and enough
        succeeded, reopen as soon as enough can no longer succeed."""
        q, base = self._q, self._base
        reported, succeeded = q[base + S_REPORTED], q[base + S_SUCCEEDED]
        if succeeded + self._probes - reported < self._need:
            self._move(OPEN, now, changes)
            return OPEN
        if reported >= self._probes:
            self._move(CLOSED, now, changes)
            return CLOSED
        return HALF_OPEN

    def _move(self, new: int, now: float, changes: list[tuple[int, int]]) -> int:
        """Enter state ``new``; returns its generation."""
        q, d, base = self._q, self._d, self._base
        word = q[base + S_STATE]
        gen = (word >> 2) + 1
        if new == OPEN:
            d[base + S_OPENED] = now
            q[base + S_OPENS] += 1
        elif new == HALF_OPEN:
            q[base + S_GRANTED] = q[base + S_REPORTED] = q[base + S_SUCCEEDED] = 0
            d[base + S_LEASE] = 0.0
        else:
            q[base + S_CONSEC] = 0
            for b in range(base + S_BUCKETS, base + S_BUCKETS + 3 * BUCKETS):
                q[b] = 0
        q[base + S_TRANSITIONS] += 1
        d[base + S_CHANGED] = now
        # The state word goes last: an unlocked reader that sees it sees its fields (x86 TSO).
        q[base + S_STATE] = gen << 2 | new
        changes.append((word & 3, new))
        return gen

    def _holder_alive(self, now: float) -> bool:
        """Whether the probe's holder may still report (checked at most every HOLDER_CHECK_S)."""
        pid = self._q[self._base + S_PROBE_PID]
        if pid == self._pid or now - self._holder_checked < HOLDER_CHECK_S:
            return True
        self._holder_checked = now
        return _shm.proc_start_ticks(pid) is not None

    def _announce(self, changes: list[tuple[int, int]]) -> None:
        for old, new in changes:
            a, b = STATE_NAMES[old], STATE_NAMES[new]
            if new == OPEN:
                log.warning("circuit %s: %s -> %s", self.name, a, b)
            else:
                log.info("circuit %s: %s -> %s", self.name, a, b)
            if self._board.on_transition is not None:
                self._board.on_transition(self.name, a, b)
