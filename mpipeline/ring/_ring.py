"""Ring: a single-producer/single-consumer record ring in shared memory.

Every stage talks to the next through one of these, so its speed bounds the
whole pipeline and its correctness decides whether anything is lost. The byte
layout and the publication order are in ``_layout.py``; the producer's and
the consumer's halves in ``_producer.py`` and ``_consumer.py``.

Limits: one producer and one consumer process per ring (SPSC; one handle per
side, not thread-safe). A record holds at most ``max_record`` bytes (default
a quarter of the capacity, at most half), so an empty ring always has room.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from types import TracebackType
from typing import Self

from mpipeline import _shm
from mpipeline.errors import RingError
from mpipeline.ring._consumer import Consumer
from mpipeline.ring._layout import (
    _DATA_BELL,
    _MASK32,
    _REC_HEADER,
    _SPACE_BELL,
    DEFAULT_SPIN_S,
    FLAG_CHECKSUM,
    HEADER_SIZE,
    MAGIC,
    MAX_CAPACITY,
    MIN_CAPACITY,
    S_BYTES_IN,
    S_BYTES_OUT,
    S_CAPACITY,
    S_CONSUMER_PID,
    S_CONSUMER_START,
    S_CORRUPT,
    S_CREATOR_PID,
    S_CREATOR_START,
    S_DATA_OFFSET,
    S_EPOCH,
    S_FULL,
    S_HIGH_WATER,
    S_MAGIC,
    S_MAX_RECORD,
    S_POISONED,
    S_PRODUCER_PID,
    S_PRODUCER_START,
    S_READ,
    S_RECORDS_IN,
    S_RECORDS_OUT,
    S_VERSION,
    S_WRITE,
    VERSION,
    RingStats,
    _validate_header,
)
from mpipeline.ring._producer import Producer


class Ring(Producer, Consumer):
    """One end (or both) of a shared-memory SPSC ring; see the module docstring.

    Build with ``Ring.create`` (the owner, who alone unlinks) or ``Ring.attach``.
    A handle becomes the producer on its first put and the consumer on its
    first get, recording its pid in the header so the other side and the
    supervisor can tell when it dies.
    """

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

    def consumer_alive(self) -> bool | None:
        """True/False for the recorded consumer, None when none has attached yet."""
        pid = self._q[S_CONSUMER_PID]
        return None if pid == 0 else _shm.process_alive(pid, self._q[S_CONSUMER_START])

    def producer_alive(self) -> bool | None:
        pid = self._q[S_PRODUCER_PID]
        return None if pid == 0 else _shm.process_alive(pid, self._q[S_PRODUCER_START])

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
