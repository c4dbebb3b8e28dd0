"""The Anthropic Messages route's wire shapes: what is decoded and encoded is what is documented.

``POST /v1/messages`` decodes its body into ``MessagesBody`` and answers
with ``AnthropicMessage`` (or SSE events built from the same types), and
every refusal is an ``AnthropicErrorBody``; ``openapi.py`` derives the
JSON Schemas from these types, so ``/openapi.json`` cannot drift from the
wire. The body refuses unknown fields: a field of Anthropic's API the
gateway does not carry (``thinking``, a ``document`` block...) is a 400
naming it, never a field accepted and then ignored.

A message's content is a string or blocks: ``text``, ``image`` (base64 or
a URL), ``tool_use`` (an assistant's) and ``tool_result`` (the user's);
``tools`` are custom tools (name, description, ``input_schema``) and
``tool_choice`` is auto, any, tool or none. Blocks are tagged by ``type``,
so an unknown type is refused by name. ``cache_control`` on a block or a
tool is accepted: it asks the backend to cache a prompt prefix, which
changes cost, never the answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mpipeline.gateway import schemas
from mpipeline.gateway.openai_request import MAX_MESSAGES, MAX_PARTS, MAX_TOOLS

__all__ = [
    "AnthropicError",
    "AnthropicErrorBody",
    "AnthropicMessage",
    "AnthropicUsage",
    "Block",
    "ImageBlock",
    "MessageIn",
    "MessagesBody",
    "TextBlock",
    "TextOut",
    "ToolChoice",
    "ToolIn",
    "ToolResultBlock",
    "ToolUseBlock",
    "ToolUseOut",
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


class _Block(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    """A content block, tagged by its ``type``."""

    cache_control: CacheControl | None = None


class TextBlock(_Block, frozen=True, kw_only=True, tag="text"):
    text: str


class Base64Source(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="base64"):
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: Annotated[str, Meta(min_length=1)]


class UrlSource(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="url"):
    url: Annotated[str, Meta(min_length=1)]


class ImageBlock(_Block, frozen=True, kw_only=True, tag="image"):
    source: Base64Source | UrlSource


class ToolUseBlock(_Block, frozen=True, kw_only=True, tag="tool_use"):
    """A tool call the assistant made (in a conversation sent back)."""

    id: schemas.Name
    name: schemas.Name
    input: dict[str, Any]


class ToolResultBlock(_Block, frozen=True, kw_only=True, tag="tool_result"):
    """What a tool answered, for the call ``tool_use_id``."""

    tool_use_id: schemas.Name
    content: str | Annotated[list[TextBlock | ImageBlock], Meta(max_length=MAX_PARTS)] = ""
    is_error: bool = False


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock
Blocks = Annotated[list[Block], Meta(max_length=MAX_PARTS)]
SystemBlocks = Annotated[list[TextBlock], Meta(max_length=MAX_PARTS)]


class MessageIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | Blocks


class Metadata(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # The end user, as Anthropic names it: the pipeline's session.
    user_id: schemas.SessionId | None = None


class ToolIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A custom tool: the model calls it with input that matches ``input_schema``."""

    name: schemas.Name
    description: str | None = None
    # A JSON Schema: the backend judges it.
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: CacheControl | None = None


class _Choice(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    disable_parallel_tool_use: bool | None = None


class AutoChoice(_Choice, frozen=True, kw_only=True, tag="auto"):
    pass


class AnyChoice(_Choice, frozen=True, kw_only=True, tag="any"):
    pass


class NamedChoice(_Choice, frozen=True, kw_only=True, tag="tool"):
    name: schemas.Name


class NoneChoice(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="none"
):
    pass


ToolChoice = AutoChoice | AnyChoice | NamedChoice | NoneChoice


class MessagesBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/messages``. Unknown fields are refused, with their name."""

    model: schemas.Name
    max_tokens: schemas.MaxTokens
    messages: Annotated[list[MessageIn], Meta(min_length=1, max_length=MAX_MESSAGES)]
    system: str | SystemBlocks | None = None
    stop_sequences: (
        Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=MAX_STOPS)] | None
    ) = None
    temperature: _Unit | None = None
    top_p: _Unit | None = None
    top_k: Annotated[int, Meta(ge=0, le=MAX_TOP_K)] | None = None
    stream: bool = False
    metadata: Metadata | None = None
    tools: Annotated[list[ToolIn], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None


# Answers.


class TextOut(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="text"):
    text: str


class ToolUseOut(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="tool_use"):
    """A tool call of the reply; ``input`` is the call's arguments, parsed."""

    id: str
    name: str
    input: Any


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
    content: list[TextOut | ToolUseOut]
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
