"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Enough of the Chat Completions API for the official SDKs and the usual tools:
messages (text content, as a string or text parts), ``max_tokens`` /
``max_completion_tokens``, ``stop``, ``user``, ``stream`` with
``stream_options.include_usage``, the chunk format ending in ``data: [DONE]``,
and errors as ``{"error": {"message", "type", "param", "code"}}``.

The last message (from the user) becomes the request's input and the ones
before it its history; the assemble stage adds the system prompt and context
and each worker sends the turns on in its own API's shape. ``user`` (or
an ``X-Session-Id`` header, which wins) becomes the session, so a
conversation keeps to one inference shard. Stop sequences are applied here,
on the text as it streams, until post grows stop rules of its own.

``ChatCompletions`` is the gateway's OpenAI style (``style.ApiStyle``): every
refusal on its routes, and any unknown path under ``/v1/chat/`` or
``/v1/models``, is in OpenAI's error shape, since that is what the SDKs parse
to pick their exception class.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import schemas, sse
from mpipeline.gateway.admission import Admission, Refused
from mpipeline.gateway.exchange import Reply, Request, Response
from mpipeline.gateway.openai_shapes import (
    AssistantMessage,
    ChatCompletion,
    ChatUsage,
    Choice,
    Model,
    ModelList,
    OpenAIError,
    OpenAIErrorBody,
)
from mpipeline.gateway.schemas import Problem
from mpipeline.gateway.style import Handler, Headers, Upgrade
from mpipeline.messages import Completed, TokenChunk, Turn
from mpipeline.pipeline import Pipeline, RequestOptions, limits

# OpenAI accepts at most four stop sequences.
MAX_STOPS = 4
# The history's bound and the input message.
MAX_MESSAGES = limits.MAX_HISTORY + 1
OWNER = "mpipeline"


class TextPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: schemas.Name | None = None


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


class ChatBody(msgspec.Struct, frozen=True, kw_only=True):
    """The request; fields the pipeline has no use for are accepted and ignored."""

    model: schemas.Name
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: schemas.MaxTokens | None = None
    max_completion_tokens: schemas.MaxTokens | None = None
    # Validated for compatibility; the pipeline has no sampling settings yet.
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    n: schemas.One | None = None
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: schemas.SessionId | None = None
    metadata: schemas.Metadata | None = None


_DECODER = msgspec.json.Decoder(ChatBody)
_ENCODE = msgspec.json.Encoder().encode


# Chat roles as the pipeline's turns: a developer message is OpenAI's newer
# name for a system message; a tool result is input the model must read.
_ROLES = {"system": "system", "developer": "system", "user": "user", "tool": "user"}


