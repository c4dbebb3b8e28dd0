"""The Worker protocol: a model backend that streams tokens for a prompt.

A worker is never a process (see the vocabulary in STYLE.md): it lives inside
an inference shard, which owns its lifecycle through ``start``/``stop``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from mpipeline.messages import PromptRequest


@dataclass(slots=True)
class Generation:
    """Running totals a worker fills in while it streams."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


class Worker(Protocol):
    def __init__(self, config: Any) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, prompt: str, request: PromptRequest, gen: Generation) -> AsyncIterator[str]:
        """Stream the reply token by token (requests with ``stream`` set)."""
        ...

    async def complete(self, prompt: str, request: PromptRequest, gen: Generation) -> str:
        """The whole reply at once: the backend's non-streaming call, which skips
        per-token work on both sides when nobody watches the tokens arrive."""
        ...
