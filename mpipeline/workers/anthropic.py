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
(``fields.ANTHROPIC``): ``temperature``, ``top_p`` and ``top_k`` as they are, ``stop``
as ``stop_sequences``, ``max_completion_tokens`` as ``max_tokens``, and tools,
tool turns, images and ``response_format`` as ``_anthropic_wire`` says;
``_anthropic_reply`` turns ``tool_use`` blocks back into OpenAI tool calls
(``Structured`` pieces, ``Generation.raw``). The gateway refuses the rest.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import msgspec

from mpipeline.config import AnthropicConfig, PoolUpstreamConfig
from mpipeline.errors import UpstreamFailure
from mpipeline.messages import Assembled
from mpipeline.workers import _failures, _http
from mpipeline.workers._anthropic_reply import ReplyTools, stop_reason
from mpipeline.workers._anthropic_wire import conversation as _conversation
from mpipeline.workers._anthropic_wire import plan
from mpipeline.workers._params import sampling
from mpipeline.workers.base import Generation, Structured, WorkerContext
from mpipeline.workers.sse import SSEDecoder, SSEEvent

__all__ = ["AnthropicUpstream", "stop_reason"]

# The API requires max_tokens; this is used when neither request nor config sets one.
DEFAULT_MAX_TOKENS = 1024


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _BlockStart(msgspec.Struct):
    type: str = ""
    id: str | None = None
    name: str | None = None


class _MessageStart(msgspec.Struct):
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    type: str = ""
    index: int = 0
    content_block: _BlockStart | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    message: _MessageStart | None = None
    # Kept raw (any shape): only its type is read, by _failures.error_failure.
    error: Any = None


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None
    id: str | None = None
    name: str | None = None
    # A tool call's arguments, kept as the JSON text Anthropic sent.
    input: msgspec.Raw = msgspec.Raw()


class _Reply(msgspec.Struct):
    type: str = ""
    content: list[_Block] | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None
    error: Any = None


_EVENT = msgspec.json.Decoder(_Event)
_REPLY = msgspec.json.Decoder(_Reply)
_ENCODER = msgspec.json.Encoder()


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
        if sample.top_k is not None:
            body["top_k"] = sample.top_k
        if stops := sample.stops:
            body["stop_sequences"] = stops
        tools = plan(job.request.params)
        if tools.tools:
            body["tools"] = tools.tools
            if tools.tool_choice is not None:
                body["tool_choice"] = tools.tool_choice
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
        calls = ReplyTools(plan(job.request.params).json_tool)
        client, conn = await self._open_stream(job)
        try:
            decoder = SSEDecoder(strict=True)
            while True:
                data = await conn.read()
                if not data:
                    raise _http.stream_end(decoder)
                tokens: list[str] = []
                done, failure = _take(_http.sse_events(decoder, data), gen, tokens, calls)
                if done:
                    await _http.drain(client, conn)
                if tokens:
                    # A tool-call delta keeps its own chunk: never joined with text.
                    if not per_read or any(type(t) is not str for t in tokens):
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
        """The non-streaming call: every text block of the reply, joined (and the JSON
        answer's input); tool calls go in ``gen.raw`` as an OpenAI completion.

        :raises UpstreamFailure: any failure, classified (see ``_failures``)
        """
        calls = ReplyTools(plan(job.request.params).json_tool)
        reply = await self._fetch(job, _REPLY)
        if reply.type == "error" or reply.error is not None:
            raise _failures.error_failure(reply.error, what="upstream reported an error")
        if reply.content is None:
            raise _failures.protocol_failure("upstream reply has no content")
        blocks = [(b.type, b.text, b.id, b.name, bytes(b.input)) for b in reply.content]
        text, raw, gen.finish_reason = calls.completion(blocks, reply.stop_reason)
        if raw:
            gen.raw = raw
            gen.raw_bytes = len(raw)
        if reply.usage is not None:
            _take_usage(reply.usage, gen)
        return text


def _take(
    events: list[SSEEvent], gen: Generation, tokens: list[str], calls: ReplyTools
) -> tuple[bool, UpstreamFailure | None]:
    """Append the events' pieces to ``tokens`` (text, and tool-call deltas as
    ``Structured`` ones); whether ``message_stop`` came, and the failure that
    stopped the stream (an ``error`` event, malformed JSON), if any."""
    for sse in events:
        if sse.event == "message_stop":
            return True, None
        try:
            event = _http.decode(_EVENT, sse.data)
        except UpstreamFailure as exc:
            return False, exc
        kind = event.type
        piece: str | None = None
        if kind == "content_block_delta":
            delta = event.delta
            if delta is not None:
                if delta.type == "text_delta":
                    piece = delta.text
                elif delta.type == "input_json_delta":
                    piece = calls.fragment(event.index, delta.partial_json)
        elif kind == "content_block_start":
            block = event.content_block
            if block is not None:
                piece = calls.start(event.index, block.type, block.id, block.name)
        elif kind == "message_start":
            if event.message is not None and event.message.usage is not None:
                _take_usage(event.message.usage, gen)
            # Its output_tokens is a placeholder; the count starts at the deltas.
            gen.completion_tokens = 0
        elif kind == "message_delta":
            if event.delta is not None:
                gen.finish_reason = calls.finish(event.delta.stop_reason)
            if event.usage is not None:
                _take_usage(event.usage, gen)
        elif kind == "error" or sse.event == "error":
            return False, _failures.error_failure(event.error, what="upstream failed mid-stream")
        # ping, content_block_stop and future event types: nothing to do.
        if piece is None:
            continue
        if type(piece) is not str:  # a tool-call delta: no text, but a piece of its own
            gen.raw_bytes += len(cast(Structured, piece).raw)
        elif not piece:
            continue
        gen.completion_tokens += 1
        tokens.append(piece)
    return False, None
