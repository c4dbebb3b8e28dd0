"""Which chat-completion fields each worker honours, passes on, or translates.

The OpenAI route asks this before a request enters the pipeline: a field the
configured worker cannot honour is refused with 400 naming it, or dropped
when ``stages.inference.drop_params`` says so. Nothing is accepted and then
ignored: ``temperature`` sent to echo was once validated and thrown away, and
a tool conversation sent to a text model became plain turns.

Kept with the workers, as plain data, because it is a fact about them (what
each ``_body`` sends, what ``_params.Sampling`` reads); the gateway only
applies it. The README's table of fields and backends is this module in words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mpipeline.config import InferenceConfig

__all__ = ["ANTHROPIC", "ECHO", "LLAMA_CPP", "OPENAI", "PIPELINE", "Capabilities", "capabilities"]

# What the pipeline honours itself, whatever the worker: the reply's length, one
# choice, the stream's usage chunk, the session (``user``) and labels (``metadata``).
PIPELINE = frozenset(
    {"max_tokens", "max_completion_tokens", "n", "stream_options", "user", "metadata"}
)
# Sampling a local model can do (llama-cpp-python's sampler and seed).
_LOCAL_SAMPLING = frozenset(
    {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"}
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one worker (or every member of a pool) honours.

    ``fields``: the request fields, or None for every one, unknown ones too,
    passed on as they came. ``messages``: whether messages that are more than a
    role and text (image parts, ``tool_calls``, tool results, ``name``) are.
    ``translated``: fields sent under the backend's own name or shape (what
    they become, in words: the README's table quotes them).
    """

    fields: frozenset[str] | None
    messages: bool
    translated: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def honours(self, name: str) -> bool:
        return self.fields is None or name in self.fields

    def __and__(self, other: Capabilities) -> Capabilities:
        """What two pool members both honour."""
        if self.fields is None:
            fields = other.fields
        elif other.fields is None:
            fields = self.fields
        else:
            fields = self.fields & other.fields
        translated = MappingProxyType({**self.translated, **other.translated})
        return Capabilities(fields, self.messages and other.messages, translated)


# Any OpenAI-compatible server: the request goes upstream as the client sent it.
OPENAI = Capabilities(None, True)
# Echo cuts its echo at a stop sequence; it has no sampling to set.
ECHO = Capabilities(PIPELINE | {"stop"}, False)
# A JSON response_format constrains the local sampler with a grammar.
LLAMA_CPP = Capabilities(
    PIPELINE | {"stop", "response_format"} | _LOCAL_SAMPLING,
    False,
    MappingProxyType({"response_format": "a JSON grammar"}),
)
# The Messages API has tools, tool turns and images in its own shape, and JSON
# output as a forced tool (``_anthropic_wire``); no seed, penalties or logprobs.
ANTHROPIC = Capabilities(
    PIPELINE
    | {"stop", "temperature", "top_p", "top_k", "tools", "tool_choice", "parallel_tool_calls"}
    | {"response_format"},
    True,
    MappingProxyType(
        {
            "stop": "stop_sequences",
            "max_completion_tokens": "max_tokens",
            "tools": "tools with input_schema",
            "tool_choice": "tool_choice auto/none/any/tool",
            "parallel_tool_calls": "disable_parallel_tool_use",
            "response_format": "a forced tool",
        }
    ),
)
_BY_KIND = {"openai": OPENAI, "anthropic": ANTHROPIC, "echo": ECHO, "llama_cpp": LLAMA_CPP}


def capabilities(cfg: InferenceConfig) -> Capabilities:
    """What the configured worker honours; for a pool, what every member does (a
    request may reach any of them)."""
    if cfg.worker != "pool":
        return _BY_KIND[cfg.worker]
    return _common(_BY_KIND[m.kind] for m in cfg.pool.upstreams)


def _common(members: Iterable[Capabilities]) -> Capabilities:
    out = OPENAI
    for caps in members:
        out = out & caps
    return out
