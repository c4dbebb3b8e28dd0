"""OpenAI-compatible chat completions: OpenAI itself, vLLM, llama.cpp server, SGLang, Ollama.

One attempt per call, failures classified into ``UpstreamFailure`` (see
``_http``); the shard around it owns retries, the circuit and phase timeouts.
Chunks are decoded by msgspec into small Structs that name only the fields we
read, so a token costs one typed decode, and unknown fields (``logprobs``,
``reasoning_content``, server extras) are skipped without building dicts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from mpipeline.config import UpstreamConfig
from mpipeline.messages import Assembled
from mpipeline.workers import _failures, _http
from mpipeline.workers.base import Generation, WorkerContext
from mpipeline.workers.sse import SSEEvent

__all__ = ["OpenAIUpstream"]

_DONE = b"[DONE]"


class _Delta(msgspec.Struct):
    content: str | None = None


class _StreamChoice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Chunk(msgspec.Struct):
    choices: list[_StreamChoice] | None = None
    usage: _Usage | None = None
    # Kept raw (any shape): only its type/code are read, by _failures.error_failure.
    error: Any = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_CHUNK = msgspec.json.Decoder(_Chunk)
_COMPLETION = msgspec.json.Decoder(_Completion)
_ENCODER = msgspec.json.Encoder()


def _take_usage(usage: _Usage, gen: Generation) -> None:
    if usage.prompt_tokens is not None:
        gen.prompt_tokens = usage.prompt_tokens
    if usage.completion_tokens is not None:
        gen.completion_tokens = usage.completion_tokens
    details = usage.prompt_tokens_details
    if details is not None and details.cached_tokens is not None:
        gen.cached_tokens = details.cached_tokens


class OpenAIUpstream(_http.HttpUpstream):
    """``POST {base_url}/chat/completions``, streamed (SSE until ``[DONE]``) or not."""

    path = "/chat/completions"

    def __init__(
        self, config: UpstreamConfig, ctx: WorkerContext | None = None, *, name: str = "openai"
    ) -> None:
        super().__init__(config, ctx, name=name)

    def _headers(self, key: _http.ApiKey | None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = "Bearer " + key.reveal()
        return headers

    def _body(self, job: Assembled, stream: bool) -> bytes:
        config = self._config
        if job.messages:
            messages = [{"role": t.role, "content": t.content} for t in job.messages]
        else:
            messages = [{"role": "user", "content": job.request.input}]
        body: dict[str, Any] = {"model": config.model, "messages": messages, "stream": stream}
        max_tokens = job.request.max_tokens or config.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if config.temperature is not None:
            body["temperature"] = config.temperature
        if stream:
            body["stream_options"] = {"include_usage": True}
        return _ENCODER.encode(body)

    async def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        """Stream the reply's content deltas as tokens.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        deltas = 0
        usage_seen = False
        events = self._events(job, last=_is_done)
        async with contextlib.aclosing(events):
            async for event in events:
                chunk = _http.decode(_CHUNK, event.data)
                if chunk.error is not None:
                    raise _failures.error_failure(chunk.error, what="upstream failed mid-stream")
                if chunk.usage is not None:
                    _take_usage(chunk.usage, gen)
                    usage_seen = True
                if chunk.choices:
                    choice = chunk.choices[0]
                    if choice.finish_reason is not None:
                        gen.finish_reason = choice.finish_reason
                    delta = choice.delta
                    if delta is not None and delta.content:
                        deltas += 1
                        if not usage_seen:
                            gen.completion_tokens = deltas
                        yield delta.content

    async def complete(self, job: Assembled, gen: Generation) -> str:
        """The non-streaming call: the whole reply in one JSON body.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        reply = await self._fetch(job, _COMPLETION)
        if reply.error is not None:
            raise _failures.error_failure(reply.error, what="upstream reported an error")
        choice = reply.choices[0] if reply.choices else None
        if choice is None or choice.message is None:
            raise _failures.protocol_failure("upstream reply has no choices")
        text = choice.message.content or ""
        gen.finish_reason = choice.finish_reason or "stop"
        if reply.usage is not None:
            _take_usage(reply.usage, gen)
        else:
            # No usage from the server: whitespace-separated words stand in for tokens.
            gen.completion_tokens = len(text.split())
        return text


def _is_done(event: SSEEvent) -> bool:
    return event.data == _DONE
