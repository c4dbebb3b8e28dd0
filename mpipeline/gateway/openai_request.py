"""A chat-completion request: checked, split for the pipeline, and the rest kept as it came.

``ChatBody`` names the fields the gateway checks (types and bounds, from
``limits``), and is what ``/openapi.json`` documents. It is not a whitelist:
every field of the body but ``model``, ``messages`` and ``stream`` reaches an
OpenAI-compatible upstream byte for byte, unknown ones included
(``PromptRequest.params``, JSON spliced in, never re-encoded), and so does a
message that is more than a role and text (``Turn.raw``: image parts, an
assistant's ``tool_calls``, a tool result, a ``name``). What the configured
worker cannot honour is refused or dropped by ``openai_fields`` first.

Why two decodes. Most requests are plain: ``model``, text messages, maybe
``max_tokens`` and ``stream``. One strict decode (unknown fields refused)
tells them apart at the cost of the single decode they always had, and they
carry nothing extra. Any other body is decoded again, leniently and typed
(every check, errors with their path), plus once as a map of raw JSON values
that become ``params``: a few microseconds, only for requests that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mpipeline.gateway import schemas
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Turn
from mpipeline.pipeline import limits

__all__ = ["MAX_MESSAGES", "Chat", "ChatBody", "ChatMessage", "ContentPart", "parse"]

# OpenAI's own limits: four stop sequences, 128 tools, 20 top logprobs.
MAX_STOPS = 4
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
# The history's bound and the input message.
MAX_MESSAGES = limits.MAX_HISTORY + 1
# Per message: content parts and tool calls; per request: biased tokens.
MAX_PARTS = 1024
MAX_TOOL_CALLS = 128
MAX_LOGIT_BIAS = 1024
# A token id as logit_bias keys it (a decimal string).
_TokenId = Annotated[str, Meta(max_length=32)]
_Penalty = Annotated[float, Meta(ge=-2, le=2)]


class ImageUrl(msgspec.Struct, frozen=True, kw_only=True):
    url: Annotated[str, Meta(min_length=1)]
    detail: schemas.Name | None = None


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    """A part of a message's content: ``text``, ``image_url``, or any other type."""

    type: schemas.Name
    text: str | None = None
    image_url: ImageUrl | None = None


class FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    name: schemas.Name
    arguments: str


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    id: schemas.Name
    type: schemas.Name = "function"
    function: FunctionCall | None = None


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Meta(max_length=MAX_PARTS)] | None = None
    name: schemas.Name | None = None
    tool_calls: Annotated[list[ToolCall], Meta(max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: schemas.Name | None = None
    refusal: str | None = None


class FunctionDef(msgspec.Struct, frozen=True, kw_only=True):
    name: schemas.Name
    description: str | None = None
    # A JSON Schema: the upstream judges it.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    type: schemas.Name
    function: FunctionDef | None = None


class FunctionName(msgspec.Struct, frozen=True, kw_only=True):
    name: schemas.Name


class NamedToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: schemas.Name
    function: FunctionName | None = None


class JsonSchemaFormat(msgspec.Struct, frozen=True, kw_only=True):
    name: schemas.Name
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    """``text``, ``json_object`` or ``json_schema`` (with its schema)."""

    type: schemas.Name
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


class ChatBody(msgspec.Struct, frozen=True, kw_only=True):
    """The request. Every field reaches an OpenAI-compatible upstream as it came,
    fields not named here too; those named are checked first."""

    model: schemas.Name
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: schemas.MaxTokens | None = None
    max_completion_tokens: schemas.MaxTokens | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    # One choice per request: the pipeline carries one reply.
    n: schemas.One | None = None
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    logit_bias: (
        Annotated[
            dict[_TokenId, Annotated[float, Meta(ge=-100, le=100)]],
            Meta(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: schemas.SessionId | None = None
    metadata: schemas.Metadata | None = None


class _PlainMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


class _PlainBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A plain request: nothing in it but what the pipeline carries itself."""

    model: schemas.Name
    messages: Annotated[list[_PlainMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: schemas.MaxTokens | None = None
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Chat:
    """A chat-completion request as the pipeline takes it."""

    model: str
    # The last message's text, the turns before it, and its own JSON if it is more.
    text: str
    history: list[Turn]
    input_raw: bytes = b""
    # Every other field, raw (``PromptRequest.params``); b"" for a plain request.
    params: bytes = b""
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    # The canonical name of the model ``model`` resolved to (``PromptRequest.model``).
    model_key: str = ""


@dataclass(slots=True)
class Parsed:
    """A checked body before the worker's rules (``openai_fields``) are applied."""

    body: ChatBody
    # The fields beyond model, messages and stream, as raw JSON values.
    extras: dict[str, msgspec.Raw]
    # Each message's own JSON, where it is more than a role and text.
    raws: list[bytes]


_PLAIN = msgspec.json.Decoder(_PlainBody)
_BODY = msgspec.json.Decoder(ChatBody)
_ENVELOPE = msgspec.json.Decoder(dict[str, msgspec.Raw])
_PLAIN_MESSAGES = msgspec.json.Decoder(list[_PlainMessage])
_PLAIN_ONE = msgspec.json.Decoder(_PlainMessage)
_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])
# What the pipeline says itself in every upstream request.
_OWN = frozenset({"model", "messages", "stream"})
# Chat roles as the pipeline's turns: a developer message is OpenAI's newer
# name for a system message; a tool result is input the model must read.
_ROLES = {"system": "system", "developer": "system", "user": "user", "tool": "user"}


def plain(body: bytes) -> Chat | None:
    """The request if it is plain (the usual case, one decode), else None."""
    try:
        decoded = _PLAIN.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    turns = [Turn(role=m.role, content=m.content) for m in decoded.messages]
    if turns[-1].role != "user" or not any(t.content.strip() for t in turns):
        return None  # refused below, with the words for it
    return Chat(
        model=decoded.model,
        text=turns[-1].content,
        history=turns[:-1],
        stream=decoded.stream,
        max_tokens=schemas.whole(decoded.max_tokens),
    )


def parse(body: bytes) -> Parsed | Problem:
    """Check a body that is not plain; keep its extra fields and messages raw."""
    checked = schemas.decode(_BODY, body)
    if isinstance(checked, Problem):
        return checked
    try:
        envelope = _ENVELOPE.decode(body)
        raws = _message_raws(envelope["messages"])
    except (msgspec.DecodeError, RecursionError):  # the typed decode took it: never seen
        return Problem("invalid JSON: nested too deeply")
    extras = {k: v for k, v in envelope.items() if k not in _OWN}
    return Parsed(checked, extras, raws)


def _message_raws(messages: msgspec.Raw) -> list[bytes]:
    """Each message's JSON where it is more than a role and text (b"" where it is not)."""
    try:
        return [b""] * len(_PLAIN_MESSAGES.decode(messages))
    except msgspec.ValidationError:
        pass
    raws = []
    for raw in _RAW_LIST.decode(messages):
        try:
            _PLAIN_ONE.decode(raw)
            raws.append(b"")
        except msgspec.ValidationError:
            raws.append(bytes(raw))
    return raws


def chat(parsed: Parsed) -> Chat | Problem:
    """The pipeline's request from a checked body (once ``openai_fields`` has had its say)."""
    body = parsed.body
    split = split_messages(body.messages, parsed.raws)
    if isinstance(split, Problem):
        return split
    history, last = split
    extras = parsed.extras
    options = body.stream_options
    return Chat(
        model=body.model,
        text=last.content,
        history=history,
        input_raw=last.raw,
        params=msgspec.json.encode(extras) if extras else b"",
        stream=body.stream,
        include_usage=options is not None and options.include_usage,
        max_tokens=schemas.whole(body.max_completion_tokens or body.max_tokens),
        user=body.user,
        metadata=body.metadata,
    )


def split_messages(
    messages: Sequence[ChatMessage], raws: Sequence[bytes] = ()
) -> tuple[list[Turn], Turn] | Problem:
    """The turns before the last message, and the last (from the user, or a tool).

    A turn's text is its content's text parts, joined; ``raws[i]`` (if any) is
    the message's own JSON, kept on its turn for an OpenAI-compatible upstream.
    """
    turns = []
    for i, msg in enumerate(messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type == "text":
                    if part.text is None:
                        return Problem("a text part needs its text", f"messages[{i}].content[{j}]")
                    texts.append(part.text)
                elif part.type == "image_url" and part.image_url is None:
                    where = f"messages[{i}].content[{j}]"
                    return Problem("an image_url part needs its image_url", where)
            content = "".join(texts)
        raw = raws[i] if i < len(raws) else b""
        turns.append(Turn(role=_ROLES.get(msg.role, "assistant"), content=content or "", raw=raw))
    if turns[-1].role != "user":
        where = f"messages[{len(turns) - 1}].role"
        return Problem("the last message must be from the user (or a tool)", where)
    if not any(t.content.strip() or t.raw for t in turns):
        return Problem("the messages have no content", "messages")
    return turns[:-1], turns[-1]
