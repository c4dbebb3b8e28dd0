"""What the MCP tests over stdio and over streamable HTTP check alike, through the SDK's session.

The tools are one definition served by two transports, so the checks of a
tool's result are one too; each transport's test adds what is its own.
"""

from __future__ import annotations

import json
from typing import Any

from mcp import ClientSession, types

CALL_TIMEOUT_S = 60.0


async def call(s: ClientSession, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
    return await s.call_tool(name, arguments, read_timeout_seconds=CALL_TIMEOUT_S)


def ok(result: types.CallToolResult) -> Any:
    """A successful result's structured content, which its text must say too."""
    text = result.content[0].text if isinstance(result.content[0], types.TextContent) else ""
    assert not result.is_error, text
    assert result.structured_content is not None
    assert json.loads(text) == result.structured_content
    return result.structured_content


def error(result: types.CallToolResult) -> str:
    """An error result's one text, which never carries a traceback."""
    assert result.is_error
    (content,) = result.content
    assert isinstance(content, types.TextContent)
    assert "Traceback" not in content.text
    return content.text


async def check_infer(s: ClientSession) -> dict[str, Any]:
    """``infer`` answers whole, then streams with one progress notification per chunk,
    counting up, the chunks' text in order; the first answer is returned."""
    done: dict[str, Any] = ok(await call(s, "infer", {"prompt": "hello there", "session_id": "a"}))
    assert done["text"] == "hello there" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 2 and done["session_id"] == "a"

    seen: list[tuple[float, float | None, str | None]] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    words = "one two three four five"
    result = await s.call_tool(
        "infer",
        {"prompt": words, "max_tokens": 10},
        read_timeout_seconds=CALL_TIMEOUT_S,
        progress_callback=progress,
    )
    assert ok(result)["text"] == words
    assert [v for v, _, _ in seen] == [float(i) for i in range(1, len(seen) + 1)]
    assert len(seen) >= 2 and {t for _, t, _ in seen} == {10.0}
    assert "".join(m or "" for _, _, m in seen) == words
    return done
