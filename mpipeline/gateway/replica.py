"""A gateway replica: the spawn target the supervisor runs for each ``[gateway]`` replica.

It serves HTTP on the listening socket the supervisor bound and passed down
(one socket for every replica, no SO_REUSEPORT: the kernel hands each new
connection to whichever replica accepts first) and talks to the pipeline
from its own client slot, so results come back on its own return rings.
Like a stage replica it is pinned, runs uvloop, ignores SIGINT, dies with
the supervisor, beats in the control block, and drains on SIGTERM. When the
supervisor starts draining it closes its copy of the listening socket, so
new connections are refused rather than left waiting in the backlog.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import msgspec

from mpipeline.config import Catalog, PipelineConfig
from mpipeline.control import ControlBlock, ReplicaState, RunState
from mpipeline.errors import BootError
from mpipeline.gateway.app import Gateway, model_name
from mpipeline.gateway.metrics import GatewayMetrics
from mpipeline.gateway.ratelimit import RateLimiter
from mpipeline.metrics import attach_writer, gateway_region
from mpipeline.pipeline import Pipeline
from mpipeline.replica import run_child
from mpipeline.rundir import EFFECTIVE_CONFIG, RunInfo
from mpipeline.topology import GatewaySpec

log = logging.getLogger(__name__)

# Connections still busy this long after SIGTERM are closed: the supervisor
# sends SIGTERM only after its own drain, and SIGKILLs 5 s later.
STOP_GRACE_S = 3.0


def main(
    spec: GatewaySpec,
    config_path: str,
    ctl_name: str,
    parent: int,
    log_level: int,
    sock: socket.socket,
    info: RunInfo,
) -> None:
    """Entry point of a gateway process (the spawn target)."""
    run_child(
        spec.name,
        spec.cpus,
        config_path,
        parent,
        log_level,
        lambda cfg: _serve(spec, cfg, ctl_name, sock, info),
    )


async def _serve(
    spec: GatewaySpec,
    cfg: PipelineConfig,
    ctl_name: str,
    sock: socket.socket,
    info: RunInfo,
) -> None:
    ctl = ControlBlock.attach(ctl_name)
    ctl.booting(spec.slot, os.getpid())
    # Its requests' default deadlines are the gateway's (Gateway sets them).
    pipeline = Pipeline.for_gateway(info, spec.client, timeout_s=cfg.gateway.timeout_s)
    limiter: RateLimiter | None = None
    try:
        await pipeline.start()
        if info.ratelimit:
            limiter = RateLimiter.attach(info.ratelimit)
        gateway = Gateway(
            pipeline,
            cfg.gateway,
            model=model_name(cfg),
            drain_timeout_s=STOP_GRACE_S,
            limiter=limiter,
            inference=cfg.stages.inference,
            catalog=Catalog.of(cfg),
        )
        metrics = _metrics(spec, cfg, ctl_name, info)
        if metrics is not None:
            pipeline.use_metrics(metrics)
            gateway.use_metrics(metrics)
        await gateway.start(sock)
    except Exception as exc:
        await pipeline.close()
        if limiter is not None:
            limiter.close()
        ctl.close()
        raise BootError(f"{type(exc).__name__}: {exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    ctl.set_state(spec.slot, ReplicaState.READY)
    ctl.apply_config(spec.slot, 0)  # not yet: the first beat reads a reload's file
    follow = _Reloads(spec, ctl, gateway, limiter, Path(info.run_dir) / EFFECTIVE_CONFIG)
    beat = loop.create_task(_beat(spec, cfg, ctl, pipeline, gateway, metrics, follow))
    try:
        await stop.wait()
    finally:
        beat.cancel()
        ctl.set_state(spec.slot, ReplicaState.EXITED)
        await gateway.close()
        await pipeline.close()
        if limiter is not None:
            limiter.close()
        ctl.close()


def _metrics(
    spec: GatewaySpec, cfg: PipelineConfig, ctl_name: str, info: RunInfo
) -> GatewayMetrics | None:
    """This replica's region of the run's metrics block (None when metrics are off)."""
    if not cfg.metrics.enabled:
        return None
    clients = {c.index: c for c in info.topology.clients}
    region = gateway_region(spec.name, clients[spec.client].ingress)
    writer = attach_writer(ctl_name.removesuffix("-control"), spec.slot, region)
    return None if writer is None else GatewayMetrics(writer, spec.name)


async def _beat(
    spec: GatewaySpec,
    cfg: PipelineConfig,
    ctl: ControlBlock,
    pipeline: Pipeline,
    gateway: Gateway,
    metrics: GatewayMetrics | None,
    follow: _Reloads,
) -> None:
    """Heartbeat with the request counts; close the listener once the run drains;
    follow reloads."""
    interval = cfg.supervisor.heartbeat_interval_s
    accepting = True
    loop = asyncio.get_running_loop()
    while True:
        stats = pipeline.stats
        ctl.beat(spec.slot, stats["completed"] + stats["failed"], pipeline.inflight)
        await follow.check()
        draining = ctl.raw_state >= RunState.DRAINING
        if accepting and draining:
            accepting = False
            log.info("the pipeline is draining: no new connections")
            gateway.stop_accepting()
        # While the supervisor drains it watches in-flight counts: report often.
        delay = 0.02 if draining else interval
        due = loop.time() + delay
        await asyncio.sleep(delay)
        if metrics is not None:
            metrics.lag(loop.time() - due)  # how long the loop was busy past the timer


class _Reloads:
    """Applies a reload the supervisor published (``mpipeline reload``, SIGHUP).

    The supervisor validates the file, writes it to the run dir and bumps the
    control block's config version; each beat compares the version and, when
    it moved, reads that file and takes its live fields, then acknowledges the
    version. The fields that need new processes come by a rolling restart.
    """

    def __init__(
        self,
        spec: GatewaySpec,
        ctl: ControlBlock,
        gateway: Gateway,
        limiter: RateLimiter | None,
        path: Path,
    ) -> None:
        self._spec, self._ctl, self._gateway, self._limiter = spec, ctl, gateway, limiter
        self._path = path
        self._applied = 0

    async def check(self) -> None:
        ctl = self._ctl
        level = ctl.log_level
        if level and logging.getLogger().level != level:
            logging.getLogger().setLevel(level)
        version = ctl.config_version
        if version == self._applied:
            return
        try:
            cfg = await asyncio.to_thread(_decode, self._path)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("cannot apply config version %d from %s: %s", version, self._path, exc)
            self._applied = version  # said once; the version stays unacknowledged
            return
        self._gateway.reconfigure(cfg.gateway)
        if self._limiter is not None:
            self._limiter.refresh()
        self._applied = version
        ctl.apply_config(self._spec.slot, version)
        log.info("applied config version %d", version)


def _decode(path: Path) -> PipelineConfig:
    """The config the supervisor validated and wrote. Decoded, not checked again: the
    checks of cores against the affinity mask would see this pinned process's mask."""
    return msgspec.toml.decode(path.read_bytes(), type=PipelineConfig)
