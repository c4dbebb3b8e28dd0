"""AnthropicUpstream against the Messages API's own bytes: the documented transcripts
(``tests/data/anthropic``, sources in its README), replayed byte for byte by a real
HTTP server, whole and cut at every byte or at random, each cut a read of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import msgspec
import pytest

from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled, PromptRequest, Turn
from mpipeline.workers.anthropic import AnthropicUpstream
from mpipeline.workers.base import Generation
from tests.transcript_server import Replay, Split, TranscriptServer, wire_pieces
from tests.unit.workers._anthropic_tooling import (
    DATA,
    KEY_ENV,
    anthropic_worker,
    recording,
)

# Whole, one write per event as the API sends them, every byte, three random cuttings.
SPLITS: list[Split] = ["whole", "events", "bytes", 1, 2, 3]

T = TypeVar("T")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[TranscriptServer]:
    monkeypatch.setenv(KEY_ENV, "sk-ant-test")
    with TranscriptServer() as up:
        yield up


def _job() -> Assembled:
    request = PromptRequest(request_id="r1", input="Hello")
    turns = [Turn(role="user", content="Hello")]
    return Assembled(request=request, prompt="Hello", dedup_key="k", messages=turns)


def _run(worker: AnthropicUpstream, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        await worker.start()
        try:
            return await body()
        finally:
            await worker.stop()

    return asyncio.run(asyncio.wait_for(main(), 120))


def _stream(
    up: TranscriptServer, name: str, split: Split, *, per_read: bool = False
) -> tuple[list[str], Generation]:
    """Replay transcript ``name`` cut as ``split``; the worker's pieces and totals."""
    up.script(Replay(recording(name), split=split))
    worker = anthropic_worker(up.url)
    gen = Generation()

    async def consume() -> list[str]:
        job = _job()
        pieces = worker.generate_reads(job, gen) if per_read else worker.generate(job, gen)
        return [piece async for piece in pieces]

    return _run(worker, consume), gen


def _usage(gen: Generation) -> tuple[int, int, str, int]:
    return (gen.prompt_tokens, gen.completion_tokens, gen.finish_reason, gen.cached_tokens)


