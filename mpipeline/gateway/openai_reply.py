"""What the OpenAI route answers: completions, ``chat.completion.chunk`` events, errors.

A plain reply is built from the pipeline's result (``openai_shapes``). A
structured one, from an OpenAI-compatible upstream, is the upstream's own
JSON (``Completed.raw``, ``StructuredChunk.raw``) passed on as it came, tool
calls, refusal, logprobs, ``system_fingerprint`` and all, with only what is
the gateway's set over it: our ``id`` and ``created``, the client's
``model``, and in a whole completion the text after post's rules and the
pipeline's token counts (a reply replayed from the cache reports its prompt
as cached). A chunk's ``usage`` goes only into the final usage chunk, and only
if the client asked for it (``stream_options.include_usage``); the stream
asks its upstream for usage every time, since the shard counts tokens.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import schemas, sse
from mpipeline.gateway.admission import Refused
from mpipeline.gateway.exchange import Reply
from mpipeline.gateway.openai_shapes import (
    AssistantMessage,
    ChatCompletion,
    ChatUsage,
    Choice,
    CitationOut,
    OpenAIError,
    OpenAIErrorBody,
)
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Completed, StructuredChunk, TokenChunk, Usage

__all__ = [
    "ChunkRenderer",
    "OpenAIErrors",
    "completion",
    "error_reply",
    "failure_reply",
    "problem_reply",
]

_ENCODE = msgspec.json.Encoder().encode
_OBJECT = msgspec.json.Decoder(dict[str, Any])
# Values stay raw JSON (passed on as they came); the gateway's own go in beside them.
_SHALLOW: msgspec.json.Decoder[dict[str, Any]] = msgspec.json.Decoder(dict[str, msgspec.Raw])


class _Finish(msgspec.Struct):
    finish_reason: str | None = None


_FINISHES = msgspec.json.Decoder(list[_Finish])


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
    return error_reply(problem.status, problem.message, param=problem.field, code=problem.code)


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


class OpenAIErrors:
    """The error replies of an API style (``style.ApiStyle``) that speaks OpenAI's
    shape, shared by every such route: the SDKs parse it to pick their exception."""

    def error_reply(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Reply:
        return error_reply(status, message, param=field, code=kind, headers=headers)

    def failure_reply(self, exc: RequestFailed) -> Reply:
        return failure_reply(exc)

    def rate_limited(self, refused: Refused) -> Reply:
        return error_reply(
            429, refused.message, code=ErrorCode.RATE_LIMITED, headers=refused.headers
        )


def completion(done: Completed, created: int, model: str) -> bytes:
    """A non-streamed ``chat.completion``: the upstream's own when it sent more than text."""
    cid = f"chatcmpl-{done.request_id}"
    if done.raw:
        body = _structured(done, cid, created, model)
        if body is not None:
            return body
    message = AssistantMessage(role="assistant", content=done.text)
    choice = Choice(index=0, message=message, finish_reason=done.finish_reason)
    return _ENCODE(
        ChatCompletion(
            id=cid,
            object="chat.completion",
            created=created,
            model=model,
            choices=[choice],
            usage=ChatUsage.of(done.usage),
            citations=CitationOut.all_of(done.citations),
        )
    )


def _structured(done: Completed, cid: str, created: int, model: str) -> bytes | None:
    """``done.raw`` with the gateway's parts set over it; None if it is not a completion."""
    try:
        doc = _OBJECT.decode(done.raw)
        choices = doc.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
    except msgspec.DecodeError:
        return None
    if not isinstance(choice, dict) or not isinstance(message, dict):
        return None
    doc.update(id=cid, object="chat.completion", created=created, model=model)
    if isinstance(message.get("content"), str):
        message["content"] = done.text  # as post left it
    choice["finish_reason"] = done.finish_reason
    doc["usage"] = _usage(doc.get("usage"), done.usage)
    if done.citations:
        doc["citations"] = CitationOut.all_of(done.citations)
    return _ENCODE(doc)


def _usage(upstream: object, usage: Usage) -> dict[str, Any]:
    """The upstream's usage object (its details kept) with the pipeline's counts."""
    out: dict[str, Any] = dict(upstream) if isinstance(upstream, dict) else {}
    out["prompt_tokens"] = usage.prompt_tokens
    out["completion_tokens"] = usage.completion_tokens
    out["total_tokens"] = usage.prompt_tokens + usage.completion_tokens
    details = out.get("prompt_tokens_details")
    details = dict(details) if isinstance(details, dict) else {}
    details["cached_tokens"] = usage.cached_tokens
    out["prompt_tokens_details"] = details
    return out


class ChunkRenderer:
    """``chat.completion.chunk`` events: role first, deltas, finish, usage, ``[DONE]``."""

    def __init__(self, model: str, created: int, include_usage: bool) -> None:
        self._model = model
        self._created = created
        self._include_usage = include_usage
        self._id = "chatcmpl-pending"
        # An upstream chunk passed on already carried the finish reason.
        self._finished = False

    def _chunk(self, delta: dict[str, str], finish: str | None = None, **extra: object) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return self._event([choice], **extra)

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
            if type(event) is StructuredChunk:
                return out + self._passed_on(event.raw)
            return out + (self._chunk({"content": event.text}) if event.text else b"")
        # The citations extension rides on the finish chunk (a chunk of its own,
        # with no choices, only when the upstream's finish chunk was passed on).
        cited = {"citations": CitationOut.all_of(event.citations)} if event.citations else {}
        if not self._finished:
            out += self._chunk({}, event.finish_reason, **cited)
        elif cited:
            out += self._event([], **cited)
        if self._include_usage:
            usage = self._usage_chunk(event)
            out += usage if usage else self._event([], usage=ChatUsage.of(event.usage))
        return out + sse.DONE

    def _passed_on(self, raw: bytes) -> bytes:
        """An upstream chunk as it came, but for our id, created and the client's model."""
        try:
            doc = _SHALLOW.decode(raw)
            choices = doc.get("choices")
            finishes = _FINISHES.decode(choices) if choices is not None else []
        except msgspec.DecodeError:
            return b""
        if any(c.finish_reason is not None for c in finishes):
            self._finished = True
        doc.pop("usage", None)  # the usage chunk at the end says it, if asked
        doc.update(id=self._id, object="chat.completion.chunk", created=self._created)
        doc["model"] = self._model
        return sse.event(_ENCODE(doc))

    def _usage_chunk(self, done: Completed) -> bytes:
        """The upstream's own usage chunk (its details kept), with the pipeline's counts."""
        if not done.raw:
            return b""
        try:
            doc = _OBJECT.decode(done.raw)
        except msgspec.DecodeError:
            return b""
        doc.update(id=self._id, object="chat.completion.chunk", created=self._created)
        doc["model"] = self._model
        doc["choices"] = []
        doc["usage"] = _usage(doc.get("usage"), done.usage)
        return sse.event(_ENCODE(doc))

    def failure(self, exc: RequestFailed) -> bytes:
        return sse.event(failure_reply(exc).body)
