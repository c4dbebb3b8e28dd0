"""Shared-memory segments owned by name under /dev/shm, without the resource tracker.

Why not ``multiprocessing.shared_memory``: on Python < 3.13 every attach
registers the name with a resource tracker, which later unlinks segments that
other processes still use, and the usual ``unregister`` workaround deletes the
creator's entry instead (cpython#82300, wool-labs/wool#337). Owning the file
directly gives an explicit 0600 mode, a clean ``ENOSPC`` at create time instead
of a later SIGBUS (``posix_fallocate``), and no tracker at all: an attaching
process can never unlink or warn about a segment it did not create. The cost
is that a SIGKILLed creator leaks its segment, so ``sweep_stale`` removes
segments whose creator (pid *and* start time, against pid reuse) is gone.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar, Self

from mpipeline.errors import RingCorrupted, RingError, RingNotFound

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# Every segment and doorbell of ours starts with this, so leaks can be globbed.
PREFIX = "mpl-"
# Doorbell FIFOs live beside their segment with these suffixes.
BELL_SUFFIXES = (".dbell", ".sbell")
SEGMENT_MODE = 0o600
# Word 0 of every mpipeline segment, ring or not: the prefix alone does not
# prove a file in /dev/shm is ours, so the sweep checks this too.
MAGIC = int.from_bytes(b"mplring\x00", "little")
# Every segment file starts with the magic (u64) then, at these u64 words, the
# creator's pid and start time: the sweep reads only these.
CREATOR_SLOTS = struct.Struct("<Q32xQQ")


class Kind(enum.IntEnum):
    """Word 1 of a segment that is not a ring: which layout follows (a ring's
    word 1 is its layout version, below 0x100)."""

    CONTROL = 0x100 | 1
    RATELIMIT = 0x100 | 2
    BREAKERS = 0x100 | 3
    METRICS = 0x100 | 4


# The header every segment but the ring begins with, in u64 words: magic,
# kind, three words the kind defines (``Segment`` subclasses name them), the
# creator's pid and start ticks (where ``CREATOR_SLOTS`` reads them), and the
# creation time in monotonic ns.
HEADER_WORDS = 8
H_MAGIC, H_KIND, H_WORD2, H_WORD3, H_WORD4, H_PID, H_START, H_CREATED = range(HEADER_WORDS)


# A kind's own u64 words of a new segment, by index; and, for what is not a
# u64 (doubles), a function given the whole mapping as bytes.
Words = Mapping[int, int]
Init = Callable[[memoryview], None]


class Segment:
    """A mapped segment with the common header: create, attach, lock, close, unlink.

    The control block, the breaker board, the rate limiter and the metrics
    block are all one of these: a subclass sets ``KIND`` and ``WHAT``, gives
    its own words to ``_create`` and checks them in ``_problem``. Only the
    creator ever unlinks; ``close`` releases every view the object made with
    ``words`` or ``doubles`` before unmapping, which ``mmap.close`` requires.
    """

    KIND: ClassVar[Kind]
    # What the segment is, for errors: "control block", "breaker board"...
    WHAT: ClassVar[str]

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool) -> None:
        # Private: use _create, _attach or _private, which check the header first.
        # The segment's name in /dev/shm; "" for a private (anonymous) one.
        self.name = name
        self.creator = creator
        self._fd = fd
        self._mem = mem
        self._mv = memoryview(mem)
        self._views: list[memoryview[int] | memoryview[float]] = []
        self._closed = False
        self._header = self.words(0, HEADER_WORDS)

    # Construction (subclasses wrap these in their own create/attach)

    @classmethod
    def _create(
        cls, name: str, size: int, words: Words | None = None, init: Init | None = None
    ) -> Self:
        """A new segment ``name`` of ``size`` bytes with the kind's own ``words``
        (u64 word index to value) and whatever else ``init`` writes.

        :raises FileExistsError: when the name is taken
        :raises RingError: when /dev/shm has no room for it
        """
        fd, mem = create_segment(name, size)
        try:
            cls._write_header(mem, words, init)
        except BaseException:
            mem.close()
            os.close(fd)
            unlink_segment(name)
            raise
        return cls(name, fd, mem, creator=True)

    @classmethod
    def _private(cls, size: int, words: Words | None = None, init: Init | None = None) -> Self:
        """The same layout in this process's anonymous memory (no name, no lock)."""
        mem = mmap.mmap(-1, size)
        cls._write_header(mem, words, init)
        return cls("", -1, mem, creator=True)

    @classmethod
    def _attach(cls, name: str) -> Self:
        """Join the segment another process created, after checking its header.

        :raises RingNotFound: when there is no such segment
        :raises RingCorrupted: when it is not a segment of this kind and layout
        """
        fd, mem = attach_segment(name)
        problem = cls._check(mem)
        if problem:
            mem.close()
            os.close(fd)
            raise RingCorrupted(f"segment {name} is not an mpipeline {cls.WHAT}: {problem}")
        return cls(name, fd, mem, creator=False)

    @classmethod
    def _write_header(cls, mem: mmap.mmap, words: Words | None, init: Init | None) -> None:
        with memoryview(mem) as mv, mv.cast("Q") as q:
            q[H_KIND] = cls.KIND
            pid = os.getpid()
            q[H_PID] = pid
            q[H_START] = proc_start_ticks(pid) or 0
            q[H_CREATED] = time.monotonic_ns()
            for word, value in (words or {}).items():
                q[word] = value
            if init is not None:
                init(mv)
            # Last: a process that sees the magic sees everything above.
            q[H_MAGIC] = MAGIC

    @classmethod
    def _check(cls, mem: mmap.mmap) -> str | None:
        if len(mem) < 8 * HEADER_WORDS:
            return f"{len(mem)} bytes is smaller than the header"
        with memoryview(mem) as mv, mv[: 8 * HEADER_WORDS].cast("Q") as q:
            if q[H_MAGIC] != MAGIC or q[H_KIND] != cls.KIND:
                return "wrong magic or kind"
            return cls._problem(mv, q)

    @classmethod
    def _problem(cls, mem: memoryview, header: memoryview) -> str | None:
        """What is wrong with the kind's own words of a segment to attach, or None."""
        return None

    # Use

    def words(self, start: int = 0, stop: int | None = None) -> memoryview[int]:
        """Words ``[start, stop)`` of the mapping as u64, released by close."""
        view = self._slice(start, stop).cast("Q")
        self._views.append(view)
        return view

    def doubles(self, start: int = 0, stop: int | None = None) -> memoryview[float]:
        """Words ``[start, stop)`` of the mapping as f64, released by close."""
        view = self._slice(start, stop).cast("d")
        self._views.append(view)
        return view

    def _slice(self, start: int, stop: int | None) -> memoryview:
        return self._mv[8 * start : None if stop is None else 8 * stop]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def creator_pid(self) -> int:
        return int(self._header[H_PID])

    @property
    def created_ns(self) -> int:
        return int(self._header[H_CREATED])

    def creator_alive(self) -> bool:
        return process_alive(self._header[H_PID], self._header[H_START])

    def lock(self) -> None:
        """Take the segment's flock (cross-process; a private segment needs none)."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmap (idempotent); the object is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        for view in reversed(self._views):
            view.release()
        self._views.clear()
        self._mv.release()
        self._mem.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Remove the segment (creator only: processes still attached keep their mapping)."""
        if self.creator and self.name:
            unlink_segment(self.name)


