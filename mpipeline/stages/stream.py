"""Stream: hand results back to the client that holds the request, and to sinks.

The last stage, so that delivery (and optional recording to a JSONL sink)
never competes with model work for a core.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO

import msgspec

from mpipeline.config import StreamConfig
from mpipeline.messages import Completed, Failed, Message, TokenChunk
from mpipeline.stages.base import Stage, StageContext


class Stream(Stage[TokenChunk | Completed | Failed, Message]):
    name = "stream"

    def __init__(self, config: StreamConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._config = config
        self._sink: IO[bytes] | None = None
        self._encoder = msgspec.json.Encoder()

    async def start(self) -> None:
        if self._config.sink_jsonl:
            # Opened once at start, closed in stop(); appends are small and buffered.
            self._sink = open(self._config.sink_jsonl, "ab")  # noqa: ASYNC230

    async def stop(self) -> None:
        if self._sink is not None:
            self._sink.close()

    def process(self, msg: TokenChunk | Completed | Failed) -> Iterable[Message]:
        if self._sink is not None and isinstance(msg, Completed):
            self._sink.write(self._encoder.encode(msg) + b"\n")
        return (msg,)
