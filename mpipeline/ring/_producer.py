"""The producer side of a ring: append records, publish them, sleep while full.

Sleeping without lost wakeups: a waiter bumps its wait sequence to an odd
value, fences, re-checks the ring, and only then sleeps on its doorbell; the
other side publishes, fences, and rings only when it sees a new odd sequence.
The fence on both sides stops the store-then-load reordering x86 does allow,
so one of the two always sees the other. Waiters also wake every ``_TICK_S``
to re-check and to notice a dead peer. The consumer side (``_consumer.py``)
mirrors all of this.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable

from mpipeline import _shm
from mpipeline.errors import PeerGone, RecordTooLarge, RingFull, RingPoisoned
from mpipeline.ring._core import RingCore
from mpipeline.ring._layout import (
    _DATA_BELL,
    _SPACE_BELL,
    _STRONG_ORDER,
    _TICK_S,
    _WRAP,
    S_BYTES_IN,
    S_CONSUMER_PID,
    S_CONSUMER_START,
    S_CONSUMER_WAIT,
    S_FULL,
    S_HIGH_WATER,
    S_POISONED,
    S_PRODUCER_PID,
    S_PRODUCER_START,
    S_PRODUCER_WAIT,
    S_READ,
    S_RECORDS_IN,
    S_WRITE,
    Buffer,
    _checksum,
    _fence,
    _pack_record,
)


class Producer(RingCore):
    """Appends records (one producer process per ring)."""

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
            _pack_record(data, off, _WRAP, 0)
            off = 0
        _pack_record(data, off, n, _checksum(buf) if self._checksums else 0)
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
        pack = _pack_record
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

    def _too_large(self, n: int) -> RecordTooLarge:
        return RecordTooLarge(
            f"record of {n} bytes exceeds ring {self.name}'s max_record of "
            f"{self._max_record} bytes (capacity {self._capacity})"
        )
