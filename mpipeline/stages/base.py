"""What a stage is: one class that turns one typed message into zero or more.

Two shapes, chosen per stage by measurement: ``Stage.process`` is a plain
function for CPU-only work (templating, joining, filtering), because an async
generator per message costs about a microsecond, which is most of a fast
stage's budget at 100k messages/s. ``AsyncStage.handle`` is an async
generator for I/O-bound work (model calls); the runner runs each message as
its own task, so one slow request never holds up the next. Neither touches
rings, signals, routing or other replicas: that is the runner's job (``mpipeline/runner/``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from mpipeline.config import PipelineConfig
from mpipeline.messages import Message
from mpipeline.metrics.block import Writer

In = TypeVar("In", bound=Message)
Out = TypeVar("Out", bound=Message)


@dataclass(frozen=True)
class StageContext:
    """What a stage may know about where it runs."""

    stage: str
    replica: int
    replicas: int
    config: PipelineConfig
    # "mpl-<run id>" under a supervisor, which owns the run's shared segments
    # (the circuit breakers); "" for a stage built outside one (tests, library).
    segments: str = ""
    cpus: tuple[int, ...] = ()
    # This replica's region of the run's metrics block; None when nothing records.
    metrics: Writer | None = None
    log: logging.LoggerAdapter[logging.Logger] = field(
        default_factory=lambda: logging.LoggerAdapter(logging.getLogger("mpipeline.stage"))
    )

    @property
    def replica_name(self) -> str:
        return f"{self.stage}-{self.replica}"


class BaseStage(Generic[In, Out]):
    """Shared lifecycle of both stage shapes."""

    name: ClassVar[str]
    concurrent: ClassVar[bool] = False

    def __init__(self, config: Any, ctx: StageContext) -> None:
        self.config = config
        self.ctx = ctx

    async def start(self) -> None:
        """Open clients, load models: runs before the replica reports ready."""

    async def stop(self) -> None:
        """Release what ``start`` opened: runs after the last message."""


class Stage(BaseStage[In, Out]):
    """A synchronous stage: fast CPU work, run inline in the batch loop."""

    def process(self, msg: In) -> Iterable[Out]:
        raise NotImplementedError


class AsyncStage(BaseStage[In, Out]):
    """An I/O-bound stage: each message runs as its own task."""

    concurrent: ClassVar[bool] = True
    # In-flight messages per replica before the runner stops reading input.
    max_concurrency: ClassVar[int] = 4096

    def handle(self, msg: In) -> AsyncIterator[Out]:
        raise NotImplementedError
