"""OpenAI-compatible chat completions: OpenAI itself, vLLM, llama.cpp server, SGLang, Ollama.

One attempt per call, failures classified into ``UpstreamFailure`` (see
``_http``); the shard around it owns retries, the circuit and phase timeouts.
Chunks are decoded by msgspec into small Structs that name only the fields we
read, and unknown fields (``logprobs``, ``reasoning_content``, server extras)
are skipped without building dicts.

A stream is decoded a network read at a time. A read that holds nothing but
whole ``data: {...}`` events (what OpenAI-compatible servers send) becomes
one JSON array by ``bytes`` operations and one msgspec call, with no Python
per line; anything else (comments, ``\r\n``, an event split across reads,
JSON that does not parse) goes through the SSE decoder event by event, so
errors are found and worded exactly as before. ``generate`` yields token by
token; ``generate_reads`` yields one piece per read (the tokens that arrived
together, joined), which the shard streams as one chunk.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec

from mpipeline.config import UpstreamConfig
from mpipeline.errors import UpstreamFailure
from mpipeline.messages import Assembled
from mpipeline.workers import _failures, _http
from mpipeline.workers.base import Generation, WorkerContext
from mpipeline.workers.sse import SSEDecoder

__all__ = ["OpenAIUpstream", "decode_read"]

_DONE = b"[DONE]"
_SEP = b"\n\ndata: "
_LAST = b"\n\ndata: [DONE]\n\n"


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
_CHUNKS = msgspec.json.Decoder(list[_Chunk])
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

    def generate(self, job: Assembled, gen: Generation) -> AsyncIterator[str]:
        """Stream the reply's content deltas as tokens.

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
            tally = _Tally(gen)
            while True:
                data = await conn.read()
                if not data:
                    raise _http.stream_end(decoder)
                chunks, done, failure = decode_read(decoder, data)
                tokens: list[str] = []
                failure = tally.take(chunks, tokens) or failure
                if done and failure is None:
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


class _Tally:
    """Turns a stream's chunks into tokens, and keeps its usage and finish reason."""

    __slots__ = ("deltas", "gen", "usage_seen")

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.deltas = 0
        self.usage_seen = False

    def take(self, chunks: list[_Chunk], tokens: list[str]) -> UpstreamFailure | None:
        """Append the chunks' content to ``tokens``; the failure of an error chunk, if any."""
        gen = self.gen
        for chunk in chunks:
            if chunk.error is not None:
                return _failures.error_failure(chunk.error, what="upstream failed mid-stream")
            if chunk.usage is not None:
                _take_usage(chunk.usage, gen)
                self.usage_seen = True
            choices = chunk.choices
            if choices:
                choice = choices[0]
                if choice.finish_reason is not None:
                    gen.finish_reason = choice.finish_reason
                delta = choice.delta
                if delta is not None and delta.content:
                    self.deltas += 1
                    if not self.usage_seen:
                        gen.completion_tokens = self.deltas
                    tokens.append(delta.content)
        return None


def decode_read(
    decoder: SSEDecoder, data: bytes
) -> tuple[list[_Chunk], bool, UpstreamFailure | None]:
    """One network read of a stream: its chunks, whether ``[DONE]`` came, and the
    failure that stopped it (the chunks before a malformed event are still good).

    :raises UpstreamFailure: the bytes are not an event stream
    """
    fast = None if decoder.pending else _whole_events(data)
    return fast or _events(decoder, data)


def _whole_events(data: bytes) -> tuple[list[_Chunk], bool, None] | None:
    """A read of whole ``data: {...}`` events only, decoded in one msgspec call.

    Each event is ``data: `` + one line of JSON + a blank line, so the events
    are what lies between the ``\\n\\ndata: `` separators, and the newlines
    count them exactly (a JSON line holds none). Anything else is None: the
    caller decodes it event by event instead.
    """
    if not data.startswith(b"data: {") or not data.endswith(b"\n\n") or b"\r" in data:
        return None
    done = data.endswith(_LAST)
    body = data[6 : -len(_LAST)] if done else data[6:-2]
    parts = body.split(_SEP)
    if data.count(b"\n") != 2 * (len(parts) + done):
        return None
    try:
        chunks = _CHUNKS.decode(b"[" + b",".join(parts) + b"]")
    except msgspec.DecodeError:
        return None
    if len(chunks) != len(parts):
        return None
    return chunks, done, None


def _events(decoder: SSEDecoder, data: bytes) -> tuple[list[_Chunk], bool, UpstreamFailure | None]:
    """A read's chunks by the SSE decoder; whether ``[DONE]`` came; the failure that
    stopped it (the chunks before a malformed one are still good)."""
    chunks: list[_Chunk] = []
    for event in _http.sse_events(decoder, data):
        if event.data == _DONE:
            return chunks, True, None
        try:
            chunks.append(_CHUNK.decode(event.data))
        except msgspec.DecodeError:
            return chunks, False, _failures.protocol_failure("upstream sent malformed JSON")
    return chunks, False, None
