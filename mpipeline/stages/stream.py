"""Stream: hand results back to the client that holds the request, and to the sink.

The last stage, so that delivery (and optional recording to a JSONL sink)
never competes with model work for a core.

The sink's promise: every result a client was given is in the file. A
``Completed`` is handed on toward its client only once its line is written
and fsynced (group commit, ``mpipeline._journal``), so a stream replica that
is SIGKILLed loses no result anyone received: what it held unsynced, it had
not passed on either, and those requests end in ``stage_restarted`` like any
other work of a dead replica. If the disk refuses the line, the request fails
(``stage_error``, naming the sink) instead of being answered unrecorded.

With a sink this is an async stage: a result waits for its batch's fsync
without holding up the chunks and results behind it, and everything else
passes through without suspending, so the runner steps it inline, in order.
Without one it is a sync pass-through (``Stream`` picks the shape).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

import msgspec

from mpipeline._journal import Journal
from mpipeline.config import StreamConfig
from mpipeline.errors import MPipelineError
from mpipeline.messages import Completed, Failed, Message, TokenChunk
from mpipeline.stages.base import AsyncStage, BaseStage, Stage, StageContext


class SinkRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of the ``sink_jsonl`` file: a result, by field name.

    Self-describing (not the rings' positional encoding), so the file stays
    readable by other tools and across versions. ``reply`` is the upstream's
    own JSON for a structured reply (``Completed.raw``: tool calls, refusal),
    embedded as it came; a plain reply's line has none.
    """

    request_id: str
    session_id: str | None
    # Unix time at which the result was recorded.
    ts: float
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reply: msgspec.Raw | None = None


def sink_record(msg: Completed) -> SinkRecord:
    return SinkRecord(
        request_id=msg.request_id,
        session_id=msg.session_id,
        ts=time.time(),
        text=msg.text,
        finish_reason=msg.finish_reason,
        prompt_tokens=msg.usage.prompt_tokens,
        completion_tokens=msg.usage.completion_tokens,
        cached_tokens=msg.usage.cached_tokens,
        reply=msgspec.Raw(msg.raw) if msg.raw else None,
    )


class Stream(BaseStage[TokenChunk | Completed | Failed, Message]):
    """The stream stage; like ``pathlib.Path``, ``Stream(config, ctx)`` builds the shape
    the config needs.

    Without a sink, every message passes straight through, and a plain sync
    stage does that in about a third of the CPU of an async one
    (``PassStream``). With a sink, results must wait for their fsync without
    holding up what comes behind them, which takes an async stage
    (``SinkStream``).
    """

    name = "stream"

    def __new__(cls, config: StreamConfig, ctx: StageContext) -> Stream:
        if cls is Stream:
            cls = SinkStream if config.sink_jsonl else PassStream
        return super().__new__(cls)

    def __init__(self, config: StreamConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config


class PassStream(Stream, Stage[TokenChunk | Completed | Failed, Message]):
    """Hands every message on as it is: no sink is configured."""

    def process(self, msg: TokenChunk | Completed | Failed) -> Iterable[Message]:
        return (msg,)


class SinkStream(Stream, AsyncStage[TokenChunk | Completed | Failed, Message]):
    """Hands every message on, each result only once it is recorded in the sink."""

    def __init__(self, config: StreamConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._sink: Journal | None = None
        self._encoder = msgspec.json.Encoder()

    async def start(self) -> None:
        assert self._config.sink_jsonl
        # Opened once at start (0600, never through a link), closed in stop().
        self._sink = Journal(self._config.sink_jsonl, what="the result sink")

    async def stop(self) -> None:
        if self._sink is not None:
            await self._sink.aclose()

    async def handle(self, msg: TokenChunk | Completed | Failed) -> AsyncIterator[Message]:
        sink = self._sink
        if sink is not None and type(msg) is Completed:
            line = self._encoder.encode(sink_record(msg)) + b"\n"
            if not await sink.append((line,)):
                raise MPipelineError(f"the result could not be written to the sink {sink.path}")
        yield msg
