"""The dashboard's one shared reading of the run, and the count of open streams.

Every viewer wants the same numbers, so the run is read once per refresh
however many pages are open: a stream (or a ``snapshot.json`` call) asks for
the latest update no older than it can use, and only when the cached one is
older does the asker read a new frame, into one shared ``Model``. N viewers
therefore cost one read per interval, not N; nobody watching costs nothing
(no background thread), and the error tail survives a page reload because
the model is shared. Reads are serialised by a lock, so rates are always
taken between consecutive frames, in order.

Streams are counted here so that a burst of viewers (or a leaking client)
gets a clear 503 instead of a thread each without limit: every stream holds a
server thread for as long as it is open.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from mpipeline.metrics.dashboard._document import document
from mpipeline.metrics.view import Frame, Model

FrameSource = Callable[[], Frame]
DlqTail = Callable[[], Sequence[Mapping[str, Any]]]

log = logging.getLogger(__name__)


class Feed:
    """The latest update as JSON bytes, refreshed on demand; and the stream slots."""

    def __init__(
        self, read: FrameSource, dlq_tail: DlqTail | None = None, *, max_streams: int
    ) -> None:
        self._read = read
        self._dlq_tail = dlq_tail
        self.max_streams = max_streams
        self._model = Model()
        self._lock = threading.Lock()
        self._doc = b""
        self._doc_at = -float("inf")
        self._seq = 0
        self._slots = threading.Lock()
        self._streams = 0
        self._closed = threading.Event()

    # Updates

    def latest(self, max_age_s: float) -> tuple[int, bytes]:
        """(sequence number, JSON) of an update at most ``max_age_s`` old, read if need be."""
        with self._lock:
            now = time.monotonic()
            if now - self._doc_at > max_age_s:
                frame = self._read()
                view = self._model.update(frame)
                doc = document(frame, view, self._dlq())
                self._doc = msgspec.json.encode(doc)
                self._doc_at = now
                self._seq += 1
            return self._seq, self._doc

    def _dlq(self) -> Sequence[Mapping[str, Any]]:
        if self._dlq_tail is None:
            return []
        try:
            return self._dlq_tail()
        except OSError as exc:
            # The page still shows the run; the DLQ panel says nothing new this time.
            log.debug("dashboard: cannot read the DLQ tail: %s", exc)
            return []

    # Streams

    def open_stream(self) -> bool:
        """Take a stream slot; False when all ``max_streams`` are taken or the feed closed."""
        with self._slots:
            if self._closed.is_set() or self._streams >= self.max_streams:
                return False
            self._streams += 1
            return True

    def close_stream(self) -> None:
        with self._slots:
            self._streams -= 1

    @property
    def streams(self) -> int:
        with self._slots:
            return self._streams

    def wait(self, seconds: float) -> bool:
        """Sleep between updates; True as soon as the feed is closed (the server stops)."""
        return self._closed.wait(seconds)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """End every stream at its next wake-up and refuse new ones."""
        self._closed.set()
