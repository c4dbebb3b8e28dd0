"""Meter: what a replica counts, and the heartbeat that reports it.

The counters (processed, in flight, expired, shed, corrupt, cancelled, paused) are
plain attributes that the runner, the outbox and the task pool add to in
place: one attribute store per event, never a call.

The heartbeat stores processed and in flight into this replica's slot of the
control block, from a loop timer and also from the pump between messages: a
slow stage can spend long on one batch without returning to the loop, whose
timer would beat, and busy must never be taken for hung. While the supervisor
drains, the timer beats often so that it can see the replica go idle. Each
beat also publishes the stage-duration histogram gathered since the last one
into the metrics block, and the timer's lateness is the event-loop lag gauge.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mpipeline.control import ControlBlock, RunState
from mpipeline.metrics.block import Cells, Writer
from mpipeline.metrics.schema import HIST_CELLS
from mpipeline.topology import ReplicaSpec, edge_label


class Meter:
    """The counters of one replica, its heartbeat and its share of the metrics block."""

    def __init__(
        self,
        spec: ReplicaSpec,
        heartbeat_s: float,
        ctl: ControlBlock | None,
        metrics: Writer | None,
    ) -> None:
        self.ctl = ctl
        self.slot = spec.slot
        self.heartbeat_s = heartbeat_s
        self.processed = 0
        self.inflight = 0
        self.expired = 0
        self.shed = 0
        self.corrupt = 0
        self.cancelled = 0
        # Streams held between two chunks because their reader was behind.
        self.paused = 0
        # The pump beats between messages once the clock passes this (monotonic ns).
        self.next_beat_ns = 0
        # Set when the runner stops: the timer then beats once more and stops.
        self.stopping = False
        self._beat_every_ns = int(heartbeat_s * 1e9)
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        # Bucket counts and (at HIST_SUM) the ns sum of stage durations since the last beat.
        self.hist = [0] * HIST_CELLS
        # Metrics: cell indices looked up once; the hot path adds to cells directly.
        self.cells: Cells | None = None
        self._m_duration = self._m_lag = self._m_expired = 0
        self._m_shed: dict[str, int] = {}
        if metrics is not None:
            self.cells = metrics.cells
            self._m_duration = metrics.index("stage_duration_seconds", spec.stage, spec.name)
            self._m_lag = metrics.index("event_loop_lag_seconds", spec.stage, spec.name)
            self._m_expired = metrics.index("expired", spec.stage)
            self._m_shed = {
                name: metrics.index("shed", edge_label(name), "ring_full") for name in spec.outputs
            }

    def start(self) -> None:
        """Beat at once, then every heartbeat from the loop's timer until ``stop``."""
        self._handle = asyncio.get_running_loop().call_later(0, self._tick)

    def stop(self) -> None:
        """Cancel the timer and beat a last time."""
        self.stopping = True
        if self._handle is not None:
            self._handle.cancel()  # the live one: each beat schedules the next
        self.beat()

    def beat(self) -> None:
        self.next_beat_ns = time.monotonic_ns() + self._beat_every_ns
        if self.ctl is not None:
            self.ctl.beat(self.slot, self.processed, self.inflight)
        self._publish()

    def count_expired(self, n: int) -> None:
        self.expired += n
        if self.cells is not None:
            self.cells[self._m_expired] += n

    def count_shed(self, ring: str, n: int) -> None:
        """``n`` messages for output ring ``ring`` were failed because it was full."""
        self.shed += n
        if self.cells is not None:
            self.cells[self._m_shed[ring]] += n

    def _publish(self) -> None:
        """Add the stage-duration histogram gathered since the last beat to shared memory.

        Per message, an add to a local list costs a third of an add to a
        shared-memory cell (measured: bench/metrics_stage_cost.py), and the
        duration histogram is the one metric touched for every message. The
        price: a scrape lags by up to one heartbeat, and a crash loses that much.
        """
        cells = self.cells
        if cells is None:
            return
        base = self._m_duration
        hist = self.hist
        for i, n in enumerate(hist):
            if n:
                cells[base + i] += n
                hist[i] = 0

    def _tick(self) -> None:
        self.beat()
        # A reload may set the run's log level (the supervisor stores it; 0: unset).
        level = self.ctl.log_level if self.ctl is not None else 0
        if level and logging.getLogger().level != level:
            logging.getLogger().setLevel(level)
        loop = asyncio.get_running_loop()
        cells = self.cells
        if cells is not None and self._due:
            # How late this timer fired: time the loop spent blocked elsewhere.
            cells[self._m_lag] = max(0.0, loop.time() - self._due)
        if self.stopping:
            return
        # While the supervisor drains, report often so it can see us go idle.
        draining = self.ctl is not None and self.ctl.state == RunState.DRAINING
        delay = 0.02 if draining else self.heartbeat_s
        self._due = loop.time() + delay
        self._handle = loop.call_later(delay, self._tick)
