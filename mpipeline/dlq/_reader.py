"""Reading the DLQ back: every entry of every file, joined into records with their history."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import msgspec

from mpipeline.dlq._files import all_files, locked
from mpipeline.dlq._records import ClaimMarker, DeadLetter, Entry, ReplayMarker

log = logging.getLogger("mpipeline.dlq")

_decoder = msgspec.json.Decoder(Entry)
_RECORD_START = b'{"kind":'


def read_entries(
    path: str | os.PathLike[str], warn: Callable[[str], None] | None = None, *, lock: bool = True
) -> Iterator[Entry]:
    """Every entry of the queue at ``path`` (rotated files first), in order.

    Bad lines are skipped with a warning. A crash in the middle of a write
    leaves a torn last line (no newline); that is expected after a power loss
    and is reported as such, not as an error. A missing file is an empty
    queue. The files are opened under the queue's shared lock, so a rotation
    cannot move one between two opens; pass ``lock=False`` only while holding
    it exclusive already.
    """
    say = warn if warn is not None else log.warning
    files = _open_all(Path(path), lock)
    try:
        for name, f in files:
            yield from _read_file(name, f, say)
    finally:
        for _, f in files:
            f.close()


def _open_all(path: Path, lock: bool) -> list[tuple[Path, BinaryIO]]:
    files: list[tuple[Path, BinaryIO]] = []
    lock_held = locked(path, exclusive=False, create=False) if lock else contextlib.nullcontext()
    with lock_held:
        for name in all_files(path):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            files.append((name, os.fdopen(fd, "rb")))
    return files


def _read_file(path: Path, f: BinaryIO, say: Callable[[str], None]) -> Iterator[Entry]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield _decoder.decode(line)
            continue
        except msgspec.DecodeError as exc:
            error = exc
        # A writer that died mid-line leaves no newline, so the next append
        # (from any process) continues the same line: keep that record.
        start = line.find(_RECORD_START, 1)
        tail = None
        if start > 0:
            with contextlib.suppress(msgspec.DecodeError):
                tail = _decoder.decode(line[start:])
        if tail is not None or not line.endswith(b"\n"):
            say(f"{path}:{lineno}: torn record (a crash while writing?); skipped")
        else:
            say(f"{path}:{lineno}: not a dead-letter record ({error}); skipped")
        if tail is not None:
            yield tail


@dataclass(slots=True)
class Listed:
    """A dead record with the claims and replays made of it, oldest first."""

    record: DeadLetter
    replays: list[ReplayMarker] = field(default_factory=list)
    claims: list[ClaimMarker] = field(default_factory=list)

    @property
    def replayed(self) -> ReplayMarker | None:
        return self.replays[-1] if self.replays else None

    @property
    def replayable(self) -> bool:
        """Whether the record holds the whole request (not a ``client_gone``, not cut)."""
        return self.record.request is not None and self.record.truncated_from is None

    @property
    def pending_replay(self) -> bool:
        """A request no resubmission was accepted for yet: what ``replay --all`` takes.

        A replay that failed again was recorded under its new id, so that
        record, not this one, is the one still to replay.
        """
        return self.replayable and not any(m.new_request_id is not None for m in self.replays)

    def open_claims(self) -> list[ClaimMarker]:
        """Claims no ``replayed`` marker settled yet (their replay runs, or died)."""
        settled = {m.claim for m in self.replays}
        return [c for c in self.claims if c.claim not in settled]

    def live_claim(self) -> ClaimMarker | None:
        """An open claim whose replaying process still runs: the record is taken."""
        return next((c for c in self.open_claims() if owner_alive(c)), None)


def process_key(pid: int) -> str | None:
    """``<pid>@<start time>`` of a running process, None if there is none.

    The start time tells a pid reused by a later process from the claimer.
    """
    import psutil

    try:
        return f"{pid}@{psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return None


def owner_alive(claim: ClaimMarker) -> bool:
    return process_key(claim.pid) == claim.owner


def listing(
    entries: Iterable[Entry],
    *,
    reasons: Sequence[str] = (),
    since: float | None = None,
    ids: Sequence[str] = (),
) -> list[Listed]:
    """Dead records joined with their claims and replay markers, filtered, in file order."""
    records: list[Listed] = []
    by_id: dict[str, list[Listed]] = {}
    for entry in entries:
        if isinstance(entry, ReplayMarker):
            for item in by_id.get(entry.replay_of, ()):
                item.replays.append(entry)
            continue
        if isinstance(entry, ClaimMarker):
            for item in by_id.get(entry.replay_of, ()):
                item.claims.append(entry)
            continue
        item = Listed(entry)
        records.append(item)
        by_id.setdefault(entry.id, []).append(item)
    wanted = set(ids)
    return [
        item
        for item in records
        if (not reasons or item.record.reason in reasons)
        and (since is None or item.record.ts >= since)
        and (not wanted or item.record.id in wanted)
    ]
