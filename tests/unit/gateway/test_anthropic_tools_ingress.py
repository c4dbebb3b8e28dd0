"""Tools, tool turns and images on ``/v1/messages``, both ways: Anthropic's request in the
OpenAI shape every worker reads (as the OpenAI route carries it), refused or dropped by
what the worker honours; OpenAI's tool calls back as Anthropic's ``tool_use`` blocks,
whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mpipeline.gateway.anthropic_reply import EventRenderer, message
from mpipeline.gateway.anthropic_request import Messages, read
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai_fields import Backend
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Completed, StructuredChunk, TokenChunk, Turn, Usage

ECHO = Backend.for_worker("echo")
OPENAI = Backend.for_worker("openai")
ANTHROPIC = Backend.for_worker("anthropic")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": SCHEMA}
FUNCTION = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": SCHEMA,
    },
}
QUESTION = {"role": "user", "content": "Weather in Paris?"}
IMAGE = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
CALL = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}


def _read(backend: Backend = OPENAI, **body: Any) -> Messages | Problem:
    full = {"model": "m", "max_tokens": 16, "messages": [QUESTION]}
    return read(json.dumps(full | body).encode(), Models.single("claude", backend))


def _ok(backend: Backend = OPENAI, **body: Any) -> Messages:
    got = _read(backend, **body)
    assert isinstance(got, Messages), got
    return got


def _raw(turn: Turn) -> Any:
    return json.loads(turn.raw) if turn.raw else None


@pytest.mark.parametrize(
    ("choice", "openai"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        (
            {"type": "tool", "name": "get_weather"},
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
        (None, {}),
    ],
)
def test_tools_and_tool_choice_become_openais(
    choice: dict[str, Any] | None, openai: dict[str, Any]
) -> None:
    body: dict[str, Any] = {"tools": [WEATHER]}
    if choice is not None:
        body["tool_choice"] = choice
    got = _ok(ANTHROPIC, **body)
    assert json.loads(got.params) == {"tools": [FUNCTION], **openai}


def test_a_tool_round_trip_becomes_openais_messages() -> None:
    got = _ok(
        messages=[
            QUESTION,
            {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, CALL]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                    },
                ],
            },
        ],
        tools=[WEATHER],
    )
    [question, asked, first] = got.history
    assert question == Turn(role="user", content="Weather in Paris?")
    assert asked.role == "assistant" and asked.content == "Let me look."
    arguments = '{"city":"Paris"}'
    assert _raw(asked) == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": arguments},
            }
        ],
    }
    assert first.role == "user" and first.content == "sunny"
    assert _raw(first) == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    # The last tool message is the input; is_error is said in its text.
    assert got.text == "Error: no such city"
    assert json.loads(got.input_raw) == {
        "role": "tool",
        "tool_call_id": "toolu_2",
        "content": "Error: no such city",
    }


def test_tool_results_come_before_the_users_words_and_images_become_parts() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iV"}}
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    got = _ok(
        messages=[
            QUESTION,
            {"role": "assistant", "content": [CALL]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "text", "text": "And these?"},
                    image,
                    url,
                ],
            },
        ]
    )
    assert _raw(got.history[1])["content"] is None  # an assistant with calls only
    assert _raw(got.history[2])["role"] == "tool"
    assert got.text == "And these?"
    assert json.loads(got.input_raw) == {
        "role": "user",
        "content": [
            {"type": "text", "text": "And these?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iV"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ],
    }
    # Text blocks alone stay a plain turn, as before.
    plain = _ok(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert (plain.text, plain.input_raw, plain.params) == ("hi", b"", b"")


def test_a_worker_without_tools_refuses_them_naming_the_field_or_drops_them() -> None:
    tools = _read(ECHO, tools=[WEATHER], tool_choice={"type": "any"})
    assert isinstance(tools, Problem) and tools.field == "tools"
    assert "worker echo" in tools.message and tools.code == "unsupported_parameter"
    turn = [QUESTION, {"role": "assistant", "content": [CALL]}]
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
    messages = [*turn, {"role": "user", "content": [result]}]
    refused = _read(ECHO, messages=messages)
    assert isinstance(refused, Problem) and refused.field == "messages[1].content[0]"
    dropped = _ok(Backend.for_worker("echo", drop=True), messages=messages, tools=[WEATHER])
    assert dropped.params == b"" and dropped.input_raw == b""
    assert dropped.text == "sunny"  # a tool result dropped keeps its text, as the user's
    assert dropped.history == [
        Turn(role="user", content="Weather in Paris?"),
        Turn(role="assistant", content=""),
    ]
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    llama = _read(Backend.for_worker("llama_cpp"), messages=[{"role": "user", "content": [image]}])
    assert isinstance(llama, Problem) and llama.field == "messages[0].content[0]"


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"tool_choice": {"type": "any"}}, "tool_choice", "no tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "x"}},
            "tool_choice.name",
            "x",
        ),
        (
            {"messages": [{"role": "user", "content": [CALL]}]},
            "messages[0].content[0].type",
            "tool_use blocks cannot be in the user's messages",
        ),
        (
            {"messages": [QUESTION, {"role": "assistant", "content": [IMAGE]}, QUESTION]},
            "messages[1].content[0].type",
            "image blocks cannot be in the assistant's messages",
        ),
        (
            {"messages": [{"role": "user", "content": [dict(RESULT, content=[IMAGE])]}]},
            "messages[0].content[0].content[0]",
            "text only",
        ),
        ({"tools": [{"name": "x"}]}, "tools[0].input_schema", "missing"),
        ({"tools": [{"type": "web_search_20250305", "name": "s"}]}, "tools[0].type", ""),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type", ""),
    ],
)
def test_bad_tool_bodies_are_refused_naming_the_field(
    body: dict[str, Any], field: str, words: str
) -> None:
    got = _read(OPENAI, **body)
    assert isinstance(got, Problem), got
    assert got.field == field and words in got.message, got


# The reply.


def _done(raw: bytes = b"", finish: str = "tool_calls", text: str = "") -> Completed:
    usage = Usage(prompt_tokens=9, completion_tokens=2)
    return Completed(
        request_id="r1",
        session_id=None,
        reply_to=0,
        text=text,
        usage=usage,
        finish_reason=finish,
        raw=raw,
    )


def _completion(content: str | None, *calls: tuple[str, str, str]) -> bytes:
    tool_calls = [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls
    ]
    msg = {"role": "assistant", "content": content, "tool_calls": tool_calls}
    return json.dumps(
        {"choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls"}]}
    ).encode()


def test_tool_calls_come_back_as_tool_use_blocks_after_the_text() -> None:
    raw = _completion(
        "Let me look.", ("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "t", "")
    )
    body = json.loads(message(_done(raw, text="Let me look."), "claude"))
    assert body["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "t", "input": {}},
    ]
    assert body["stop_reason"] == "tool_use"
    only = json.loads(message(_done(_completion(None, ("c", "t", "{}")), "stop"), "m"))
    assert [b["type"] for b in only["content"]] == ["tool_use"]
    assert only["stop_reason"] == "tool_use"  # a server that says stop with calls
    plain = json.loads(message(_done(finish="stop", text="hi"), "m"))
    assert plain["content"] == [{"type": "text", "text": "hi"}]
    assert plain["stop_reason"] == "end_turn"


def _events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in data.decode().split("\n\n"):
        if block:
            name, payload = block.split("\n")
            out.append((name.removeprefix("event: "), json.loads(payload.removeprefix("data: "))))
    return out


def _delta(*calls: dict[str, Any], content: str | None = None) -> StructuredChunk:
    delta: dict[str, Any] = {"tool_calls": list(calls)}
    if content is not None:
        delta["content"] = content
    raw = json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    return StructuredChunk(
        request_id="r1", session_id=None, reply_to=0, index=0, text=content or "", raw=raw.encode()
    )


def _start(index: int, call_id: str, name: str) -> dict[str, Any]:
    fn = {"name": name, "arguments": ""}
    return {"index": index, "id": call_id, "type": "function", "function": fn}


def _part(index: int, arguments: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": arguments}}


def _stream(*events: TokenChunk | Completed) -> list[tuple[str, dict[str, Any]]]:
    renderer = EventRenderer("m")
    return _events(renderer.opening() + b"".join(renderer.render(e) for e in events))


def test_streamed_tool_calls_are_tool_use_blocks_with_input_json_deltas() -> None:
    text = TokenChunk(request_id="r1", session_id=None, reply_to=0, index=0, text="Looking.")
    events = _stream(
        text,
        _delta(_start(0, "call_a", "get_weather")),
        _delta(_part(0, '{"city": ')),
        _delta(_part(0, '"Paris"}')),
        _delta(_start(1, "call_b", "get_weather"), _part(1, '{"city": "Rome"}')),
        _done(),
    )
    assert [(n, b.get("index")) for n, b in events] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("ping", None),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[5][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_a",
        "name": "get_weather",
        "input": {},
    }
    assert [b["delta"] for n, b in events[6:8]] == [
        {"type": "input_json_delta", "partial_json": '{"city": '},
        {"type": "input_json_delta", "partial_json": '"Paris"}'},
    ]
    assert events[9][1]["content_block"]["id"] == "call_b"
    assert events[12][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


def test_interleaved_calls_are_held_back_and_sent_whole_in_order() -> None:
    events = _stream(
        _delta(_start(0, "call_a", "f")),
        _delta(_part(0, '{"a": ')),
        _delta(_start(1, "call_b", "g")),  # call 0 is not done: call 1 waits
        _delta(_part(0, "1}")),
        _delta(_part(1, '{"b": 2}')),
        _delta(content="late words"),
        _done(),
    )
    blocks: dict[int, dict[str, Any]] = {}
    open_block = None
    for name, body in events:
        if name == "content_block_start":
            assert open_block is None  # one block open at a time
            assert body["index"] == len(blocks)  # indexes count up
            open_block = body["index"]
            blocks[open_block] = dict(body["content_block"], partial="")
        elif name == "content_block_delta":
            assert body["index"] == open_block  # only the open block gets deltas
            delta = body["delta"]
            blocks[open_block]["partial"] += delta.get("partial_json", delta.get("text", ""))
        elif name == "content_block_stop":
            assert body["index"] == open_block
            open_block = None
    assert [(b["type"], b.get("id"), b["partial"]) for b in blocks.values()] == [
        ("tool_use", "call_a", '{"a": 1}'),
        ("tool_use", "call_b", '{"b": 2}'),
        ("text", None, "late words"),
    ]
    starts = [n for n, _ in events].count("content_block_start")
    assert starts == [n for n, _ in events].count("content_block_stop") == 3


def test_an_empty_stream_still_has_its_text_block() -> None:
    events = _stream(_done(finish="stop"))
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