def split_messages(messages: Sequence[ChatMessage]) -> tuple[str, list[Turn]] | Problem:
    """The pipeline's input (the last message, from the user) and the history before it."""
    turns = []
    for i, msg in enumerate(messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    where = f"messages[{i}].content[{j}]"
                    message = f"only text content parts are supported, not {part.type!r}"
                    return Problem(message, where)
                texts.append(part.text)
            content = "".join(texts)
        turns.append(Turn(role=_ROLES.get(msg.role, "assistant"), content=content or ""))
    if turns[-1].role != "user":
        where = f"messages[{len(turns) - 1}].role"
        return Problem("the last message must be from the user (or a tool)", where)
    if not any(t.content.strip() for t in turns):
        return Problem("the messages have no content", "messages")
    return turns[-1].content, turns[:-1]


class StopScanner:
    """Cuts streamed text at the first stop sequence, even one split across chunks.

    Holds back the last ``len(longest stop) - 1`` characters until it knows
    they do not start a stop sequence.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buf = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._buf += text
        cut = min((i for s in self._stops if (i := self._buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self._buf, self.stopped = self._buf[:cut], "", True
            return out
        keep = len(self._buf) - self._hold
        out, self._buf = self._buf[:keep], self._buf[keep:]
        return out

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return "" if self.stopped else out


def error_reply(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> Reply:
    """OpenAI's error shape; the SDKs pick the exception class from the status."""
    if status == 401:
        kind, code = "invalid_request_error", code or "invalid_api_key"
    elif status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    body = OpenAIErrorBody(error=OpenAIError(message=message, type=kind, param=param, code=code))
    return Reply(status, _ENCODE(body), headers)


def problem_reply(problem: Problem) -> Reply:
    return error_reply(problem.status, problem.message, param=problem.field)


def failure_reply(exc: RequestFailed) -> Reply:
    status = schemas.failure_status(exc)
    message = schemas.failure_message(exc)
    if exc.request_id:
        message = f"{message}; request_id {exc.request_id}"
    return error_reply(
        status,
        message,
        code=str(exc.code),
        headers=schemas.failure_headers(status, exc.failed.retry_after_s),
    )


class ChatCompletions:
    """The two OpenAI routes over one pipeline client, and OpenAI's error replies."""

    prefixes: tuple[str, ...] = ("/v1/chat/", "/v1/models")
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(
        self, pipeline: Pipeline, model: str, keepalive_s: float, *, admission: Admission
    ) -> None:
        self._pipeline = pipeline
        self._model = model
        self._keepalive_s = keepalive_s
        self._admission = admission
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self.create},
            "/v1/models": {"GET": self.models},
        }

    # Error replies

    def error_reply(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: Headers = (),
    ) -> Reply:
        return error_reply(status, message, param=field, code=kind, headers=headers)

    def failure_reply(self, exc: RequestFailed) -> Reply:
        return failure_reply(exc)

    def rate_limited(self, refused: Refused) -> Reply:
        return self.error_reply(
            429, refused.message, kind=ErrorCode.RATE_LIMITED, headers=refused.headers
        )

    # Routes

    async def models(self, request: Request, response: Response) -> None:
        models = ModelList(data=[Model(id=self._model, owned_by=OWNER)])
        response.send(200, _ENCODE(models))

    async def create(self, request: Request, response: Response) -> None:
        body = schemas.decode(_DECODER, request.body)
        if isinstance(body, Problem):
            response.send_reply(problem_reply(body))
            return
        split = split_messages(body.messages)
        if isinstance(split, Problem):
            response.send_reply(problem_reply(split))
            return
        text, history = split
        session = request.header("x-session-id") or body.user
        refused = self._admission.check(session)
        if refused is not None:
            response.send_reply(self.rate_limited(refused))
            return
        max_tokens = schemas.whole(body.max_completion_tokens or body.max_tokens)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
        created = int(time.time())
        options = RequestOptions(
            session_id=session, metadata=body.metadata, max_tokens=max_tokens, history=history
        )
        if not body.stream:
            done = await self._pipeline.submit(text, options)
            response.send(200, self._completion(done, stops, created, body.model))
            return
        events = sse.pipeline_events(self._pipeline, text, options)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        renderer = _ChunkRenderer(body.model, created, stops, include_usage)
        await sse.respond(response, events, renderer, self._keepalive_s, self._pipeline.cancel)

    def _completion(self, done: Completed, stops: list[str], created: int, model: str) -> bytes:
        scanner = StopScanner(stops)
        text = scanner.feed(done.text) + scanner.flush()
        finish = "stop" if scanner.stopped else done.finish_reason
        choice = Choice(index=0, message=AssistantMessage(content=text), finish_reason=finish)
        completion = ChatCompletion(
            id=f"chatcmpl-{done.request_id}",
            created=created,
            model=model,
            choices=[choice],
            usage=ChatUsage.of(done.usage),
        )
        return _ENCODE(completion)


class _ChunkRenderer:
    """``chat.completion.chunk`` events: role first, content deltas, finish, usage, DONE."""

    def __init__(self, model: str, created: int, stops: list[str], include_usage: bool) -> None:
        self._model = model
        self._created = created
        self._scanner = StopScanner(stops)
        self._include_usage = include_usage
        self._id = "chatcmpl-pending"

    def _chunk(self, delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return self._event([choice])

    def _event(self, choices: list[dict[str, object]], **extra: object) -> bytes:
        body = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
            **extra,
        }
        return sse.event(_ENCODE(body))

    def opening(self) -> bytes:
        return b""  # the role chunk goes out with the first event, which carries the id

    def render(self, event: TokenChunk | Completed) -> bytes:
        out = b""
        if self._id == "chatcmpl-pending":
            self._id = f"chatcmpl-{event.request_id}"
            out = self._chunk({"role": "assistant", "content": ""})
        if isinstance(event, TokenChunk):
            text = self._scanner.feed(event.text)
            return out + (self._chunk({"content": text}) if text else b"")
        rest = self._scanner.flush()
        if rest:
            out += self._chunk({"content": rest})
        finish = "stop" if self._scanner.stopped else event.finish_reason
        out += self._chunk({}, finish)
        if self._include_usage:
            out += self._event([], usage=ChatUsage.of(event.usage))
        return out + sse.DONE

    def failure(self, exc: RequestFailed) -> bytes:
        reply = failure_reply(exc)
        return sse.event(reply.body)
