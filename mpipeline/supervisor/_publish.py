"""What the supervisor publishes: the metrics server and the run's description.

Apart from ``_supervisor.py`` for size. ``serve_metrics`` binds /metrics and
the dashboard before any segment exists (a busy port leaves nothing behind);
``run_info`` is what gateways get at spawn and ``state.json`` says.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mpipeline import rundir, topology
from mpipeline.auth import BearerAuth
from mpipeline.config import Catalog, PipelineConfig
from mpipeline.errors import MPipelineError
from mpipeline.supervisor._segments import RunSegments

if TYPE_CHECKING:
    from mpipeline.metrics.collect import RunCollector
    from mpipeline.metrics.server import MetricsServer


class _Run(Protocol):
    cfg: PipelineConfig
    run_id: str
    run_dir: Path
    config_path: Path
    topo: topology.Topology


def serve_metrics(
    cfg: PipelineConfig, run_dir: Path, published: Callable[[], rundir.Run | None]
) -> tuple[MetricsServer, RunCollector]:
    """Start /metrics and the dashboard; they answer with no samples until ``published``.

    :raises MPipelineError: when the port cannot be bound, saying what to change
    """
    from mpipeline.metrics.collect import Reader, RunCollector
    from mpipeline.metrics.server import MetricsServer
    from mpipeline.supervisor._dashboard import dashboard

    collector = RunCollector(Reader(), published)
    # The gateway's token guards /metrics and the dashboard too (checked set already).
    auth = BearerAuth.from_env(cfg.gateway.auth_token_env)
    board = dashboard(run_dir, collector, auth)
    server = MetricsServer(cfg.metrics.host, cfg.metrics.port, collector, auth, board)
    try:
        server.start()
    except OSError as exc:
        collector.close()
        raise MPipelineError(
            f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port}: "
            f"{exc.strerror or exc} (set metrics.port, or metrics.enabled = false)"
        ) from None
    return server, collector


def url_of(listener: socket.socket | None) -> str | None:
    """The gateway's base URL from its bound socket (port 0 picks one), or None."""
    if listener is None:
        return None
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_info(
    sup: _Run, seg: RunSegments, gateway_url: str | None, metrics_url: str | None
) -> rundir.RunInfo:
    """The run as gateways and state.json describe it (segments exist; URLs are bound)."""
    from mpipeline.workers import served_upstream_names

    return rundir.RunInfo(
        pid=os.getpid(),
        run_id=sup.run_id,
        run_dir=str(sup.run_dir),
        config=str(sup.config_path),
        control=seg.ctl.name,
        ratelimit=seg.limiter.name if seg.limiter else None,
        breakers=seg.breakers.name if seg.breakers else None,
        breaker_config=sup.cfg.stages.inference.breaker,
        metrics=seg.metrics.name if seg.metrics else None,
        gateway_url=gateway_url,
        metrics_url=metrics_url,
        upstreams=served_upstream_names(Catalog.of(sup.cfg)),
        topology=sup.topo,
    )
