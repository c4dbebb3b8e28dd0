"""The state both sides of a ring handle share: the mapping, the header, the doorbells."""

from __future__ import annotations

import mmap

from mpipeline._doorbell import Doorbell
from mpipeline.errors import RingClosed
from mpipeline.ring._layout import (
    _DATA_BELL,
    FLAG_CHECKSUM,
    HEADER_SIZE,
    S_CAPACITY,
    S_MAX_RECORD,
    S_VERSION,
)


class RingCore:
    """A mapped ring segment; ``Ring`` adds the producer and consumer sides to it."""

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool, spin_s: float) -> None:
        # Private: use Ring.create() or Ring.attach(), which validate the segment first.
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
