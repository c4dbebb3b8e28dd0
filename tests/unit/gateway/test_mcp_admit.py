"""The MCP tools under the gateway's rate limits (``/mcp``): a refused prompt never
reaches the pipeline, and says why, as a tool error or a batch entry."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from mpipeline.gateway.mcp_tools import tools
from mpipeline.pipeline import Pipeline

# Touching it at all is the failure: a refused prompt must not be submitted.
NO_PIPELINE = cast(Pipeline, object())


async def _no_progress(progress: float, total: float | None, message: str | None) -> None:
    raise AssertionError("a refused prompt reported progress")


def test_a_refused_infer_is_a_rate_limited_tool_error_naming_the_wait() -> None:
    asked: list[str | None] = []

    def admit(session: str | None) -> str | None:
        asked.append(session)
        return "this session's rate limit is exhausted; retry in 3 s"

    call = tools.infer(NO_PIPELINE, {"prompt": "hi", "session_id": "s1"}, _no_progress, admit)
    with pytest.raises(tools.ToolFailedError, match=r"^rate_limited: .*retry in 3 s"):
        asyncio.run(call)
    assert asked == ["s1"]


def test_a_refused_batch_prompt_is_its_entry_and_the_others_are_not_touched() -> None:
    def admit(session: str | None) -> str | None:
        return "the gateway's rate limit is exhausted; retry in 1 s"

    async def counted(progress: float, total: float | None, message: str | None) -> None:
        return None

    arguments = {"prompts": ["a", "b"], "session_id": "s2"}
    out = asyncio.run(tools.batch_infer(NO_PIPELINE, arguments, counted, admit))
    assert (out["completed"], out["failed"]) == (0, 2)
    assert [r["error"]["type"] for r in out["results"]] == ["rate_limited", "rate_limited"]
    assert "retry in 1 s" in out["results"][0]["error"]["message"]
