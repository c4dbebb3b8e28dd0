"""The MCP resources: the run's effective config and its metrics, read when asked.

* ``mpipeline://config/effective``: the config the run uses, every field with
  its value (defaults filled in), as ``mpipeline config show`` prints it: read
  from the file the supervisor started with and its replicas read on every
  (re)start (state.json's ``config``; ``effective.toml`` in the run dir when
  the run had command-line overrides);
* ``mpipeline://metrics``: what ``/metrics`` serves at this moment, in the
  Prometheus text format, read straight from shared memory by the same
  collector (``metrics.collect``): no HTTP round trip, no metrics port or
  token needed, and nothing in the pipeline changes for the read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import mcp_types as types
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from mpipeline import config
from mpipeline.errors import MPipelineError
from mpipeline.metrics.collect import collect
from mpipeline.rundir import connect

CONFIG_URI = "mpipeline://config/effective"
METRICS_URI = "mpipeline://metrics"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


RESOURCES = [
    types.Resource(
        uri=CONFIG_URI,
        name="effective-config",
        description="The configuration the running pipeline uses, every field with its "
        "value, as TOML (`mpipeline config show` of the run's own file).",
        mime_type="application/toml",
    ),
    types.Resource(
        uri=METRICS_URI,
        name="metrics",
        description="The pipeline's Prometheus metrics now (the same families as /metrics).",
        mime_type=PROMETHEUS_TEXT,
    ),
]


async def read(run_dir: Path, uri: str) -> types.TextResourceContents:
    """The contents of ``uri`` now.

    :raises LookupError: for an unknown URI, or one that cannot be read (no run)
    """
    if uri == CONFIG_URI:
        try:
            text = await asyncio.to_thread(_effective, run_dir)
        except (MPipelineError, OSError) as exc:
            raise LookupError(f"{uri}: {exc}") from None
        return types.TextResourceContents(uri=uri, mime_type="application/toml", text=text)
    if uri == METRICS_URI:
        try:
            text = await asyncio.to_thread(_exposition, run_dir)
        except MPipelineError as exc:
            raise LookupError(f"{uri}: {exc}") from None
        return types.TextResourceContents(uri=uri, mime_type=PROMETHEUS_TEXT, text=text)
    known = ", ".join(str(resource.uri) for resource in RESOURCES)
    raise LookupError(f"no resource {uri!r}; the resources are {known}")


class _Once(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def _effective(run_dir: Path) -> str:
    with connect(run_dir) as run:
        path = Path(run.info.config)
    return config.dump_toml(config.load(path))


def _exposition(run_dir: Path) -> str:
    with connect(run_dir) as run:
        metrics = collect(run)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once(metrics))
    return generate_latest(registry).decode()
