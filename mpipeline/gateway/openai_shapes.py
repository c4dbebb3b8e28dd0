"""The OpenAI routes' answers as msgspec Structs: what is encoded is what is documented.

``POST /v1/chat/completions`` (non-streaming), ``GET /v1/models`` and every
OpenAI-style error are built from these types, and ``openapi.py`` derives
their JSON Schemas from the same types, so the served ``/openapi.json`` can
never drift from the bytes on the wire (the schemathesis test checks every
answer against it). A structured reply from an OpenAI-compatible upstream
(tool calls, refusal, logprobs) is passed on as the upstream sent it, in the
same shape: the optional fields here document what it may hold.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from mpipeline.messages import Citation, Usage


class PromptTokensDetails(msgspec.Struct, frozen=True, kw_only=True):
    # Prompt tokens the model did not evaluate again (the session's KV cache).
    cached_tokens: int = 0


class ChatUsage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, usage: Usage) -> ChatUsage:
        """OpenAI's usage object; reused prompt tokens go where OpenAI reports cache hits."""
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.prompt_tokens + usage.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        )


class ToolCallOut(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str
    # {"name", "arguments"}: the arguments are the model's JSON, as a string.
    function: dict[str, Any]


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: Literal["assistant"]
    # None when the reply is tool calls only.
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    refusal: str | None = None


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str
    # OpenAI's {"content": [...]} when the request asked for logprobs.
    logprobs: dict[str, Any] | None = None


class CitationOut(msgspec.Struct, frozen=True, kw_only=True):
    """A source of rag's context: the file (relative to ``stages.rag.documents``),
    its chunk number and the BM25 score. The native result's ``citations`` and the
    OpenAI extension field of the same name (SDKs keep unknown fields: ``model_extra``)."""

    source: str
    chunk: int
    score: float

    @classmethod
    def all_of(cls, citations: list[Citation]) -> list[CitationOut]:
        return [cls(source=c.source, chunk=c.chunk, score=round(c.score, 4)) for c in citations]


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A non-streaming chat completion (``object: chat.completion``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: ChatUsage
    system_fingerprint: str | None = None
    # An extension: where rag's context came from (absent when rag found none).
    citations: list[CitationOut] = []


class Model(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/models``: the one model this gateway serves."""

    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIError(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI's error shape, which the SDKs parse to pick their exception class."""

    error: OpenAIError