@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_the_basic_streaming_request(server: TranscriptServer, split: Split) -> None:
    tokens, gen = _stream(server, "text_stream.sse", split)
    assert tokens == ["Hello", "!"]
    # input_tokens from message_start; output_tokens from message_delta (cumulative,
    # so it replaces the count of deltas); end_turn is OpenAI's "stop". The ping,
    # content_block_start/stop and message_start's placeholder output count are ignored.
    assert _usage(gen) == (25, 15, "stop", 0)
    [call] = server.calls
    assert call.path == "/v1/messages"
    assert call.headers["x-api-key"] == "sk-ant-test"
    assert call.headers["anthropic-version"] == "2023-06-01"
    assert call.body["stream"] is True
    assert call.body["messages"] == [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_the_python_sdk_fixture(server: TranscriptServer, split: Split) -> None:
    tokens, gen = _stream(server, "sdk_basic_stream.sse", split)
    assert tokens == ["Hello", " there", "!"]
    assert _usage(gen) == (11, 6, "stop", 0)


@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_a_thinking_block_stays_out_of_the_text(server: TranscriptServer, split: Split) -> None:
    tokens, gen = _stream(server, "thinking_stream.sse", split)
    assert tokens == ["The greatest common divisor of 1071 and 462 is **21**."]
    assert "Euclidean" not in "".join(tokens)  # thinking_delta is not text
    # This transcript reports no usage at all: no prompt count, and the output
    # count is the text deltas seen.
    assert _usage(gen) == (0, 1, "stop", 0)


@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_an_overloaded_error_mid_stream(server: TranscriptServer, split: Split) -> None:
    server.script(Replay(recording("error_mid_stream.sse"), split=split))
    worker = anthropic_worker(server.url)
    got: list[str] = []

    async def consume() -> None:
        async for token in worker.generate(_job(), Generation()):
            got.append(token)  # noqa: PERF401 - keeps the tokens that came before the error

    with pytest.raises(UpstreamFailure) as info:
        _run(worker, consume)
    assert got == ["Hello"]
    failure = info.value
    # overloaded_error stands for HTTP 529: retried, and counted against the circuit,
    # but it came inside a 200, so the failure carries no HTTP status.
    assert str(failure) == "upstream failed mid-stream (overloaded_error)"
    assert (failure.code, failure.retryable, failure.counts) == (
        ErrorCode.UPSTREAM_ERROR,
        True,
        True,
    )
    assert (failure.status, failure.retry_after_s) == (None, None)
    assert "Overloaded" not in str(failure)  # the upstream's free text stays out


@pytest.mark.parametrize(
    ("split", "pieces"),
    [
        ("whole", ["Hello!"]),  # one read: its two tokens leave together
        ("events", ["Hello", "!"]),
        ("bytes", ["Hello", "!"]),
    ],
)
def test_each_cut_is_a_read_of_its_own(
    server: TranscriptServer, split: Split, pieces: list[str]
) -> None:
    """The replays above really read the cuts one at a time: ``generate_reads``
    joins what one read brought, and the paced replays bring one event at most."""
    got, gen = _stream(server, "text_stream.sse", split, per_read=True)
    assert got == pieces
    assert _usage(gen) == (25, 15, "stop", 0)


@pytest.mark.parametrize("split", ["whole", "bytes", 4], ids=str)
@pytest.mark.parametrize(
    ("name", "text", "usage"),
    [
        ("message.json", "Hello!", (12, 6, "stop", 0)),
        ("message_max_tokens.json", "C", (42, 1, "length", 0)),
        # Cache reads and writes are part of the prompt (as OpenAI counts it);
        # the reads are also its cached tokens. Citations, container and
        # stop_details are not text.
        (
            "message_reference.json",
            "Hi! My name is Claude.",
            (2095 + 2051 + 2051, 503, "stop", 2051),
        ),
    ],
)
def test_a_reply_not_streamed(
    server: TranscriptServer,
    name: str,
    text: str,
    usage: tuple[int, int, str, int],
    split: Split,
) -> None:
    server.script(Replay(recording(name), content_type="application/json", split=split))
    worker = anthropic_worker(server.url)
    gen = Generation()
    assert _run(worker, lambda: worker.complete(_job(), gen)) == text
    assert _usage(gen) == usage
    assert server.calls[0].body["stream"] is False


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "complete"])
def test_the_documented_error_body(server: TranscriptServer, stream: bool) -> None:
    body = recording("error_not_found.json")
    server.script(Replay(body, status=404, content_type="application/json"))
    worker = anthropic_worker(server.url)

    async def call() -> object:
        if stream:
            return [t async for t in worker.generate(_job(), Generation())]
        return await worker.complete(_job(), Generation())

    with pytest.raises(UpstreamFailure) as info:
        _run(worker, call)
    failure = info.value
    assert str(failure) == "upstream answered HTTP 404 (not_found_error)"
    assert (failure.status, failure.retryable, failure.counts) == (404, False, False)
    assert "req_011CSHoEeqs5C35K2UUqR7Fy" not in str(failure)


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.sse")))
def test_the_server_sends_each_transcript_byte_for_byte(name: str) -> None:
    """What the tests above replay is the stored file, unchanged (read here by
    another HTTP client), and every stored stream is whole SSE: events end with a
    blank line, and each one's name is the ``type`` of its data (the docs' rule)."""
    raw = recording(name)
    assert raw.endswith(b"\n\n") and not raw.endswith(b"\n\n\n")
    for event in raw.removesuffix(b"\n\n").split(b"\n\n"):
        head, data = event.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        doc: dict[str, Any] = msgspec.json.decode(data.removeprefix(b"data: "))
        assert doc["type"] == head.removeprefix(b"event: ").decode()
    with TranscriptServer() as up:
        up.script(Replay(raw, split=5))
        with httpx.stream("POST", up.url + "/v1/messages", json={"stream": True}) as reply:
            assert reply.headers["content-type"] == "text/event-stream"
            assert reply.read() == raw
    assert b"".join(wire_pieces(Replay(raw, split="bytes"))) == b"".join(
        wire_pieces(Replay(raw, split="events"))
    )
