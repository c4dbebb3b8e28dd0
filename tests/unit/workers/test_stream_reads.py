"""Streams read by read: the OpenAI fast path decodes exactly what the SSE decoder does,
and ``generate_reads`` gives the tokens that arrived together as one piece."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpipeline.config import AnthropicConfig, OpenAIConfig, TimeoutsConfig
from mpipeline.errors import UpstreamFailure
from mpipeline.messages import Assembled, PromptRequest
from mpipeline.workers._openai_wire import Chunk, RawChunk
from mpipeline.workers.anthropic import AnthropicUpstream
from mpipeline.workers.base import Generation
from mpipeline.workers.openai import OpenAIUpstream, decode_read
from mpipeline.workers.sse import SSEDecoder
from tests.fault_upstream import FaultUpstream, Ok, Status

TIMEOUTS = TimeoutsConfig(connect_s=1, first_token_s=2, between_tokens_s=2, total_s=4)


def _event(obj: object) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def _delta(text: str) -> bytes:
    return _event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def _read(chunk: Chunk) -> Any:
    """What the worker reads of a chunk, plain or structured."""
    return chunk.chunk if isinstance(chunk, RawChunk) else chunk


def _texts(decoder: SSEDecoder, reads: list[bytes]) -> tuple[list[str], bool]:
    """Every token the reads carry, decoded read by read as the worker does."""
    tokens: list[str] = []
    done = False
    for data in reads:
        chunks, done, failure = decode_read(decoder, data)
        assert failure is None
        choices = [choice for chunk in chunks for choice in _read(chunk).choices or []]
        tokens += [c.delta.content for c in choices if c.delta is not None and c.delta.content]
        if done:
            break
    return tokens, done


def test_a_read_of_whole_events_and_done() -> None:
    data = _delta("a") + _delta('b "\\n" c') + b"data: [DONE]\n\n"
    assert _texts(SSEDecoder(strict=True), [data]) == (["a", 'b "\\n" c'], True)


@pytest.mark.parametrize(
    "data",
    [
        b": keep-alive\n\n" + b"data: {}\n\n",  # a comment
        b'data: {"choices":[]}\r\n\r\n',  # CRLF line ends
        b'event: message\ndata: {"choices":[]}\n\n',  # a named event
        b'data: {"choices":[]}\ndata: {"x":1}\n\n',  # two data lines: one event, bad JSON
        b"data: [DONE]\n\n",
    ],
    ids=["comment", "crlf", "event-name", "multi-line", "done-only"],
)
def test_other_shapes_take_the_sse_decoder(data: bytes) -> None:
    from mpipeline.workers import _openai_wire

    assert _openai_wire._whole_events(data) is None


def test_malformed_json_keeps_the_chunks_before_it() -> None:
    data = _delta("a") + b"data: {not json\n\n" + _delta("b")
    chunks, done, failure = decode_read(SSEDecoder(strict=True), data)
    read = [_read(c) for c in chunks]
    assert [c.choices[0].delta.content for c in read if c.choices and c.choices[0].delta] == ["a"]
    assert not done and failure is not None and "malformed JSON" in str(failure)


def _splits(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[last:cut]
        last = cut
    yield data[last:]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_any_split_into_reads_gives_the_same_tokens(tokens: list[str], cuts: list[int]) -> None:
    stream = b"".join(_delta(t) for t in tokens) + b"data: [DONE]\n\n"
    reads = [r for r in _splits(stream, cuts) if r]
    assert _texts(SSEDecoder(strict=True), reads) == (tokens, True)


# Through the real workers, against the fault upstream


def _job() -> Assembled:
    return Assembled(request=PromptRequest(request_id="r", input="hi"), prompt="", dedup_key="")


async def _pieces(upstream: OpenAIUpstream | AnthropicUpstream, gen: Generation) -> list[str]:
    await upstream.start()
    try:
        return [piece async for piece in upstream.generate_reads(_job(), gen)]
    finally:
        await upstream.stop()


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_generate_reads_joins_what_arrived_together(api: str) -> None:
    tokens = ["Bon", "jour", " tout", " le", " monde"]
    with FaultUpstream() as up:
        upstream: OpenAIUpstream | AnthropicUpstream
        if api == "openai":
            config = OpenAIConfig(base_url=up.openai_url, api_key_env="", timeouts=TIMEOUTS)
            upstream = OpenAIUpstream(config)
        else:
            config2 = AnthropicConfig(base_url=up.url, api_key_env="", timeouts=TIMEOUTS)
            upstream = AnthropicUpstream(config2)
        up.script(Ok(tokens=tokens), Ok(tokens=tokens, token_delay_s=0.05))
        for spaced in (False, True):
            gen = Generation()
            pieces = asyncio.run(_pieces(upstream, gen))
            assert "".join(pieces) == "".join(tokens)
            assert gen.completion_tokens == len(tokens)
            if spaced:  # 50 ms apart: every token is a read of its own
                assert pieces == tokens


def test_an_error_after_tokens_in_one_read_comes_after_them() -> None:
    body = _delta("a") + _delta("b") + _event({"error": {"type": "server_error"}})
    with FaultUpstream() as up:
        up.script(Status(200, body=body, content_type="text/event-stream"))
        config = OpenAIConfig(base_url=up.openai_url, api_key_env="", timeouts=TIMEOUTS)
        upstream = OpenAIUpstream(config)
        got: list[str] = []

        async def main() -> None:
            await upstream.start()
            try:
                async for piece in upstream.generate_reads(_job(), Generation()):
                    got.append(piece)  # noqa: PERF401 - keeps what came before the error
            finally:
                await upstream.stop()

        with pytest.raises(UpstreamFailure, match="mid-stream"):
            asyncio.run(main())
        assert "".join(got) == "ab"
