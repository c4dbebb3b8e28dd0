"""Ring: a single-producer/single-consumer record ring in shared memory.

Every stage talks to the next through one of these, so its speed bounds the
whole pipeline and its correctness decides whether anything is lost.

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

Sleeping without lost wakeups: a waiter bumps its wait sequence to an odd
value, fences, re-checks the ring, and only then sleeps on its doorbell; the
other side publishes, fences, and rings only when it sees a new odd sequence.
The fence on both sides stops the store-then-load reordering x86 does allow,
so one of the two always sees the other. Waiters also wake every
``_TICK_S`` to re-check and to notice a dead peer.

Limits: one producer and one consumer process per ring (SPSC; one handle per
side, not thread-safe). A record holds at most ``max_record`` bytes (default
a quarter of the capacity, at most half), so an empty ring always has room.
A record handed out by a get is at-least-once: it is released only by the
next get, so a consumer that dies holding it leaves it to its successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import platform
import secrets
import struct
import threading
import time
import warnings
from collections.abc import Iterable
from types import TracebackType
from typing import NamedTuple, NoReturn, Self, TypeAlias

import xxhash

from mpipeline import _shm
from mpipeline._doorbell import Doorbell
from mpipeline.errors import (
    PeerGone,
    RecordTooLarge,
    RingClosed,
    RingCorrupted,
    RingEmpty,
    RingError,
    RingFull,
    RingPoisoned,
)

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


class Ring:
    """One end (or both) of a shared-memory SPSC ring; see the module docstring.

    Build with ``Ring.create`` (the owner, who alone unlinks) or ``Ring.attach``.
    A handle becomes the producer on its first put and the consumer on its
    first get, recording its pid in the header so the other side and the
    supervisor can tell when it dies.
    """

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool, spin_s: float) -> None:
        # Private: use create() or attach(), which validate the segment first.
        self.name = name
        self.spin_s = spin_s
        self._fd = fd
        self._mem = mem
        self._creator = creator
        self._closed = False
        self._mv = memoryview(mem)
        self._q = self._mv[:HEADER_SIZE].cast("Q")
        q = self._q
        self._capacity: int = q[S_CAPACITY]
        self._max_record: int = q[S_MAX_RECORD]
        self._checksums = bool((q[S_VERSION] >> 32) & FLAG_CHECKSUM)
        self._data = self._mv[HEADER_SIZE : HEADER_SIZE + self._capacity]
        # What consumers see: read-only, so nobody scribbles over a record in place.
        self._rdata = self._data.toreadonly()
        self._data_bell: Doorbell | None = None
        self._space_bell: Doorbell | None = None
        self._poison: str | None = None
        # Producer-side state, loaded from the header when this handle claims the role.
        self._producing = False
        self._wpos = self._rcache = self._nin = self._bin = self._hwm = self._full = 0
        self._pwait = self._rung_consumer = 0
        # Consumer-side state.
        self._consuming = False
        self._rpos = self._rnext = self._wcache = self._nout = self._bout = self._corrupt = 0
        self._cwait = self._rung_producer = 0

    # Construction

    @classmethod
    def create(
        cls,
        capacity: int,
        name: str | None = None,
        *,
        max_record: int | None = None,
        checksums: bool = True,
        epoch: int = 1,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> Ring:
        """Create a new segment of ``capacity`` data bytes and return its owner handle.

        :param capacity: data bytes, a multiple of 8 in [64, 2**40].
        :param name: segment name (``mpl-`` is prepended when missing); random when None.
        :param max_record: largest payload accepted; default ``capacity // 4 - 8``,
            at most ``capacity // 2 - 8``.
        :raises ValueError: for a bad capacity, max_record or name.
        :raises FileExistsError: when a segment of that name exists.
        :raises RingError: when /dev/shm has no room for it.
        """
        if capacity % 8 or not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
            raise ValueError(
                f"ring capacity must be a multiple of 8 in [{MIN_CAPACITY}, {MAX_CAPACITY}], "
                f"got {capacity}"
            )
        limit = min(capacity // 2 - _REC_HEADER, _MASK32 - 1)
        if max_record is None:
            max_record = min(capacity // 4 - _REC_HEADER, limit)
        if not 0 <= max_record <= limit:
            raise ValueError(f"max_record must be in [0, {limit}] for capacity {capacity}")
        if name is None:
            name = f"{_shm.PREFIX}{secrets.token_hex(8)}"
        elif not name.startswith(_shm.PREFIX):
            name = _shm.PREFIX + name
        _shm.check_name(name)
        pid = os.getpid()
        fd, mem = _shm.create_segment(name, HEADER_SIZE + capacity)
        try:
            _shm.make_bell(name, _DATA_BELL)
            _shm.make_bell(name, _SPACE_BELL)
            with memoryview(mem) as mv, mv[:HEADER_SIZE].cast("Q") as q:
                q[S_VERSION] = VERSION | ((FLAG_CHECKSUM if checksums else 0) << 32)
                q[S_CAPACITY] = capacity
                q[S_MAX_RECORD] = max_record
                q[S_EPOCH] = epoch
                q[S_CREATOR_PID] = pid
                q[S_CREATOR_START] = _shm.proc_start_ticks(pid) or 0
                q[S_DATA_OFFSET] = HEADER_SIZE
                # Magic last: a concurrent attach or sweep never sees a half-made header.
                q[S_MAGIC] = MAGIC
        except BaseException:
            mem.close()
            os.close(fd)
            _shm.unlink_segment(name)
            raise
        return cls(name, fd, mem, creator=True, spin_s=spin_s)

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        expect_epoch: int | None = None,
        expect_capacity: int | None = None,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> Ring:
        """Attach to an existing ring by name, after validating its header.

        :raises RingNotFound: when no segment has that name.
        :raises RingCorrupted: when the segment is not a valid ring of this
            version, or its epoch/capacity differ from the expected ones.
        """
        if not name.startswith(_shm.PREFIX):
            name = _shm.PREFIX + name
        fd, mem = _shm.attach_segment(name)
        try:
            _validate_header(name, mem, expect_epoch, expect_capacity)
        except BaseException:
            mem.close()
            os.close(fd)
            raise
        return cls(name, fd, mem, creator=False, spin_s=spin_s)

    # Properties

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_record(self) -> int:
        return self._max_record

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def is_creator(self) -> bool:
        return self._creator

    # Producer side

    def _claim_producer(self) -> None:
        self._check_open()
        q = self._q
        self._wpos = q[S_WRITE]
        self._rcache = q[S_READ]
        self._nin, self._bin, self._hwm, self._full = (
            q[S_RECORDS_IN],
            q[S_BYTES_IN],
            q[S_HIGH_WATER],
            q[S_FULL],
        )
        # A predecessor may have died asleep: start from an even (awake) sequence.
        self._pwait = (q[S_PRODUCER_WAIT] + 1) & ~1
        q[S_PRODUCER_WAIT] = self._pwait
        pid = os.getpid()
        q[S_PRODUCER_START] = _shm.proc_start_ticks(pid) or 0
        q[S_PRODUCER_PID] = pid
        self._producing = True

    def try_put(self, buf: Buffer) -> bool:
        """Append one record if it fits now; never blocks.

        :param buf: bytes, bytearray or a 1-D byte memoryview.
        :return: True when written and published, False when the ring is full.
        :raises RecordTooLarge: when ``len(buf) > max_record``; nothing is written.
        :raises RingClosed: when this handle was closed.
        """
        if not self._producing:
            self._claim_producer()
        n = len(buf)
        if n > self._max_record:
            raise self._too_large(n)
        cap = self._capacity
        w = self._wpos
        off = w % cap
        rec = (n + 15) & -8
        tail = cap - off
        need = rec if rec <= tail else rec + tail
        if w + need - self._rcache > cap:
            self._rcache = self._load_read()
            if w + need - self._rcache > cap:
                self._full += 1
                self._q[S_FULL] = self._full
                return False
        data = self._data
        if rec > tail:
            _REC.pack_into(data, off, _WRAP, 0)
            off = 0
        _REC.pack_into(data, off, n, _checksum(buf) if self._checksums else 0)
        data[off + 8 : off + 8 + n] = buf
        self._nin += 1
        self._bin += n
        self._publish_write(w + need)
        return True

    def put_many(self, bufs: Iterable[Buffer]) -> int:
        """Append records in order until one does not fit; publish them at once.

        One position store and one doorbell check for the whole batch, which
        is what makes batching cheap.

        :return: how many records of ``bufs`` were written (a prefix).
        :raises RecordTooLarge: when a record exceeds ``max_record``; none of
            the batch is published then.
        """
        if not self._producing:
            self._claim_producer()
        cap = self._capacity
        maxrec = self._max_record
        data = self._data
        checksums = self._checksums
        pack = _REC.pack_into
        w = w0 = self._wpos
        limit = self._rcache + cap
        count = nbytes = 0
        for buf in bufs:
            n = len(buf)
            if n > maxrec:
                raise self._too_large(n)
            off = w % cap
            rec = (n + 15) & -8
            tail = cap - off
            need = rec if rec <= tail else rec + tail
            if w + need > limit:
                self._rcache = self._load_read()
                limit = self._rcache + cap
                if w + need > limit:
                    self._full += 1
                    self._q[S_FULL] = self._full
                    break
            if rec > tail:
                pack(data, off, _WRAP, 0)
                off = 0
            pack(data, off, n, _checksum(buf) if checksums else 0)
            data[off + 8 : off + 8 + n] = buf
            w += need
            count += 1
            nbytes += n
        if w != w0:
            self._nin += count
            self._bin += nbytes
            self._publish_write(w)
        return count

    def _publish_write(self, w: int) -> None:
        q = self._q
        self._wpos = w
        if not _STRONG_ORDER:
            _fence()  # release: payload before position
        q[S_WRITE] = w
        q[S_RECORDS_IN] = self._nin
        q[S_BYTES_IN] = self._bin
        if w - self._rcache > self._hwm:
            self._rcache = self._load_read()
            used = w - self._rcache
            if used > self._hwm:
                self._hwm = used
                q[S_HIGH_WATER] = used
        _fence()  # store->load: the position must be visible before we look at the flag
        seq = q[S_CONSUMER_WAIT]
        if seq & 1 and seq != self._rung_consumer:
            self._rung_consumer = seq
            self._bell(_DATA_BELL).ring()

    async def put(self, buf: Buffer, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Append one record, sleeping on the doorbell while the ring is full.

        :raises RingFull: when ``timeout`` seconds pass without room.
        :raises PeerGone: when the consumer process died while we waited.
        :raises RecordTooLarge: as ``try_put``.
        """
        if self.try_put(buf):
            return
        if self.spin_s > 0:
            end = time.perf_counter() + self.spin_s
            while time.perf_counter() < end:
                if self.try_put(buf):
                    return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        bell = self._bell(_SPACE_BELL)
        q = self._q
        while True:
            self._pwait += 1
            q[S_PRODUCER_WAIT] = self._pwait  # odd: asleep
            try:
                _fence()
                if self.try_put(buf):
                    return
                wait = _TICK_S
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise RingFull(
                            f"ring {self.name} stayed full for {timeout}s "
                            f"({len(buf)} bytes to write)"
                        )
                rung = await bell.wait(wait)
            finally:
                self._pwait += 1
                q[S_PRODUCER_WAIT] = self._pwait
            if self.try_put(buf):
                return
            if not rung:
                self._check_consumer()

    def _check_consumer(self) -> None:
        q = self._q
        pid = q[S_CONSUMER_PID]
        if pid and not _shm.process_alive(pid, q[S_CONSUMER_START]):
            raise PeerGone(f"consumer pid {pid} of ring {self.name} died and was not replaced")

    def consumer_alive(self) -> bool | None:
        """True/False for the recorded consumer, None when none has attached yet."""
        pid = self._q[S_CONSUMER_PID]
        return None if pid == 0 else _shm.process_alive(pid, self._q[S_CONSUMER_START])

    def producer_alive(self) -> bool | None:
        pid = self._q[S_PRODUCER_PID]
        return None if pid == 0 else _shm.process_alive(pid, self._q[S_PRODUCER_START])

    # Consumer side

    def _claim_consumer(self) -> None:
        self._check_open()
        q = self._q
        self._rpos = self._rnext = q[S_READ]
        self._wcache = q[S_WRITE]
        self._nout, self._bout, self._corrupt = q[S_RECORDS_OUT], q[S_BYTES_OUT], q[S_CORRUPT]
        self._cwait = (q[S_CONSUMER_WAIT] + 1) & ~1
        q[S_CONSUMER_WAIT] = self._cwait
        pid = os.getpid()
        q[S_CONSUMER_START] = _shm.proc_start_ticks(pid) or 0
        q[S_CONSUMER_PID] = pid
        self._consuming = True
        if q[S_POISONED]:
            self._poison = "the supervisor marked this ring poisoned"

    def try_get(self) -> memoryview | None:
        """Take the next record if there is one; never blocks.

        Returns a read-only view straight into shared memory, valid until the
        next get (``try_get``, ``get_many`` or ``get``) or ``close``: the space
        is released to the producer only then. Copy it (``bytes(view)``) to keep it.

        :raises RingCorrupted: on a checksum mismatch (that record is skipped
            and counted; the next get continues) or on broken framing (the ring
            is poisoned and every later get raises).
        :raises RingClosed: when this handle was closed.
        """
        if not self._consuming:
            self._claim_consumer()
        r = self._rnext
        if r != self._rpos:
            self._publish_read(r)
        if self._poison is None and self._q[S_POISONED]:
            self._poison = "the supervisor marked this ring poisoned"
        if r == self._wcache:
            self._wcache = self._load_write(r)
            if r == self._wcache:
                return None
            if not _STRONG_ORDER:
                _fence()  # acquire: position before payload
        view, ok = self._read_record(r)
        if not ok:
            raise self._corrupt_record(r, view)
        return view

    def get_many(self, max_n: int) -> list[memoryview]:
        """Take up to ``max_n`` records; the views live until the next get.

        A corrupt record ends the batch early; the next call raises for it.
        """
        if not self._consuming:
            self._claim_consumer()
        r = self._rnext
        if r != self._rpos:
            self._publish_read(r)
        if self._poison is None and self._q[S_POISONED]:
            self._poison = "the supervisor marked this ring poisoned"
        w = self._wcache
        if r == w:
            w = self._wcache = self._load_write(r)
            if r == w:
                return []
            if not _STRONG_ORDER:
                _fence()
        out: list[memoryview] = []
        read = self._read_record
        while r < w and len(out) < max_n:
            view, ok = read(r)
            if not ok:
                if out:
                    # Report it on the next call, after these are used; it is counted then.
                    self._rnext = r
                    self._nout -= 1
                    self._bout -= len(view)
                    break
                raise self._corrupt_record(r, view)
            out.append(view)
            r = self._rnext
        return out

    def _load_write(self, r: int) -> int:
        """Re-read the write position; poison the ring if it cannot be right."""
        w: int = self._q[S_WRITE]
        if w < r or w - r > self._capacity or w & 7:
            self._poison_ring(f"write position {w} is inconsistent with read position {r}")
        return w

    def _load_read(self) -> int:
        """Re-read the read position; raise if it cannot be right."""
        r: int = self._q[S_READ]
        w = self._wpos
        if r > w or w - r > self._capacity or r & 7:
            self._q[S_POISONED] = 1
            raise RingPoisoned(
                f"ring {self.name} is corrupted: read position {r} is inconsistent "
                f"with write position {w}"
            )
        return r

    def _read_record(self, r: int) -> tuple[memoryview, bool]:
        """Parse the record at position ``r``; advance ``_rnext`` past it."""
        if self._poison is not None:
            raise RingPoisoned(f"ring {self.name} is poisoned: {self._poison}")
        cap = self._capacity
        data = self._data
        off = r % cap
        n, crc = _REC.unpack_from(data, off)
        if n == _WRAP:
            r += cap - off
            off = 0
            n, crc = _REC.unpack_from(data, 0)
        if n > self._max_record:
            self._poison_ring(f"record length {n} at position {r} exceeds max_record")
        end = r + ((n + 15) & -8)
        if end > self._wcache:
            self._poison_ring(f"record at position {r} runs past the write position")
        view = self._rdata[off + 8 : off + 8 + n]
        self._rnext = end
        self._nout += 1
        self._bout += n
        if self._checksums and _checksum(view) != crc:
            return view, False
        return view, True

    def _publish_read(self, r: int) -> None:
        q = self._q
        self._rpos = r
        if not _STRONG_ORDER:
            _fence()  # release: finish reading before the space is reused
        q[S_READ] = r
        q[S_RECORDS_OUT] = self._nout
        q[S_BYTES_OUT] = self._bout
        _fence()
        seq = q[S_PRODUCER_WAIT]
        if seq & 1 and seq != self._rung_producer:
            self._rung_producer = seq
            self._bell(_SPACE_BELL).ring()

    async def get(self, timeout: float | None = None) -> memoryview:  # noqa: ASYNC109
        """Take the next record, sleeping on the doorbell while the ring is empty.

        The view follows the ``try_get`` lifetime rule.

        :raises RingEmpty: when ``timeout`` seconds pass with nothing to read.
        :raises RingCorrupted: as ``try_get``.
        """
        view = self.try_get()
        if view is not None:
            return view
        if self.spin_s > 0:
            end = time.perf_counter() + self.spin_s
            while time.perf_counter() < end:
                view = self.try_get()
                if view is not None:
                    return view
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        bell = self._bell(_DATA_BELL)
        q = self._q
        while True:
            self._cwait += 1
            q[S_CONSUMER_WAIT] = self._cwait
            try:
                _fence()
                view = self.try_get()
                if view is not None:
                    return view
                wait = _TICK_S
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise RingEmpty(f"ring {self.name} stayed empty for {timeout}s")
                await bell.wait(wait)
            finally:
                self._cwait += 1
                q[S_CONSUMER_WAIT] = self._cwait
            view = self.try_get()
            if view is not None:
                return view

    # Corruption

    def _corrupt_record(self, r: int, view: memoryview) -> RingCorrupted:
        self._corrupt += 1
        self._q[S_CORRUPT] = self._corrupt
        exc = RingCorrupted(
            f"checksum mismatch in ring {self.name} at position {r} ({len(view)} bytes); "
            "the record was skipped"
        )
        exc.record = bytes(view[:256])  # type: ignore[attr-defined]
        return exc

    def _poison_ring(self, why: str) -> NoReturn:
        self._poison = why
        self._corrupt += 1
        self._q[S_CORRUPT] = self._corrupt
        self._q[S_POISONED] = 1
        raise RingPoisoned(f"ring {self.name} is corrupted: {why}")

    def _too_large(self, n: int) -> RecordTooLarge:
        return RecordTooLarge(
            f"record of {n} bytes exceeds ring {self.name}'s max_record of "
            f"{self._max_record} bytes (capacity {self._capacity})"
        )

    # Observation

    def stats(self) -> RingStats:
        """Read the header; safe from any process, disturbs neither side."""
        self._check_open()
        q = self._q
        w, r = q[S_WRITE], q[S_READ]
        return RingStats(
            name=self.name,
            capacity=self._capacity,
            used_bytes=w - r,
            write_pos=w,
            read_pos=r,
            records_in=q[S_RECORDS_IN],
            records_out=q[S_RECORDS_OUT],
            bytes_in=q[S_BYTES_IN],
            bytes_out=q[S_BYTES_OUT],
            high_water=q[S_HIGH_WATER],
            full_events=q[S_FULL],
            corrupt_records=q[S_CORRUPT],
            producer_pid=q[S_PRODUCER_PID],
            consumer_pid=q[S_CONSUMER_PID],
            epoch=q[S_EPOCH],
            poisoned=bool(q[S_POISONED]),
        )

    def occupancy(self) -> float:
        """Fraction of the data area in use, 0.0 to 1.0."""
        self._check_open()
        return (self._q[S_WRITE] - self._q[S_READ]) / self._capacity

    def poison(self) -> None:
        """Mark the ring unusable (supervisor use: a corrupt edge is recreated)."""
        self._check_open()
        self._q[S_POISONED] = 1

    # Lifetime

    def _bell(self, suffix: str) -> Doorbell:
        self._check_open()
        if suffix == _DATA_BELL:
            if self._data_bell is None:
                self._data_bell = Doorbell(self.name, suffix)
            return self._data_bell
        if self._space_bell is None:
            self._space_bell = Doorbell(self.name, suffix)
        return self._space_bell

    def _check_open(self) -> None:
        if self._closed:
            raise RingClosed(f"ring {self.name} handle is closed")

    def close(self) -> None:
        """Release this handle's mapping and descriptors; never removes the segment.

        A side that closes cleanly clears its pid, so the other side waits for
        a successor instead of treating it as dead. Views still held by the
        caller keep the mapping alive until they are released.
        """
        if self._closed:
            return
        q = self._q
        if self._producing and q[S_PRODUCER_PID] == os.getpid():
            q[S_PRODUCER_PID] = 0
        if self._consuming and q[S_CONSUMER_PID] == os.getpid():
            q[S_READ] = self._rnext  # release what was handed out
            q[S_RECORDS_OUT] = self._nout
            q[S_BYTES_OUT] = self._bout
            q[S_CONSUMER_PID] = 0
        self._closed = True
        # The next put/get goes through _claim_*, which raises RingClosed.
        self._producing = self._consuming = False
        for bell in (self._data_bell, self._space_bell):
            if bell is not None:
                bell.close()
        self._q.release()
        self._rdata.release()
        self._data.release()
        self._mv.release()
        with contextlib.suppress(BufferError):
            # BufferError: the caller still holds a view; the mapping goes with it.
            self._mem.close()
        os.close(self._fd)

    def unlink(self) -> None:
        """Remove the segment and its doorbells from /dev/shm (creator only).

        :raises RingError: when called on an attached handle: only the creator
            may destroy a segment, so a stage can never pull one from under
            the others.
        """
        if not self._creator:
            raise RingError(
                f"ring {self.name} was attached, not created, here; only its creator unlinks it"
            )
        _shm.unlink_segment(self.name)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close; the creator also unlinks."""
        self.close()
        if self._creator:
            self.unlink()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"ring {self.name} was never closed", ResourceWarning, stacklevel=1)
            with contextlib.suppress(Exception):
                self.close()

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # Crossing a process boundary means attaching by name in the child.
        return (Ring.attach, (self.name,))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self._capacity}"
        return f"<Ring {self.name} {state}>"


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
