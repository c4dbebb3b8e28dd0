"""Byte layout of the breaker board segment; ``breaker.py`` and ``_circuit.py`` use it.

In 8-byte words: ``HEADER_WORDS`` of header (``_shm.Segment``'s common eight
with slots, buckets and slot words as words 2-4, so ``_shm.sweep_stale``
removes the segment of a dead supervisor; then eight spare), then
``SLOT_WORDS`` per upstream slot:

====  ==========================================================
0-3   name, ASCII, up to ``NAME_BYTES``
4     name length; 0: a free slot. Written last when claiming
5     state word: ``generation << 2 | state``, one aligned store
6     consecutive failures (closed state)
7     opened at (double)
8     not before: the Retry-After hold (double)
9     transitions
10-12 probes granted, reported, succeeded (this half-open round)
13    probe lease expiry (double); 0: no probe out
14-15 probe holder's pid, probe sequence number
16    last transition time (double)
17    times opened
18-19 spare
20-   ``BUCKETS`` triples: bucket index, calls, failures
====  ==========================================================

Times are ``time.monotonic()`` seconds (CLOCK_MONOTONIC is one clock for
every process of the machine). Every word is written under the board's
``flock`` except by ``private`` boards, which have one user.
"""

from __future__ import annotations

from mpipeline import _shm

HEADER_WORDS = 16
H_SLOTS, H_BUCKETS, H_SLOT_WORDS = _shm.H_WORD2, _shm.H_WORD3, _shm.H_WORD4
# Time buckets of the failure-rate window: it slides in steps of window_s / BUCKETS.
BUCKETS = 8
SLOT_WORDS = 48
NAME_BYTES = 32
(S_NAME_LEN, S_STATE, S_CONSEC, S_OPENED, S_NOT_BEFORE, S_TRANSITIONS, S_GRANTED, S_REPORTED,
 S_SUCCEEDED, S_LEASE, S_PROBE_PID, S_PROBE_SEQ, S_CHANGED, S_OPENS) = range(4, 18)  # fmt: skip
S_BUCKETS = 20
CLOSED, OPEN, HALF_OPEN = 0, 1, 2


def segment_size(slots: int) -> int:
    return 8 * (HEADER_WORDS + SLOT_WORDS * slots)


def window(q: memoryview, base: int, current: int) -> tuple[int, int]:
    """Calls and failures in the buckets still inside the window ending at bucket ``current``."""
    calls = failures = 0
    oldest = current - BUCKETS
    for b in range(base + S_BUCKETS, base + S_BUCKETS + 3 * BUCKETS, 3):
        if oldest < q[b] <= current:
            calls += q[b + 1]
            failures += q[b + 2]
    return calls, failures


def header_words(slots: int) -> _shm.Words:
    """The header words of a new board of ``slots`` slots."""
    return {H_SLOTS: slots, H_BUCKETS: BUCKETS, H_SLOT_WORDS: SLOT_WORDS}


def problem(mem: memoryview, header: memoryview) -> str | None:
    """What is wrong with a board's own header words, or None."""
    if header[H_BUCKETS] != BUCKETS or header[H_SLOT_WORDS] != SLOT_WORDS:
        return "another layout version"
    if len(mem) != segment_size(header[H_SLOTS]):
        return f"{len(mem)} bytes does not fit {header[H_SLOTS]} slots"
    return None
