"""Circuit breakers per upstream, one board shared by every inference shard of a node.

A shard that sees its upstream die should spare the other shards the same
discovery: with a breaker per process, N shards send N times as many doomed
calls and open at N different moments. So the breakers live in one segment
(``mpl-<run_id>-breakers``, 0600) that the supervisor creates and each shard
attaches; ``private`` keeps the same layout in anonymous memory for library
use and tests. The layout is documented in ``_breaker_shm.py``.

Each upstream gets a slot, found or claimed by its name. The state machine
(``_circuit.Breaker``) fixes what the reference orchestrator got wrong:
timeouts and connection errors count as failures (the caller passes
``UpstreamFailure.counts``); the closed state opens on ``consecutive_failures``
in a row *or* on a failure rate over a sliding window of time buckets;
half-open lets one probe at a time through, up to ``probes`` of them, and
closes only when their success rate reaches ``probe_success_rate``
(reopening as soon as it no longer can), not on the first success. A probe
whose holder died or never reported expires and counts as a failure, so a
lost permit cannot wedge the breaker. ``defer`` records an upstream's
Retry-After: no call starts before it, on any shard, and ``allow`` tells it
apart from "open" so the caller may wait instead of failing.

Concurrency: every update runs under ``flock`` on the segment (about 0.9 µs a
pair; the kernel drops it when a holder dies, see ``gateway/ratelimit.py``).
The common ``allow`` takes no lock: the state and its generation share one
aligned u64 (a single store on x86-64, so never torn), and a permit granted on
a state that changes an instant later carries the old generation, so its
verdict is ignored, exactly as if it had been granted just before the change.
"""

from __future__ import annotations

import mmap
import time
from typing import Self

from mpipeline import _shm
from mpipeline.config import BreakerConfig
from mpipeline.resilience import _breaker_shm as layout
from mpipeline.resilience._breaker_shm import (
    HEADER_WORDS,
    NAME_BYTES,
    OPEN,
    S_CONSEC,
    S_GRANTED,
    S_NAME_LEN,
    S_NOT_BEFORE,
    S_OPENED,
    S_OPENS,
    S_REPORTED,
    S_STATE,
    S_SUCCEEDED,
    S_TRANSITIONS,
    SLOT_WORDS,
)
from mpipeline.resilience._circuit import (
    DEFAULT_LEASE_S,
    DISABLED,
    STATE_NAMES,
    Breaker,
    BreakerState,
    Permit,
    Refusal,
    StateName,
    Transition,
    probes_needed,
)

_monotonic = time.monotonic


