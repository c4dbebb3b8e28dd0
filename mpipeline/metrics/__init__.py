"""Metrics: replicas count into a shared block, the supervisor serves them.

``schema`` says what is counted and where; ``block`` is the shared segment
and a writer's handle; ``collect`` turns a run's block, ring headers, control
block, circuits and psutil into Prometheus families; ``server`` serves them.
"""

from mpipeline.metrics.block import MetricsBlock, Writer, attach_writer, segment_name
from mpipeline.metrics.schema import Region, gateway_region, stage_region

__all__ = [
    "MetricsBlock",
    "Region",
    "Writer",
    "attach_writer",
    "gateway_region",
    "segment_name",
    "stage_region",
]
