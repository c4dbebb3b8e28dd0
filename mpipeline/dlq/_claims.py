"""Claiming records for a replay, so that two replays at once never submit one record twice.

Reading the queue and then appending a ``replayed`` marker once the outcome is
known leaves a window of seconds in which a second ``dlq replay --all`` sees
the same records as pending. So a replay first claims what it will submit:
under the queue's exclusive lock it reads the queue again, skips what another
live replay holds or what was replayed meanwhile, and appends (and fsyncs) a
``claimed`` marker per record it takes, before the lock is released. The
second replay, waiting on the lock, then sees those claims.

A claim is void once its process has exited without settling it (killed
mid-replay): the record is pending again for the next replay, instead of
being held forever by a dead process.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mpipeline import rundir
from mpipeline._journal import APPEND_FLAGS, write_all
from mpipeline.dlq._files import KEEP_FILES, MAX_FILE_BYTES, locked, rotate, sync_dir
from mpipeline.dlq._reader import Listed, listing, process_key, read_entries
from mpipeline.dlq._records import ClaimMarker
from mpipeline.errors import MPipelineError

_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Claimed:
    """A record this process may now replay, and the claim its outcome must name."""

    item: Listed
    claim: ClaimMarker


def claim(
    path: Path,
    ids: Sequence[str],
    *,
    only_pending: bool,
    max_file_bytes: int = MAX_FILE_BYTES,
    keep: int = KEEP_FILES,
) -> tuple[list[Claimed], list[str]]:
    """Claim the records ``ids`` (in that order) for this process; what was taken, and why not.

    With ``only_pending`` (``replay --all``), a record that a replay was
    accepted for meanwhile is left silently: there is nothing left to do.
    A record another running replay holds is left with a note saying whose.

    :raises MPipelineError: when this process cannot be identified for its claims
    """
    pid = os.getpid()
    owner = process_key(pid)
    if owner is None:  # pragma: no cover - only without /proc
        raise MPipelineError("cannot identify this process to claim records for replay")
    taken: list[Claimed] = []
    notes: list[str] = []
    with locked(path, exclusive=True):
        latest = {item.record.id: item for item in listing(read_entries(path, lock=False))}
        for rid in dict.fromkeys(ids):
            item = latest.get(rid)
            if item is None or not item.replayable:
                continue  # the caller has said why already
            holder = item.live_claim()
            if holder is not None:
                notes.append(f"{rid}: being replayed by pid {holder.pid}; skipped")
                continue
            if only_pending and not item.pending_replay:
                continue
            marker = ClaimMarker(
                replay_of=rid, ts=time.time(), claim=secrets.token_hex(8), pid=pid, owner=owner
            )
            taken.append(Claimed(item, marker))
        if taken:
            data = b"".join(_ENCODER.encode(c.claim) + b"\n" for c in taken)
            _append_locked(path, data, max_file_bytes, keep)
    return taken, notes


def _append_locked(path: Path, data: bytes, max_file_bytes: int, keep: int) -> None:
    """Append ``data`` durably with the lock held exclusive; rotate if that filled the file."""
    fd = rundir.open_private(path, APPEND_FLAGS)
    try:
        write_all(fd, data)
        os.fsync(fd)
        full = os.fstat(fd).st_size >= max_file_bytes
    finally:
        os.close(fd)
    if full:
        rotate(path, keep)
        sync_dir(path.parent)
