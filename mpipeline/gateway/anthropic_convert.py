"""Anthropic's tools, tool turns and images in OpenAI's terms, as the pipeline carries them.

Every worker reads a request in OpenAI's shape (``PromptRequest.params`` in
OpenAI's names, a structured message as its OpenAI JSON in ``Turn.raw``),
so ``/v1/messages`` says what its client asked in that shape, exactly as
the OpenAI route would have carried the same conversation: an
OpenAI-compatible upstream gets it as it is, and the anthropic worker
translates it back (``workers._anthropic_wire``), so an Anthropic client in
front of an Anthropic upstream loses nothing on the way.

- ``tools`` become function tools (``input_schema`` as ``parameters``);
  ``tool_choice`` auto/any/tool/none becomes auto/required/a named
  function/none, and ``disable_parallel_tool_use`` ``parallel_tool_calls:
  false``.
- An assistant message with ``tool_use`` blocks becomes one with
  ``tool_calls`` (the input as the arguments' JSON text).
- A user message's ``tool_result`` blocks become ``tool`` messages, one per
  result, before the rest of the message (its text and images), since
  OpenAI wants the results right after the calls. A result's text is its
  content; ``is_error`` has no OpenAI counterpart, so the text says it
  (``Error: `` before it) rather than the flag being lost.
- ``image`` blocks become ``image_url`` parts (base64 as a ``data:`` URL).

Refuse, never drop: the chosen model's worker must honour each
(``workers.fields``); else a 400 names the field or block, unless
``drop_params`` says to drop it (a dropped tool turn keeps its text, a tool
result becoming the user's words). An image inside a tool result cannot be
said in OpenAI's shape and is refused whatever the worker.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mpipeline.gateway.anthropic_shapes import (
    AnyChoice,
    AutoChoice,
    Blocks,
    ImageBlock,
    MessageIn,
    MessagesBody,
    NamedChoice,
    TextBlock,
    ToolIn,
    ToolResultBlock,
    ToolUseBlock,
    UrlSource,
)
from mpipeline.gateway.openai_fields import Backend
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Turn

__all__ = ["refusal", "tool_params", "turns"]

_ENCODE = msgspec.json.Encoder().encode
# The block types each role may send.
_ALLOWED = {
    "user": (TextBlock, ImageBlock, ToolResultBlock),
    "assistant": (TextBlock, ToolUseBlock),
}


def refusal(field: str, backend: Backend) -> Problem:
    """What the chosen model's worker cannot honour, named (``drop_params`` drops it)."""
    message = (
        f"{field} is not supported by this model's backend (worker {backend.worker}); "
        "set drop_params = true (in [stages.inference], or the model's [[models]] entry) "
        "to drop such fields instead"
    )
    return Problem(message, field, code="unsupported_parameter")


