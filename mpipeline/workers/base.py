"""What a model backend is: an ``Upstream`` that streams tokens for an assembled prompt.

An upstream is never a process (see the vocabulary in STYLE.md): it lives
inside an inference shard, which owns its lifecycle through ``start``/``stop``.
A remote upstream (an OpenAI-compatible or Anthropic server) makes exactly one
attempt per call and raises ``UpstreamFailure`` saying what went wrong; the
shard's retry loop (``mpipeline.resilience``) decides whether to try again, and
its circuit breaker and limits wrap every call. So nothing below the shard
retries: SDK and transport retries are off (RELIABILITY 1.5).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from mpipeline.config import TimeoutsConfig
from mpipeline.messages import Assembled


@dataclass(slots=True)
class Generation:
    """Running totals an upstream fills in while it streams.

    ``cached_tokens`` counts prompt tokens the backend did not have to evaluate
    again (a local model's session cache, a server's prompt cache). ``raw`` is
    the upstream's own JSON for a reply that is more than text: the whole
    chat completion of a call that was not streamed, or a stream's final usage
    chunk (``Completed.raw``); b"" for a plain reply.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    cached_tokens: int = 0
    raw: bytes = b""
    # Bytes of upstream JSON the reply carries in all: ``raw`` and every
    # ``Structured`` piece's (what a cached copy of it costs beyond its text).
    raw_bytes: int = 0


class Structured(str):
    """A piece of a streamed reply that is more than text: its text, plus the
    upstream's own chunk (``raw``, JSON) with the tool-call delta, refusal or
    logprobs it carried, which the OpenAI route passes on as it came.

    A ``str``, so that everything between an upstream and the client that
    joins, caches, coalesces or counts pieces keeps working unchanged, and the
    chunk travels with its piece through all of it; the inference stage turns
    it into a ``StructuredChunk`` of its own. Plain pieces stay
    plain ``str``: ``type(piece) is str`` tells them apart.
    """

    raw: bytes

    def __new__(cls, text: str, raw: bytes) -> Structured:
        piece = super().__new__(cls, text)
        piece.raw = raw
        return piece


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """Where the shard runs: local models size their threads by ``cpus``."""

    shard: int = 0
    shards: int = 1
    cpus: tuple[int, ...] = ()


class Upstream(Protocol):
    """One model backend a shard can call.

    ``name`` labels its circuit, metrics and status lines: the config's name for
    it (``"openai"``, a pool member's name), never a URL. ``remote`` says whether
    the shard's circuit breaker, retries and timeouts apply. ``timeouts`` and
    ``max_concurrency`` are the per-upstream limits the shard enforces.
    """

    name: str
    remote: bool
    timeouts: TimeoutsConfig
    max_concurrency: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        """Stream the reply token by token (requests with ``stream`` set)."""
        ...

    async def complete(self, job: Assembled, gen: Generation) -> str:
        """The whole reply at once: the backend's non-streaming call, which skips
        per-token work on both sides when nobody watches the tokens arrive."""
        ...


# A local backend has no network phases; these bound nothing in practice.
LOCAL_TIMEOUTS = TimeoutsConfig(connect_s=1e9, first_token_s=1e9, between_tokens_s=1e9, total_s=1e9)


__all__ = [
    "LOCAL_TIMEOUTS",
    "Generation",
    "Structured",
    "Upstream",
    "WorkerContext",
]
