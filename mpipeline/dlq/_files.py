"""The DLQ's files: the live one, its rotated predecessors, and the lock that orders them.

``dlq.jsonl`` is the live file. Once an append leaves it at ``max_file_bytes``
or more, it is renamed ``dlq.1.jsonl`` (the one before becomes ``dlq.2.jsonl``
and so on) and a new live file is started; beyond ``keep`` rotated files the
oldest is deleted, with a warning naming it. So the whole queue holds at most
``(keep + 1) x max_file_bytes`` (plus one batch per file), and a reader reads
the rotated files from the highest number down, then the live one: oldest
first, as the records were written.

Several processes append, so rotation is ordered by ``flock`` on ``dlq.lock``
beside the files (0600, never through a link): an append holds it shared for
its write, a rotation (and a replay's claim, which must read the whole queue
and append its claims as one step) holds it exclusive. So a rotation never
moves a file under a batch being written, nor under a claim, and a reader that
opens the files under the shared lock sees every record once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from mpipeline import rundir

DLQ_FILE = "dlq.jsonl"
# Rotate once the live file reaches this; with KEEP_FILES, the queue's bound.
MAX_FILE_BYTES = 64 * 1024 * 1024
# Rotated files kept beside the live one (dlq.1.jsonl ... dlq.4.jsonl).
KEEP_FILES = 4

log = logging.getLogger("mpipeline.dlq")


def lock_path(path: Path) -> Path:
    """``dlq.lock`` for ``dlq.jsonl``."""
    return path.with_suffix(".lock")


def rotated(path: Path, n: int) -> Path:
    """``dlq.<n>.jsonl`` for ``dlq.jsonl``."""
    return path.with_name(f"{path.stem}.{n}{path.suffix}")


def rotated_numbers(path: Path) -> list[int]:
    """The numbers of the rotated files that exist, highest (oldest) first."""
    pattern = re.compile(rf"^{re.escape(path.stem)}\.(\d+){re.escape(path.suffix)}$")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    found = (pattern.match(name) for name in names)
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def all_files(path: Path) -> list[Path]:
    """Every file of the queue, oldest first: the rotated ones, then the live one."""
    return [*(rotated(path, n) for n in rotated_numbers(path)), path]


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool, create: bool = True) -> Iterator[None]:
    """Hold the queue's lock; without ``create``, go unlocked if no writer ever made it.

    Readers pass ``create=False``: listing a run dir must not write to it, and
    with no lock file there has been no rotation to guard against.
    """
    flags = os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
    try:
        fd = rundir.open_private(lock_path(path), flags)
    except FileNotFoundError:
        if create:
            raise
        fd = -1
    if fd < 0:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # drops the lock


def rotate(path: Path, keep: int) -> None:
    """Shift ``dlq.jsonl`` to ``dlq.1.jsonl`` and each older file up one; drop beyond ``keep``.

    Call with the lock held exclusive. Numbers missing in between (a crash
    during an earlier rotation) are tolerated: readers sort what is there.
    """
    for n in rotated_numbers(path):
        older = rotated(path, n)
        if n >= keep:
            size = older.stat().st_size
            older.unlink()
            log.warning(
                "dead-letter queue: deleted %s (%d bytes, the oldest records): more than "
                "%d rotated files",
                older,
                size,
                keep,
            )
        else:
            os.rename(older, rotated(path, n + 1))
    os.rename(path, rotated(path, 1))


def sync_dir(path: Path) -> None:
    """fsync a directory, so that renames and new files in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
