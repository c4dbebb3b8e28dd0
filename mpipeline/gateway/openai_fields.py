"""Refuse, never drop: the chat fields the configured worker cannot honour.

An OpenAI client that sends ``tools`` to a text model, or ``temperature`` to
echo, must hear so: 400 ``invalid_request_error`` with ``param`` naming the
field and ``code`` ``unsupported_parameter``, as OpenAI answers for a model
that lacks a parameter. With ``stages.inference.drop_params = true`` (as
LiteLLM users know it) such fields are dropped instead, and the request goes
on without them. What each worker honours is ``workers.fields``.

A value that asks for nothing (``null``, an empty list or object, ``logprobs:
false``, ``tool_choice: "auto"``, ``response_format: {"type": "text"}``) is
never refused: SDKs and frameworks send their defaults. Messages that are more
than a role and text (image parts, ``tool_calls``, tool results, a ``name``)
are refused the same way by a worker without ``messages``; dropped, they keep
their text (a tool result becomes a user turn).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from mpipeline.config import InferenceConfig
from mpipeline.gateway.openai_request import ChatMessage, Parsed
from mpipeline.gateway.schemas import Problem
from mpipeline.workers.fields import Capabilities, capabilities

__all__ = ["UNSUPPORTED", "Backend"]

# OpenAI's code for a parameter the model does not support.
UNSUPPORTED = "unsupported_parameter"
# Values that ask for nothing, whatever the field.
_EMPTY = frozenset({b"null", b"[]", b"{}"})
# Values that ask for nothing of one field (as their JSON).
_NO_OP = {
    "logprobs": frozenset({b"false"}),
    "parallel_tool_calls": frozenset({b"false", b"true"}),
    "tool_choice": frozenset({b'"none"', b'"auto"'}),
}
# A message's fields that are its role and text (anything else is structure).
_TEXT_KEYS = frozenset({"role", "content"})


class _Format(msgspec.Struct):
    type: str = ""


_FORMAT = msgspec.json.Decoder(_Format)
_KEYS = msgspec.json.Decoder(dict[str, msgspec.Raw])


@dataclass(frozen=True, slots=True)
class Backend:
    """The configured worker as the OpenAI route sees it: what it honours, and
    whether what it does not is refused or dropped."""

    worker: str
    caps: Capabilities
    drop: bool = False

    @classmethod
    def of(cls, cfg: InferenceConfig) -> Backend:
        return cls(cfg.worker, capabilities(cfg), cfg.drop_params)

    @classmethod
    def for_worker(cls, worker: str, *, drop: bool = False) -> Backend:
        """The backend of a worker with its default settings (tests, tools)."""
        return cls.of(InferenceConfig(worker=worker, drop_params=drop))  # type: ignore[arg-type]

    def admit(self, parsed: Parsed) -> Problem | None:
        """Refuse what this worker cannot honour, or drop it (``drop_params``):
        the refusal naming the first such field, else None (``parsed`` trimmed)."""
        caps = self.caps
        if caps.fields is not None:
            for name, value in list(parsed.extras.items()):
                if caps.honours(name) or _asks_nothing(name, bytes(value)):
                    continue
                if not self.drop:
                    return self._refusal(name)
                del parsed.extras[name]
        if not caps.messages:
            messages = parsed.body.messages
            for i, raw in enumerate(parsed.raws):
                if not raw:
                    continue
                where = _structure(i, messages[i], raw)
                if where is None:
                    continue
                if not self.drop:
                    return self._refusal(where)
                parsed.raws[i] = b""  # the turn keeps its text
        return None

    def _refusal(self, param: str) -> Problem:
        message = (
            f"Unsupported parameter: '{param}' is not supported by this model's backend "
            f"(worker {self.worker}); set drop_params = true (in [stages.inference], or "
            "the model's [[models]] entry) to drop such fields instead"
        )
        return Problem(message, param, code=UNSUPPORTED)


def _asks_nothing(name: str, value: bytes) -> bool:
    if value in _EMPTY or value in _NO_OP.get(name, ()):
        return True
    if name == "response_format":
        try:
            return _FORMAT.decode(value).type == "text"
        except msgspec.DecodeError:
            return False
    return False


def _structure(i: int, msg: ChatMessage, raw: bytes) -> str | None:
    """Where message ``i`` is more than a role and text (a ``param``), or None."""
    if msg.role == "tool":
        return f"messages[{i}].role"
    if isinstance(msg.content, list):
        for j, part in enumerate(msg.content):
            if part.type != "text":
                return f"messages[{i}].content[{j}]"
    for key, value in _KEYS.decode(raw).items():
        if key not in _TEXT_KEYS and bytes(value) not in _EMPTY:
            return f"messages[{i}].{key}"
    return None
