"""Anthropic's Messages API (``POST /v1/messages``), streamed or not.

The API differs from OpenAI's where it matters here: the system prompt is a
separate field, turns must alternate and start with the user, ``max_tokens``
is required, and a stream is a sequence of named events that ends with
``message_stop`` and may carry an ``error`` event (``overloaded_error``) after
a 200. Event payloads are decoded into one loose Struct that names only the
fields read, so event types the API adds later pass through harmlessly. A
stream is read a network read at a time: ``generate`` yields token by token,
``generate_reads`` one piece per read (the tokens that arrived together).

Of an OpenAI request's other fields it translates what the Messages API has
(``fields.ANTHROPIC``): ``temperature`` and ``top_p`` as they are, ``stop``
as ``stop_sequences``, ``max_completion_tokens`` as ``max_tokens``; the
gateway refuses the rest.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec

from mpipeline.config import AnthropicConfig, PoolUpstreamConfig
from mpipeline.errors import UpstreamFailure
from mpipeline.messages import Assembled
from mpipeline.workers import _failures, _http
from mpipeline.workers._params import sampling
from mpipeline.workers.base import Generation, WorkerContext
from mpipeline.workers.sse import SSEDecoder, SSEEvent

__all__ = ["AnthropicUpstream", "stop_reason"]

# The API requires max_tokens; this is used when neither request nor config sets one.
DEFAULT_MAX_TOKENS = 1024

# Anthropic's stop reasons in the OpenAI vocabulary the rest of mpipeline speaks.
_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    stop_reason: str | None = None


class _MessageStart(msgspec.Struct):
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    type: str = ""
    delta: _Delta | None = None
    usage: _Usage | None = None
    message: _MessageStart | None = None
    # Kept raw (any shape): only its type is read, by _failures.error_failure.
    error: Any = None


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _Reply(msgspec.Struct):
    type: str = ""
    content: list[_Block] | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None
    error: Any = None


_EVENT = msgspec.json.Decoder(_Event)
_REPLY = msgspec.json.Decoder(_Reply)
_ENCODER = msgspec.json.Encoder()


def stop_reason(reason: str | None) -> str:
    """Anthropic's ``stop_reason`` as a ``finish_reason`` (unknown ones as they are)."""
    if reason is None:
        return "stop"
    return _STOP_REASONS.get(reason, reason)


def _take_usage(usage: _Usage, gen: Generation) -> None:
    # input_tokens excludes cached prompt tokens; prompt_tokens counts them, as
    # OpenAI's does, with the cache hits also in cached_tokens.
    if usage.input_tokens is not None:
        gen.prompt_tokens = (
            usage.input_tokens
            + (usage.cache_read_input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0)
        )
    if usage.cache_read_input_tokens is not None:
        gen.cached_tokens = usage.cache_read_input_tokens
    if usage.output_tokens is not None:
        gen.completion_tokens = usage.output_tokens


