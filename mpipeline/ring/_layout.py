"""The ring's bytes: segment layout, record framing, fences; what every side agrees on.

Segment layout (all integers little-endian; header slots are u64)::

    offset  line  slots  written by  contents
    0       0     0-7    creator     magic, version|flags<<32, capacity, max_record,
                                     epoch, creator pid, creator start ticks, data offset
    64      1     8-15   producer    write position, records in, bytes in, high-water
                                     bytes, full events, pid, start ticks, wait seq
    128     2     16-23  consumer    read position, records out, bytes out, corrupt
                                     records, (spare), pid, start ticks, wait seq
    192     3     24-31  supervisor  poisoned flag, (spare)
    256     -     -      producer    data: ``capacity`` bytes of records

Each line has one writer, so the two sides never write the same cache line.
Positions are byte counters that only grow (u64 never wraps in practice);
``position % capacity`` is the offset in the data area, ``write - read`` the
bytes in use. A record is ``[u32 length][u32 checksum][payload][pad to 8]``
and never straddles the end of the data area: when it would, the producer
writes a wrap marker (length 0xFFFFFFFF) and starts the record at offset 0,
so every record is one contiguous slice that msgspec can decode in place.

Publication order: the producer writes record header and payload first and
the write position last; the consumer reads the write position first, then
the records below it. On x86-64 (TSO) stores become visible in program order
and loads are not reordered with older loads, so a consumer that sees the new
position also sees the bytes before it, provided the position is one aligned
8-byte store: CPython's memoryview item assignment for format 'Q' is a fixed
8-byte memcpy, which compilers emit as a single ``mov``; slots are 8-aligned
because mmap is page-aligned. On weaker memory models (aarch64, ppc64le...)
that is not enough, so there every publish is preceded and every acquire
followed by a full fence. Python exposes no fence, so ``_fence`` takes and
releases a ``threading.Lock``: both are locked atomic instructions in glibc,
which order everything (the fix vLLM adopted, vllm#30407). Only x86-64 is
verified by our tests; the README says so.
"""

from __future__ import annotations

import mmap
import platform
import struct
import threading
from typing import NamedTuple, TypeAlias

import xxhash

from mpipeline import _shm
from mpipeline.errors import RingCorrupted

# What a record may be made of: anything with a flat byte buffer.
Buffer: TypeAlias = bytes | bytearray | memoryview

MAGIC = _shm.MAGIC
VERSION = 1
# Header flag: records carry an xxh3 checksum of their payload.
FLAG_CHECKSUM = 1
HEADER_SIZE = 256
# Record header: payload length and checksum.
_REC = struct.Struct("<II")
_REC_HEADER = _REC.size
# Bound once for the other modules of the ring: CPython 3.11 compiles
# ``name.method(...)`` on an imported name as an attribute load plus a call
# (no LOAD_METHOD), which cost 5 % of a put or a get when this moved here.
_pack_record = _REC.pack_into
_unpack_record = _REC.unpack_from
_WRAP = 0xFFFFFFFF
_MASK32 = 0xFFFFFFFF
MIN_CAPACITY = 64
MAX_CAPACITY = 1 << 40
# A parked waiter re-checks this often: bounds the cost of a missed wakeup and
# how long a producer takes to notice its consumer died.
_TICK_S = 0.1
# Busy-poll this long before parking: cheap latency when traffic is steady.
DEFAULT_SPIN_S = 20e-6

# Header slots (u64 indexes).
S_MAGIC, S_VERSION, S_CAPACITY, S_MAX_RECORD, S_EPOCH, S_CREATOR_PID, S_CREATOR_START = range(7)
S_DATA_OFFSET = 7
S_WRITE, S_RECORDS_IN, S_BYTES_IN, S_HIGH_WATER, S_FULL = 8, 9, 10, 11, 12
S_PRODUCER_PID, S_PRODUCER_START, S_PRODUCER_WAIT = 13, 14, 15
S_READ, S_RECORDS_OUT, S_BYTES_OUT, S_CORRUPT = 16, 17, 18, 19
S_CONSUMER_PID, S_CONSUMER_START, S_CONSUMER_WAIT = 21, 22, 23
S_POISONED = 24

