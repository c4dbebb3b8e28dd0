"""Token-bucket rate limits for the gateway: one global bucket and one per session.

Every gateway replica is a process of its own, yet ``requests_per_s = 100``
must mean 100 for the whole gateway and a session's limit must hold whichever
replica its connections land on. So the buckets live in one shared segment in
/dev/shm that the supervisor creates and each replica attaches; a
``private`` limiter keeps the same layout in anonymous memory for a gateway
that runs without a supervisor (tests, ``Gateway`` built directly).

Cross-process atomicity comes from ``flock`` on the segment's descriptor:
about 0.8 µs for a lock/unlock pair here, and the kernel drops the lock when a
holder dies, so a SIGKILLed gateway can never wedge the others (a process-shared
semaphore would stay taken). A robust pthread mutex through ctypes measured
0.36 µs a pair, not worth its EOWNERDEAD recovery. Both buckets are checked and
then taken inside one critical section: a request refused by either bucket
takes from neither. The clock is ``CLOCK_MONOTONIC`` (``time.monotonic``),
which is the same clock in every process of the machine.

Sessions get a fixed table of ``session_slots`` buckets keyed by the xxh3-64
of the session id, so memory is bounded whatever the number of sessions. A
lookup probes ``PROBE`` neighbouring slots. A slot whose bucket has refilled
completely is free to take: forgetting a full bucket loses nothing, since a
returning session would start from a full bucket anyway. If every probed slot
belongs to another session that is still using its bucket, the newcomer
shares the fullest of them: under such churn the limit gets stricter for a
few sessions rather than looser for all. Requests with no session meet only
the global bucket (the client address says little behind a proxy or NAT).
Per-session limits are about fairness between well-behaved clients: a client
can mint session ids, so the global bucket is the one that protects the pipeline.

Layout, in 8-byte words: a header of ``HEADER_WORDS`` (magic, kind, slots,
probe, spare, creator pid, creator start ticks, created ns, then the two rates
and burst sizes as doubles, the global bucket's tokens and refill time, and the
admitted and refused counts), then ``SLOT_WORDS`` per session slot (key hash,
tokens, refill time, spare). Words 0, 5 and 6 follow the ring and control block
convention, so ``_shm.sweep_stale`` removes the segment of a dead supervisor.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import time
from typing import Literal

import xxhash

from mpipeline import _shm
from mpipeline.config import RateLimitConfig

HEADER_WORDS = 16
# Words 2-3 of the common header (_shm's), then this kind's own.
H_SLOTS, H_PROBE = _shm.H_WORD2, _shm.H_WORD3
H_RATE, H_BURST, H_SRATE, H_SBURST, H_TOKENS, H_LAST, H_ADMITTED, H_REFUSED = range(8, 16)
SLOT_WORDS = 4
S_KEY, S_TOKENS, S_LAST = range(3)
# Bound once: the hot path runs per request.
_flock, _LOCK_EX, _LOCK_UN = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
_monotonic = time.monotonic
_hash = xxhash.xxh3_64_intdigest
# Neighbouring slots a session may occupy: four 32-byte slots are two cache lines.
PROBE = 4

Bucket = Literal["global", "session"]


def bucket_size(rate: float, burst: int) -> float:
    """Tokens a full bucket holds: ``burst``, or one second's worth (at least 1) for 0."""
    return float(burst) if burst > 0 else float(max(1, math.ceil(rate)))


