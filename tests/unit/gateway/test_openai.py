"""The OpenAI route's request and reply: messages to the pipeline's turns, every other
field kept raw, what each worker refuses or drops, deadlines from headers, structured
replies passed on, and OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import msgspec
import pytest

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import deadlines
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.exchange import Request
from mpipeline.gateway.openai import (
    Backend,
    ChatCompletions,
    ChatMessage,
    ContentPart,
    error_reply,
    failure_reply,
)
from mpipeline.gateway.openai_reply import ChunkRenderer, completion
from mpipeline.gateway.openai_request import Chat, split_messages
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Completed, Failed, StructuredChunk, TokenChunk, Turn, Usage
from mpipeline.pipeline import Pipeline, RequestOptions

USER = {"role": "user", "content": "hello"}
USAGE = Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=2)


def _route(worker: str = "openai", *, drop: bool = False) -> ChatCompletions:
    backend = Backend.for_worker(worker, drop=drop)
    return ChatCompletions(None, "m", 1.0, admission=Admission(None), backend=backend)  # type: ignore[arg-type]


def _read(body: dict[str, Any], worker: str = "openai", *, drop: bool = False) -> Chat | Problem:
    return _route(worker, drop=drop).read(msgspec.json.encode(body))


def _chat(body: dict[str, Any], worker: str = "openai", *, drop: bool = False) -> Chat:
    chat = _read(body, worker, drop=drop)
    assert isinstance(chat, Chat), chat
    return chat


def _params(chat: Chat) -> dict[str, Any]:
    return json.loads(chat.params) if chat.params else {}


# Messages


def test_the_last_message_is_the_input_and_the_rest_its_history() -> None:
    messages = [
        ChatMessage(role="developer", content="Be brief."),
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content=None),
        ChatMessage(
            role="user",
            content=[ContentPart(type="text", text="hi "), ContentPart(type="text", text="there")],
        ),
    ]
    split = split_messages(messages)
    assert not isinstance(split, Problem)
    history, last = split
    assert last == Turn(role="user", content="hi there")
    assert history == [
        Turn(role="system", content="Be brief."),
        Turn(role="user", content="hi"),
        Turn(role="assistant", content=""),
    ]


def test_parts_without_their_value_empty_conversations_and_a_trailing_reply_are_refused() -> None:
    textless = split_messages([ChatMessage(role="user", content=[ContentPart(type="text")])])
    assert isinstance(textless, Problem) and textless.field == "messages[0].content[0]"
    image = split_messages([ChatMessage(role="user", content=[ContentPart(type="image_url")])])
    assert isinstance(image, Problem) and image.field == "messages[0].content[0]"
    empty = split_messages([ChatMessage(role="user", content="  ")])
    assert isinstance(empty, Problem) and empty.field == "messages"
    reply = split_messages(
        [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="x")]
    )
    assert isinstance(reply, Problem) and reply.field == "messages[1].role"


def test_a_plain_request_carries_nothing_raw() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "s"}, USER]}
    chat = _chat({**body, "max_tokens": 12, "stream": True})
    assert (chat.text, chat.params, chat.input_raw, chat.max_tokens) == ("hello", b"", b"", 12)
    assert chat.stream and [t.raw for t in chat.history] == [b""]


def test_every_other_field_is_kept_as_it_came_unknown_ones_too() -> None:
    extras = {
        "temperature": 0.25,
        "seed": 7,
        "stop": ["END"],
        "logit_bias": {"50256": -100},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        "max_completion_tokens": 9,
        "user": "u1",
        "reasoning_effort": "low",
        "x_vendor": {"deep": [1, {"a": None}]},
    }
    chat = _chat({"model": "m", "messages": [USER], **extras})
    assert _params(chat) == extras
    assert chat.max_tokens == 9 and chat.user == "u1"


def test_structured_messages_keep_their_own_json_and_plain_ones_do_not() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "developer", "content": "d"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "user", "content": "plain"},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    chat = _chat({"model": "m", "messages": messages, "top_p": 0.5})
    raws = [t.raw for t in chat.history]
    assert [json.loads(r) if r else None for r in raws] == [*messages[:3], None]
    assert json.loads(chat.input_raw) == messages[4]
    assert chat.text == "sunny" and [t.role for t in chat.history] == [
        "system",
        "user",
        "assistant",
        "user",
    ]


# What each worker honours


@pytest.mark.parametrize(
    ("worker", "extra", "param"),
    [
        ("echo", {"temperature": 0.5}, "temperature"),
        ("echo", {"seed": 1}, "seed"),
        ("echo", {"unknown_field": 1}, "unknown_field"),
        ("llama_cpp", {"tools": [{"type": "function"}]}, "tools"),
        ("llama_cpp", {"tool_choice": "required"}, "tool_choice"),
        ("llama_cpp", {"logprobs": True}, "logprobs"),
        ("anthropic", {"seed": 3}, "seed"),
        ("anthropic", {"logit_bias": {"1": 2}}, "logit_bias"),
    ],
)
def test_a_field_the_worker_cannot_honour_is_refused_naming_it(
    worker: str, extra: dict[str, Any], param: str
) -> None:
    problem = _read({"model": "m", "messages": [USER], **extra}, worker)
    assert isinstance(problem, Problem)
    assert (problem.status, problem.field, problem.code) == (400, param, "unsupported_parameter")
    assert worker in problem.message and "drop_params" in problem.message
    reply = json.loads(error_reply(400, problem.message, param=param, code=problem.code).body)
    assert reply["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("worker", "extra"),
    [
        ("echo", {"stop": "x", "user": "u", "metadata": {"k": "v"}, "n": 1}),
        ("echo", {"stream_options": {"include_usage": True}, "max_completion_tokens": 3}),
        ("echo", {"logprobs": False, "tool_choice": "auto", "tools": [], "temperature": None}),
        ("echo", {"response_format": {"type": "text"}, "parallel_tool_calls": True}),
        ("llama_cpp", {"temperature": 0.3, "top_p": 0.9, "seed": 5, "stop": ["a"]}),
        ("llama_cpp", {"presence_penalty": 0.1, "frequency_penalty": -0.1}),
        ("anthropic", {"temperature": 0.3, "top_p": 0.9, "stop": ["a"]}),
        # Translated by the worker (issue 14, item 2).
        ("llama_cpp", {"response_format": {"type": "json_object"}}),
        ("anthropic", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
        ("anthropic", {"tool_choice": "required", "parallel_tool_calls": False}),
        ("anthropic", {"response_format": {"type": "json_object"}}),
    ],
)
def test_what_the_worker_honours_or_what_asks_nothing_passes(
    worker: str, extra: dict[str, Any]
) -> None:
    chat = _chat({"model": "m", "messages": [USER], **extra}, worker)
    assert _params(chat) == extra


def test_drop_params_drops_what_would_be_refused_and_keeps_the_rest() -> None:
    body = {"model": "m", "messages": [USER], "temperature": 0.5, "stop": "x", "foo": 1}
    chat = _chat(body, "echo", drop=True)
    assert _params(chat) == {"stop": "x"}


def test_structured_messages_are_refused_by_text_workers_or_dropped_to_their_text() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tool_turns = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    image = [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "u"}}]
    cases = [
        (tool_turns, "messages[1].tool_calls"),
        ([USER, {"role": "user", "content": image}], "messages[1].content[1]"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name"),
        ([{"role": "tool", "tool_call_id": "c", "content": "r"}], "messages[0].role"),
    ]
    for messages, param in cases:
        for worker in ("echo", "llama_cpp"):
            problem = _read({"model": "m", "messages": messages}, worker)
            assert isinstance(problem, Problem) and problem.field == param, (worker, problem)
        # The anthropic worker translates them (tool_use/tool_result/image blocks).
        assert not isinstance(_read({"model": "m", "messages": messages}, "anthropic"), Problem)
    dropped = _chat({"model": "m", "messages": tool_turns}, "echo", drop=True)
    assert dropped.text == "sunny" and dropped.input_raw == b""
    assert [(t.role, t.content, t.raw) for t in dropped.history] == [
        ("user", "hello", b""),
        ("assistant", "", b""),
    ]
    pictured = _chat(
        {"model": "m", "messages": [{"role": "user", "content": image}]}, "echo", drop=True
    )
    assert (pictured.text, pictured.input_raw) == ("what?", b"")


def test_a_round_tripped_sdk_message_with_null_fields_is_plain_enough_for_any_worker() -> None:
    echoed = {"role": "assistant", "content": "hi", "refusal": None, "tool_calls": None}
    chat = _chat({"model": "m", "messages": [USER, echoed, USER]}, "echo")
    assert chat.history[1].content == "hi"


def test_a_pool_honours_what_every_member_does() -> None:
    from mpipeline.config import InferenceConfig, PoolConfig, PoolUpstreamConfig

    members = [
        PoolUpstreamConfig(name="a", kind="openai"),
        PoolUpstreamConfig(name="b", kind="anthropic"),
    ]
    mixed = Backend.of(InferenceConfig(worker="pool", pool=PoolConfig(upstreams=members)))
    assert mixed.caps.honours("temperature") and not mixed.caps.honours("seed")
    assert mixed.caps.messages  # both send structured messages, each in its API's shape
    with_local = mixed.caps & Backend.for_worker("llama_cpp").caps
    assert not with_local.messages and not with_local.honours("tools")
    only_openai = Backend.of(InferenceConfig(worker="pool", pool=PoolConfig(upstreams=members[:1])))
    assert only_openai.caps.fields is None and only_openai.caps.messages


# Deadlines from headers


def _request(**headers: str) -> Request:
    return Request(
        "POST", "/v1/chat/completions", "", {k.replace("_", "-"): v for k, v in headers.items()}
    )


@pytest.mark.parametrize(
    ("headers", "stream", "expected"),
    [
        ({}, False, None),
        ({"x_request_timeout": "2.5"}, False, 2500.0),
        ({"x_request_timeout": "90"}, True, 90_000.0),
        ({"x_stainless_read_timeout": "600.0"}, False, 600_000.0),
        ({"x_stainless_timeout": "30"}, False, 30_000.0),
        # A stream's SDK timeout bounds each read, not the whole stream.
        ({"x_stainless_read_timeout": "600.0"}, True, None),
        # The SDK's is clamped; ours wins over it.
        ({"x_stainless_read_timeout": "86400"}, False, 3_600_000.0),
        ({"x_stainless_read_timeout": "junk"}, False, None),
        ({"x_request_timeout": "5", "x_stainless_read_timeout": "600"}, False, 5000.0),
    ],
)
def test_a_request_names_its_deadline_in_a_header(
    headers: dict[str, str], stream: bool, expected: float | None
) -> None:
    assert deadlines.requested_ms(_request(**headers), stream=stream) == expected


@pytest.mark.parametrize("value", ["0", "-1", "3601", "nan", "inf", "soon", "1" * 40])
def test_an_x_request_timeout_out_of_range_is_refused(value: str) -> None:
    problem = deadlines.requested_ms(_request(x_request_timeout=value), stream=False)
    assert isinstance(problem, Problem) and problem.field == "X-Request-Timeout"


class _Pipeline:
    """What the route needs of a pipeline: records the options, answers at once."""

    def __init__(self) -> None:
        self.options: list[RequestOptions] = []

    async def submit(self, text: str, options: RequestOptions) -> Completed:
        self.options.append(options)
        return Completed(request_id="r1", session_id=None, reply_to=0, text=text, usage=USAGE)


class _Response:
    def __init__(self) -> None:
        self.status = 0
        self.body = b""

    def send(self, status: int, body: bytes, *args: object) -> None:
        self.status, self.body = status, body

    def send_reply(self, reply: Any) -> None:
        self.status, self.body = reply.status, reply.body


def test_the_route_sends_the_header_deadline_and_raw_parts_into_the_pipeline() -> None:
    pipeline = _Pipeline()
    backend = Backend.for_worker("openai")
    stub = cast(Pipeline, pipeline)
    route = ChatCompletions(stub, "m", 1.0, admission=Admission(None), backend=backend)
    body = {"model": "gpt", "messages": [USER], "seed": 3}
    request = Request(
        "POST", "/v1/chat/completions", "", {"x-request-timeout": "42"}, msgspec.json.encode(body)
    )
    response = _Response()
    asyncio.run(route.create(request, response))  # type: ignore[arg-type]
    assert response.status == 200, response.body
    (options,) = pipeline.options
    assert options.deadline_ms == 42_000 and json.loads(options.params or b"") == {"seed": 3}
    assert json.loads(response.body)["model"] == "gpt"
    bad = Request("POST", "/v1/chat/completions", "", {"x-request-timeout": "x"}, request.body)
    asyncio.run(route.create(bad, response))  # type: ignore[arg-type]
    assert response.status == 400
    assert json.loads(response.body)["error"]["param"] == "X-Request-Timeout"


# Replies


def _done(text: str = "hi", raw: bytes = b"", finish: str = "stop") -> Completed:
    return Completed(
        request_id="r1",
        session_id=None,
        reply_to=0,
        text=text,
        usage=USAGE,
        finish_reason=finish,
        raw=raw,
    )


def test_a_plain_completion_is_built_from_the_result() -> None:
    body = json.loads(completion(_done(), 5, "client-model"))
    assert body == {
        "id": "chatcmpl-r1",
        "object": "chat.completion",
        "created": 5,
        "model": "client-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }


def test_a_structured_completion_is_the_upstreams_own_with_our_parts_set() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    upstream = {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": "up-model",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "logprobs": {"content": []},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "completion_tokens_details": {"r": 1},
        },
    }
    done = _done("", msgspec.json.encode(upstream), "tool_calls")
    body = json.loads(completion(done, 5, "client-model"))
    assert (body["id"], body["created"], body["model"]) == ("chatcmpl-r1", 5, "client-model")
    assert body["choices"] == upstream["choices"] and body["system_fingerprint"] == "fp_1"
    assert body["usage"]["completion_tokens_details"] == {"r": 1}
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    # Post's text rules show in a text reply's content.
    upstream["choices"][0]["message"] = {"role": "assistant", "content": " x ", "refusal": None}  # type: ignore[index]
    body = json.loads(completion(_done("x", msgspec.json.encode(upstream)), 5, "m"))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "x", "refusal": None}


def _events(data: bytes) -> list[Any]:
    return [
        line[6:].decode() if line == b"data: [DONE]" else json.loads(line[6:])
        for line in data.split(b"\n")
        if line.startswith(b"data: ")
    ]


def test_stream_chunks_pass_structured_ones_on_and_end_once() -> None:
    delta = {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}]}
    raw = {
        "id": "up",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "system_fingerprint": "fp",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        "usage": None,
    }
    final = {**raw, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    usage = {"id": "up", "choices": [], "usage": {"prompt_tokens": 1, "x": {"y": 2}}}
    renderer = ChunkRenderer("client-model", 9, include_usage=True)

    def chunk(i: int, text: str, body: dict[str, Any] | None = None) -> TokenChunk:
        if body is None:
            return TokenChunk(request_id="r1", session_id=None, reply_to=0, index=i, text=text)
        blob = msgspec.json.encode(body)
        return StructuredChunk(
            request_id="r1", session_id=None, reply_to=0, index=i, text=text, raw=blob
        )

    out = renderer.render(chunk(0, "", raw)) + renderer.render(chunk(1, "", final))
    out += renderer.render(chunk(2, "plain"))
    out += renderer.render(_done("plain", msgspec.json.encode(usage), "tool_calls"))
    events = _events(out)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"] == raw["choices"] and events[1]["system_fingerprint"] == "fp"
    assert all(
        (e["id"], e["model"], e["created"]) == ("chatcmpl-r1", "client-model", 9)
        for e in events[:-1]
    )
    assert "usage" not in events[1]
    assert events[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[3]["choices"][0]["delta"] == {"content": "plain"}
    # The upstream's chunk had the finish reason: no second one; then its usage chunk.
    assert events[4]["choices"] == [] and events[4]["usage"]["x"] == {"y": 2}
    assert events[4]["usage"]["total_tokens"] == 10 and events[5] == "[DONE]"


# Errors


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (401, "invalid_request_error"), (503, "server_error")],
)
def test_error_shape(status: int, kind: str) -> None:
    reply = error_reply(status, "nope", param="messages[0].content")
    body = json.loads(reply.body)
    assert body == {
        "error": {
            "message": "nope",
            "type": kind,
            "param": "messages[0].content",
            "code": "invalid_api_key" if status == 401 else None,
        }
    }


def test_failure_reply_carries_code_request_id_and_retry_after() -> None:
    failed = Failed(
        request_id="r9",
        session_id=None,
        reply_to=0,
        code=ErrorCode.RING_FULL,
        reason="ring_full:client1-rag0",
        stage="client",
    )
    reply = failure_reply(RequestFailed(failed))
    assert reply.status == 503 and ("retry-after", "1") in reply.headers
    error = json.loads(reply.body)["error"]
    assert error["code"] == "ring_full" and "r9" in error["message"]
