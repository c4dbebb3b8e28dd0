"""The supervisor's half of the web dashboard: its frames and the DLQ tail.

``metrics.dashboard`` sits below the DLQ in the import layers, so it takes
the DLQ's tail as a callable and this module, which may import both, wires
them: frames from the ``RunCollector`` that serves ``/metrics`` (the same
shared-memory reads, under its lock), the tail from the run's ``dlq.jsonl``.

The tail is read once per dashboard refresh, so it reads only the end of the
newest file(s), never the whole queue (up to 320 MiB): ``TAIL_BYTES`` from
the end, newest file first. A rotation renames files under it, which an open
descriptor does not notice, so no lock is taken and no writer ever waits on a
viewer. Only who failed, when, where and why is shown: never the request's
input or metadata, which can be large and may be private.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from mpipeline.auth import BearerAuth
from mpipeline.dlq import DLQ_FILE, all_files
from mpipeline.metrics.collect import RunCollector
from mpipeline.metrics.dashboard import MAX_STREAMS, Dashboard, Feed

TAIL = 10
# Far more than TAIL ordinary records; a run of huge ones (each up to 256 KiB) shows fewer.
TAIL_BYTES = 512 * 1024
MESSAGE_CHARS = 300


class _Letter(msgspec.Struct, frozen=True):
    """The fields of a DLQ line the dashboard shows; the payload is skipped unparsed."""

    kind: str
    id: str = ""
    ts: float = 0.0
    reason: str = ""
    stage: str = ""
    message: str = ""


_decoder = msgspec.json.Decoder(_Letter)


def dashboard(run_dir: Path, collector: RunCollector, auth: BearerAuth) -> Dashboard:
    """The dashboard of the supervisor's run, behind the token ``/metrics`` wants."""
    path = run_dir / DLQ_FILE
    feed = Feed(collector.frame, lambda: dlq_tail(path), max_streams=MAX_STREAMS)
    return Dashboard(feed, auth)


def dlq_tail(path: Path, n: int = TAIL) -> list[Mapping[str, Any]]:
    """The newest ``n`` dead letters of the queue at ``path``, newest first."""
    found: list[_Letter] = []
    for name in reversed(all_files(path)):  # the live file, then dlq.1.jsonl, ...
        found = _letters(name) + found
        if len(found) >= n:
            break
    return [
        {
            "id": x.id,
            "at": x.ts,
            "reason": x.reason,
            "stage": x.stage,
            "message": x.message[:MESSAGE_CHARS],
        }
        for x in reversed(found[-n:])
    ]


def _letters(path: Path) -> list[_Letter]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - TAIL_BYTES)
        f.seek(start)
        data = f.read(TAIL_BYTES)
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # begins mid-record
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            letter = _decoder.decode(line)
        except msgspec.DecodeError:
            continue  # torn or foreign: `mpipeline dlq list` reports those
        if letter.kind == "dead":
            out.append(letter)
    return out