def check_name(name: str) -> str:
    """Return ``name`` if it is a usable segment name.

    :raises ValueError: when it lacks the ``mpl-`` prefix or contains a slash.
    """
    if not name.startswith(PREFIX) or "/" in name or name in (PREFIX, ".", ".."):
        raise ValueError(f"segment name {name!r} must start with {PREFIX!r} and contain no '/'")
    return name


def segment_path(name: str) -> Path:
    return SHM_DIR / check_name(name)


def create_segment(name: str, size: int) -> tuple[int, mmap.mmap]:
    """Create a new segment of ``size`` bytes, mode 0600, fully backed.

    :raises FileExistsError: when the name is taken.
    :raises RingError: when /dev/shm has no room for it.
    """
    path = segment_path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, SEGMENT_MODE)
    try:
        # The mode passed to open is filtered by umask; be explicit anyway.
        os.fchmod(fd, SEGMENT_MODE)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                free = shm_free_bytes()
                raise RingError(
                    f"/dev/shm has {free} bytes free, segment {name} needs {size}: "
                    "enlarge it (docker: --shm-size) or shrink ring capacities"
                ) from exc
            raise
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return fd, mem


def attach_segment(name: str) -> tuple[int, mmap.mmap]:
    """Map an existing segment read-write.

    :raises RingNotFound: when no such segment exists.
    :raises PermissionError: when it belongs to another user.
    """
    path = segment_path(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RingNotFound(f"no shared-memory segment named {name!r} in {SHM_DIR}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return fd, mmap.mmap(-1, 1)  # an empty file: the caller's header check rejects it
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mem


def make_bell(name: str, suffix: str) -> None:
    path = SHM_DIR / (check_name(name) + suffix)
    os.mkfifo(path, SEGMENT_MODE)
    os.chmod(path, SEGMENT_MODE)


def open_bell(name: str, suffix: str) -> int:
    """Open a doorbell FIFO read-write and non-blocking.

    O_RDWR keeps the FIFO open from both ends in one descriptor, so neither
    side ever blocks in open() waiting for a peer, and the waiter never sees
    EOF when the ringer goes away.
    """
    path = SHM_DIR / (check_name(name) + suffix)
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RingNotFound(f"doorbell {path} is missing; was the ring unlinked?") from None


def unlink_segment(name: str) -> bool:
    """Remove a segment and its doorbells; True when the segment existed."""
    existed = True
    try:
        segment_path(name).unlink()
    except FileNotFoundError:
        existed = False
    for suffix in BELL_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / (name + suffix)).unlink()
    return existed


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone.

    pid plus start time names a process uniquely, so a recycled pid is never
    mistaken for the original owner. Zombies count as gone: they run no code.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_ticks: int) -> bool:
    if pid <= 0:
        return False
    now = proc_start_ticks(pid)
    return now is not None and (start_ticks == 0 or now == start_ticks)


