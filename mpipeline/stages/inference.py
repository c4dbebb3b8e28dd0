"""Inference: run the model worker for one request and stream its tokens.

One shard per core, chosen by session hash, so a session's cache and state
stay on one core. Requests run concurrently as tasks (a model call is I/O
or a long computation), but the turns of one session run in order.

A piece that is more than text (``Structured``: a tool-call delta, a
refusal) becomes a ``StructuredChunk`` of its own carrying the upstream's JSON,
never joined with its neighbours; the result carries the upstream's reply
JSON when there is one, and says when its text is a JSON document that post
must leave as it is (``response_format`` json_object or json_schema).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

from mpipeline.config import Catalog, InferenceConfig
from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.messages import (
    Assembled,
    Completed,
    Message,
    PromptRequest,
    StructuredChunk,
    TokenChunk,
    Usage,
)
from mpipeline.resilience import BreakerBoard
from mpipeline.stages.base import AsyncStage, StageContext
from mpipeline.stages.calls import ShardCalls
from mpipeline.workers import Upstream, WorkerContext, breaker_slots, build_upstreams
from mpipeline.workers._params import json_mode
from mpipeline.workers.base import Generation, Structured


def breakers_name(segments: str) -> str:
    """The run's circuit-breaker segment, created by the supervisor."""
    return f"{segments}-breakers"


class Inference(AsyncStage[Assembled, Message]):
    """Every shard serves every model of the run (``[[models]]``): each model has
    its own upstreams and call path (circuits, cache, limits), and a request
    takes its model's. Affinity is by session, whatever the model."""

    name = "inference"

    def __init__(self, config: InferenceConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config
        wctx = WorkerContext(shard=ctx.replica, shards=ctx.replicas, cpus=ctx.cpus)
        self._catalog = Catalog.build(ctx.config.models, config)
        self._upstreams: list[Upstream] = []
        self._models: dict[str, ShardCalls] = {}
        for model in self._catalog.models:
            upstreams = build_upstreams(model.inference, wctx, model.label)
            self._upstreams += upstreams
            calls = self._models[model.key] = ShardCalls(model.inference, upstreams, None)
            if ctx.metrics is not None:
                calls.use_metrics(ctx.metrics)
        self._board: BreakerBoard | None = None
        # The default model's (the only one without [[models]]).
        self.calls = self._models[self._catalog.default.key]

    async def start(self) -> None:
        cfg = self._config
        if self._catalog.remote:
            # Under a supervisor every shard shares its circuits; alone, a private board.
            segments = self.ctx.segments
            if segments:
                self._board = BreakerBoard.attach(breakers_name(segments), cfg.breaker)
            else:
                self._board = BreakerBoard.private(cfg.breaker, breaker_slots(self._catalog))
            for calls in self._models.values():
                calls.use_breakers(self._board)
        for upstream in self._upstreams:
            await upstream.start()

    async def stop(self) -> None:
        for upstream in self._upstreams:
            await upstream.stop()
        if self._board is not None:
            self._board.close()
            self._board = None

    async def handle(self, msg: Assembled) -> AsyncIterator[Message]:
        req = msg.request
        gen = Generation()
        calls = self.calls if not req.model else self._calls_for(req.model)
        if not req.stream:
            text = "".join([piece async for piece in calls.tokens(msg, gen, False)])
            yield self._completed(req, text, gen)
            return
        parts: list[str] = []
        per_chunk = self._config.chunk_tokens
        pending: list[str] = []
        index = 0
        async for token in calls.tokens(msg, gen, True):
            parts.append(token)
            if type(token) is not str:  # Structured: a chunk of its own, with its JSON
                if pending:
                    yield self._chunk(req, index, "".join(pending))
                    index += 1
                    pending.clear()
                yield self._chunk(req, index, str(token), cast(Structured, token).raw)
                index += 1
                continue
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
            yield self._chunk(req, index, "".join(pending))
        yield self._completed(req, "".join(parts), gen)

    def _calls_for(self, name: str) -> ShardCalls:
        """The call path of the model ``name`` names. The gateway's HTTP routes send
        canonical names; the WebSocket and the Python API may send an alias.

        :raises UpstreamFailure: ``invalid_request`` when no model has that name
        """
        model = self._catalog.find(name)
        if model is None:
            message = f"no model named {name!r} is configured ([[models]])"
            raise UpstreamFailure(message, code=ErrorCode.INVALID_REQUEST, counts=False)
        return self._models[model.key]

    @staticmethod
    def _chunk(req: PromptRequest, index: int, text: str, raw: bytes = b"") -> TokenChunk:
        if raw:
            return StructuredChunk(
                request_id=req.request_id,
                session_id=req.session_id,
                reply_to=req.reply_to,
                index=index,
                text=text,
                raw=raw,
            )
        return TokenChunk(
            request_id=req.request_id,
            session_id=req.session_id,
            reply_to=req.reply_to,
            index=index,
            text=text,
        )

    @staticmethod
    def _completed(req: PromptRequest, text: str, gen: Generation) -> Completed:
        return Completed(
            request_id=req.request_id,
            session_id=req.session_id,
            reply_to=req.reply_to,
            text=text,
            usage=Usage(
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                cached_tokens=gen.cached_tokens,
            ),
            finish_reason=gen.finish_reason,
            stamps=req.stamps,
            raw=gen.raw,
            verbatim=json_mode(req.params),
            citations=req.citations,
        )
