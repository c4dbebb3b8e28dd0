"""The realistic workload's streamed load and the baseline's ``stream_events``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mpipeline.bench import workload
from mpipeline.bench.baseline import AsyncioPipeline
from mpipeline.bench.layout import config_for_cores
from mpipeline.config import PipelineConfig
from mpipeline.errors import RequestFailed
from mpipeline.messages import Assembled, Completed, TokenChunk
from mpipeline.workers.base import Generation
from mpipeline.workers.echo import EchoWorker


def test_the_baseline_streams_chunks_that_make_the_final_text() -> None:
    async def go() -> tuple[list[TokenChunk | Completed], Completed]:
        async with AsyncioPipeline(config_for_cores([0])) as b:
            events = [e async for e in b.stream_events("one two three four five", max_tokens=4)]
            whole = await b.submit_nowait("one two three four five", max_tokens=4)
            return events, whole

    events, whole = asyncio.run(go())
    *rest, done = events
    chunks = [c for c in rest if isinstance(c, TokenChunk)]
    assert isinstance(done, Completed) and len(chunks) == len(rest)
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    # Post's ``strip`` trims the final text, not the chunks already streamed.
    assert "".join(c.text for c in chunks) == "one two three four "
    assert done.text == whole.text == "one two three four"
    assert done.finish_reason == "length"


def test_a_failed_stream_raises_and_leaves_no_state(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    async def flaky(self: EchoWorker, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        nonlocal calls
        calls += 1
        yield "first "
        if calls == 1:
            raise RuntimeError("the model fell over")

    monkeypatch.setattr(EchoWorker, "generate", flaky)

    async def go() -> None:
        async with AsyncioPipeline(config_for_cores([0])) as b:
            with pytest.raises(RequestFailed) as err:
                async for event in b.stream_events("one two", max_tokens=4):
                    assert isinstance(event, TokenChunk)
            assert err.value.code == "stage_error" and err.value.stage == "inference"
            # As in the pipeline, the Failed goes straight to the client and may pass
            # the chunk still in post's queue: that chunk is dropped when it arrives,
            # and the next stream (behind it in every queue) finds nothing left over.
            events = [e async for e in b.stream_events("one two", max_tokens=4)]
            assert [type(e) for e in events] == [TokenChunk, Completed]
            assert not b._streams and not b._inflight

    asyncio.run(go())


def test_the_realistic_load_streams_redacts_and_checks_on_the_baseline(tmp_path: Path) -> None:
    work = workload.realistic(tmp_path, quick=True)
    work.check_requests = 8
    cfg = config_for_cores([0, 1], work.config, heavy=work.heavy)
    # rag and assemble get a replica per core; the others one.
    assert cfg.stages.rag.replicas == cfg.stages.assemble.replicas == 2
    assert cfg.stages.post.replicas == cfg.stages.inference.replicas == 1

    async def go() -> Completed:
        async with AsyncioPipeline(cfg) as b:
            target = work.target(b)
            result = await target.submit_nowait(next(work.prompts()), max_tokens=16)
            await work.check(b, "baseline")
            return result

    result = asyncio.run(go())
    assert "[email]" in result.text and result.citations
    check = work.checks["baseline"]
    assert check.replies == 8 and check.failed == 0 and check.leaked == 0 and check.torn == 0
    assert check.redactions == 8 * len(workload.PLACEHOLDERS)
    assert check.chunks >= 4 * check.replies
    assert work.problems() == []
    # A run whose replies were not streamed, or leaked, is reported as not doing its work.
    work.checks["broken"] = workload.Check(
        replies=2, failed=0, chunks=2, redactions=8, leaked=1, torn=1, cited=2
    )
    problems = " ".join(work.problems())
    assert "leaked" in problems and "differ from their final text" in problems
    assert "not streamed" in problems


def test_default_config_is_echo_with_one_heavy_stage() -> None:
    cfg = config_for_cores([0, 1], PipelineConfig())
    assert cfg.stages.inference.replicas == 2 and cfg.stages.assemble.replicas == 1
