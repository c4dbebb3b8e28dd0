"""Stream: hands every message on, and records final results to the JSONL sink."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from mpipeline.config import PipelineConfig, StreamConfig
from mpipeline.errors import ErrorCode
from mpipeline.messages import Completed, Failed, Message, TokenChunk, Usage
from mpipeline.stages import StageContext
from mpipeline.stages.stream import Stream

DONE = Completed(
    request_id="r1",
    session_id=None,
    reply_to=0,
    text="hi",
    usage=Usage(prompt_tokens=1, completion_tokens=1),
)
CHUNK = TokenChunk(request_id="r1", session_id=None, reply_to=0, index=0, text="hi")
FAILED = Failed(
    request_id="r2",
    session_id=None,
    reply_to=0,
    code=ErrorCode.DEADLINE_EXCEEDED,
    reason="late",
    stage="post",
)


def _stage(sink: Path | None = None) -> Stream:
    cfg = StreamConfig(sink_jsonl=str(sink) if sink else None)
    return Stream(cfg, StageContext("stream", 0, 1, PipelineConfig()))


def _through(stage: Stream, msgs: list[Message]) -> list[Message]:
    async def run() -> list[Message]:
        await stage.start()
        try:
            return [out for msg in msgs for out in stage.process(msg)]  # type: ignore[arg-type]
        finally:
            await stage.stop()

    return asyncio.run(run())


def test_passes_every_message_through_in_order() -> None:
    msgs: list[Message] = [CHUNK, DONE, FAILED]
    out = _through(_stage(), msgs)
    assert len(out) == 3
    assert all(a is b for a, b in zip(out, msgs, strict=True))


def test_sink_records_only_final_results_and_appends(tmp_path: Path) -> None:
    sink = tmp_path / "results.jsonl"
    sink.write_text('{"earlier": true}\n')
    _through(_stage(sink), [CHUNK, DONE, FAILED, DONE])
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert lines[0] == {"earlier": True}
    assert len(lines) == 3
    # array_like messages encode as arrays: tag first, then fields in order.
    assert lines[1][:3] == ["done", "r1", None]
    assert lines[1] == lines[2]
