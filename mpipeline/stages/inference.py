"""Inference: run the model worker for one request and stream its tokens.

One shard per core, chosen by session hash, so a session's cache and state
stay on one core. Requests run concurrently as tasks (a model call is I/O
or a long computation), but the turns of one session run in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from mpipeline.config import InferenceConfig
from mpipeline.messages import Assembled, Completed, Message, PromptRequest, TokenChunk, Usage
from mpipeline.stages.base import AsyncStage, StageContext
from mpipeline.workers import WORKERS, Worker
from mpipeline.workers.base import Generation


class Inference(AsyncStage[Assembled, Message]):
    name = "inference"

    def __init__(self, config: InferenceConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config
        worker_cls = WORKERS[config.worker]
        self._worker: Worker = worker_cls(getattr(config, config.worker))

    async def start(self) -> None:
        await self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def handle(self, msg: Assembled) -> AsyncIterator[Message]:
        req = msg.request
        gen = Generation()
        if not req.stream:
            text = await self._worker.complete(msg.prompt, req, gen)
            yield self._completed(req, text, gen)
            return
        parts: list[str] = []
        per_chunk = self._config.echo.chunk_tokens
        pending: list[str] = []
        index = 0
        async for token in self._worker.generate(msg.prompt, req, gen):
            parts.append(token)
            if per_chunk:
                pending.append(token)
                if len(pending) >= per_chunk:
                    yield TokenChunk(
                        request_id=req.request_id,
                        session_id=req.session_id,
                        reply_to=req.reply_to,
                        index=index,
                        text="".join(pending),
                    )
                    index += 1
                    pending.clear()
        if pending:
            yield TokenChunk(
                request_id=req.request_id,
                session_id=req.session_id,
                reply_to=req.reply_to,
                index=index,
                text="".join(pending),
            )
        yield self._completed(req, "".join(parts), gen)

    @staticmethod
    def _completed(req: PromptRequest, text: str, gen: Generation) -> Completed:
        return Completed(
            request_id=req.request_id,
            session_id=req.session_id,
            reply_to=req.reply_to,
            text=text,
            usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens),
            finish_reason=gen.finish_reason,
            stamps=req.stamps,
        )
