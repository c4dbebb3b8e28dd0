"""Body decoding into Problems with field paths, and pipeline failures as statuses."""

from __future__ import annotations

import msgspec
import pytest

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import schemas
from mpipeline.gateway.openai import ChatBody
from mpipeline.gateway.schemas import Problem, PromptBody
from mpipeline.messages import Failed

PROMPT = msgspec.json.Decoder(PromptBody)
CHAT = msgspec.json.Decoder(ChatBody)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (b"", None, "empty"),
        (b"{", None, "invalid JSON"),
        (b'{"input": "x",}', None, "invalid JSON"),
        (b"[1, 2]", None, "Expected `object`, got `array`"),
        (b'{"input": 5}', "input", "Expected `str`, got `int`"),
        (b"{}", "input", "missing required field `input`"),
        (b'{"input": ""}', "input", "length >= 1"),
        (b'{"input": "x", "priority": "urgent"}', "priority", "Invalid enum value 'urgent'"),
        (b'{"input": "x", "deadline_ms": 0}', "deadline_ms", "a number >= 1"),
        (b'{"input": "x", "deadline_ms": -1}', "deadline_ms", "a number >= 1"),
        (b'{"input": "x", "deadline_ms": 1e9}', "deadline_ms", "<= 3600000"),
        (b'{"input": "x", "deadline_ms": 1e999}', "deadline_ms", "out of range"),
        (b'{"input": "x", "deadline_ms": "5"}', "deadline_ms", "got `str`"),
        (b'{"input": "x", "metadata": {"a": 1}}', "metadata[...]", "Expected `str`"),
        (b'{"input": "x", "stream": "yes"}', "stream", "Expected `bool`"),
        (b'{"input": "x", "session_id": ""}', "session_id", "length >= 1"),
        (b'{"input": "x", "deadline": 5}', "deadline", "unknown field `deadline`"),
        (b'{"input": "\xff"}', None, "not valid UTF-8 (byte 11)"),
        (b'{"input": "\\ud800"}', None, "invalid JSON"),
        (b'{"input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "input", "got `array`"),
    ],
)
def test_prompt_problems_name_the_field(body: bytes, field: str | None, message: str) -> None:
    problem = schemas.decode(PROMPT, body)
    assert isinstance(problem, Problem)
    assert problem.status == 400
    assert problem.field == field
    assert message in problem.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"input": "\xff"}', "the body is not valid UTF-8 (byte 11)"),
        (b'{"input": "\xc3\xa9\xc3"}', "the body is not valid UTF-8 (byte 13)"),
        (b"{", "invalid JSON at byte 1: expected a field name in double quotes"),
        (
            b'{"input": "x"',
            "invalid JSON at byte 13: expected ',' or the end of the object or array",
        ),
        (b'{"input": "x",}', "invalid JSON at byte 13: a trailing comma"),
        (
            b'{"input": "x", "history": [{"role": "user", "content": "a"}, ]}',
            "invalid JSON at byte 59: a trailing comma",
        ),
        (b'{"input": "x"} tail', "invalid JSON at byte 15: unexpected data after the JSON value"),
        ('{"input": "x\u00e9\\n'.encode(), "invalid JSON at byte 10: a string is never closed"),
        (
            b'{"input": "a\tb"}',
            "invalid JSON at byte 12: a control character inside a string must be escaped",
        ),
        (b'{"input": "\\q"}', "invalid JSON at byte 11: an invalid escape in a string"),
        (b'{"input": "\\u12"}', "invalid JSON at byte 11: an invalid \\u escape in a string"),
        (b'{"input" "x"}', "invalid JSON at byte 9: expected ':' after a field name"),
        (b'{"input": tru}', "invalid JSON at byte 10: unexpected character 't'"),
        (
            b'{"input": "\xc3\xa9", "deadline_ms": @}',
            "invalid JSON at byte 31: unexpected character '@'",
        ),
        (
            b'{"input": "\\ud800"}',
            "invalid JSON at byte 11: \\ud800 is an unpaired surrogate, not a character",
        ),
        (b'{"input": "\\udc00\\ud800\\udc00"}', "invalid JSON at byte 11: \\udc00 is an unpaired"),
        (b'{"input": "x", "deadline_ms": NaN}', "invalid JSON: NaN is not a JSON number"),
        (
            b'{"input": "x", "deadline_ms": -Infinity}',
            "invalid JSON: -Infinity is not a JSON number",
        ),
    ],
)
def test_bad_json_is_described_in_our_words_with_the_byte(body: bytes, message: str) -> None:
    """The 400 for a body that is not JSON is mpipeline's sentence, whatever msgspec says."""
    problem = schemas.decode(PROMPT, body)
    assert isinstance(problem, Problem)
    assert (problem.status, problem.field) == (400, None)
    assert problem.message.startswith(message), problem.message