class BreakerBoard(_shm.Segment):
    """The breakers of one segment; one event-loop thread per object."""

    KIND = _shm.Kind.BREAKERS
    WHAT = "breaker board"

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool) -> None:
        super().__init__(name, fd, mem, creator=creator)
        self.cfg = BreakerConfig()
        self.on_transition: Transition | None = None
        self._q = self.words()
        self._d = self.doubles()
        self._slots = int(self._q[layout.H_SLOTS])
        self._breakers: dict[str, Breaker] = {}

    @classmethod
    def create(
        cls, name: str, cfg: BreakerConfig, slots: int = 64, on_transition: Transition | None = None
    ) -> BreakerBoard:
        """A new shared segment ``name`` (``mpl-`` prefix, 0600) with ``slots`` free slots.

        :raises FileExistsError: when the name is taken
        :raises RingError: when /dev/shm has no room for it
        """
        size = layout.segment_size(_slots(slots))
        return cls._create(name, size, layout.header_words(slots))._use(cfg, on_transition)

    @classmethod
    def attach(
        cls, name: str, cfg: BreakerConfig, on_transition: Transition | None = None
    ) -> BreakerBoard:
        """Join the board another process created. Every process must pass the same ``cfg``.

        :raises RingNotFound: when there is no such segment
        :raises RingCorrupted: when it is not a breaker board
        """
        return cls._attach(name)._use(cfg, on_transition)

    @classmethod
    def private(
        cls, cfg: BreakerConfig, slots: int = 64, on_transition: Transition | None = None
    ) -> BreakerBoard:
        """Breakers in this process's memory only (no lock: one thread uses them)."""
        size = layout.segment_size(_slots(slots))
        return cls._private(size, layout.header_words(slots))._use(cfg, on_transition)

    @classmethod
    def _problem(cls, mem: memoryview, header: memoryview) -> str | None:
        return layout.problem(mem, header)

    def _use(self, cfg: BreakerConfig, on_transition: Transition | None) -> Self:
        self.cfg = cfg
        self.on_transition = on_transition
        return self

    def breaker(self, upstream: str) -> Breaker:
        """The breaker of ``upstream``, claiming a free slot the first time any process asks.

        :raises ValueError: when the name is not 1-32 ASCII bytes or every slot is taken
        """
        found = self._breakers.get(upstream)
        if found is not None:
            return found
        try:
            raw = upstream.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"upstream name {upstream!r} is not ASCII") from None
        if not 0 < len(raw) <= NAME_BYTES:
            raise ValueError(f"upstream name {upstream!r} must be 1-{NAME_BYTES} bytes")
        self.lock()
        try:
            base = self._find_or_claim(raw)
        finally:
            self.unlock()
        if base < 0:
            raise ValueError(
                f"breaker board {self.name} has no free slot for {upstream!r}: "
                f"all {self._slots} are taken"
            )
        found = self._breakers[upstream] = Breaker(self, upstream, base)
        return found

    def _find_or_claim(self, raw: bytes) -> int:
        q, free = self._q, -1
        for i in range(self._slots):
            base = HEADER_WORDS + SLOT_WORDS * i
            length = q[base + S_NAME_LEN]
            if length == 0:
                if free < 0:
                    free = base
            elif length == len(raw) and self._mem[8 * base : 8 * base + length] == raw:
                return base
        if free >= 0:
            self._mem[8 * free : 8 * free + len(raw)] = raw
            # The length goes last: a claimer killed halfway leaves the slot free.
            q[free + S_NAME_LEN] = len(raw)
        return free

    def snapshot(self, now: float | None = None) -> list[BreakerState]:
        """Every claimed slot's state, in slot order (``now``: for tests)."""
        out: list[BreakerState] = []
        q = self._q
        for i in range(self._slots):
            base = HEADER_WORDS + SLOT_WORDS * i
            length = q[base + S_NAME_LEN]
            if length:
                name = bytes(self._mem[8 * base : 8 * base + length]).decode("ascii", "replace")
                out.append(self.state_of(name, base, now))
        return out

    def state_of(self, name: str, base: int, now: float | None = None) -> BreakerState:
        """The state of the slot at word ``base`` (``name``: its upstream)."""
        q, d = self._q, self._d
        self.lock()
        try:
            word = q[base + S_STATE]
            state = word & 3
            calls, failures = layout.window(q, base, int((now or _monotonic()) / self._width()))
            opened = d[base + S_OPENED]
            return BreakerState(
                name=name,
                state=STATE_NAMES[state],
                consecutive_failures=int(q[base + S_CONSEC]),
                window_calls=calls,
                window_failures=failures,
                opened_at=opened,
                retry_at=opened + self.cfg.open_s if state == OPEN else 0.0,
                not_before=d[base + S_NOT_BEFORE],
                transitions=int(q[base + S_TRANSITIONS]),
                opens=int(q[base + S_OPENS]),
                probes_granted=int(q[base + S_GRANTED]),
                probes_reported=int(q[base + S_REPORTED]),
                probes_succeeded=int(q[base + S_SUCCEEDED]),
            )
        finally:
            self.unlock()

    def _width(self) -> float:
        return self.cfg.window_s / layout.BUCKETS


def _slots(slots: int) -> int:
    if slots < 1:
        raise ValueError(f"a breaker board needs at least one slot, not {slots}")
    return slots


__all__ = [
    "DEFAULT_LEASE_S",
    "DISABLED",
    "Breaker",
    "BreakerBoard",
    "BreakerState",
    "Permit",
    "Refusal",
    "StateName",
    "Transition",
    "probes_needed",
]
