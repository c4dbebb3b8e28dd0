"""The yardstick for ``mpipeline bench``: the same stages in one asyncio process.

The plain design a reader would write first: one task per stage replica,
an ``asyncio.Queue`` between stages, the very stage classes of
``mpipeline.stages`` built from the same config, routed like the runner
(session hash over the next stage's replicas) and stamped like it. Sync
stages run ``process`` inline; async stages iterate ``handle`` inline in
their replica's task too. That is the fastest plain shape for a worker that
never waits (echo, no delay): a task per message, which a real model call
would need, costs about 30 % of this baseline's throughput here, so the
ratio this yardstick gives is the conservative one. No encoding, no
rings, no processes: whatever the multi-process pipeline beats this by is
what its design buys, measured on the same machine in the same run.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

from mpipeline.config import PipelineConfig, active_stages
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import (
    Completed,
    Failed,
    Message,
    PromptRequest,
    StructuredChunk,
    TokenChunk,
    failed_from,
)
from mpipeline.pipeline._chunks import ChunkBuffer
from mpipeline.routing import message_key, request_key, shard_for
from mpipeline.stages import STAGES, AsyncStage, BaseStage, Stage, StageContext

# Bound of each queue between stages, like a ring's capacity in records.
QUEUE_SIZE = 1024
_TIMEOUT_S = 30.0


class AsyncioPipeline:
    """Single-process pipeline with the ``Pipeline`` client's ``submit_nowait``."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self._cfg = cfg
        self._stages: list[tuple[str, list[BaseStage[Any, Any]]]] = []
        self._queues: list[list[asyncio.Queue[Message]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[str, asyncio.Future[Completed]] = {}
        self._streams: dict[str, ChunkBuffer] = {}
        self._ids = itertools.count()

    async def __aenter__(self) -> AsyncioPipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        for pos, (name, stage_cfg) in enumerate(active_stages(self._cfg)):
            n = stage_cfg.replicas
            replicas = [
                STAGES[name](
                    stage_cfg, StageContext(stage=name, replica=i, replicas=n, config=self._cfg)
                )
                for i in range(n)
            ]
            for stage in replicas:
                await stage.start()
            self._stages.append((name, replicas))
            # The first stage's queues take the client's writes: unbounded, like its outbox.
            size = 0 if pos == 0 else QUEUE_SIZE
            self._queues.append([asyncio.Queue(size) for _ in range(n)])
        loop = asyncio.get_running_loop()
        for pos, (_, replicas) in enumerate(self._stages):
            for i, stage in enumerate(replicas):
                self._tasks.append(loop.create_task(self._serve(pos, stage, self._queues[pos][i])))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, replicas in self._stages:
            for stage in replicas:
                await stage.stop()
        for fut in self._inflight.values():
            fut.cancel()
        self._inflight.clear()
        self._streams.clear()

    def submit_nowait(
        self, text: str, *, session_id: str | None = None, max_tokens: int | None = None
    ) -> asyncio.Future[Completed]:
        return self._submit(text, session_id, max_tokens, None)

    async def stream_events(
        self, text: str, *, session_id: str | None = None, max_tokens: int | None = None
    ) -> AsyncIterator[TokenChunk | Completed]:
        """Like ``Pipeline.stream_events``: the chunks as they come, then the ``Completed``.

        The chunks wait in the pipeline client's own ``ChunkBuffer``, and the
        worker streams (``generate``) as it does for a streamed request in the
        pipeline, so a streamed workload costs both sides the same work.
        """
        chunks = ChunkBuffer()
        future = self._submit(text, session_id, max_tokens, chunks)
        while True:
            chunk = chunks.take()
            if chunk is not None:
                yield chunk
                continue
            if future.done():
                yield future.result()  # raises RequestFailed
                return
            await chunks.wait(future)  # type: ignore[arg-type]

    def _submit(
        self,
        text: str,
        session_id: str | None,
        max_tokens: int | None,
        chunks: ChunkBuffer | None,
    ) -> asyncio.Future[Completed]:
        now = time.monotonic_ns()
        req = PromptRequest(
            request_id=f"b-{next(self._ids)}",
            session_id=session_id,
            input=text,
            deadline_ns=now + int(_TIMEOUT_S * 1e9),
            max_tokens=max_tokens,
            stream=chunks is not None,
        )
        fut: asyncio.Future[Completed] = asyncio.get_running_loop().create_future()
        self._inflight[req.request_id] = fut
        if chunks is not None:
            self._streams[req.request_id] = chunks
        first, replicas = self._stages[0]
        n = len(replicas)
        self._queues[0][0 if n == 1 else shard_for(request_key(req, first), n)].put_nowait(req)
        return fut

    async def _serve(
        self, pos: int, stage: BaseStage[Any, Any], inbox: asyncio.Queue[Message]
    ) -> None:
        name = self._stages[pos][0]
        last = pos == len(self._stages) - 1
        outs = None if last else self._queues[pos + 1]
        sync = stage if isinstance(stage, Stage) else None
        handler = stage if isinstance(stage, AsyncStage) else None
        while True:
            msg = await inbox.get()
            stamps = getattr(msg, "stamps", None)
            if stamps is None:
                stamps = getattr(getattr(msg, "request", None), "stamps", None)
            if stamps is not None:
                stamps[name] = time.monotonic_ns()
            try:
                if sync is not None:
                    for out in sync.process(msg):
                        await self._emit(out, outs)
                else:
                    assert handler is not None
                    async for out in handler.handle(msg):
                        await self._emit(out, outs)
            except Exception as exc:  # one bad message must not stop the stage
                reason = f"{type(exc).__name__}: {exc}"
                self._deliver(failed_from(msg, ErrorCode.STAGE_ERROR, reason, name))

    async def _emit(self, msg: Message, outs: list[asyncio.Queue[Message]] | None) -> None:
        if outs is None or type(msg) is Failed:
            self._deliver(msg)
            return
        n = len(outs)
        await outs[0 if n == 1 else shard_for(message_key(msg), n)].put(msg)

    def _deliver(self, msg: Message) -> None:
        if type(msg) is TokenChunk or type(msg) is StructuredChunk:
            chunks = self._streams.get(msg.request_id)
            if chunks is not None:
                chunks.put(msg)
            return
        self._streams.pop(getattr(msg, "request_id", ""), None)
        if type(msg) is Completed:
            fut = self._inflight.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif type(msg) is Failed:
            fut = self._inflight.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(RequestFailed(msg))
