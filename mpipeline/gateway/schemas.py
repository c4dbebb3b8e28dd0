"""The gateway's wire shapes: request bodies, results, and errors as HTTP statuses.

Bodies are decoded straight into msgspec Structs, so a wrong type, a missing
field or a value out of range is found in the same pass that parses the
JSON, and msgspec's error names the place (``$.messages[0].content``). That
place becomes the error's ``field`` (or OpenAI's ``param``): a client is told
what to fix, and a bad body can only ever be a 4xx. Decoding returns a
``Problem`` instead of raising, so each route decides its own error shape.
mpipeline's own error shape is built here too (``error_reply``,
``failure_reply``): the native REST style and the WebSocket's handshake
refusals both answer in it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import _json_errors
from mpipeline.gateway.admission import Refused
from mpipeline.gateway.exchange import Reply
from mpipeline.gateway.openai_shapes import CitationOut
from mpipeline.messages import Completed, Priority, Turn
from mpipeline.pipeline import RequestOptions, limits

T = TypeVar("T")

# Bounds shared with the Python API (``pipeline.limits``): every integer,
# string, list and map a client sends has one, checked while decoding.
MAX_DEADLINE_MS = limits.MAX_DEADLINE_MS
MAX_SESSION_ID = limits.MAX_SESSION_ID
MAX_TOKENS = limits.MAX_TOKENS
# A name that is only a label (a model, a message's author).
MAX_NAME = 256
# Seconds a client should wait before retrying a shed (503) request.
RETRY_AFTER_S = 1
PRIORITIES = {
    "critical": Priority.CRITICAL,
    "high": Priority.HIGH,
    "normal": Priority.NORMAL,
    "low": Priority.LOW,
}
STATUS_FOR_CODE: dict[ErrorCode, int] = {
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.RING_FULL: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.STAGE_ERROR: 500,
    ErrorCode.STAGE_RESTARTED: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.DECODE_ERROR: 500,
    ErrorCode.RING_CORRUPTED: 503,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.UPSTREAM_TIMEOUT: 504,
    ErrorCode.UPSTREAM_RATE_LIMITED: 429,
    ErrorCode.CIRCUIT_OPEN: 503,
    ErrorCode.CANCELLED: 503,
    # Nginx's "client closed request": only ever logged, the client is gone.
    ErrorCode.CLIENT_CANCELLED: 499,
    ErrorCode.CLIENT_GONE: 499,
    # Only ever logged and recorded: the reader is not reading.
    ErrorCode.SLOW_CLIENT: 408,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
}
# "Expected `str`, got `int` - at `$.messages[0].content`"
# A bad dict key reads "... - at `key` in `$.metadata`": the dict is the field.
_AT = re.compile(r"(?P<message>.*) - at (?:`key` in )?`\$(?P<path>[^`]*)`", re.DOTALL)
# "Expected `float` <= 2147483647.0": a whole number's bound, as the client reads it.
_WHOLE_BOUND = re.compile(r"`float` (?P<op>[<>]=?) (?P<n>\d+)\.0\b")
# "Object missing required field `input`": the field belongs in the path too.
_NAMED = re.compile(r"Object (?:missing required|contains unknown) field `(?P<name>[^`]*)`")

# The native error type a status implies when the caller names none.
TYPE_FOR_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "invalid_request",
    426: "upgrade_required",
    431: "invalid_request",
}
_ENCODE = msgspec.json.Encoder().encode

SessionId = Annotated[str, Meta(min_length=1, max_length=MAX_SESSION_ID)]
# A whole number, as JSON Schema's "integer" means it: 898 and 898.0 alike (as
# OpenAI's API takes them), 2.5 refused. Decoded as a float, used as an int.
MaxTokens = Annotated[float, Meta(ge=1, le=MAX_TOKENS, multiple_of=1)]
One = Annotated[float, Meta(ge=1, le=1, multiple_of=1)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
# OpenAI's own limits on metadata (16 pairs, keys of 64, values of 512 characters).
Metadata = Annotated[
    dict[
        Annotated[str, Meta(max_length=limits.MAX_METADATA_KEY)],
        Annotated[str, Meta(max_length=limits.MAX_METADATA_VALUE)],
    ],
    Meta(max_length=limits.MAX_METADATA_ITEMS),
]


class TurnIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One earlier message of the conversation in ``POST /v1/prompt``."""

    role: Literal["system", "user", "assistant"]
    content: str


class PromptBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/prompt``. Unknown fields are refused: a typo must not pass silently."""

    input: Annotated[str, Meta(min_length=1)]
    session_id: SessionId | None = None
    metadata: Metadata = {}
    priority: Literal["critical", "high", "normal", "low"] = "normal"
    deadline_ms: Annotated[float, Meta(ge=1, le=MAX_DEADLINE_MS)] | None = None
    stream: bool = False
    max_tokens: MaxTokens | None = None
    # The conversation before ``input``, oldest first, for multi-turn sessions.
    history: Annotated[list[TurnIn], Meta(max_length=limits.MAX_HISTORY)] = []
    # A model's name or alias ([[models]]); unset: the default (first) model.
    model: Name | None = None


class UsageOut(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Of prompt_tokens, those the model did not evaluate again (session cache).
    cached_tokens: int = 0


class PromptResult(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    session_id: str | None
    text: str
    finish_reason: str
    usage: UsageOut
    # Milliseconds from a stage's receipt of the request to the next stage's.
    timings: dict[str, float]
    # Where rag's context came from, best first ([] when rag found none or is off).
    citations: list[CitationOut] = []


class ChunkOut(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    index: int
    text: str


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /healthz``: the process answers."""

    status: Literal["ok"] = "ok"


class Readiness(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``GET /readyz``: 200 ``ready``, or 503 ``not_ready`` with the reason."""

    status: Literal["ready", "not_ready"]
    reason: str | None = None


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    type: str
    message: str
    field: str | None = None
    request_id: str | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorDetail


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a body was refused: a message, where (a JSON path without ``$.``), which
    status, and a code for styles that have one (OpenAI's ``unsupported_parameter``)."""

    message: str
    field: str | None = None
    status: int = 400
    code: str | None = None


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T | Problem:
    """Decode ``body`` with a typed decoder, or say what is wrong with it and where."""
    if not body.strip():
        return Problem("the request body is empty; send a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        return validation_problem(str(exc))
    except (msgspec.DecodeError, UnicodeDecodeError):
        # Our words and the byte offset, whatever msgspec's version says.
        return Problem(_json_errors.describe(bytes(body)))
    except RecursionError:
        return Problem("invalid JSON: nested too deeply")


def request_options(
    body: PromptBody,
    session: str | None,
    deadline_ms: float | None = None,
    model: str | None = None,
) -> RequestOptions:
    """How to run a native request (``POST /v1/prompt`` and a WebSocket message).

    ``session`` is the body's ``session_id`` or the route's own (a header);
    ``deadline_ms`` the route's (``X-Request-Timeout``), which the body's own wins over;
    ``model`` the canonical name the body's ``model`` resolved to (unresolved, the
    shard resolves it).
    """
    return RequestOptions(
        session_id=session,
        metadata=body.metadata or None,
        priority=PRIORITIES[body.priority],
        deadline_ms=body.deadline_ms if body.deadline_ms is not None else deadline_ms,
        max_tokens=whole(body.max_tokens),
        history=[Turn(role=t.role, content=t.content) for t in body.history] or None,
        model=body.model if model is None else model or None,
    )


def whole(value: float | None) -> int | None:
    """A ``MaxTokens`` as the int it is (the schema allowed only whole numbers)."""
    return None if value is None else int(value)


def validation_problem(text: str) -> Problem:
    """Split msgspec's validation message into a message and a field path."""
    at = _AT.fullmatch(text)
    message, path = (at["message"], at["path"]) if at else (text, "")
    # Whole numbers are floats with multiple_of=1 to msgspec: say what the client sent wrong.
    message = message.replace("`float` that's a multiple of 1.0", "a whole number")
    message = _WHOLE_BOUND.sub(r"a number \g<op> \g<n>", message)
    message = message.replace("`float | null`", "a number or null")
    named = _NAMED.match(message)
    if named:
        path = f"{path}.{named['name']}"
    return Problem(message, path.removeprefix(".") or None)


def failure_status(exc: RequestFailed) -> int:
    """HTTP status for a request the pipeline refused or failed."""
    return STATUS_FOR_CODE.get(exc.code, 500)


def failure_headers(status: int, retry_after_s: float = 0.0) -> tuple[tuple[str, str], ...]:
    """Retry-After for refusals a client should retry: the upstream's own advice
    when it gave one (an open circuit's time to half-open, a 429's Retry-After)."""
    if retry_after_s > 0:
        return (("retry-after", str(math.ceil(retry_after_s))),)
    return (("retry-after", str(RETRY_AFTER_S)),) if status in (429, 503) else ()


def failure_message(exc: RequestFailed) -> str:
    """What went wrong, for the client: the reason and where, never internals."""
    return f"{exc.failed.reason} (stage {exc.stage})" if exc.stage else exc.failed.reason


def error_reply(
    status: int,
    message: str,
    *,
    field: str | None = None,
    kind: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> Reply:
    """mpipeline's error shape (``{"error": {"type", "message", "field"?}}``);
    ``kind`` overrides the type the status implies."""
    if kind is None:
        kind = TYPE_FOR_STATUS.get(status, "internal" if status >= 500 else "invalid_request")
    body = ErrorBody(error=ErrorDetail(type=kind, message=message, field=field))
    return Reply(status, _ENCODE(body), headers)


def failure_detail(exc: RequestFailed) -> ErrorDetail:
    """A pipeline failure in mpipeline's error shape: its code as the type, and the request."""
    return ErrorDetail(
        type=str(exc.code),
        message=failure_message(exc),
        request_id=exc.request_id or None,
    )


def failure_reply(exc: RequestFailed) -> Reply:
    """A pipeline failure as an HTTP status and mpipeline's error body."""
    status = failure_status(exc)
    headers = failure_headers(status, exc.failed.retry_after_s)
    return Reply(status, _ENCODE(ErrorBody(error=failure_detail(exc))), headers)


def usage(done: Completed) -> UsageOut:
    u = done.usage
    return UsageOut(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        cached_tokens=u.cached_tokens,
    )


def timings(stamps: dict[str, int], received_ns: int) -> dict[str, float]:
    """Per-stage milliseconds from the receipt stamps; the last stage runs to ``received_ns``."""
    if not stamps:
        return {}
    ordered = sorted(stamps.items(), key=lambda item: item[1])
    ends = [t for _, t in ordered[1:]] + [received_ns]
    return {
        stage: round(max(0, end - start) / 1e6, 3)
        for (stage, start), end in zip(ordered, ends, strict=True)
    }


def prompt_result(done: Completed, received_ns: int) -> PromptResult:
    return PromptResult(
        request_id=done.request_id,
        session_id=done.session_id,
        text=done.text,
        finish_reason=done.finish_reason,
        usage=usage(done),
        timings=timings(done.stamps, received_ns),
        citations=CitationOut.all_of(done.citations),
    )


class NativeErrors:
    """mpipeline's own error shape, for the styles that speak it (native REST and the
    WebSocket's handshake refusals): the ``ApiStyle`` error methods, written once."""

    def error_reply(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Reply:
        return error_reply(status, message, field=field, kind=kind, headers=headers)

    def failure_reply(self, exc: RequestFailed) -> Reply:
        return failure_reply(exc)

    def rate_limited(self, refused: Refused) -> Reply:
        return error_reply(
            429, refused.message, kind=ErrorCode.RATE_LIMITED, headers=refused.headers
        )