def test_valid_prompt_keeps_unicode_and_nul() -> None:
    text = "naïve e\u0301 \u05e9\u05dc\u05d5\u05dd 🦀 a\x00b"
    body = msgspec.json.encode({"input": text, "session_id": text, "deadline_ms": 1500})
    got = schemas.decode(PROMPT, body)
    assert isinstance(got, PromptBody)
    assert got.input == got.session_id == text
    assert got.deadline_ms == 1500.0
    assert got.priority == "normal" and schemas.PRIORITIES[got.priority] == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m", "messages": [{"role": "user"}], "n": 2}', "n"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stop": ["a","b","c","d","e"]}', "stop"),
    ],
)
def test_chat_problems_name_the_param(body: bytes, field: str | None) -> None:
    problem = schemas.decode(CHAT, body)
    assert isinstance(problem, Problem), problem
    assert problem.field == field


def test_chat_ignores_unknown_fields_however_deep() -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": ' + deep + b"}"
    got = schemas.decode(CHAT, body)
    # msgspec skips unknown values recursively: deep ones are a clear 400, never a 500.
    if isinstance(got, Problem):
        assert got.message == "invalid JSON: nested too deeply"
    shallow = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1}'
    body_ok = schemas.decode(CHAT, shallow)
    assert isinstance(body_ok, ChatBody)


def _failed(code: ErrorCode, reason: str = "why") -> RequestFailed:
    return RequestFailed(
        Failed(request_id="r1", session_id=None, reply_to=0, code=code, reason=reason, stage="post")
    )


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.RING_FULL, 503),
        (ErrorCode.DEADLINE_EXCEEDED, 504),
        (ErrorCode.STAGE_ERROR, 500),
        (ErrorCode.SHUTTING_DOWN, 503),
        (ErrorCode.STAGE_RESTARTED, 503),
        (ErrorCode.INVALID_REQUEST, 400),
        (ErrorCode.UPSTREAM_ERROR, 502),
    ],
)
def test_failure_status(code: ErrorCode, status: int) -> None:
    exc = _failed(code)
    assert schemas.failure_status(exc) == status
    retry = dict(schemas.failure_headers(status)).get("retry-after")
    assert retry == ("1" if status == 503 else None)
    assert schemas.failure_message(exc) == "why (stage post)"


def test_oversized_input_is_413() -> None:
    exc = _failed(ErrorCode.TOO_LARGE, "input of 9 characters exceeds the limit of 8")
    assert schemas.failure_status(exc) == 413


def test_every_error_code_has_a_status() -> None:
    assert set(schemas.STATUS_FOR_CODE) == set(ErrorCode)


def test_timings_run_from_stamp_to_stamp() -> None:
    stamps = {"post": 4_000_000, "rag": 1_000_000, "inference": 2_500_000}
    assert schemas.timings(stamps, 5_000_000) == {"rag": 1.5, "inference": 1.5, "post": 1.0}
    assert schemas.timings({}, 5) == {}