_DATA_BELL, _SPACE_BELL = _shm.BELL_SUFFIXES

_STRONG_ORDER = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_FENCE = threading.Lock()
_acquire = _FENCE.acquire
_release = _FENCE.release


def _fence() -> None:
    """Full memory barrier (see the module docstring)."""
    _acquire()
    _release()


def _checksum(buf: Buffer) -> int:
    return xxhash.xxh3_64_intdigest(buf) & _MASK32


class RingStats(NamedTuple):
    """A snapshot of a ring header, readable from any process without side effects."""

    name: str
    capacity: int
    used_bytes: int
    write_pos: int
    read_pos: int
    records_in: int
    records_out: int
    bytes_in: int
    bytes_out: int
    high_water: int
    full_events: int
    corrupt_records: int
    producer_pid: int
    consumer_pid: int
    epoch: int
    poisoned: bool

    @property
    def depth(self) -> int:
        """Records written and not yet consumed."""
        return self.records_in - self.records_out

    @property
    def occupancy(self) -> float:
        return self.used_bytes / self.capacity


def _validate_header(
    name: str, mem: mmap.mmap, expect_epoch: int | None, expect_capacity: int | None
) -> None:
    size = len(mem)
    if size < HEADER_SIZE:
        raise RingCorrupted(f"segment {name} is {size} bytes, smaller than a ring header")
    with memoryview(mem) as mv, mv[:HEADER_SIZE].cast("Q") as q:
        if q[S_MAGIC] != MAGIC:
            raise RingCorrupted(f"segment {name} is not an mpipeline ring (bad magic)")
        version = q[S_VERSION] & _MASK32
        if version != VERSION:
            raise RingCorrupted(f"ring {name} has layout version {version}, expected {VERSION}")
        cap, maxrec = q[S_CAPACITY], q[S_MAX_RECORD]
        # The ring may be live: read the read position on both sides of the write
        # position so that both checks hold at the instant w was read.
        r, w, r_after = q[S_READ], q[S_WRITE], q[S_READ]
        problems = []
        if cap % 8 or cap < MIN_CAPACITY or HEADER_SIZE + cap != size:
            problems.append(f"capacity {cap} does not match segment size {size}")
        if q[S_DATA_OFFSET] != HEADER_SIZE:
            problems.append(f"data offset {q[S_DATA_OFFSET]} is not {HEADER_SIZE}")
        if maxrec > cap // 2 - _REC_HEADER:
            problems.append(f"max_record {maxrec} exceeds half the capacity {cap}")
        if w % 8 or r % 8 or w < r or w - r_after > cap:
            problems.append(f"positions write={w} read={r} are inconsistent")
        if expect_capacity is not None and cap != expect_capacity:
            problems.append(f"capacity {cap}, expected {expect_capacity}")
        if expect_epoch is not None and q[S_EPOCH] != expect_epoch:
            problems.append(f"epoch {q[S_EPOCH]}, expected {expect_epoch} (stale attach)")
        if problems:
            raise RingCorrupted(f"ring {name}: " + "; ".join(problems))


# What ``mpipeline.ring`` re-exports.
__all__ = [
    "DEFAULT_SPIN_S",
    "FLAG_CHECKSUM",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CAPACITY",
    "MIN_CAPACITY",
    "S_BYTES_IN",
    "S_BYTES_OUT",
    "S_CAPACITY",
    "S_CONSUMER_PID",
    "S_CONSUMER_START",
    "S_CONSUMER_WAIT",
    "S_CORRUPT",
    "S_CREATOR_PID",
    "S_CREATOR_START",
    "S_DATA_OFFSET",
    "S_EPOCH",
    "S_FULL",
    "S_HIGH_WATER",
    "S_MAGIC",
    "S_MAX_RECORD",
    "S_POISONED",
    "S_PRODUCER_PID",
    "S_PRODUCER_START",
    "S_PRODUCER_WAIT",
    "S_READ",
    "S_RECORDS_IN",
    "S_RECORDS_OUT",
    "S_VERSION",
    "S_WRITE",
    "VERSION",
    "Buffer",
    "RingStats",
]
