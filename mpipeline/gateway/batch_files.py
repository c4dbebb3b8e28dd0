"""Where batches and their files live: a folder under the run dir, shared by every replica.

Every gateway replica of a run shares the run dir, so the Batch API keeps
all its state there and none in memory: any replica answers a GET for any
batch or file by reading it, and a batch whose runner died (its replica or
the whole supervisor was killed) is found and finished by another. Layout
under ``<run_dir>/batches`` (0700, files 0600, never through a link):

* ``files/<id>.json`` the ``FileObject``; ``files/<id>.jsonl`` its content.
  A batch's output and error files are written straight into ``files/``
  under ids derived from the batch's (``output_ids``), and become visible
  (their ``.json`` appears) when the batch ends.
* ``<batch>.json`` the ``Batch`` object as GET returns it, rewritten
  atomically (write a temp file, rename) so a reader sees all or nothing.
* ``<batch>.lock`` the runner's exclusive ``flock``: the kernel drops it
  when the runner dies, which is how an orphaned batch is told apart from a
  running one (RELIABILITY 2.8: a lock, not a pidfile).
* ``<batch>.cancel`` the marker ``POST /v1/batches/{id}/cancel`` leaves; the
  runner, whichever replica holds it, notices it between lines.

Output lines are appended by the one runner that holds the lock, one
``os.write`` each; on resume a torn last line (a kill mid-write) is cut off
and the custom ids already answered are skipped, so each line gets exactly
one outcome line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from pathlib import Path

import msgspec

from mpipeline import rundir
from mpipeline.gateway.batch_shapes import Batch, Done, FileObject, Purpose

SUBDIR = "batches"
FILES = "files"
# Ids are ours (``new_id``); anything else in a path is refused before it reaches the disk.
# (fullmatch: ``$`` would also match before a trailing newline.)
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What one run keeps at most (the routes refuse more, a 400): files, inputs and outputs
# alike (OpenAI's largest page of ``GET /v1/files``, so one listing holds them all), and
# batches (which cannot be deleted, so this bounds the run dir and every listing's reads).
MAX_FILES = 10_000
MAX_BATCHES = 10_000
# Append ``fsync``s at most this often (and always when a file is closed).
FSYNC_INTERVAL_S = 1.0

_ENCODE = msgspec.json.Encoder().encode
_DECODE_FILE = msgspec.json.Decoder(FileObject)
_DECODE_BATCH = msgspec.json.Decoder(Batch)
_DECODE_DONE = msgspec.json.Decoder(Done)


def new_id(prefix: str) -> str:
    """``file-…`` or ``batch_…`` (OpenAI's prefixes), 24 random hex digits."""
    return f"{prefix}{secrets.token_hex(12)}"


def output_ids(batch_id: str) -> tuple[str, str]:
    """The ids of a batch's output and error files, fixed from its creation so that
    a resumed runner appends to the same files."""
    tail = batch_id.removeprefix("batch_")
    return f"file-{tail}-output", f"file-{tail}-errors"


def valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def now() -> int:
    return int(time.time())


class BatchStore:
    """The files and batches of one run; ``root`` is made (0700) on the first write,
    so a run that never sees a batch has no folder for them."""

    def __init__(self, run_dir: Path) -> None:
        self.root = run_dir / SUBDIR
        self.files = self.root / FILES
        self._made = False

    def _make(self) -> None:
        """Create the folders, and refuse them if another user could touch them.

        :raises MPipelineError: naming the unsafe folder (``rundir.check``)
        """
        if not self._made:
            rundir.create(self.files)
            rundir.check(self.root)
            rundir.check(self.files)
            self._made = True

    # Files

    def add_file(self, filename: str, purpose: Purpose, data: bytes) -> FileObject:
        self._make()
        file_id = new_id("file-")
        rundir.write_atomically(self.files / f"{file_id}.jsonl", data, durable=True)
        obj = FileObject(
            id=file_id, bytes=len(data), created_at=now(), filename=filename, purpose=purpose
        )
        rundir.write_atomically(self.files / f"{file_id}.json", _ENCODE(obj), durable=True)
        return obj

    def publish_output(self, file_id: str, filename: str) -> FileObject | None:
        """Make a batch's output (or error) file visible; None when it has no line."""
        path = self.content_path(file_id)
        size = path.stat().st_size if path.exists() else 0
        if size == 0:
            return None
        obj = FileObject(
            id=file_id, bytes=size, created_at=now(), filename=filename, purpose="batch_output"
        )
        rundir.write_atomically(self.files / f"{file_id}.json", _ENCODE(obj), durable=True)
        return obj

    def file(self, file_id: str) -> FileObject | None:
        if not valid_id(file_id):
            return None
        data = _read(self.files / f"{file_id}.json")
        return None if data is None else _DECODE_FILE.decode(data)

    def list_files(self) -> list[FileObject]:
        found = (self.file(p.stem) for p in self.files.glob("*.json"))
        return sorted((f for f in found if f is not None), key=lambda f: f.created_at)

    def file_count(self) -> int:
        return sum(1 for _ in self.files.glob("*.json"))

    def content_path(self, file_id: str) -> Path:
        return self.files / f"{file_id}.jsonl"

    def content(self, file_id: str) -> bytes | None:
        if self.file(file_id) is None:
            return None
        return _read(self.content_path(file_id))

    def delete_file(self, file_id: str) -> bool:
        """Forget a file (its metadata first, so no reader sees it half gone)."""
        if self.file(file_id) is None:
            return False
        for path in (self.files / f"{file_id}.json", self.content_path(file_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return True

    # Batches

    def write_batch(self, batch: Batch) -> None:
        self._make()
        rundir.write_atomically(self.root / f"{batch.id}.json", _ENCODE(batch), durable=True)

    def batch(self, batch_id: str) -> Batch | None:
        if not valid_id(batch_id):
            return None
        data = _read(self.root / f"{batch_id}.json")
        return None if data is None else _DECODE_BATCH.decode(data)

    def batch_count(self) -> int:
        return sum(1 for _ in self.root.glob("*.json"))

    def batch_ids(self) -> list[str]:
        return [p.stem for p in self.root.glob("*.json")]

    def batches(self) -> list[Batch]:
        """Every batch, newest first (as OpenAI lists them)."""
        found = (self.batch(p.stem) for p in self.root.glob("*.json"))
        return sorted((b for b in found if b is not None), key=lambda b: (-b.created_at, b.id))

    def request_cancel(self, batch_id: str) -> None:
        self._make()
        os.close(rundir.open_private(self.root / f"{batch_id}.cancel", os.O_WRONLY | os.O_CREAT))

    def cancel_requested(self, batch_id: str) -> bool:
        return (self.root / f"{batch_id}.cancel").exists()

    def lock(self, batch_id: str) -> int | None:
        """The batch's exclusive flock (an fd to close to release), or None if held."""
        self._make()
        fd = rundir.open_private(self.root / f"{batch_id}.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def answered(self, batch_id: str) -> tuple[set[str], int, int]:
        """Custom ids with an outcome line already, and how many are in output and
        error files; cuts a torn last line off first (only the lock holder calls it)."""
        done: set[str] = set()
        counts = []
        for file_id in output_ids(batch_id):
            path = self.content_path(file_id)
            lines = _complete_lines(path)
            for line in lines:
                done.add(_DECODE_DONE.decode(line).custom_id)
            counts.append(len(lines))
        return done, counts[0], counts[1]


class Appender:
    """Appends whole lines to one file; ``fsync`` at most every ``FSYNC_INTERVAL_S``."""

    def __init__(self, path: Path) -> None:
        self._fd = rundir.open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._synced = time.monotonic()

    def append(self, line: bytes) -> None:
        os.write(self._fd, line + b"\n")
        if time.monotonic() - self._synced >= FSYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._fd)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1


def _read(path: Path) -> bytes | None:
    try:
        fd = rundir.open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _complete_lines(path: Path) -> list[bytes]:
    """The file's whole lines; a last one without its newline is truncated away."""
    data = _read(path)
    if not data:
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        os.truncate(path, end)
    return [line for line in data[:end].split(b"\n") if line]
