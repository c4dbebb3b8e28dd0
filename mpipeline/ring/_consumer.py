"""The consumer side of a ring: take records in place, release them, sleep while empty.

A record handed out by a get is at-least-once: it is released only by the
next get, so a consumer that dies holding it leaves it to its successor.
Corruption never surfaces as an ``IndexError``: a bad checksum skips and
counts the record, broken framing poisons the ring (every later get raises)
so the supervisor can recreate it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

from mpipeline import _shm
from mpipeline.errors import RingCorrupted, RingEmpty, RingPoisoned
from mpipeline.ring._core import RingCore
from mpipeline.ring._layout import (
    _DATA_BELL,
    _SPACE_BELL,
    _STRONG_ORDER,
    _TICK_S,
    _WRAP,
    S_BYTES_OUT,
    S_CONSUMER_PID,
    S_CONSUMER_START,
    S_CONSUMER_WAIT,
    S_CORRUPT,
    S_POISONED,
    S_PRODUCER_WAIT,
    S_READ,
    S_RECORDS_OUT,
    S_WRITE,
    _checksum,
    _fence,
    _unpack_record,
)

_T = TypeVar("_T")


class Consumer(RingCore):
    """Takes records (one consumer process per ring)."""

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

    def _read_record(self, r: int) -> tuple[memoryview, bool]:
        """Parse the record at position ``r``; advance ``_rnext`` past it."""
        if self._poison is not None:
            raise RingPoisoned(f"ring {self.name} is poisoned: {self._poison}")
        cap = self._capacity
        data = self._data
        off = r % cap
        n, crc = _unpack_record(data, off)
        if n == _WRAP:
            r += cap - off
            off = 0
            n, crc = _unpack_record(data, 0)
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
        return await self._park(self.try_get, timeout)

    async def wait_readable(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Sleep until a record is there to take, without taking it.

        Lets a consumer that reads in batches wake once and then take a whole
        batch with ``get_many``, instead of one record from ``get`` and the
        rest on its next round (one wake per batch, not per record). Views
        handed out earlier stay valid: nothing is released here.

        :raises RingEmpty: when ``timeout`` seconds pass with nothing to read.
        :raises RingPoisoned: when the ring is poisoned.
        """
        if self._readable() is None:
            await self._park(self._readable, timeout)

    def _readable(self) -> bool | None:
        """True when a record is published past the ones handed out, else None."""
        if not self._consuming:
            self._claim_consumer()
        if self._poison is None and self._q[S_POISONED]:
            self._poison = "the supervisor marked this ring poisoned"
        if self._poison is not None:
            raise RingPoisoned(f"ring {self.name} is poisoned: {self._poison}")
        r = self._rnext
        if r == self._wcache:
            self._wcache = self._load_write(r)
            if r == self._wcache:
                return None
        return True

    async def _park(self, probe: Callable[[], _T | None], timeout: float | None) -> _T:  # noqa: ASYNC109
        """Spin ``spin_s``, then sleep on the doorbell until ``probe`` returns a value."""
        if self.spin_s > 0:
            end = time.perf_counter() + self.spin_s
            while time.perf_counter() < end:
                got = probe()
                if got is not None:
                    return got
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        bell = self._bell(_DATA_BELL)
        q = self._q
        while True:
            self._cwait += 1
            q[S_CONSUMER_WAIT] = self._cwait
            try:
                _fence()
                got = probe()
                if got is not None:
                    return got
                wait = _TICK_S
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise RingEmpty(f"ring {self.name} stayed empty for {timeout}s")
                await bell.wait(wait)
            finally:
                self._cwait += 1
                q[S_CONSUMER_WAIT] = self._cwait
            got = probe()
            if got is not None:
                return got

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
