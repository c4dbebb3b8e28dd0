"""An OpenAI chat request in Anthropic's Messages API terms (the reply: ``_anthropic_reply``).

The OpenAI route admits tools, tool turns, images and ``response_format`` for
the anthropic worker (``fields.ANTHROPIC``), so each must arrive as Anthropic
says it, or the model answers a different question than the client asked:

- ``tools`` (function tools) become Anthropic tools with ``input_schema``;
  ``tool_choice`` auto/none/required/a named function becomes
  auto/none/any/tool, and ``parallel_tool_calls: false`` its
  ``disable_parallel_tool_use``.
- An assistant's ``tool_calls`` become ``tool_use`` blocks (arguments parsed
  into ``input``); ``tool`` messages become ``tool_result`` blocks of one user
  turn (consecutive ones merged, since turns must alternate); image parts become
  image blocks (a ``data:`` URL as base64, an http(s) URL as a url source).
- ``response_format`` json_schema becomes a tool the model is made to call
  (``tool_choice`` of that tool), whose input is the JSON document; it comes back
  as the message's text, as Anthropic's users do it. json_object is the same with
  a schema that takes any object. With tools of the client's beside it, the
  model must call one of the tools or answer in the format (``any``).

What OpenAI has and Anthropic does not is refused before it gets here; what
cannot be translated as sent (a tool type other than function, arguments that
are not a JSON object, an image URL of another scheme) is the request's error,
``invalid_request``. ``strict: true`` on a function (or a json_schema) is
Anthropic's strict tool use, sent as it is; a message's ``name`` has no
Anthropic counterpart and is not sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from mpipeline.messages import Assembled, Turn
from mpipeline.workers._failures import invalid_request
from mpipeline.workers._params import ResponseFormat, response_format

__all__ = ["JSON_OBJECT_TOOL", "NO_PLAN", "Plan", "conversation", "plan"]

# The JSON answer's tool for json_object (the name the Vercel AI SDK gives it too).
JSON_OBJECT_TOOL = "json"
_ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


# The request: what of an OpenAI request's params and messages is read here.


class _Function(msgspec.Struct, frozen=True):
    name: str
    description: str | None = None
    parameters: msgspec.Raw = msgspec.Raw()
    strict: bool | None = None


class _Tool(msgspec.Struct, frozen=True):
    type: str = "function"
    function: _Function | None = None


class _Name(msgspec.Struct, frozen=True):
    name: str


class _NamedChoice(msgspec.Struct, frozen=True):
    type: str = "function"
    function: _Name | None = None


class _ToolFields(msgspec.Struct, frozen=True):
    tools: list[_Tool] | None = None
    tool_choice: str | _NamedChoice | None = None
    parallel_tool_calls: bool | None = None


class _ImageUrl(msgspec.Struct, frozen=True):
    url: str


class _Part(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None
    image_url: _ImageUrl | None = None


class _CallFunction(msgspec.Struct, frozen=True):
    name: str
    arguments: str = ""


class _Call(msgspec.Struct, frozen=True):
    id: str
    type: str = "function"
    function: _CallFunction | None = None


class _Message(msgspec.Struct, frozen=True):
    role: str = "user"
    content: str | list[_Part] | None = None
    tool_calls: list[_Call] | None = None
    tool_call_id: str | None = None


_TOOL_FIELDS = msgspec.json.Decoder(_ToolFields)
_MESSAGE = msgspec.json.Decoder(_Message)
_KEYS = (b'"tools"', b'"tool_choice"', b'"response_format"')


@dataclass(frozen=True, slots=True)
class Plan:
    """The request's tools in Anthropic's shape, and the JSON answer's tool, if any."""

    tools: list[dict[str, Any]]
    tool_choice: dict[str, Any] | None = None
    json_tool: str | None = None


NO_PLAN = Plan([])


def plan(params: bytes) -> Plan:
    """The tools, ``tool_choice`` and JSON answer an OpenAI request's ``params`` ask for.

    :raises UpstreamFailure: ``invalid_request`` for what cannot be translated
    """
    if not params or not any(key in params for key in _KEYS):
        return NO_PLAN
    try:
        fields = _TOOL_FIELDS.decode(params)
    except msgspec.DecodeError as exc:
        raise invalid_request(f"params: {exc}") from None
    tools = [_tool(i, tool) for i, tool in enumerate(fields.tools or ())]
    fmt = response_format(params)
    json_tool = None
    if fmt is not None:
        answer = _answer_tool(fmt)
        json_tool = answer["name"]
        if any(tool["name"] == json_tool for tool in tools):
            raise invalid_request(
                f"response_format: the JSON answer's name {json_tool!r} is also a tool's name"
            )
        tools.append(answer)
    choice = fields.tool_choice
    if not tools:
        if choice == "required" or isinstance(choice, _NamedChoice):
            raise invalid_request("tool_choice: it names a tool, but the request has no tools")
        return NO_PLAN
    anthropic = _choice(choice, json_tool, own_tools=bool(fields.tools))
    if fields.parallel_tool_calls is False and (anthropic or {}).get("type") != "none":
        anthropic = {**(anthropic or {"type": "auto"}), "disable_parallel_tool_use": True}
    return Plan(tools, anthropic, json_tool)


