"""Every shared segment of one run: the supervisor alone creates and unlinks them.

The control block (always), the metrics block (metrics on), the rate limiter
(a gateway with limits), the breaker board (a worker with remote upstreams)
and one ring per edge of the topology. Created before any process starts, so
a full /dev/shm fails the run before a replica exists; removed last, after
every replica has stopped.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mpipeline.config import Catalog, PipelineConfig
from mpipeline.control import ControlBlock
from mpipeline.ring import Ring
from mpipeline.topology import Topology

if TYPE_CHECKING:
    from mpipeline.gateway.ratelimit import RateLimiter
    from mpipeline.metrics import MetricsBlock
    from mpipeline.resilience import BreakerBoard

# Attached clients get this long to read the final state before the control block goes.
FINAL_READ_S = 0.05


class RunSegments:
    """The run's segments, created in ``create`` and removed in ``remove``."""

    def __init__(self, ctl: ControlBlock) -> None:
        self.ctl = ctl
        self.metrics: MetricsBlock | None = None
        # Token buckets every gateway shares, so a limit holds across replicas.
        self.limiter: RateLimiter | None = None
        # One circuit per upstream for every shard: one shard's failures make them
        # all fail fast.
        self.breakers: BreakerBoard | None = None
        self.rings: dict[str, Ring] = {}

    @classmethod
    def create(cls, cfg: PipelineConfig, topo: Topology) -> RunSegments:
        """Every segment ``cfg`` and ``topo`` call for (a failure removes what was made).

        :raises RingError: when /dev/shm has no room
        """
        prefix = f"mpl-{topo.run_id}"
        n_replicas = len(topo.replicas) + len(topo.gateways)
        segments = cls(ControlBlock.create(f"{prefix}-control", n_replicas, len(topo.clients)))
        try:
            segments._create_rest(cfg, topo, prefix, n_replicas)
        except BaseException:
            segments.remove(final_read_s=0.0)
            raise
        return segments

    def _create_rest(
        self, cfg: PipelineConfig, topo: Topology, prefix: str, n_replicas: int
    ) -> None:
        if cfg.metrics.enabled:
            from mpipeline.metrics import MetricsBlock, segment_name

            # Every replica counts in its own region, indexed by its control slot.
            self.metrics = MetricsBlock.create(segment_name(prefix), n_replicas)
        if topo.gateways and cfg.gateway.rate_limit.enabled:
            from mpipeline.gateway.ratelimit import RateLimiter

            self.limiter = RateLimiter.create(f"{prefix}-ratelimit", cfg.gateway.rate_limit)
        catalog = Catalog.of(cfg)
        if catalog.remote:
            from mpipeline.resilience import BreakerBoard
            from mpipeline.workers import breaker_slots

            breaker = cfg.stages.inference.breaker
            slots = breaker_slots(catalog)
            self.breakers = BreakerBoard.create(f"{prefix}-breakers", breaker, slots)
        for edge in topo.edges:
            self.rings[edge.name] = Ring.create(edge.capacity, edge.name)

    def remove(self, final_read_s: float = FINAL_READ_S) -> None:
        """Close and unlink everything (idempotent); the control block goes last."""
        for ring in self.rings.values():
            ring.close()
            ring.unlink()
        self.rings.clear()
        for seg in (self.limiter, self.breakers, self.metrics):
            if seg is not None:
                seg.close()
                seg.unlink()
        self.limiter = self.breakers = self.metrics = None
        if not self.ctl.closed:
            time.sleep(final_read_s)
            self.ctl.close()
            self.ctl.unlink()
