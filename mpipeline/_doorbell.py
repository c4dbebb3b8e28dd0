"""Cross-process wakeups for the ring: a named FIFO registered with the event loop.

A waiting side parks on ``wait`` (the loop's epoll watches the FIFO, so an
idle waiter burns no CPU); the other side calls ``ring`` only when the waiter
announced itself in the ring header, so a busy ring makes no syscalls at all.
A FIFO rather than an eventfd because it can be opened by name from any
process, which keeps ``Ring.attach(name)`` self-contained.

A park is the price of every hop at low load, so it is kept to a Future:
the FIFO stays registered with the loop from the first wait until ``close``
(not an ``add_reader``/``remove_reader`` pair, two ``epoll_ctl`` calls, per
park), and the timeout is one timer per doorbell that is re-armed only when
it fires, not a ``call_later`` and a cancel per park (issue 16).
"""

from __future__ import annotations

import asyncio
import os

from mpipeline import _shm

# One byte is enough: the waiter drains everything on wakeup.
_TOKEN = b"\x01"
_DRAIN = 4096


class Doorbell:
    """One FIFO endpoint; both processes open the same FIFO read-write.

    At most one coroutine waits on a doorbell at a time (each ring side has
    one owner), which is what lets the registration and the timer be shared.
    """

    __slots__ = ("_deadline", "_fd", "_loop", "_path_name", "_timer", "_timer_at", "_waiter")

    def __init__(self, segment: str, suffix: str) -> None:
        self._path_name = segment + suffix
        self._fd = _shm.open_bell(segment, suffix)
        # The loop the FIFO is registered with (None: not registered).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[bool] | None = None
        # When the current wait times out, and the one timer that enforces it.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # try/except rather than contextlib.suppress in these two: they run once per
    # wake, one on each side, and the context managers cost 0.6-0.9 us of a
    # 2.3-3.4 us ring-and-drain pair (timeit on a pipe).

    def ring(self) -> None:
        """Wake the waiter. Never blocks: a full pipe already holds a wakeup."""
        try:
            os.write(self._fd, _TOKEN)
        except BlockingIOError:
            pass

    def drain(self) -> None:
        try:
            while len(os.read(self._fd, _DRAIN)) == _DRAIN:
                pass
        except BlockingIOError:
            pass

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - the loop timer is ours
        """Sleep until rung or ``timeout`` seconds pass; True when rung.

        Spurious wakeups are possible (a stale token from an earlier round);
        callers re-check the ring after every return.

        :raises RuntimeError: when another coroutine is already waiting here.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._register(loop)
        if self._waiter is not None and not self._waiter.done():
            raise RuntimeError(f"doorbell {self._path_name} already has a waiter")
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiter = fut
        deadline = self._deadline = loop.time() + timeout
        # The timer may fire early (it was armed for an earlier wait); it then
        # re-arms for this deadline. It must not fire late, so re-arm when it would.
        if self._timer is None or self._timer_at > deadline:
            self._arm(loop, deadline)
        try:
            return await fut
        finally:
            self._waiter = None

    def _register(self, loop: asyncio.AbstractEventLoop) -> None:
        self._unregister()
        loop.add_reader(self._fd, self._on_readable)
        self._loop = loop

    def _unregister(self) -> None:
        loop, self._loop = self._loop, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._fd)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_readable(self) -> None:
        self.drain()
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(True)

    def _on_timer(self) -> None:
        self._timer = None
        fut = self._waiter
        if fut is None or fut.done():
            return  # nobody waits: the next wait arms a new timer
        if self._deadline <= self._timer_at:
            fut.set_result(False)
        elif self._loop is not None:
            self._arm(self._loop, self._deadline)

    def close(self) -> None:
        if self._fd >= 0:
            self._unregister()
            os.close(self._fd)
            self._fd = -1
