"""Chat messages to the pipeline's input, stop sequences, and OpenAI's error shape."""

from __future__ import annotations

import json

import pytest

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway.openai import (
    ChatMessage,
    StopScanner,
    TextPart,
    error_reply,
    failure_reply,
    split_messages,
)
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Failed, Turn


def test_the_last_message_is_the_input_and_the_rest_its_history() -> None:
    messages = [
        ChatMessage(role="developer", content="Be brief."),
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content=None),
        ChatMessage(
            role="user",
            content=[TextPart(type="text", text="hi "), TextPart(type="text", text="there")],
        ),
    ]
    assert split_messages(messages) == (
        "hi there",
        [
            Turn(role="system", content="Be brief."),
            Turn(role="user", content="hi"),
            Turn(role="assistant", content=""),
        ],
    )


def test_non_text_parts_empty_conversations_and_a_trailing_reply_are_refused() -> None:
    image = [ChatMessage(role="user", content=[TextPart(type="image_url")])]
    problem = split_messages(image)
    assert isinstance(problem, Problem) and problem.field == "messages[0].content[0]"
    empty = split_messages([ChatMessage(role="user", content="  ")])
    assert isinstance(empty, Problem) and empty.field == "messages"
    reply = split_messages(
        [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="x")]
    )
    assert isinstance(reply, Problem) and reply.field == "messages[1].role"


@pytest.mark.parametrize(
    ("stops", "pieces", "out", "stopped"),
    [
        ([], ["a", "b"], "ab", False),
        (["END"], ["hello E", "N", "D more"], "hello ", True),
        (["END"], ["hello E", "Nx"], "hello ENx", False),
        (["x", "abc"], ["zab", "cx"], "z", True),
        (["\n\n"], ["one\n", "\ntwo"], "one", True),
        ([""], ["a"], "a", False),
    ],
)
def test_stop_scanner_cuts_across_chunks(
    stops: list[str], pieces: list[str], out: str, stopped: bool
) -> None:
    scanner = StopScanner(stops)
    got = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    assert (got, scanner.stopped) == (out, stopped)


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
