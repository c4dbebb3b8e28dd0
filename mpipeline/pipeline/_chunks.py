"""A stream's unread chunks: a bounded buffer whose fill level reaches the shard.

The chunks of a streamed request wait here between the client's receive loop
and the reader (``Pipeline.stream``, the gateway's SSE or WebSocket writer).
An unbounded ``asyncio.Queue`` let 200 readers that read almost nothing
hold 3 M chunks and 380 MiB (issue 15). Now the buffer has marks:

- at ``HIGH_WATER`` unread chunks the client pauses the request on the
  control block's pause board, and the shard generating it stops between two
  chunks, so a reader who never reads spends no model time;
- when the reader has taken the buffer down to ``LOW_WATER`` the pause is
  lifted (hysteresis, so a reader at the edge does not flip it per chunk);
- past ``HARD_LIMIT`` (chunks already in the rings when the pause was set, or
  a pause lost to a board collision) the request is cut ``slow_client``, as
  it is when it stays paused longer than the client's stall timeout.

Nothing is dropped: a cut request gets its DLQ record and its reader an
error in place of the rest.
"""

from __future__ import annotations

import asyncio
import collections

from mpipeline.messages import TokenChunk

# Unread chunks at which the shard is asked to pause (a few kB of tokens).
HIGH_WATER = 256
# Unread chunks at which a paused stream goes on.
LOW_WATER = HIGH_WATER // 4
# Unread chunks past which the stream is cut: the pause did not take.
HARD_LIMIT = 8 * HIGH_WATER


class ChunkBuffer:
    """Unread chunks of one stream, and the one reader waiting for them."""

    __slots__ = ("_items", "_waiter", "paused_ns")

    def __init__(self) -> None:
        self._items: collections.deque[TokenChunk] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        # When the request was paused (monotonic ns); 0 while it runs.
        self.paused_ns = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, chunk: TokenChunk) -> int:
        """Add a chunk and wake the reader; returns how many are unread now."""
        items = self._items
        items.append(chunk)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return len(items)

    def take(self) -> TokenChunk | None:
        """The oldest unread chunk, or None."""
        return self._items.popleft() if self._items else None

    def clear(self) -> None:
        """Forget unread chunks: the request ended in an error the reader gets instead."""
        self._items.clear()

    async def wait(self, end: asyncio.Future[object]) -> None:
        """Wait for a chunk, or for ``end`` (the request's outcome), whichever is first."""
        if self._items or end.done():
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait((waiter, end), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._waiter is waiter:
                self._waiter = None
            if not waiter.done():
                waiter.cancel()
