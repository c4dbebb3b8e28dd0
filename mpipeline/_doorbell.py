"""Cross-process wakeups for the ring: a named FIFO registered with the event loop.

A waiting side parks on ``wait`` (the loop's epoll watches the FIFO, so an
idle waiter burns no CPU); the other side calls ``ring`` only when the waiter
announced itself in the ring header, so a busy ring makes no syscalls at all.
A FIFO rather than an eventfd because it can be opened by name from any
process, which keeps ``Ring.attach(name)`` self-contained.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from mpipeline import _shm

# One byte is enough: the waiter drains everything on wakeup.
_TOKEN = b"\x01"
_DRAIN = 4096


class Doorbell:
    """One FIFO endpoint; both processes open the same FIFO read-write."""

    __slots__ = ("_fd", "_path_name")

    def __init__(self, segment: str, suffix: str) -> None:
        self._path_name = segment + suffix
        self._fd = _shm.open_bell(segment, suffix)

    def ring(self) -> None:
        """Wake the waiter. Never blocks: a full pipe already holds a wakeup."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._fd, _TOKEN)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while len(os.read(self._fd, _DRAIN)) == _DRAIN:
                pass

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - the loop timer is ours
        """Sleep until rung or ``timeout`` seconds pass; True when rung.

        Spurious wakeups are possible (a stale token from an earlier round);
        callers re-check the ring after every return.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        fd = self._fd
        loop.add_reader(fd, _on_readable, self, fut)
        timer = loop.call_later(timeout, _on_timeout, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            loop.remove_reader(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _on_readable(bell: Doorbell, fut: asyncio.Future[bool]) -> None:
    bell.drain()
    if not fut.done():
        fut.set_result(True)


def _on_timeout(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)
