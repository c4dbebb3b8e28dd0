"""Rag: find context for the prompt in the configured document store.

Separate from assemble because retrieval is its own cost (index lookups, and
later network stores) and gets its own core. With no store configured it
passes the request through with empty context, at the cost of one decode and
encode, so the pipeline's shape never depends on the config. The index, its
sharing between replicas and its reloads are ``mpipeline.retrieval``'s; this
stage only asks it and records where the context came from
(``PromptRequest.citations``, which the reply carries back to the client).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from mpipeline.config import RagConfig
from mpipeline.messages import Citation, PromptRequest, Retrieved
from mpipeline.retrieval.live import LiveIndex
from mpipeline.stages.base import Stage, StageContext


class Rag(Stage[PromptRequest, Retrieved]):
    name = "rag"

    def __init__(self, config: RagConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config
        self._index: LiveIndex | None = None
        if config.documents is not None:
            self._index = LiveIndex(config, ctx.config)

    async def start(self) -> None:
        if self._index is not None:
            await self._index.start()

    async def stop(self) -> None:
        if self._index is not None:
            await self._index.stop()

    def process(self, msg: PromptRequest) -> Iterable[Retrieved]:
        if self._index is None or msg.endpoint:  # an endpoint's body is not a question
            return (Retrieved(request=msg),)
        context = self._index.search(msg.input)
        if not context:
            return (Retrieved(request=msg),)
        cited = [Citation(source=p.source, chunk=p.chunk, score=p.score) for p in context]
        return (Retrieved(request=msgspec.structs.replace(msg, citations=cited), context=context),)
