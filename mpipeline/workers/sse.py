"""An incremental Server-Sent Events decoder over raw bytes, for upstream streams.

Both model APIs stream over SSE, and this runs once per network read, so it
works on ``bytes`` and leans on ``bytes.splitlines`` (C speed; for bytes it
splits on exactly the three SSE line endings, ``\\n``, ``\\r\\n`` and ``\\r``).
Event data stays ``bytes``: the workers hand it straight to msgspec, which
checks UTF-8 itself, so no text is decoded twice. A multi-byte character split
across reads needs no care either: nothing is decoded until its line is whole.

It follows the WHATWG event-stream rules (comments, ``event``/``data``/``id``/
``retry``, multi-line data joined by ``\\n``, a blank line dispatches, a leading
BOM is dropped) with two additions the workers need to call a stream broken
instead of guessing: ``strict`` rejects field names the spec would silently
ignore (a proxy's HTML page is not an event stream), and ``finish()`` tells a
body that stopped between events from one cut off mid-event. Errors are
``ValueError`` with a fixed message (never upstream text), which the workers
turn into a 502-class ``UpstreamFailure``.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["MAX_EVENT_BYTES", "SSEDecoder", "SSEEvent"]

# A line or an event larger than this is garbage or an attack, not a token: the
# decoder refuses it instead of buffering without bound.
MAX_EVENT_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"
_DATA = b"data:"


class SSEEvent(NamedTuple):
    """One dispatched event: its type (``"message"`` unless named), its data
    lines joined by ``\\n`` (as bytes), and the last event id seen (or None)."""

    event: str
    data: bytes
    id: str | None = None


class SSEDecoder:
    """Feed it network chunks in order; it returns the events each one completes.

    Usage::

        decoder = SSEDecoder(strict=True)
        async for chunk in response.aiter_bytes():
            for event in decoder.feed(chunk):
                ...
        decoder.finish()  # raises if the body stopped mid-event

    ``retry_ms`` holds the last valid ``retry:`` value (None until one is seen).
    """

    __slots__ = (
        "_after_cr",
        "_data",
        "_event",
        "_last_id",
        "_line_size",
        "_max",
        "_parts",
        "_size",
        "_started",
        "_strict",
        "retry_ms",
    )

    def __init__(self, *, strict: bool = False, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._strict = strict
        self._max = max_event_bytes
        # Pieces of a line that has not ended yet.
        self._parts: list[bytes] = []
        self._line_size = 0
        # The previous chunk ended in "\r": a "\n" opening this one belongs to it.
        self._after_cr = False
        self._started = False
        self._data: list[bytes] = []
        self._size = 0
        self._event: str | None = None
        self._last_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode one chunk of the body; return the events it completed, in order.

        :raises ValueError: the stream is not SSE: an unknown field in strict
            mode, a non-UTF-8 event name or id, or a line or event over the limit
        """
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            return []
        if b"\n" not in chunk and b"\r" not in chunk:
            # No line ends here: keep the piece (a list, so a long line costs O(n), not O(n^2)).
            self._parts.append(chunk)
            self._line_size += len(chunk)
            if self._line_size > self._max:
                raise ValueError("SSE line or event too large")
            return []
        if self._parts:
            self._parts.append(chunk)
            chunk = b"".join(self._parts)
            self._parts = []
            self._line_size = 0
        if not self._started:
            self._started = True
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        lines = chunk.splitlines()
        last = chunk[-1]
        if last == 13:  # "\r"
            self._after_cr = True
        elif last != 10:  # "\n": otherwise the final line is still open
            tail = lines.pop()
            self._parts.append(tail)
            self._line_size = len(tail)
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(self._dispatch())
                    data = self._data
                else:
                    self._event = None
                continue
            if line.startswith(_DATA):
                # The fast path: nearly every line of a model stream is "data: {...}".
                value = line[6:] if line[5:6] == b" " else line[5:]
                data.append(value)
                self._size += len(value) + 1
                if self._size > self._max:
                    raise ValueError("SSE line or event too large")
                continue
            self._field(line)
        return events

    def _field(self, line: bytes) -> None:
        field, colon, value = line.partition(b":")
        if not field and colon:
            return  # a comment (keep-alives such as ": ping")
        if value[:1] == b" ":
            value = value[1:]
        try:
            if field == b"event":
                self._event = value.decode()
            elif field == b"data":
                self._data.append(value)
                self._size += len(value) + 1
            elif field == b"id":
                if b"\0" not in value:
                    self._last_id = value.decode()
            elif field == b"retry":
                if value.isdigit():
                    self.retry_ms = int(value)
            elif self._strict:
                raise ValueError("SSE line with an unknown field")
        except UnicodeDecodeError:
            raise ValueError("SSE field is not UTF-8") from None

    def _dispatch(self) -> SSEEvent:
        data = self._data
        joined = data[0] if len(data) == 1 else b"\n".join(data)
        event = SSEEvent(self._event or "message", joined, self._last_id)
        self._data = []
        self._size = 0
        self._event = None
        return event

    @property
    def pending(self) -> bool:
        """True while a line or an event has begun but not been dispatched."""
        return bool(self._parts or self._data or self._event is not None)

    def finish(self) -> None:
        """Declare the body over.

        The spec drops an undispatched event at end of stream; for an upstream
        that means the body was cut off, so it is an error here instead.

        :raises ValueError: the body ended inside a line or an event
        """
        if not self._started and _BOM.startswith(b"".join(self._parts)):
            self._parts = []  # nothing but (part of) a byte-order mark
        if self.pending:
            raise ValueError("SSE stream ended mid-event")
