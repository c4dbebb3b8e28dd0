"""The stage kinds, by name. Adding one: a module here and an entry below."""

from __future__ import annotations

from mpipeline.stages.assemble import Assemble
from mpipeline.stages.base import AsyncStage, BaseStage, Stage, StageContext
from mpipeline.stages.inference import Inference
from mpipeline.stages.post import Post
from mpipeline.stages.rag import Rag
from mpipeline.stages.stream import Stream

STAGES: dict[str, type[BaseStage]] = {  # type: ignore[type-arg]
    "rag": Rag,
    "assemble": Assemble,
    "inference": Inference,
    "post": Post,
    "stream": Stream,
}

__all__ = ["STAGES", "AsyncStage", "BaseStage", "Stage", "StageContext"]
