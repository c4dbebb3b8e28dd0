"""What the anthropic tool-translation tests share: the recorded replies, the
fake upstream, and an OpenAI request built as the gateway and the assemble
stage build it (sources of the recordings: ``test_anthropic_tools.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from mpipeline.config import AnthropicConfig, TimeoutsConfig
from mpipeline.gateway import openai_request
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Assembled, PromptRequest
from mpipeline.stages.assemble import conversation
from mpipeline.workers.anthropic import AnthropicUpstream
from mpipeline.workers.base import Generation, Structured
from tests.fault_upstream import FaultUpstream
from tests.transcript_server import TranscriptServer

DATA = Path(__file__).resolve().parents[2] / "data" / "anthropic"
KEY_ENV = "MPL_TEST_ANTHROPIC_KEY"
TIMEOUTS = TimeoutsConfig(connect_s=10, first_token_s=30, between_tokens_s=30, total_s=60)
SSE = "text/event-stream"
WEATHER_DOCS = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {
            "location": {
                "type": "string",
                "description": "The city and state, e.g. San Francisco, CA",
            }
        },
        "required": ["location"],
    },
}
# The same tool as an OpenAI client declares it.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": WEATHER_DOCS["description"],
        "parameters": WEATHER_DOCS["input_schema"],
    },
}

T = TypeVar("T")


def recording(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultUpstream]:
    monkeypatch.setenv(KEY_ENV, "sk-ant-test")
    with FaultUpstream() as up:
        yield up


def anthropic_worker(url: str) -> AnthropicUpstream:
    config = AnthropicConfig(
        base_url=url, model="claude-opus-5", api_key_env=KEY_ENV, timeouts=TIMEOUTS
    )
    return AnthropicUpstream(config)


def openai_job(body: dict[str, Any], *, stream: bool = True) -> Assembled:
    """An OpenAI chat request as the gateway and the assemble stage hand it on."""
    parsed = openai_request.parse(msgspec.json.encode({"model": "gpt-x", **body}))
    assert not isinstance(parsed, Problem)
    chat = openai_request.chat(parsed)
    assert not isinstance(chat, Problem)
    request = PromptRequest(
        request_id="r1",
        input=chat.text,
        history=chat.history,
        input_raw=chat.input_raw,
        params=chat.params,
        stream=stream,
        max_tokens=chat.max_tokens,
    )
    turns = conversation("", request, [])
    return Assembled(request=request, prompt="", dedup_key="k", messages=turns)


def run_worker(worker: AnthropicUpstream, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        await worker.start()
        try:
            return await body()
        finally:
            await worker.stop()

    return asyncio.run(asyncio.wait_for(main(), 30))


def stream_pieces(
    worker: AnthropicUpstream, job: Assembled, gen: Generation, reads: bool
) -> list[str]:
    async def go() -> list[str]:
        pieces = worker.generate_reads(job, gen) if reads else worker.generate(job, gen)
        return [piece async for piece in pieces]

    return run_worker(worker, go)


def last_body(up: FaultUpstream | TranscriptServer) -> dict[str, Any]:
    [call] = up.calls
    assert call.path == "/v1/messages"
    body: dict[str, Any] = call.body
    return body


def tool_deltas(pieces: list[str]) -> list[dict[str, Any]]:
    """The OpenAI tool-call deltas of the structured pieces, in order."""
    out = []
    for piece in pieces:
        if isinstance(piece, Structured):
            chunk = json.loads(piece.raw)
            assert chunk["object"] == "chat.completion.chunk"
            [choice] = chunk["choices"]
            assert (choice["index"], choice["finish_reason"]) == (0, None)
            [call] = choice["delta"]["tool_calls"]
            out.append(call)
    return out


def text_of(pieces: list[str]) -> str:
    return "".join(p for p in pieces if not isinstance(p, Structured))


WEATHER_QUESTION = {"role": "user", "content": "What is the weather like in San Francisco?"}
