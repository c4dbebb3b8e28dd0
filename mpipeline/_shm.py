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
import errno
import logging
import mmap
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from mpipeline.errors import RingError, RingNotFound

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# Every segment and doorbell of ours starts with this, so leaks can be globbed.
PREFIX = "mpl-"
# Doorbell FIFOs live beside their segment with these suffixes.
BELL_SUFFIXES = (".dbell", ".sbell")
SEGMENT_MODE = 0o600
# Segment files start with magic (u64) then, at these u64 slots, the creator's
# pid and start time; ring.py owns the rest of the layout.
CREATOR_SLOTS = struct.Struct("<Q32xQQ")


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
        from mpipeline.ring import MAGIC  # the layout owner; imported late to avoid a cycle

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
