"""What ``POST /v1/messages`` answers: a message, Anthropic's stream events, its errors.

Errors are in Anthropic's shape with the status the SDK maps to its
exception classes (400 ``BadRequestError``, 401 ``AuthenticationError``, 404
``NotFoundError``, 429 ``RateLimitError``, 5xx ``InternalServerError``);
the type is the one Anthropic's API gives that status (503, which the
pipeline answers when it sheds load, is ``overloaded_error``). A field's
place goes into the message, since the shape has no ``param``.

A stream is Anthropic's event sequence: ``message_start``,
``content_block_start``, ``ping``, one ``content_block_delta`` per chunk,
``content_block_stop`` (and so on for each block: the text, then each tool
call, ``anthropic_blocks``), ``message_delta`` (stop reason and usage),
``message_stop``; a failure after the first event is an ``error`` event.
A reply with tool calls stops for ``tool_use``, whatever finish reason an
OpenAI-compatible server gave with them.
The token counts are known only when the pipeline completes, so
``message_start`` reports 0 and ``message_delta`` the counts (the SDK takes
``input_tokens`` from it as the API's own streams send it).
"""

from __future__ import annotations

import msgspec

from mpipeline.errors import RequestFailed
from mpipeline.gateway import anthropic_blocks, schemas, sse
from mpipeline.gateway.anthropic_blocks import BlockStream, event
from mpipeline.gateway.anthropic_shapes import (
    AnthropicError,
    AnthropicErrorBody,
    AnthropicMessage,
    AnthropicUsage,
    ToolUseOut,
)
from mpipeline.gateway.exchange import Reply
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Completed, StructuredChunk, TokenChunk, Usage

__all__ = ["EventRenderer", "error_reply", "failure_reply", "message", "problem_reply"]

_ENCODE = msgspec.json.Encoder().encode
# Anthropic's error type for each status it uses; other 4xx are invalid requests.
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# The pipeline's finish reasons as Anthropic's stop reasons.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
    "stop_sequence": "stop_sequence",
}


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> bytes:
    return _ENCODE(
        AnthropicErrorBody(error=AnthropicError(type=error_type(status), message=message))
    )


def error_reply(
    status: int,
    message: str,
    *,
    field: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> Reply:
    """Anthropic's error shape; ``field`` (where in the body) leads the message."""
    text = f"{field}: {message}" if field else message
    return Reply(status, error_body(status, text), headers)


def problem_reply(problem: Problem) -> Reply:
    return error_reply(problem.status, problem.message, field=problem.field)


def _failure(exc: RequestFailed) -> tuple[int, str]:
    status = schemas.failure_status(exc)
    message = f"{exc.code}: {schemas.failure_message(exc)}"
    if exc.request_id:
        message = f"{message}; request_id {exc.request_id}"
    return status, message


def failure_reply(exc: RequestFailed) -> Reply:
    status, message = _failure(exc)
    headers = schemas.failure_headers(status, exc.failed.retry_after_s)
    return Reply(status, error_body(status, message), headers)


def stop_reason(finish_reason: str, *, tool_calls: bool = False) -> str:
    """Anthropic's stop reason for a finish reason (a plain "stop" is the end of a turn,
    or a stop to call tools when the reply called some)."""
    if tool_calls and finish_reason == "stop":
        return "tool_use"
    return _STOP_REASONS.get(finish_reason, "end_turn")


def usage(counts: Usage) -> AnthropicUsage:
    """Prompt tokens the backend reused are Anthropic's cache reads, apart from the rest."""
    return AnthropicUsage(
        input_tokens=counts.prompt_tokens - counts.cached_tokens,
        output_tokens=counts.completion_tokens,
        cache_read_input_tokens=counts.cached_tokens,
    )


def message_id(request_id: str) -> str:
    return f"msg_{request_id}"


def message(done: Completed, model: str) -> bytes:
    """A non-streamed reply: its text and tool_use blocks, the stop reason, the counts."""
    blocks = anthropic_blocks.content(done.text, done.raw)
    calls = any(isinstance(block, ToolUseOut) for block in blocks)
    return _ENCODE(
        AnthropicMessage(
            id=message_id(done.request_id),
            model=model,
            content=blocks,
            stop_reason=stop_reason(done.finish_reason, tool_calls=calls),
            usage=usage(done.usage),
        )
    )


class EventRenderer:
    """Pipeline events as Anthropic's stream events (``sse.Renderer``)."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._started = False
        self._blocks = BlockStream()

    def opening(self) -> bytes:
        return b""  # message_start goes out with the first event, which carries the id

    def _start(self, request_id: str) -> bytes:
        self._started = True
        start = AnthropicMessage(
            id=message_id(request_id),
            model=self._model,
            content=[],
            stop_reason=None,
            usage=AnthropicUsage(input_tokens=0, output_tokens=0),
        )
        return event("message_start", {"message": start})

    def render(self, ev: TokenChunk | Completed) -> bytes:
        out = b"" if self._started else self._start(ev.request_id)
        blocks = self._blocks
        if type(ev) is StructuredChunk:
            return out + blocks.structured(ev.text, ev.raw)
        if isinstance(ev, TokenChunk):
            return out + blocks.text(ev.text)
        counts = usage(ev.usage)
        delta_usage = {
            "input_tokens": counts.input_tokens,
            "output_tokens": counts.output_tokens,
            "cache_read_input_tokens": counts.cache_read_input_tokens,
        }
        reason = stop_reason(ev.finish_reason, tool_calls=blocks.tool_calls)
        finish = {"stop_reason": reason, "stop_sequence": None}
        return (
            out
            + blocks.finish()
            + event("message_delta", {"delta": finish, "usage": delta_usage})
            + event("message_stop", {})
        )

    def failure(self, exc: RequestFailed) -> bytes:
        status, text = _failure(exc)
        return sse.event(error_body(status, text), "error")
