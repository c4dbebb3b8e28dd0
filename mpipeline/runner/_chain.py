"""Placement groups: several stages in one process, outputs handed over as objects.

Operator chaining (issue 16): when consecutive stages share a ``group``, one
process runs replica ``i`` of each, and a member's outputs go to the next
member's dispatcher instead of a ring, with no encode, decode, ring or
doorbell wake in between. Each member keeps its own ``StageRunner`` (its
admission, deadlines and stamps, its task pool, its heartbeat slot and
metrics), so the stage classes and everything the supervisor and the clients
read per stage are unchanged; only the edge between two members is replaced
by a ``LocalLink``.

A ``LocalLink`` collects a batch's outputs and hands them over at the flush
that a ring would have had, so each stage still runs a whole batch at a time
and keeps its own timing, and the next member's outputs are flushed in the
same loop iteration. Back-pressure crosses the link through the task pools:
the group's pump stops reading while any member's pool is saturated, as a
full ring would have stopped it. Failed messages pass through the later
members' admission and leave by the group's last member, as they would have
crossed the rings. A group stops in flow order: each member drains before
the next one is told to stop, so nothing is handed to a stopped stage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mpipeline.messages import Message
from mpipeline.metrics.schema import BUCKET_OF_BITS, HIST_SUM
from mpipeline.runner._meter import Meter
from mpipeline.runner._sink import Sink

if TYPE_CHECKING:
    from mpipeline.runner._runner import StageRunner


class LocalLink:
    """A member's outputs to the next member of its group: a ``Sink`` with no ring."""

    def __init__(
        self,
        dispatch: Callable[[Message, int], None],
        downstream: Sink,
        meter: Meter,
        *,
        timed: bool,
    ) -> None:
        """``dispatch`` is the next member's entry (``StageRunner.entry``),
        ``downstream`` its own sink, ``meter`` its meter; ``timed`` times a sync
        stage's messages into its histogram, as its pump would have."""
        self._dispatch = dispatch
        self._downstream = downstream
        self._meter = meter
        self._timed = timed and meter.cells is not None
        self._pending: list[Message] = []
        self._flush_task: asyncio.Task[None] | None = None

    def attach(self, *, spin_s: float) -> None:
        """Nothing to attach: the next member is in this process."""

    def close(self) -> None:
        """Nothing to close (the group's runners close their own rings)."""

    def emit(self, msg: Message) -> None:
        self._pending.append(msg)

    def has_pending(self) -> bool:
        return bool(self._pending) or self._downstream.has_pending()

    def schedule_flush(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Run the next member on what waits, then flush its outputs onward."""
        self.hand_over()
        await self._downstream.flush()

    async def finish(self) -> None:
        await self.flush()
        if self._flush_task is not None:
            await self._flush_task

    def hand_over(self) -> None:
        """Dispatch every waiting message to the next member (synchronously).

        A stage may emit while this runs (the next member's own outputs go to
        its sink, not here; a Failed made by admission too), so the list is
        swapped before the loop and looked at again after it.
        """
        dispatch = self._dispatch
        meter = self._meter
        clock = time.monotonic_ns
        while self._pending:
            msgs, self._pending = self._pending, []
            now = start = clock()
            if not self._timed:
                for msg in msgs:
                    dispatch(msg, now)
                if now >= meter.next_beat_ns:
                    meter.beat()
                continue
            hist = meter.hist
            for msg in msgs:
                dispatch(msg, now)
                then, now = now, clock()
                hist[BUCKET_OF_BITS[(now - then).bit_length()]] += 1
                if now >= meter.next_beat_ns:
                    meter.beat()
            hist[HIST_SUM] += now - start


class GroupRunner:
    """The members of one placement-group process, run and stopped in flow order."""

    def __init__(self, runners: Sequence[StageRunner]) -> None:
        self.runners = list(runners)

    def attach(self) -> None:
        for runner in self.runners:
            runner.attach()

    def close(self) -> None:
        for runner in self.runners:
            runner.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop``; then stop each member after the one before it drained."""
        events = [asyncio.Event() for _ in self.runners]
        tasks = [
            asyncio.create_task(r.run(ev), name=f"member-{r.spec.name}")
            for r, ev in zip(self.runners, events, strict=True)
        ]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            for event, task in zip(events, tasks, strict=True):
                event.set()
                await task
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
