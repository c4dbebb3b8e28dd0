"""An Anthropic Messages request, checked and turned into the pipeline's request.

The conversation maps as the OpenAI route's does: ``system`` (a string or
text blocks) becomes a system turn at the head of the history, the last
message (from the user) the input, the ones before it the history. The
sampling fields travel in ``PromptRequest.params`` under the names every
worker reads there, OpenAI's (``stop_sequences`` as ``stop``): the anthropic
worker translates them back, an OpenAI-compatible upstream takes them as
they are, echo and llama_cpp honour what ``workers.fields`` says they do.
``metadata.user_id`` is the session, so a conversation keeps to one shard.

Refuse, never drop: a field the configured worker cannot honour (say
``temperature`` for echo) is a 400 naming it, unless
``stages.inference.drop_params`` says to drop it; a field of Anthropic's API
this route does not carry (``tools``, ``thinking``, an image block) is a 400
naming it whatever the worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from mpipeline.gateway import schemas
from mpipeline.gateway.anthropic_shapes import Blocks, MessagesBody
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
    "model, max_tokens, messages (text), system, stop_sequences, temperature, top_p, "
    "top_k, stream and metadata.user_id"
)
_BLOCK_TYPE = re.compile(r"(system|messages\[\d+\]\.content)\[\d+\]\.type")


@dataclass(frozen=True, slots=True)
class Messages:
    """A Messages request as the pipeline takes it."""

    model: str
    # The last message's text and the turns before it (the system turn first).
    text: str
    history: list[Turn]
    max_tokens: int
    # The sampling fields, as JSON in OpenAI's names; b"" for none.
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
            return _refusal(field, backend)
        params[name] = value
    split = _split(decoded)
    if isinstance(split, Problem):
        return split
    history, text = split
    max_tokens = schemas.whole(decoded.max_tokens)
    assert max_tokens is not None  # required by the schema
    metadata = decoded.metadata
    return Messages(
        model=decoded.model,
        text=text,
        history=history,
        max_tokens=max_tokens,
        params=msgspec.json.encode(params) if params else b"",
        stream=decoded.stream,
        user=metadata.user_id if metadata is not None else None,
        model_key=model.key,
    )


def _text(content: str | Blocks) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def _split(body: MessagesBody) -> tuple[list[Turn], str] | Problem:
    """The turns before the last message (the system turn first), and the last's text."""
    turns = [Turn(role=m.role, content=_text(m.content)) for m in body.messages]
    last = len(turns) - 1
    if turns[last].role != "user":
        # An assistant message last asks the model to continue it (a prefill).
        message = (
            "the last message must be from the user; a prefilled assistant turn is not supported"
        )
        return Problem(message, f"messages[{last}].role")
    if not any(t.content.strip() for t in turns):
        return Problem("the messages have no content", "messages")
    system = _text(body.system) if body.system is not None else ""
    head = [Turn(role="system", content=system)] if system else []
    return head + turns[:last], turns[last].content


def _worded(problem: Problem) -> Problem:
    """msgspec's refusal of a field this route does not carry, in words a client can act on."""
    field = problem.field or ""
    if problem.message.startswith("Object contains unknown field"):
        message = f"{field} is not supported on /v1/messages; this gateway carries {_CARRIED}"
        return Problem(message, field)
    if problem.message.startswith("Invalid enum value") and _BLOCK_TYPE.fullmatch(field):
        message = f"only text content blocks are supported on /v1/messages ({problem.message})"
        return Problem(message, field)
    return problem


def _refusal(field: str, backend: Backend) -> Problem:
    message = (
        f"{field} is not supported by this model's backend (worker {backend.worker}); "
        "set drop_params = true (in [stages.inference], or the model's [[models]] entry) "
        "to drop such fields instead"
    )
    return Problem(message, field, code="unsupported_parameter")