def tool_params(body: MessagesBody, backend: Backend) -> dict[str, Any] | Problem:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` in OpenAI's shape ({} for none)."""
    choice = body.tool_choice
    if not body.tools:
        if isinstance(choice, AnyChoice | NamedChoice):
            return Problem("it asks for a tool call, but the request has no tools", "tool_choice")
        return {}
    caps = backend.caps
    if not caps.honours("tools"):
        return {} if backend.drop else refusal("tools", backend)
    out: dict[str, Any] = {"tools": [_function(tool) for tool in body.tools]}
    if choice is None:
        return out
    if isinstance(choice, NamedChoice):
        if all(tool.name != choice.name for tool in body.tools):
            return Problem(f"no tool is named {choice.name!r}", "tool_choice.name")
        named = {"type": "function", "function": {"name": choice.name}}
        out["tool_choice"] = named
    elif isinstance(choice, AnyChoice):
        out["tool_choice"] = "required"
    else:
        out["tool_choice"] = "auto" if isinstance(choice, AutoChoice) else "none"
    if out["tool_choice"] not in ("auto", "none") and not caps.honours("tool_choice"):
        if not backend.drop:
            return refusal("tool_choice", backend)
        del out["tool_choice"]
    if not isinstance(choice, AutoChoice | AnyChoice | NamedChoice):
        return out
    if choice.disable_parallel_tool_use:
        if caps.honours("parallel_tool_calls"):
            out["parallel_tool_calls"] = False
        elif not backend.drop:
            return refusal("tool_choice.disable_parallel_tool_use", backend)
    return out


def _function(tool: ToolIn) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        fn["description"] = tool.description
    fn["parameters"] = tool.input_schema
    if tool.strict is not None:
        fn["strict"] = tool.strict
    return {"type": "function", "function": fn}


def turns(i: int, message: MessageIn, backend: Backend) -> list[Turn] | Problem:
    """Message ``i`` as the pipeline's turns: one for text, more for tool results."""
    content = message.content
    if isinstance(content, str):
        return [Turn(role=message.role, content=content)]
    allowed = _ALLOWED[message.role]
    for j, block in enumerate(content):
        if not isinstance(block, allowed):
            kind = type(block).__name__
            what = f"{_TYPES.get(kind, kind)} blocks cannot be in the {message.role}'s messages"
            return Problem(what, f"messages[{i}].content[{j}].type")
    structured = next((j for j, b in enumerate(content) if not _plain(b)), None)
    if structured is None:
        return [Turn(role=message.role, content=_texts(content))]
    if not backend.caps.messages:
        if not backend.drop:
            return refusal(f"messages[{i}].content[{structured}]", backend)
        return [Turn(role=message.role, content=_words(content))]
    if message.role == "assistant":
        return [_assistant(content)]
    return _user(i, content)


_TYPES = {
    "TextBlock": "text",
    "ImageBlock": "image",
    "ToolUseBlock": "tool_use",
    "ToolResultBlock": "tool_result",
}


def _plain(block: object) -> bool:
    return isinstance(block, TextBlock)


def _texts(blocks: Blocks) -> str:
    return "".join(b.text for b in blocks if isinstance(b, TextBlock))


def _words(blocks: Blocks) -> str:
    """The text a worker without structured messages keeps (``drop_params``)."""
    texts = []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            result = _result_text(block)
            if isinstance(result, str):
                texts.append(result)
    return "".join(texts)


def _assistant(blocks: Blocks) -> Turn:
    text = _texts(blocks)
    calls = [
        {
            "id": b.id,
            "type": "function",
            "function": {"name": b.name, "arguments": _ENCODE(b.input).decode()},
        }
        for b in blocks
        if isinstance(b, ToolUseBlock)
    ]
    raw = {"role": "assistant", "content": text or None, "tool_calls": calls}
    return Turn(role="assistant", content=text, raw=_ENCODE(raw))


def _user(i: int, blocks: Blocks) -> list[Turn] | Problem:
    out: list[Turn] = []
    parts: list[dict[str, Any]] = []
    images = False
    for j, block in enumerate(blocks):
        if isinstance(block, ToolResultBlock):
            text = _result_text(block)
            if isinstance(text, int):
                where = f"messages[{i}].content[{j}].content[{text}]"
                return Problem("a tool_result carries text only here (no images)", where)
            result = {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}
            out.append(Turn(role="user", content=text, raw=_ENCODE(result)))
        elif isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            images = True
            parts.append({"type": "image_url", "image_url": {"url": _url(block)}})
    if parts:
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        said = _ENCODE({"role": "user", "content": parts}) if images else b""
        out.append(Turn(role="user", content=text, raw=said))
    return out


def _result_text(block: ToolResultBlock) -> str | int:
    """A tool result's text, or the index of an image in it (which cannot be carried)."""
    content = block.content
    if isinstance(content, str):
        text = content
    else:
        for k, part in enumerate(content):
            if isinstance(part, ImageBlock):
                return k
        text = "".join(p.text for p in content if isinstance(p, TextBlock))
    return f"Error: {text}" if block.is_error else text


def _url(block: ImageBlock) -> str:
    source = block.source
    if isinstance(source, UrlSource):
        return source.url
    return f"data:{source.media_type};base64,{source.data}"
