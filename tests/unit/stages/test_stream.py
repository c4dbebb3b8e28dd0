"""Stream: hands every message on, and records final results durably to the JSONL sink.

The sink's promise (issue 15 §8): a result is handed on toward its client only
once its line is fsynced, the file is 0600 whatever the umask and never opened
through a link, and each line is a JSON object with field names.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mpipeline.config import PipelineConfig, StreamConfig
from mpipeline.errors import ErrorCode, MPipelineError
from mpipeline.messages import Completed, Failed, Message, TokenChunk, Usage
from mpipeline.stages import AsyncStage, Stage, StageContext
from mpipeline.stages.stream import PassStream, SinkStream, Stream

DONE = Completed(
    request_id="r1",
    session_id="s1",
    reply_to=0,
    text="hi",
    usage=Usage(prompt_tokens=3, completion_tokens=1, cached_tokens=2),
    finish_reason="length",
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


async def _handle(
    stage: Stream, msgs: list[Message], seen: list[str] | None = None
) -> list[Message]:
    """Each message through the stage as the runner would, in order."""
    out: list[Message] = []
    for msg in msgs:
        if isinstance(stage, SinkStream):
            results = [r async for r in stage.handle(msg)]  # type: ignore[arg-type]
        else:
            assert isinstance(stage, PassStream)
            results = list(stage.process(msg))  # type: ignore[arg-type]
        for result in results:
            if seen is not None:
                seen.append(f"handed on {type(result).__name__}")
            out.append(result)
    return out


def _through(stage: Stream, msgs: list[Message]) -> list[Message]:
    async def run() -> list[Message]:
        await stage.start()
        try:
            return await _handle(stage, msgs)
        finally:
            await stage.stop()

    return asyncio.run(run())


def test_passes_every_message_through_in_order() -> None:
    msgs: list[Message] = [CHUNK, DONE, FAILED]
    out = _through(_stage(), msgs)
    assert len(out) == 3
    assert all(a is b for a, b in zip(out, msgs, strict=True))


def test_the_shape_follows_the_config(tmp_path: Path) -> None:
    """Without a sink a sync pass-through (cheapest); with one an async stage, so that a
    result can wait for its fsync without holding up the messages behind it."""
    plain = _stage()
    assert type(plain) is PassStream and isinstance(plain, Stage) and plain.name == "stream"
    sinking = _stage(tmp_path / "results.jsonl")
    assert type(sinking) is SinkStream and isinstance(sinking, AsyncStage)
    assert not isinstance(sinking, Stage) and sinking.name == "stream"


def test_sink_records_only_final_results_as_named_fields_and_appends(tmp_path: Path) -> None:
    sink = tmp_path / "results.jsonl"
    sink.write_text('{"earlier": true}\n')
    out = _through(_stage(sink), [CHUNK, DONE, FAILED, DONE])
    assert len(out) == 4
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert lines[0] == {"earlier": True}
    assert len(lines) == 3
    record = lines[1]
    assert isinstance(record, dict)  # an object with field names, not a positional array
    ts = record.pop("ts")
    assert isinstance(ts, float) and ts > 1e9
    assert record == {
        "request_id": "r1",
        "session_id": "s1",
        "text": "hi",
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "cached_tokens": 2,
    }
    assert lines[2]["request_id"] == "r1"


def test_sink_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    created = tmp_path / "new.jsonl"
    old_file = tmp_path / "old.jsonl"
    old_file.write_text("")
    old_file.chmod(0o666)
    old = os.umask(0)
    try:
        _through(_stage(created), [DONE])
        _through(_stage(old_file), [DONE])
    finally:
        os.umask(old)
    assert stat.S_IMODE(created.stat().st_mode) == 0o600
    assert stat.S_IMODE(old_file.stat().st_mode) == 0o600


def test_sink_is_never_opened_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "precious"
    victim.write_text("mine")
    link = tmp_path / "results.jsonl"
    link.symlink_to(victim)
    with pytest.raises(MPipelineError, match="result sink"):
        asyncio.run(_stage(link).start())
    assert victim.read_text() == "mine"


class _Spy:
    """Records writes and fsyncs; ``gate`` holds fsync until set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
        self.gate = threading.Event()
        self.gate.set()
        real_write, real_fsync = os.write, os.fsync

        def write(fd: int, data: Any) -> int:
            events.append("write")
            return real_write(fd, data)

        def fsync(fd: int) -> None:
            self.gate.wait(10)
            real_fsync(fd)
            events.append("fsync")

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)


def test_a_result_is_handed_on_only_after_its_line_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    spy = _Spy(monkeypatch, events)
    spy.gate.clear()

    async def run() -> None:
        stage = _stage(tmp_path / "results.jsonl")
        await stage.start()
        # Two results in one loop turn: one write and one fsync for both (group commit).
        first = asyncio.ensure_future(_handle(stage, [CHUNK, DONE], events))
        second = asyncio.ensure_future(
            _handle(stage, [msgspec.structs.replace(DONE, request_id="r3")], events)
        )
        await asyncio.sleep(0.1)
        assert events == ["handed on TokenChunk", "write"]  # the results wait for the fsync
        spy.gate.set()
        await asyncio.gather(first, second)
        await stage.stop()

    asyncio.run(run())
    assert events == [
        "handed on TokenChunk",
        "write",
        "fsync",
        "handed on Completed",
        "handed on Completed",
    ]


def test_a_result_the_disk_refuses_fails_instead_of_being_handed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def run() -> list[Message]:
        stage = _stage(tmp_path / "results.jsonl")
        await stage.start()
        monkeypatch.setattr(os, "write", full)
        try:
            return await _handle(stage, [DONE])
        finally:
            monkeypatch.undo()
            await stage.stop()

    # The runner turns the exception into a Failed (stage_error) for this request only.
    with pytest.raises(MPipelineError, match="could not be written to the sink"):
        asyncio.run(run())


def test_a_cancelled_result_is_still_written_and_stop_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner cancels the task of a result whose client cancelled; the line it queued
    still goes out, and ``stop`` closes the file only after it."""
    events: list[str] = []
    spy = _Spy(monkeypatch, events)
    spy.gate.clear()
    sink = tmp_path / "results.jsonl"

    async def run() -> None:
        stage = _stage(sink)
        await stage.start()
        task = asyncio.ensure_future(_handle(stage, [DONE], events))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0)
        assert task.cancelled()
        stopping = asyncio.ensure_future(stage.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # its batch is still in fsync
        spy.gate.set()
        await stopping

    asyncio.run(run())
    assert events == ["write", "fsync"]
    assert json.loads(sink.read_text())["request_id"] == "r1"
