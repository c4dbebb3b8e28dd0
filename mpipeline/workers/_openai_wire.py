"""OpenAI's chat-completion replies on the wire: plain ones fast, structured ones whole.

Replies are decoded by msgspec into small Structs that name only the fields
the pipeline reads. A *plain* reply (a role and text, the usual counts) is
all that most servers send, and is decoded exactly as before, in one call
per network read. Anything more (tool calls, a refusal, logprobs,
``system_fingerprint``, usage details, fields nobody knows yet) is found by
the same decode: the plain Structs forbid unknown fields and take ``null``
only where the structured value would go, so msgspec refuses such a reply
and it is decoded again leniently, with its own JSON kept to be passed on as
it came (``Structured`` pieces, ``Generation.raw``). So a plain reply pays
nothing for what a structured one needs.

A stream is decoded a network read at a time. A read that holds nothing but
whole plain ``data: {...}`` events (what OpenAI-compatible servers send)
becomes one JSON array by ``bytes`` operations and one msgspec call, with no
Python per line; anything else (comments, ``\\r\\n``, an event split across
reads, JSON that does not parse, a structured chunk) goes through the SSE
decoder event by event, so errors are found and worded exactly as before.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from mpipeline.errors import UpstreamFailure
from mpipeline.workers import _failures, _http
from mpipeline.workers.base import Generation, Structured
from mpipeline.workers.sse import SSEDecoder

__all__ = ["Chunk", "Tally", "decode_completion", "decode_read"]

_DONE = b"[DONE]"
_SEP = b"\n\ndata: "
_LAST = b"\n\ndata: [DONE]\n\n"


# Lenient: every reply, structured ones included, names only what we read.


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


# Plain: a role, text and the usual counts, nothing else (unknown fields refused).


class _PlainDelta(msgspec.Struct, forbid_unknown_fields=True):
    role: str | None = None
    content: str | None = None


class _PlainStreamChoice(msgspec.Struct, forbid_unknown_fields=True):
    index: int = 0
    delta: _PlainDelta | None = None
    finish_reason: str | None = None
    logprobs: None = None


class _PlainDetails(msgspec.Struct, forbid_unknown_fields=True):
    cached_tokens: int | None = None


class _PlainUsage(msgspec.Struct, forbid_unknown_fields=True):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: _PlainDetails | None = None


class _PlainChunk(msgspec.Struct, forbid_unknown_fields=True):
    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    choices: list[_PlainStreamChoice] | None = None
    usage: _PlainUsage | None = None
    error: None = None


class _PlainMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str | None = None
    content: str | None = None


class _PlainChoice(msgspec.Struct, forbid_unknown_fields=True):
    index: int = 0
    message: _PlainMessage | None = None
    finish_reason: str | None = None
    logprobs: None = None


class _PlainCompletion(msgspec.Struct, forbid_unknown_fields=True):
    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    choices: list[_PlainChoice] | None = None
    usage: _PlainUsage | None = None
    error: None = None


class RawChunk(NamedTuple):
    """A structured chunk: what we read of it, and its JSON as the upstream sent it."""

    chunk: _Chunk
    raw: bytes


Chunk = _PlainChunk | _Chunk | RawChunk
Usage = _PlainUsage | _Usage

_PLAIN_CHUNK = msgspec.json.Decoder(_PlainChunk)
_PLAIN_CHUNKS = msgspec.json.Decoder(list[_PlainChunk])
_CHUNK = msgspec.json.Decoder(_Chunk)
_PLAIN_COMPLETION = msgspec.json.Decoder(_PlainCompletion)
_COMPLETION = msgspec.json.Decoder(_Completion)


def take_usage(usage: Usage, gen: Generation) -> None:
    if usage.prompt_tokens is not None:
        gen.prompt_tokens = usage.prompt_tokens
    if usage.completion_tokens is not None:
        gen.completion_tokens = usage.completion_tokens
    details = usage.prompt_tokens_details
    if details is not None and details.cached_tokens is not None:
        gen.cached_tokens = details.cached_tokens


def decode_completion(body: bytes) -> tuple[_PlainCompletion | _Completion, bool]:
    """A non-streamed reply, and whether it is plain (else ``body`` is worth keeping).

    :raises UpstreamFailure: the body is not JSON, or not a chat completion
    """
    try:
        return _PLAIN_COMPLETION.decode(body), True
    except msgspec.ValidationError:
        return _http.decode(_COMPLETION, body), False
    except msgspec.DecodeError:
        raise _failures.protocol_failure("upstream sent malformed JSON") from None


class Tally:
    """Turns a stream's chunks into pieces, and keeps its usage and finish reason.

    A plain chunk's content is a ``str`` piece; a structured chunk becomes a
    ``Structured`` piece (its content, and its JSON), even with no content (a
    tool-call delta), except a final usage chunk, whose JSON goes to
    ``gen.raw``. ``structured`` says the last ``take`` made such a piece.
    """

    __slots__ = ("deltas", "gen", "structured", "usage_seen")

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.deltas = 0
        self.usage_seen = False
        self.structured = False

    def take(self, chunks: list[Chunk], tokens: list[str]) -> UpstreamFailure | None:
        """Append the chunks' pieces to ``tokens``; the failure of an error chunk, if any."""
        gen = self.gen
        self.structured = False
        for item in chunks:
            raw = None
            chunk: _PlainChunk | _Chunk
            if type(item) is RawChunk:
                chunk, raw = item.chunk, item.raw
            else:
                chunk = item  # type: ignore[assignment]
            if chunk.error is not None:
                return _failures.error_failure(chunk.error, what="upstream failed mid-stream")
            if chunk.usage is not None:
                take_usage(chunk.usage, gen)
                self.usage_seen = True
            choices = chunk.choices
            content = None
            if choices:
                choice = choices[0]
                if choice.finish_reason is not None:
                    gen.finish_reason = choice.finish_reason
                delta = choice.delta
                if delta is not None:
                    content = delta.content
            if raw is not None:
                self._structured(raw, content, bool(choices) or chunk.usage is None, tokens)
            elif content:
                self.deltas += 1
                if not self.usage_seen:
                    gen.completion_tokens = self.deltas
                tokens.append(content)
        return None

    def _structured(self, raw: bytes, content: str | None, piece: bool, tokens: list[str]) -> None:
        self.gen.raw_bytes += len(raw)
        if not piece:  # the usage chunk: the route answers with it at the end
            self.gen.raw = raw
            return
        self.deltas += 1
        if not self.usage_seen:
            self.gen.completion_tokens = self.deltas
        tokens.append(Structured(content or "", raw))
        self.structured = True


