"""An Anthropic Messages request, checked and turned into the pipeline's request.

The conversation maps as the OpenAI route's does: ``system`` (a string or
text blocks) becomes a system turn at the head of the history, the last
message (from the user) the input, the ones before it the history. The
sampling fields travel in ``PromptRequest.params`` under the names every
worker reads there, OpenAI's (``stop_sequences`` as ``stop``): the anthropic
worker translates them back, an OpenAI-compatible upstream takes them as
they are, echo and llama_cpp honour what ``workers.fields`` says they do.
``metadata.user_id`` is the session, so a conversation keeps to one shard.
Tools, tool turns and images travel in OpenAI's shape too
(``anthropic_convert``), as the OpenAI route carries them.

Refuse, never drop: a field the configured worker cannot honour (say
``temperature`` or ``tools`` for echo) is a 400 naming it, unless
``stages.inference.drop_params`` says to drop it; a field of Anthropic's API
this route does not carry (``thinking``, a document block) is a 400 naming
it whatever the worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from mpipeline.gateway import schemas
from mpipeline.gateway.anthropic_convert import refusal, tool_params, turns
from mpipeline.gateway.anthropic_shapes import MessagesBody, SystemBlocks
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai_fields import Backend
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Turn

__all__ = ["Messages", "read"]

_BODY = msgspec.json.Decoder(MessagesBody)
# Anthropic's sampling fields, and their names in ``PromptRequest.params``.
_PARAMS = {
    "stop_sequences": "stop",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
}
_CARRIED = (
    "model, max_tokens, messages (text, image, tool_use and tool_result blocks), system, "
    "stop_sequences, temperature, top_p, top_k, tools, tool_choice, stream and "
    "metadata.user_id"
)
_BLOCK_TYPE = re.compile(r"(system|messages\[\d+\]\.content(\[\d+\]\.content)?)\[\d+\]\.type")


@dataclass(frozen=True, slots=True)
class Messages:
    """A Messages request as the pipeline takes it."""

    model: str
    # The last message's text and the turns before it (the system turn first), and
    # the last's OpenAI JSON when it is more than text (``Turn.raw``).
    text: str
    history: list[Turn]
    max_tokens: int
    input_raw: bytes = b""
    # The sampling and tool fields, as JSON in OpenAI's names; b"" for none.
    params: bytes = b""
    stream: bool = False
    user: str | None = None
    # The model's canonical name (``[[models]]``); "" for the one default model.
    model_key: str = ""


def read(body: bytes, models: Models) -> Messages | Problem:
    """The request in ``body``, checked against the schema, its model (404 when there
    is none of that name) and what the model's worker honours."""
    decoded = schemas.decode(_BODY, body)
    if isinstance(decoded, Problem):
        return _worded(decoded)
    model = models.resolve(decoded.model)
    if isinstance(model, Problem):
        return model
    backend = models.backend(model)
    params: dict[str, Any] = {}
    for field, name in _PARAMS.items():
        value = getattr(decoded, field)
        if value is None or value == []:
            continue  # asks for nothing
        if not backend.caps.honours(name):
            if backend.drop:
                continue
            return refusal(field, backend)
        params[name] = value
    tools = tool_params(decoded, backend)
    if isinstance(tools, Problem):
        return tools
    params.update(tools)
    split = _split(decoded, backend)
    if isinstance(split, Problem):
        return split
    history, last = split
    max_tokens = schemas.whole(decoded.max_tokens)
    assert max_tokens is not None  # required by the schema
    metadata = decoded.metadata
    return Messages(
        model=decoded.model,
        text=last.content,
        history=history,
        max_tokens=max_tokens,
        input_raw=last.raw,
        params=msgspec.json.encode(params) if params else b"",
        stream=decoded.stream,
        user=metadata.user_id if metadata is not None else None,
        model_key=model.key,
    )


def _split(body: MessagesBody, backend: Backend) -> tuple[list[Turn], Turn] | Problem:
    """The turns before the last (the system turn first), and the last."""
    last = len(body.messages) - 1
    if body.messages[last].role != "user":
        # An assistant message last asks the model to continue it (a prefill).
        message = (
            "the last message must be from the user; a prefilled assistant turn is not supported"
        )
        return Problem(message, f"messages[{last}].role")
    conversation: list[Turn] = []
    for i, message_in in enumerate(body.messages):
        got = turns(i, message_in, backend)
        if isinstance(got, Problem):
            return got
        conversation += got
    if not any(t.content.strip() or t.raw for t in conversation):
        return Problem("the messages have no content", "messages")
    system = _system(body.system)
    head = [Turn(role="system", content=system)] if system else []
    return head + conversation[:-1], conversation[-1]


def _system(system: str | SystemBlocks | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "".join(b.text for b in system)


def _worded(problem: Problem) -> Problem:
    """msgspec's refusal of a field this route does not carry, in words a client can act on."""
    field = problem.field or ""
    if problem.message.startswith("Object contains unknown field"):
        message = f"{field} is not supported on /v1/messages; this gateway carries {_CARRIED}"
        return Problem(message, field)
    if problem.message.startswith("Invalid value") and _BLOCK_TYPE.fullmatch(field):
        if field.startswith("system"):
            kinds = "text"
        elif ".content[" in field.split("].content", 1)[1]:
            kinds = "text and image"  # inside a tool_result
        else:
            kinds = "text, image, tool_use and tool_result"
        message = f"only {kinds} content blocks are supported here ({problem.message})"
        return Problem(message, field)
    return problem
