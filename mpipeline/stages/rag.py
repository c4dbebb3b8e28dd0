"""Rag: find context for the prompt in the configured document store.

Separate from assemble because retrieval is its own cost (index lookups, and
later network stores) and gets its own core. With no store configured it
passes the request through with empty context, at the cost of one decode and
encode, so the pipeline's shape never depends on the config.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mpipeline.config import RagConfig
from mpipeline.messages import PromptRequest, Retrieved
from mpipeline.retrieval.bm25 import BM25Index
from mpipeline.stages.base import Stage, StageContext


class Rag(Stage[PromptRequest, Retrieved]):
    name = "rag"

    def __init__(self, config: RagConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config
        self._index: BM25Index | None = None

    async def start(self) -> None:
        if self._config.documents is not None:
            self._index = BM25Index.from_folder(Path(self._config.documents))

    def process(self, msg: PromptRequest) -> Iterable[Retrieved]:
        if self._index is None or msg.endpoint:  # an endpoint's body is not a question
            return (Retrieved(request=msg),)
        return (Retrieved(request=msg, context=self._index.search(msg.input, self._config.top_k)),)
