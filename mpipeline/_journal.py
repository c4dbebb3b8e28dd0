"""Group-committed append-only files: how the DLQ and the result sink reach the disk.

Both make the same promise: a line is "recorded" once it is written and
fsynced, and nobody is told it exists before that. Calling ``fsync`` per line
would cost one disk flush per shed request or per result, so writes are
group-committed: everything appended during one event-loop turn, and everything
that arrives while a batch is being written, goes out as one ``write`` plus one
``fsync`` in a worker thread. The loop never blocks on the disk, and a burst
costs one flush.

Several processes may append to one file (gateway replicas, API clients and
``dlq replay`` to the DLQ; every stream replica to the sink). Each batch is a
single ``write`` on an ``O_APPEND`` descriptor, which the kernel places whole at
the end of a regular file, so lines of different processes never interleave.

The file is opened through ``rundir.open_private``: never through a symbolic
link, only if it is a regular file of this user, and mode 0600 whatever the
umask, because what it holds (prompts, results) is the clients' data. Before
each batch the writer checks that the path still names the file it holds and
reopens it if not, so a file moved away (by an operator, logrotate or the DLQ's
own rotation) is followed by every appender, not written into forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mpipeline import rundir
from mpipeline.errors import MPipelineError

__all__ = ["Journal", "write_all"]

log = logging.getLogger(__name__)

APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` whole, as one ``write`` unless the disk fills (then the retry fails too)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Journal:
    """The appending side of one JSONL file, owned by one event loop.

    ``append`` never raises: if the disk refuses a batch, the error is logged
    and counted in ``errors``, and the batch's futures resolve to False. What
    a False means is the caller's choice: the DLQ still answers its client,
    the result sink fails the request it could not record.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True, what: str) -> None:
        self.path = Path(path)
        self.fsync = fsync
        # What the file is, for messages: "the dead-letter queue", "the result sink".
        self.what = what
        self.written = 0
        self.errors = 0
        self._fd = self._open()
        self._ino = os.fstat(self._fd).st_ino
        self._lines: list[bytes] = []
        self._waiters: list[asyncio.Future[bool]] = []
        self._scheduled = False
        self._writing = False
        # Set while nothing is waiting to be written or being written.
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        # One thread: batches go out in order, and a slow disk never takes the
        # default executor's threads from the rest of the process.
        self._executor: ThreadPoolExecutor | None = None

    def append(self, lines: Iterable[bytes]) -> asyncio.Future[bool]:
        """Queue ``lines`` (each ending in a newline); the future says whether they are on disk.

        It resolves to True once they are written and fsynced, False when the
        disk refused them or the file is closed. Call from the event loop thread.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        batch = list(lines)
        if self._closed:
            self.errors += len(batch)
            log.error("%s %s is closed; %d lines lost", self.what, self.path, len(batch))
            future.set_result(False)
            return future
        self._lines.extend(batch)
        self._waiters.append(future)
        self._drained.clear()
        if not self._scheduled and not self._writing:
            self._scheduled = True
            loop.call_soon(self._start_batch)
        return future

    async def flush(self) -> None:
        """Wait until everything appended so far, and while waiting, is on disk (or failed).

        It waits on the writer, not on the callers' futures, which a caller may cancel;
        so ``aclose`` never closes the file under a batch still to be written.
        """
        await self._drained.wait()

    async def aclose(self) -> None:
        """Flush, then close the file; later ``append`` calls only log."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        os.close(self._fd)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # In the writer thread

    def _write_batch(self, data: bytes) -> None:
        """Put one batch on disk: follow the path, one write, one fsync."""
        self._follow()
        write_all(self._fd, data)
        if self.fsync:
            os.fsync(self._fd)

    def _follow(self) -> None:
        """Reopen the path if it no longer names the file we hold (moved, rotated, removed)."""
        try:
            current = os.lstat(self.path).st_ino
        except FileNotFoundError:
            current = -1
        if current != self._ino:
            self._reopen()

    def _reopen(self) -> None:
        fd = self._open()
        old, self._fd = self._fd, fd
        self._ino = os.fstat(fd).st_ino
        os.close(old)

    def _open(self) -> int:
        try:
            return rundir.open_private(self.path, APPEND_FLAGS)
        except (OSError, MPipelineError) as exc:
            raise MPipelineError(f"cannot open {self.what} {self.path}: {exc}") from exc

    # On the loop

    def _start_batch(self) -> None:
        self._scheduled = False
        if self._writing or not self._waiters:
            return
        data = b"".join(self._lines)
        n = len(self._lines)
        waiters = self._waiters
        self._lines = []
        self._waiters = []
        self._writing = True
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="journal")
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._executor, self._write_batch, data)
        done.add_done_callback(lambda f: self._batch_done(f, n, waiters))

    def _batch_done(
        self, done: asyncio.Future[None], n: int, waiters: list[asyncio.Future[bool]]
    ) -> None:
        self._writing = False
        exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
        if exc is None:
            self.written += n
        else:
            self.errors += n
            log.error("%s %s: %d lines not recorded: %s", self.what, self.path, n, exc)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(exc is None)
        if self._waiters:
            if not self._scheduled:
                self._start_batch()
        else:
            self._drained.set()