def retry_after_s(wait: float) -> int:
    """``wait`` seconds as a Retry-After value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait))


def segment_size(cfg: RateLimitConfig) -> int:
    return 8 * (HEADER_WORDS + SLOT_WORDS * _slots(cfg))


def _slots(cfg: RateLimitConfig) -> int:
    # No session limit, no table: the segment stays one header.
    return cfg.session_slots if cfg.session_requests_per_s > 0 else 0


class RateLimiter(_shm.Segment):
    """The buckets of one segment; ``acquire`` per request. One event-loop thread per object."""

    KIND = _shm.Kind.RATELIMIT
    WHAT = "rate limiter"

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool) -> None:
        super().__init__(name, fd, mem, creator=creator)
        self._q = self.words()
        self._d = self.doubles()
        q, d = self._q, self._d
        # Fixed at creation: plain attributes spare a load per request.
        self._n_slots = int(q[H_SLOTS])
        self._mask = self._n_slots - 1
        self._probe = int(q[H_PROBE])
        self._rate = float(d[H_RATE])
        self._burst = float(d[H_BURST])
        self._srate = float(d[H_SRATE]) if self._n_slots else 0.0
        self._sburst = float(d[H_SBURST])
        self.refused_by: Bucket = "global"

    # Construction

    @classmethod
    def create(cls, name: str, cfg: RateLimitConfig) -> RateLimiter:
        """A new shared segment ``name`` (``mpl-`` prefix, 0600) with full buckets.

        :raises FileExistsError: when the name is taken
        :raises RingError: when /dev/shm has no room for it
        """
        return cls._create(name, segment_size(cfg), _words(cfg), _doubles(cfg))

    @classmethod
    def attach(cls, name: str) -> RateLimiter:
        """Join the segment another process created; the limits are the creator's.

        :raises RingNotFound: when there is no such segment
        :raises RingCorrupted: when it is not a rate-limit segment
        """
        return cls._attach(name)

    @classmethod
    def private(cls, cfg: RateLimitConfig) -> RateLimiter:
        """Buckets in this process's memory only, for a gateway without a supervisor."""
        return cls._private(segment_size(cfg), _words(cfg), _doubles(cfg))

    @classmethod
    def _problem(cls, mem: memoryview, header: memoryview) -> str | None:
        slots = header[H_SLOTS]
        if slots & (slots - 1) if slots else False:
            return f"{slots} slots is not a power of two"
        if len(mem) != 8 * (HEADER_WORDS + SLOT_WORDS * slots):
            return f"{len(mem)} bytes does not fit {slots} slots"
        return None

    # The hot path

    def acquire(self, session_id: str | None, now: float | None = None) -> float:
        """Take a token from the global bucket and the session's, or from neither.

        Returns 0.0 when the request may go on, else the seconds until both
        buckets could hold a token again (``retry_after_s`` makes it a header),
        with ``refused_by`` naming the bucket that waits longer.
        ``now`` (``time.monotonic`` seconds) is for tests.
        """
        fd = self._fd
        if fd < 0:
            return self._acquire(session_id, _monotonic() if now is None else now)
        _flock(fd, _LOCK_EX)
        try:
            # The clock is read under the lock, so stamps only ever move forward.
            return self._acquire(session_id, _monotonic() if now is None else now)
        finally:
            _flock(fd, _LOCK_UN)

    def _acquire(self, session_id: str | None, now: float) -> float:
        d = self._d
        wait = 0.0
        rate = self._rate
        tokens = last = 0.0
        if rate > 0:
            tokens, last = d[H_TOKENS], d[H_LAST]
            if now > last:
                tokens += (now - last) * rate
                if tokens > self._burst:
                    tokens = self._burst
                last = now
            if tokens < 1.0:
                wait = (1.0 - tokens) / rate
                self.refused_by = "global"
        slot = key = 0
        stokens = 1.0
        srate = self._srate
        if srate > 0 and session_id is not None:
            slot, key, stokens = self._lookup(session_id, now)
            if stokens < 1.0:
                swait = (1.0 - stokens) / srate
                if swait >= wait:
                    wait = swait
                    self.refused_by = "session"
        if wait > 0.0:
            self._q[H_REFUSED] += 1
            return max(wait, 1e-9)
        # Both buckets hold a token: take them, still under the lock.
        if rate > 0:
            d[H_TOKENS] = tokens - 1.0
            d[H_LAST] = last
        if slot:
            d[slot + S_TOKENS] = stokens - 1.0
            if key:
                d[slot + S_LAST] = now
                # The key goes last: a writer killed halfway leaves the slot to its old owner.
                self._q[slot + S_KEY] = key
            elif now > d[slot + S_LAST]:
                d[slot + S_LAST] = now
        self._q[H_ADMITTED] += 1
        return 0.0

    def _lookup(self, session_id: str, now: float) -> tuple[int, int, float]:
        """``(slot word, key to store or 0, refilled tokens)`` for ``session_id``.

        The key is 0 when the slot is already this session's or is shared.
        """
        q, d = self._q, self._d
        srate, sburst, mask = self._srate, self._sburst, self._mask
        # 0 marks an empty slot; surrogatepass: a header may carry anything.
        h = _hash(session_id.encode("utf-8", "surrogatepass")) or 1
        start = h & mask
        # The usual case first, without the loop: the session's own slot, or a new one.
        slot = HEADER_WORDS + SLOT_WORDS * start
        key = q[slot]
        if key == h:
            tokens, last = d[slot + S_TOKENS], d[slot + S_LAST]
            if now > last:
                tokens += (now - last) * srate
                if tokens > sburst:
                    tokens = sburst
            return slot, 0, tokens
        if key == 0:
            return slot, h, sburst
        free = shared = -1
        shared_tokens = -1.0
        for i in range(self._probe):
            slot = HEADER_WORDS + SLOT_WORDS * ((start + i) & mask)
            key = q[slot + S_KEY]
            if key == 0:
                # Slots are never emptied, so the session is not further on.
                return slot, h, sburst
            tokens, last = d[slot + S_TOKENS], d[slot + S_LAST]
            if now > last:
                tokens += (now - last) * srate
                if tokens > sburst:
                    tokens = sburst
            if key == h:
                return slot, 0, tokens
            if tokens >= sburst:
                if free < 0:
                    free = slot
            elif tokens > shared_tokens:
                shared, shared_tokens = slot, tokens
        if free >= 0:
            return free, h, sburst
        return shared, 0, shared_tokens

    # Live reconfiguration

    def set_limits(self, cfg: RateLimitConfig) -> None:
        """Store new rates and burst sizes (a reload), under the lock; buckets keep their
        tokens, capped at the new sizes. The table's size cannot change: that needs a new run.
        Each replica takes them with ``refresh``."""
        fd = self._fd
        if fd >= 0:
            _flock(fd, _LOCK_EX)
        try:
            d = self._d
            d[H_RATE] = cfg.requests_per_s
            d[H_BURST] = burst = bucket_size(cfg.requests_per_s, cfg.burst)
            d[H_TOKENS] = min(d[H_TOKENS], burst)
            if self._n_slots:
                d[H_SRATE] = cfg.session_requests_per_s
                d[H_SBURST] = bucket_size(cfg.session_requests_per_s, cfg.session_burst)
        finally:
            if fd >= 0:
                _flock(fd, _LOCK_UN)
        self.refresh()

    def refresh(self) -> None:
        """Read the limits again (``set_limits`` in another process changed them)."""
        d = self._d
        self._rate = float(d[H_RATE])
        self._burst = float(d[H_BURST])
        self._srate = float(d[H_SRATE]) if self._n_slots else 0.0
        self._sburst = float(d[H_SBURST])

    # Observation

    @property
    def admitted(self) -> int:
        """Requests let through since the segment was created, by every process."""
        return int(self._q[H_ADMITTED])

    @property
    def refused(self) -> int:
        """Requests refused since the segment was created, by every process."""
        return int(self._q[H_REFUSED])


def _words(cfg: RateLimitConfig) -> _shm.Words:
    return {H_SLOTS: _slots(cfg), H_PROBE: min(PROBE, _slots(cfg))}


def _doubles(cfg: RateLimitConfig) -> _shm.Init:
    """Writes full buckets and the limits of ``cfg`` into a new segment."""

    def init(mem: memoryview) -> None:
        burst = bucket_size(cfg.requests_per_s, cfg.burst)
        with mem.cast("d") as d:
            d[H_RATE] = cfg.requests_per_s
            d[H_BURST] = burst
            d[H_SRATE] = cfg.session_requests_per_s
            d[H_SBURST] = bucket_size(cfg.session_requests_per_s, cfg.session_burst)
            d[H_TOKENS] = burst
            d[H_LAST] = time.monotonic()

    return init
