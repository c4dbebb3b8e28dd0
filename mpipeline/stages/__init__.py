"""The stage kinds, by name: one class each, in the flow order of ``messages.FLOW``."""

from __future__ import annotations

from mpipeline.messages import STAGE_ORDER
from mpipeline.stages.assemble import Assemble
from mpipeline.stages.base import AsyncStage, BaseStage, Stage, StageContext
from mpipeline.stages.inference import Inference
from mpipeline.stages.post import Post
from mpipeline.stages.rag import Rag
from mpipeline.stages.stream import Stream

STAGES: dict[str, type[BaseStage]] = {  # type: ignore[type-arg]
    cls.name: cls
    for cls in (
        Rag,
        Assemble,
        Inference,
        Post,
        Stream,
    )
}
if tuple(STAGES) != STAGE_ORDER:  # pragma: no cover - a dev's slip
    raise ImportError(f"stage classes {tuple(STAGES)} != messages.STAGE_ORDER {STAGE_ORDER}")

__all__ = ["STAGES", "AsyncStage", "BaseStage", "Stage", "StageContext"]
