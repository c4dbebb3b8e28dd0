"""The anthropic worker translates OpenAI tools, tool turns, images and response_format
to the Messages API, and tool_use blocks back to OpenAI tool calls (issue 14, item 2).

Requests are built as the gateway builds them (``openai_request``, then the
assemble stage's conversation), so a test states an OpenAI request and the
exact Anthropic body the upstream must receive. Replies are recorded ones,
replayed as they are (``tests/data/anthropic``):

- ``tool_use_stream.sse``: the "Streaming request with tool use" response of
  https://platform.claude.com/docs/en/build-with-claude/streaming (docs source
  as mirrored in thevibeworks/claude-code-docs, commit 3f1ef7c2,
  ``content/en/build-with-claude/streaming.md``), event for event; the final
  blank line restored. Its request is the docs' request, which
  ``test_the_docs_tool_request_streams_back_as_openai_tool_call_deltas`` rebuilds
  from an OpenAI one.
- ``tool_use_sdk_stream.sse``: the official Python SDK's fixture
  (anthropics/anthropic-sdk-python@009b0353,
  ``tests/lib/streaming/fixtures/tool_use_response.txt``, MIT), final blank
  line added.
- ``tool_use_message.json``: the "Example API response with a tool_use
  content block" of https://platform.claude.com/docs/en/agents-and-tools/tool-use/handle-tool-calls
  (same mirror, ``content/en/agents-and-tools/tool-use/handle-tool-calls.md``).
- ``tool_use_json_stream.sse``: a recorded forced-tool JSON answer, from the
  Vercel AI SDK's fixtures (vercel/ai@ef0018fa,
  ``packages/anthropic/src/__fixtures__/anthropic-json-tool.1.chunks.txt``,
  Apache-2.0), one JSON event per line there, framed here as SSE
  (``event: <type>``) with nothing else changed.
"""

from __future__ import annotations

import json

import pytest

from mpipeline.gateway.openai_reply import ChunkRenderer, completion
from mpipeline.messages import Completed, StructuredChunk, Usage
from mpipeline.workers.base import Generation, Structured
from tests.fault_upstream import FaultUpstream, Status
from tests.transcript_server import Replay, Split, TranscriptServer
from tests.unit.workers._anthropic_tooling import (
    KEY_ENV,
    SSE,
    WEATHER,
    WEATHER_DOCS,
    WEATHER_QUESTION,
    anthropic_worker,
    last_body,
    openai_job,
    recording,
    run_worker,
    stream_pieces,
    text_of,
    tool_deltas,
    upstream,
)

__all__ = ["upstream"]  # the fixture