def _tool(i: int, tool: _Tool) -> dict[str, Any]:
    if tool.type != "function" or tool.function is None:
        raise invalid_request(
            f"tools[{i}].type: {tool.type!r} tools cannot be sent to Anthropic (function only)"
        )
    fn = tool.function
    out: dict[str, Any] = {"name": fn.name}
    if fn.description is not None:
        out["description"] = fn.description
    out["input_schema"] = fn.parameters if _given(fn.parameters) else _NO_ARGUMENTS
    if fn.strict:
        out["strict"] = True
    return out


def _answer_tool(fmt: ResponseFormat) -> dict[str, Any]:
    """The tool whose input is the JSON answer."""
    schema = fmt.json_schema
    if fmt.type == "json_schema" and schema is not None:
        out: dict[str, Any] = {"name": schema.name}
        out["description"] = schema.description or "Answer with JSON that matches this schema."
        out["input_schema"] = schema.schema if _given(schema.schema) else _ANY_OBJECT
        if schema.strict:
            out["strict"] = True
        return out
    return {
        "name": JSON_OBJECT_TOOL,
        "description": "Answer with a JSON object.",
        "input_schema": _ANY_OBJECT,
    }


def _given(raw: msgspec.Raw) -> bool:
    return bool(raw) and bytes(raw) != b"null"


def _choice(
    choice: str | _NamedChoice | None, json_tool: str | None, *, own_tools: bool
) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` as Anthropic's (None: not sent, Anthropic's auto)."""
    if isinstance(choice, _NamedChoice):
        if choice.function is None:
            raise invalid_request("tool_choice: a named tool choice needs its function")
        return {"type": "tool", "name": choice.function.name}
    if json_tool is not None:
        # The answer must be JSON: the model calls the client's tool or answers so.
        if own_tools and choice != "none":
            return {"type": "any"}
        return {"type": "tool", "name": json_tool}
    if choice is None:
        return None
    return {"type": {"required": "any"}.get(choice, choice)}


def conversation(job: Assembled) -> tuple[str, list[dict[str, Any]]]:
    """Split ``job.messages`` into the ``system`` field and alternating turns.

    System turns are joined by blank lines. Other turns are user or assistant
    (an unknown role, a tool result, is the user's); consecutive turns of one role
    are merged, since the API rejects two in a row (texts joined by a blank line,
    blocks one after another), and assistant turns before the first user turn are
    dropped, since the conversation must open with the user. A turn with its
    OpenAI JSON (``Turn.raw``) becomes content blocks. With no user turn at all,
    the request's input is the one user turn.

    :raises UpstreamFailure: ``invalid_request`` for a message that cannot be translated
    """
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for turn in job.messages:
        if turn.role == "system":
            system.append(turn.content)
            continue
        role = "assistant" if turn.role == "assistant" else "user"
        if not messages and role == "assistant":
            continue
        _append(messages, role, _content(turn))
    if not messages:
        request = job.request
        question = Turn(role="user", content=request.input, raw=request.input_raw)
        messages.append({"role": "user", "content": _content(question)})
    return "\n\n".join(system), messages


def _append(messages: list[dict[str, Any]], role: str, content: str | list[Any]) -> None:
    if not messages or messages[-1]["role"] != role:
        messages.append({"role": role, "content": content})
        return
    last = messages[-1]
    before = last["content"]
    if isinstance(before, str) and isinstance(content, str):
        last["content"] = before + "\n\n" + content
    else:
        last["content"] = _blocks(before) + _blocks(content)


def _blocks(content: str | list[Any]) -> list[Any]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def _content(turn: Turn) -> str | list[Any]:
    """A turn's content: its text, or blocks when its OpenAI JSON says more."""
    if not turn.raw:
        return turn.content
    try:
        msg = _MESSAGE.decode(turn.raw)
    except msgspec.DecodeError as exc:
        raise invalid_request(f"messages: {exc}") from None
    if msg.role == "tool":
        if msg.tool_call_id is None:
            raise invalid_request("messages: a tool message needs its tool_call_id")
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": msg.tool_call_id}
        if turn.content:
            result["content"] = turn.content
        return [result]
    if isinstance(msg.content, str | None) and not msg.tool_calls:
        return turn.content  # its JSON only had a name, or a developer role: the text
    blocks: list[Any] = []
    if isinstance(msg.content, list):
        for part in msg.content:
            if part.type == "text":
                if part.text:
                    blocks.append({"type": "text", "text": part.text})
            elif part.type == "image_url" and part.image_url is not None:
                blocks.append(_image(part.image_url.url))
            else:
                raise invalid_request(
                    f"messages: {part.type!r} content parts cannot be sent to Anthropic"
                )
    elif msg.content:
        blocks.append({"type": "text", "text": msg.content})
    blocks.extend(_tool_use(call) for call in msg.tool_calls or ())
    return blocks or turn.content


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        head, comma, data = url[5:].partition(",")
        media, _, encoding = head.partition(";")
        if not comma or not media or encoding != "base64":
            raise invalid_request("messages: an image data URL must be data:<type>;base64,<data>")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise invalid_request("messages: an image URL must be https://, http:// or a data: URL")


def _tool_use(call: _Call) -> dict[str, Any]:
    fn = call.function
    if call.type != "function" or fn is None:
        raise invalid_request(f"messages: tool call {call.id!r} is not a function call")
    try:
        arguments = msgspec.json.decode(fn.arguments or "{}")
    except msgspec.DecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise invalid_request(f"messages: tool call {call.id!r}: arguments must be a JSON object")
    return {"type": "tool_use", "id": call.id, "name": fn.name, "input": arguments}