def decode_read(
    decoder: SSEDecoder, data: bytes
) -> tuple[list[Chunk], bool, UpstreamFailure | None]:
    """One network read of a stream: its chunks, whether ``[DONE]`` came, and the
    failure that stopped it (the chunks before a malformed event are still good).

    :raises UpstreamFailure: the bytes are not an event stream
    """
    fast = None if decoder.pending else _whole_events(data)
    return fast or _events(decoder, data)


def _whole_events(data: bytes) -> tuple[list[Chunk], bool, None] | None:
    """A read of whole plain ``data: {...}`` events only, decoded in one msgspec call.

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
        chunks: list[Chunk] = _PLAIN_CHUNKS.decode(b"[" + b",".join(parts) + b"]")  # type: ignore[assignment]
    except msgspec.DecodeError:
        return None
    if len(chunks) != len(parts):
        return None
    return chunks, done, None


def _events(decoder: SSEDecoder, data: bytes) -> tuple[list[Chunk], bool, UpstreamFailure | None]:
    """A read's chunks by the SSE decoder; whether ``[DONE]`` came; the failure that
    stopped it (the chunks before a malformed one are still good)."""
    chunks: list[Chunk] = []
    for event in _http.sse_events(decoder, data):
        if event.data == _DONE:
            return chunks, True, None
        try:
            chunks.append(_PLAIN_CHUNK.decode(event.data))
        except msgspec.ValidationError:
            try:
                chunks.append(RawChunk(_CHUNK.decode(event.data), bytes(event.data)))
            except msgspec.DecodeError:
                return chunks, False, _failures.protocol_failure("upstream sent malformed JSON")
        except msgspec.DecodeError:
            return chunks, False, _failures.protocol_failure("upstream sent malformed JSON")
    return chunks, False, None
