"""Model backends behind one ``Worker`` protocol; the registry is explicit."""

from __future__ import annotations

from mpipeline.workers.base import Worker
from mpipeline.workers.echo import EchoWorker

WORKERS: dict[str, type[Worker]] = {"echo": EchoWorker}

__all__ = ["WORKERS", "EchoWorker", "Worker"]