def sweep_stale(
    prefix: str = PREFIX,
    magic: int | None = None,
    alive: Callable[[int, int], bool] = process_alive,
) -> list[str]:
    """Remove segments (and their doorbells) whose creator process is dead.

    Segments that do not carry ``magic`` are left alone: the prefix alone does
    not prove they are ours. Returns the names removed.
    """
    if magic is None:
        magic = MAGIC
    removed: list[str] = []
    try:
        entries = list(SHM_DIR.iterdir())
    except FileNotFoundError:
        return removed

    def bell_of(name: str) -> str | None:
        """The segment a doorbell belongs to; None when ``name`` is not a doorbell."""
        for suffix in BELL_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return None

    ours = [p for p in entries if p.name.startswith(prefix)]
    segments = {p.name for p in ours if bell_of(p.name) is None}
    for entry in ours:
        name = entry.name
        owner = bell_of(name)
        if owner is not None:
            # A doorbell whose segment is gone is always stale.
            if owner not in segments:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            continue
        try:
            st = entry.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_size < CREATOR_SLOTS.size:
                continue
            with entry.open("rb") as f:
                head = f.read(CREATOR_SLOTS.size)
        except (FileNotFoundError, PermissionError):
            continue
        seg_magic, pid, start = CREATOR_SLOTS.unpack(head)
        if seg_magic != magic or alive(pid, start):
            continue
        if unlink_segment(name):
            log.info("removed stale segment %s (creator pid %d is gone)", name, pid)
            removed.append(name)
    return removed