class AnthropicUpstream(_http.HttpUpstream):
    """``POST {base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version``."""

    path = "/v1/messages"

    def __init__(
        self,
        config: AnthropicConfig | PoolUpstreamConfig,
        ctx: WorkerContext | None = None,
        *,
        name: str = "anthropic",
    ) -> None:
        super().__init__(config, ctx, name=name)
        self._version = config.version

    def _headers(self, key: _http.ApiKey | None) -> dict[str, str]:
        headers = {"content-type": "application/json", "anthropic-version": self._version}
        if key is not None:
            headers["x-api-key"] = key.reveal()
        return headers

    def _body(self, job: Assembled, stream: bool) -> bytes:
        config = self._config
        system, messages = _conversation(job)
        max_tokens = job.request.max_tokens or config.max_tokens or DEFAULT_MAX_TOKENS
        body: dict[str, Any] = {"model": config.model, "max_tokens": max_tokens}
        if system:
            body["system"] = system
        body["messages"] = messages
        sample = sampling(job.request)
        temperature = config.temperature if sample.temperature is None else sample.temperature
        if temperature is not None:
            body["temperature"] = temperature
        if sample.top_p is not None:
            body["top_p"] = sample.top_p
        if stops := sample.stops:
            body["stop_sequences"] = stops
        body["stream"] = stream
        return _ENCODER.encode(body)

    def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        """Stream the reply's ``text_delta`` pieces as tokens.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        return self._stream(job, gen, per_read=False)

    def generate_reads(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        """Stream the reply as pieces: the tokens of each network read, joined.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        return self._stream(job, gen, per_read=True)

    async def _stream(
        self, job: Assembled, gen: Generation, *, per_read: bool
    ) -> AsyncGenerator[str, None]:
        client, conn = await self._open_stream(job)
        try:
            decoder = SSEDecoder(strict=True)
            while True:
                data = await conn.read()
                if not data:
                    raise _http.stream_end(decoder)
                tokens: list[str] = []
                done, failure = _take(_http.sse_events(decoder, data), gen, tokens)
                if done:
                    await _http.drain(client, conn)
                if tokens:
                    if not per_read:
                        for token in tokens:
                            yield token
                    else:
                        yield tokens[0] if len(tokens) == 1 else "".join(tokens)
                if failure is not None:
                    raise failure
                if done:
                    return
        finally:
            client.release(conn)

    async def complete(self, job: Assembled, gen: Generation) -> str:
        """The non-streaming call: every text block of the reply, joined.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        reply = await self._fetch(job, _REPLY)
        if reply.type == "error" or reply.error is not None:
            raise _failures.error_failure(reply.error, what="upstream reported an error")
        if reply.content is None:
            raise _failures.protocol_failure("upstream reply has no content")
        text = "".join(b.text for b in reply.content if b.type == "text" and b.text)
        gen.finish_reason = stop_reason(reply.stop_reason)
        if reply.usage is not None:
            _take_usage(reply.usage, gen)
        return text


def _take(
    events: list[SSEEvent], gen: Generation, tokens: list[str]
) -> tuple[bool, UpstreamFailure | None]:
    """Append the events' text to ``tokens``; whether ``message_stop`` came, and the
    failure that stopped the stream (an ``error`` event, malformed JSON), if any."""
    for sse in events:
        if sse.event == "message_stop":
            return True, None
        try:
            event = _http.decode(_EVENT, sse.data)
        except UpstreamFailure as exc:
            return False, exc
        kind = event.type
        if kind == "content_block_delta":
            delta = event.delta
            if delta is not None and delta.type == "text_delta" and delta.text:
                gen.completion_tokens += 1
                tokens.append(delta.text)
        elif kind == "message_start":
            if event.message is not None and event.message.usage is not None:
                _take_usage(event.message.usage, gen)
            # Its output_tokens is a placeholder; the count starts at the deltas.
            gen.completion_tokens = 0
        elif kind == "message_delta":
            if event.delta is not None:
                gen.finish_reason = stop_reason(event.delta.stop_reason)
            if event.usage is not None:
                _take_usage(event.usage, gen)
        elif kind == "error" or sse.event == "error":
            return False, _failures.error_failure(event.error, what="upstream failed mid-stream")
        # ping, content_block_start/stop and future event types: nothing to do.
    return False, None


def _conversation(job: Assembled) -> tuple[str, list[dict[str, str]]]:
    """Split ``job.messages`` into the ``system`` field and alternating turns.

    System turns are joined by blank lines. Other turns are user or assistant
    (an unknown role is taken as the user's); consecutive turns of one role are
    merged, since the API rejects two in a row, and assistant turns before the
    first user turn are dropped, since the conversation must open with the user.
    With no user turn at all, the request's input is the one user turn.
    """
    system: list[str] = []
    messages: list[dict[str, str]] = []
    for turn in job.messages:
        if turn.role == "system":
            system.append(turn.content)
            continue
        role = "assistant" if turn.role == "assistant" else "user"
        if not messages and role == "assistant":
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + turn.content
        else:
            messages.append({"role": role, "content": turn.content})
    if not messages:
        messages.append({"role": "user", "content": job.request.input})
    return "\n\n".join(system), messages
