"""The Anthropic Messages route's request and reply: the conversation as the pipeline's
turns, the sampling fields under the names workers read, refusals naming the field,
Anthropic's stream events, errors and auth by ``x-api-key``."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from mpipeline.auth import BearerAuth
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway.anthropic_reply import EventRenderer, error_reply, failure_reply, message
from mpipeline.gateway.anthropic_request import Messages, read
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai_fields import Backend
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Completed, Failed, TokenChunk, Turn, Usage

ECHO = Backend.for_worker("echo")
OPENAI = Backend.for_worker("openai")


def _read(backend: Backend = ECHO, **body: Any) -> Messages | Problem:
    full = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    return read(json.dumps(full | body).encode(), Models.single("claude", backend))


def _done(finish: str = "stop", text: str = "a b") -> Completed:
    usage = Usage(prompt_tokens=9, completion_tokens=2, cached_tokens=4)
    return Completed(
        request_id="r1", session_id=None, reply_to=0, text=text, usage=usage, finish_reason=finish
    )


def test_the_conversation_becomes_a_system_turn_the_history_and_the_input() -> None:
    got = _read(
        system=[{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
        messages=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "thr", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "ee"},
                ],
            },
        ],
        metadata={"user_id": "u-7"},
        stream=True,
    )
    assert isinstance(got, Messages)
    assert got.text == "three"
    assert got.history == [
        Turn(role="system", content="be brief"),
        Turn(role="user", content="one"),
        Turn(role="assistant", content="two"),
    ]
    assert (got.user, got.stream, got.max_tokens, got.params) == ("u-7", True, 16, b"")


def test_sampling_fields_travel_under_the_names_workers_read() -> None:
    got = _read(OPENAI, stop_sequences=["END"], temperature=0.5, top_p=0.9, top_k=40)
    assert isinstance(got, Messages)
    assert json.loads(got.params) == {
        "stop": ["END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
    }
    openai_name = _read(ECHO, stop=["END"])
    assert isinstance(openai_name, Problem) and openai_name.field == "stop"  # not Anthropic's
    echo_ok = _read(ECHO, stop_sequences=["END"])
    assert isinstance(echo_ok, Messages) and json.loads(echo_ok.params) == {"stop": ["END"]}


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k"])
def test_a_field_the_worker_cannot_honour_is_refused_or_dropped(field: str) -> None:
    value = 1 if field == "top_k" else 0.5
    refused = _read(ECHO, **{field: value})
    assert isinstance(refused, Problem)
    assert refused.field == field and "worker echo" in refused.message
    dropped = _read(Backend.for_worker("echo", drop=True), **{field: value})
    assert isinstance(dropped, Messages) and dropped.params == b""


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking", "not supported"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0].type",
            "only text, image, tool_use and tool_result content blocks",
        ),
        (
            {"system": [{"type": "image", "source": {"type": "url", "url": "u"}}]},
            "system[0].type",
            "only text content blocks",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "tool_use"}],
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].content[0].type",
            "only text and image content blocks",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content[0].source.type",
            "missing required field `type`",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages[1].role",
            "prefilled assistant turn",
        ),
        ({"messages": [{"role": "user", "content": " "}]}, "messages", "no content"),
        ({"messages": []}, "messages", "length >= 1"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"temperature": 1.5}, "temperature", "<= 1"),
        ({"metadata": {"user_id": "u", "other": 1}}, "metadata.other", "not supported"),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(
    body: dict[str, Any], field: str, words: str
) -> None:
    got = _read(OPENAI, **body)
    assert isinstance(got, Problem), got
    assert got.field == field and words in got.message, got


def test_a_missing_max_tokens_is_refused() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "q"}]}'
    got = read(body, Models.single("m", ECHO))
    assert isinstance(got, Problem) and got.field == "max_tokens"


def test_a_reply_is_a_message_with_anthropics_stop_reasons_and_usage() -> None:
    body = json.loads(message(_done(), "claude-x"))
    assert body == {
        "id": "msg_r1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "a b"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 5,
            "output_tokens": 2,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 4,
        },
    }
    assert json.loads(message(_done("length"), "m"))["stop_reason"] == "max_tokens"


def _events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        name, payload = block.split("\n")
        out.append((name.removeprefix("event: "), json.loads(payload.removeprefix("data: "))))
    return out


def test_a_stream_is_anthropics_event_sequence() -> None:
    renderer = EventRenderer("m")
    chunk = TokenChunk(request_id="r1", session_id=None, reply_to=0, index=0, text="a ")
    data = renderer.opening() + renderer.render(chunk)
    data += renderer.render(
        TokenChunk(request_id="r1", session_id=None, reply_to=0, index=1, text="b")
    )
    data += renderer.render(_done())
    events = _events(data)
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(body["type"] == name for name, body in events)
    assert events[0][1]["message"]["id"] == "msg_r1"
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "a "}
    assert events[6][1]["delta"]["stop_reason"] == "end_turn"
    assert events[6][1]["usage"]["output_tokens"] == 2
    assert events[6][1]["usage"]["input_tokens"] == 5


def _failed(code: ErrorCode) -> RequestFailed:
    failed = Failed(
        request_id="r9", session_id=None, reply_to=0, code=code, reason="why", stage="inference"
    )
    return RequestFailed(failed)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (ErrorCode.RING_FULL, 503, "overloaded_error"),
        (ErrorCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
        (ErrorCode.UPSTREAM_RATE_LIMITED, 429, "rate_limit_error"),
        (ErrorCode.STAGE_ERROR, 500, "api_error"),
        (ErrorCode.UPSTREAM_ERROR, 502, "api_error"),
        (ErrorCode.INVALID_REQUEST, 400, "invalid_request_error"),
    ],
)
def test_failures_are_in_anthropics_error_shape(code: ErrorCode, status: int, kind: str) -> None:
    reply = failure_reply(_failed(code))
    body = json.loads(reply.body)
    assert reply.status == status
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert body["error"]["message"].startswith(f"{code}: ") and "r9" in body["error"]["message"]
    event = EventRenderer("m").failure(_failed(code))
    assert event.startswith(b"event: error\ndata: ")
    assert json.loads(event.split(b"data: ")[1]) == body


def test_errors_name_the_field_in_the_message() -> None:
    reply = error_reply(400, "too big", field="max_tokens")
    assert msgspec.json.decode(reply.body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: too big"},
    }
    unauthorized = json.loads(error_reply(401, "no").body)
    assert unauthorized["error"]["type"] == "authentication_error"
    assert json.loads(error_reply(404, "no").body)["error"]["type"] == "not_found_error"


def test_the_token_is_taken_bare_as_x_api_key() -> None:
    auth = BearerAuth("s3cret")
    assert auth.allows_key("s3cret") and auth.allows_key(" s3cret ")
    assert not auth.allows_key("S3CRET") and not auth.allows_key(None)
    assert not auth.allows_key("Bearer s3cret")
    assert BearerAuth(None).allows_key(None)
