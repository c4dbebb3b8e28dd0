"""The appending side of the DLQ: capped records, group commit, rotation by size."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import msgspec

from mpipeline import rundir
from mpipeline._journal import Journal
from mpipeline.dlq._files import KEEP_FILES, MAX_FILE_BYTES, locked, rotate, sync_dir
from mpipeline.dlq._records import MAX_RECORD_BYTES, Entry, encode_line

log = logging.getLogger("mpipeline.dlq")


class DeadLetterQueue(Journal):
    """The appending side of one DLQ, owned by one event loop.

    ``record`` never fails the caller: if the disk refuses a batch the error
    is logged and counted in ``errors`` and the future resolves (to False)
    anyway, because the client's own answer (the error it is owed) matters
    more than the copy. The limits are per writer; every writer of a run uses
    the defaults unless a test or a tool says otherwise.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = True,
        max_record_bytes: int = MAX_RECORD_BYTES,
        max_file_bytes: int = MAX_FILE_BYTES,
        keep: int = KEEP_FILES,
    ) -> None:
        if max_record_bytes < 1 or max_file_bytes < 1 or keep < 1:
            raise ValueError("the DLQ's limits must be >= 1")
        path = Path(path)
        _prepare_dir(path.parent)
        self.max_record_bytes = max_record_bytes
        self.max_file_bytes = max_file_bytes
        self.keep = keep
        self.rotations = 0
        self._encoder = msgspec.json.Encoder()
        super().__init__(path, fsync=fsync, what="the dead-letter queue")

    def record(self, entries: Iterable[Entry]) -> asyncio.Future[bool]:
        """Queue ``entries``; the future resolves once they are written and fsynced.

        Each is cut to the per-record cap first (see ``DeadLetter.truncated_from``).
        Must be called from the event loop thread. The entries are encoded at
        once, so the caller may drop or reuse them.
        """
        encoder, cap = self._encoder, self.max_record_bytes
        return self.append([encode_line(encoder, entry, cap) for entry in entries])

    # In the writer thread

    def _write_batch(self, data: bytes) -> None:
        with locked(self.path, exclusive=False):
            super()._write_batch(data)
            full = os.fstat(self._fd).st_size >= self.max_file_bytes
        if full:
            with locked(self.path, exclusive=True):
                self._follow()  # another process may have rotated it meanwhile
                if os.fstat(self._fd).st_size >= self.max_file_bytes:
                    self._rotate_locked()

    def _rotate_locked(self) -> None:
        rotate(self.path, self.keep)
        self._reopen()
        sync_dir(self.path.parent)
        self.rotations += 1


def _prepare_dir(path: Path) -> None:
    rundir.create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "%s is open to other users (mode %o); the dead-letter queue there holds "
            "request payloads: chmod 700 it",
            path,
            mode,
        )