@pytest.mark.parametrize("reads", [False, True], ids=["tokens", "reads"])
def test_the_docs_tool_request_streams_back_as_openai_tool_call_deltas(
    upstream: FaultUpstream, reads: bool
) -> None:
    upstream.script(Status(200, body=recording("tool_use_stream.sse"), content_type=SSE))
    worker = anthropic_worker(upstream.url)
    job = openai_job(
        {"messages": [WEATHER_QUESTION], "tools": [WEATHER], "tool_choice": "required"}
    )
    gen = Generation()
    pieces = stream_pieces(worker, job, gen, reads)
    # The OpenAI request became exactly the docs' Anthropic request.
    assert last_body(upstream) == {
        "model": "claude-opus-5",
        "max_tokens": 1024,
        "messages": [WEATHER_QUESTION],
        "tools": [WEATHER_DOCS],
        "tool_choice": {"type": "any"},
        "stream": True,
    }
    assert text_of(pieces) == "Okay, let's check the weather for San Francisco, CA:"
    assert tool_deltas(pieces) == [
        {
            "index": 0,
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        *(
            {"index": 0, "function": {"arguments": fragment}}
            for fragment in ['{"location":', ' "San', " Francisc", "o,", ' CA"}']
        ),
    ]
    assert all(str(p) == "" for p in pieces if isinstance(p, Structured))
    assert gen.finish_reason == "tool_calls"
    assert (gen.prompt_tokens, gen.completion_tokens) == (472, 89)


def test_sdk_recording_text_then_call_and_the_route_renders_openai_chunks(
    upstream: FaultUpstream,
) -> None:
    upstream.script(Status(200, body=recording("tool_use_sdk_stream.sse"), content_type=SSE))
    worker = anthropic_worker(upstream.url)
    question = {"role": "user", "content": "What's the weather in Paris?"}
    gen = Generation()
    pieces = stream_pieces(
        worker, openai_job({"messages": [question], "tools": [WEATHER]}), gen, True
    )
    assert last_body(upstream)["tools"] == [WEATHER_DOCS]
    assert "tool_choice" not in last_body(upstream)
    # Text pieces and tool-call pieces are never joined into one (generate_reads).
    assert pieces[:2] == ["I", "'ll check the current weather in Paris for you."]
    calls = tool_deltas(pieces)
    assert calls[0]["id"] == "toolu_01NRLabsLyVHZPKxbKvkfSMn"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"location": "Paris"}

    # What the OpenAI route makes of them: OpenAI's own streamed tool call.
    renderer = ChunkRenderer("gpt-x", 1700000000, include_usage=False)
    events = b""
    for i, piece in enumerate(pieces):
        if isinstance(piece, Structured):
            events += renderer.render(
                StructuredChunk(
                    request_id="r1",
                    session_id=None,
                    reply_to=0,
                    index=i,
                    text=str(piece),
                    raw=piece.raw,
                )
            )
    events += renderer.render(
        Completed(
            request_id="r1",
            session_id=None,
            reply_to=0,
            text=text_of(pieces),
            usage=Usage(prompt_tokens=5, completion_tokens=7),
            finish_reason="tool_calls",
        )
    )
    chunks = [json.loads(line[6:]) for line in events.split(b"\n\n") if line[6:7] == b"{"]
    assert {c["id"] for c in chunks} == {"chatcmpl-r1"} and chunks[0]["model"] == "gpt-x"
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("split", ["bytes", 1, 2], ids=str)
def test_tool_call_deltas_are_the_same_however_the_stream_is_cut(
    monkeypatch: pytest.MonkeyPatch, split: Split
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-ant-test")
    whole = recording("tool_use_stream.sse")
    job = openai_job(
        {"messages": [WEATHER_QUESTION], "tools": [WEATHER], "tool_choice": "required"}
    )
    with TranscriptServer() as server:
        server.script(Replay(whole, split=split))
        gen = Generation()
        pieces = stream_pieces(anthropic_worker(server.url), job, gen, True)
    fragments = [c["function"]["arguments"] for c in tool_deltas(pieces)]
    assert "".join(fragments) == '{"location": "San Francisco, CA"}'
    assert text_of(pieces) == "Okay, let's check the weather for San Francisco, CA:"
    assert gen.finish_reason == "tool_calls"


def test_a_whole_tool_use_reply_is_an_openai_completion_with_tool_calls(
    upstream: FaultUpstream,
) -> None:
    upstream.script(Status(200, body=recording("tool_use_message.json")))
    worker = anthropic_worker(upstream.url)
    gen = Generation()
    job = openai_job({"messages": [WEATHER_QUESTION], "tools": [WEATHER]}, stream=False)
    text = run_worker(worker, lambda: worker.complete(job, gen))
    assert text == "I'll check the current weather in San Francisco for you."
    assert gen.finish_reason == "tool_calls" and gen.raw_bytes == len(gen.raw)
    call = {
        "id": "toolu_01A09q90qw90lq917835lq9",
        "type": "function",
        # The input as the JSON text Anthropic sent.
        "function": {
            "name": "get_weather",
            "arguments": '{ "location": "San Francisco, CA", "unit": "celsius" }',
        },
    }
    assert json.loads(gen.raw)["choices"][0]["message"] == {
        "role": "assistant",
        "content": text,
        "tool_calls": [call],
    }
    done = Completed(
        request_id="r1",
        session_id=None,
        reply_to=0,
        text=text,
        usage=Usage(prompt_tokens=5, completion_tokens=7),
        finish_reason=gen.finish_reason,
        raw=gen.raw,
    )
    reply = json.loads(completion(done, 1700000000, "gpt-x"))
    assert reply["id"] == "chatcmpl-r1" and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["tool_calls"] == [call]
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    assert reply["usage"]["total_tokens"] == 12


def test_json_object_is_a_forced_tool_whose_streamed_input_is_the_text(
    upstream: FaultUpstream,
) -> None:
    upstream.script(Status(200, body=recording("tool_use_json_stream.sse"), content_type=SSE))
    worker = anthropic_worker(upstream.url)
    gen = Generation()
    job = openai_job({"messages": [WEATHER_QUESTION], "response_format": {"type": "json_object"}})
    pieces = stream_pieces(worker, job, gen, False)
    sent = last_body(upstream)
    assert sent["tools"] == [
        {
            "name": "json",
            "description": "Answer with a JSON object.",
            "input_schema": {"type": "object", "additionalProperties": True},
        }
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": "json"}
    # Plain text pieces, no tool call: the client asked for a JSON message.
    assert all(type(p) is str for p in pieces)
    assert json.loads("".join(pieces)) == {
        "elements": [{"location": "San Francisco", "temperature": 58, "condition": "sunny"}]
    }
    assert gen.finish_reason == "stop"


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}


def test_json_schema_is_a_forced_strict_tool_and_a_whole_reply_is_its_input(
    upstream: FaultUpstream,
) -> None:
    reply = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-5",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 20, "output_tokens": 9},
    }
    upstream.script(Status(200, body=json.dumps(reply).encode()))
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True},
    }
    worker = anthropic_worker(upstream.url)
    gen = Generation()
    job = openai_job({"messages": [WEATHER_QUESTION], "response_format": fmt}, stream=False)
    text = run_worker(worker, lambda: worker.complete(job, gen))
    sent = last_body(upstream)
    assert sent["tools"] == [
        {
            "name": "weather",
            "description": "Answer with JSON that matches this schema.",
            "input_schema": SCHEMA,
            "strict": True,
        }
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": "weather"}
    assert json.loads(text) == {"city": "Paris"}
    assert (gen.finish_reason, gen.raw) == ("stop", b"")
