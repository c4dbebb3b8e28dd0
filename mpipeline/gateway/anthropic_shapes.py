"""The Anthropic Messages route's wire shapes: what is decoded and encoded is what is documented.

``POST /v1/messages`` decodes its body into ``MessagesBody`` and answers
with ``AnthropicMessage`` (or SSE events built from the same types), and
every refusal is an ``AnthropicErrorBody``; ``openapi.py`` derives the
JSON Schemas from these types, so ``/openapi.json`` cannot drift from the
wire. The body refuses unknown fields: a field of Anthropic's API the
gateway does not carry (``tools``, ``thinking``, an image block...) is a
400 naming it, never a field accepted and then ignored.

Only text goes through this round: a message's content is a string or
``text`` blocks. ``cache_control`` on a block is accepted: it asks the
backend to cache a prompt prefix, which changes cost, never the answer.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from mpipeline.gateway import schemas
from mpipeline.gateway.openai_request import MAX_MESSAGES, MAX_PARTS

__all__ = [
    "AnthropicError",
    "AnthropicErrorBody",
    "AnthropicMessage",
    "AnthropicUsage",
    "MessageIn",
    "MessagesBody",
    "TextBlock",
]

# Stop sequences per request: enough for any client; the backend judges its own limit.
MAX_STOPS = 16
# llama.cpp and vLLM take top_k; 2^31 - 1 bounds it like every other integer.
MAX_TOP_K = 2**31 - 1
_Unit = Annotated[float, Meta(ge=0, le=1)]


class CacheControl(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A prompt-caching hint: what the backend may cache, never what it answers."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A ``text`` content block, the one kind this route takes."""

    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


Blocks = Annotated[list[TextBlock], Meta(max_length=MAX_PARTS)]


class MessageIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | Blocks


class Metadata(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # The end user, as Anthropic names it: the pipeline's session.
    user_id: schemas.SessionId | None = None


class MessagesBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/messages``. Unknown fields are refused, with their name."""

    model: schemas.Name
    max_tokens: schemas.MaxTokens
    messages: Annotated[list[MessageIn], Meta(min_length=1, max_length=MAX_MESSAGES)]
    system: str | Blocks | None = None
    stop_sequences: (
        Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=MAX_STOPS)] | None
    ) = None
    temperature: _Unit | None = None
    top_p: _Unit | None = None
    top_k: Annotated[int, Meta(ge=0, le=MAX_TOP_K)] | None = None
    stream: bool = False
    metadata: Metadata | None = None


# Answers.


class TextOut(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["text"] = "text"
    text: str


class AnthropicUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Anthropic counts cache reads apart from ``input_tokens`` (their sum is the prompt)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class AnthropicMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A reply (``type: message``); in a stream's ``message_start`` it has no content yet."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextOut]
    stop_reason: str | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicError(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    message: str


class AnthropicErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """Anthropic's error shape; the SDK picks its exception class from the status."""

    type: Literal["error"] = "error"
    error: AnthropicError
