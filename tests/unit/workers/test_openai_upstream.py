"""OpenAIUpstream against the fault upstream: happy paths, every fault, no leaks."""

from __future__ import annotations

import asyncio
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from mpipeline.config import OpenAIConfig, TimeoutsConfig
from mpipeline.errors import ConfigError, ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled, PromptRequest, Turn
from mpipeline.workers.base import Generation
from mpipeline.workers.openai import OpenAIUpstream
from tests.fault_upstream import (
    AnthropicError,
    Behaviour,
    DropAfter,
    FaultUpstream,
    Hang,
    HangAfterHeaders,
    InvalidJSON,
    MalformedSSE,
    Ok,
    StallAfter,
    Status,
    TruncatedChunked,
)

CANARY = "sk-canary-5d1e0b7a2c9f"
KEY_ENV = "MPL_TEST_OPENAI_KEY"
# Small enough that a hung upstream costs a test a fraction of a second.
FAST = TimeoutsConfig(connect_s=0.5, first_token_s=0.15, between_tokens_s=0.15, total_s=0.3)
# Happy paths get room: a loaded 2-core box can take a second to schedule one.
# FAST is only for the tests about timeouts.
ROOMY = TimeoutsConfig(connect_s=10, first_token_s=10, between_tokens_s=10, total_s=20)

T = TypeVar("T")


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultUpstream]:
    monkeypatch.setenv(KEY_ENV, CANARY)
    with FaultUpstream() as up:
        yield up


def _worker(up: FaultUpstream, **overrides: Any) -> OpenAIUpstream:
    fields: dict[str, Any] = {
        "base_url": up.openai_url,
        "model": "test-model",
        "api_key_env": KEY_ENV,
        "timeouts": ROOMY,
    }
    return OpenAIUpstream(OpenAIConfig(**(fields | overrides)))


def _job(text: str = "hello there world", *, max_tokens: int | None = None) -> Assembled:
    request = PromptRequest(request_id="r1", input=text, max_tokens=max_tokens)
    turns = [Turn(role="system", content="Be brief."), Turn(role="user", content=text)]
    return Assembled(request=request, prompt=text, dedup_key="k", messages=turns)


def _run(worker: OpenAIUpstream, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        await worker.start()
        try:
            return await body()
        finally:
            await worker.stop()

    return asyncio.run(asyncio.wait_for(main(), 5))


async def _stream(worker: OpenAIUpstream, job: Assembled, gen: Generation) -> list[str]:
    return [token async for token in worker.generate(job, gen)]


def test_stream_happy_path_with_usage(upstream: FaultUpstream) -> None:
    upstream.script(Ok(tokens=["Hel", "lo", "!"], cached_tokens=2))
    worker = _worker(upstream, temperature=0.5, max_tokens=50)
    gen = Generation()
    tokens = _run(worker, lambda: _stream(worker, _job(), gen))
    assert tokens == ["Hel", "lo", "!"]
    assert gen == Generation(
        prompt_tokens=5, completion_tokens=3, finish_reason="stop", cached_tokens=2
    )
    [call] = upstream.calls
    assert call.path == "/v1/chat/completions"
    assert call.headers["authorization"] == f"Bearer {CANARY}"
    assert call.body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there world"},
        ],
        "stream": True,
        "max_tokens": 50,
        "temperature": 0.5,
        "stream_options": {"include_usage": True},
    }


def test_stream_without_usage_counts_content_deltas(upstream: FaultUpstream) -> None:
    upstream.script(Ok(tokens=["a", "b", "c", "d"], usage=False))
    worker = _worker(upstream)
    gen = Generation()
    assert _run(worker, lambda: _stream(worker, _job(), gen)) == ["a", "b", "c", "d"]
    assert (gen.prompt_tokens, gen.completion_tokens) == (0, 4)


def test_complete_happy_path(upstream: FaultUpstream) -> None:
    upstream.script(Ok(text="the whole reply", cached_tokens=1))
    worker = _worker(upstream)
    gen = Generation()
    assert _run(worker, lambda: worker.complete(_job(), gen)) == "the whole reply"
    assert gen == Generation(
        prompt_tokens=5, completion_tokens=3, finish_reason="stop", cached_tokens=1
    )
    body = upstream.calls[0].body
    assert body["stream"] is False and "stream_options" not in body
    assert "max_tokens" not in body and "temperature" not in body


def test_request_max_tokens_wins_and_length_is_reported(upstream: FaultUpstream) -> None:
    worker = _worker(upstream, max_tokens=100)
    gen = Generation()
    tokens = _run(worker, lambda: _stream(worker, _job("one two three four", max_tokens=2), gen))
    assert tokens == ["one ", "two "]
    assert gen.finish_reason == "length"
    assert upstream.calls[0].body["max_tokens"] == 2


def test_no_turns_falls_back_to_the_input_and_no_key_sends_no_auth(
    upstream: FaultUpstream,
) -> None:
    worker = _worker(upstream, api_key_env=None)
    job = Assembled(
        request=PromptRequest(request_id="r", input="just this"), prompt="", dedup_key=""
    )
    assert _run(worker, lambda: worker.complete(job, Generation())) == "just this"
    call = upstream.calls[0]
    assert call.body["messages"] == [{"role": "user", "content": "just this"}]
    assert "authorization" not in call.headers


def test_missing_key_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPL_TEST_UNSET_KEY", raising=False)
    worker = OpenAIUpstream(
        OpenAIConfig(base_url="http://127.0.0.1:9", api_key_env="MPL_TEST_UNSET_KEY")
    )
    with pytest.raises(ConfigError, match="MPL_TEST_UNSET_KEY"):
        asyncio.run(worker.start())


def test_streams_reuse_one_keep_alive_connection(upstream: FaultUpstream) -> None:
    worker = _worker(upstream)

    async def three() -> None:
        for _ in range(3):
            assert await _stream(worker, _job(), Generation())

    _run(worker, three)
    assert {call.connection for call in upstream.calls} == {1}


def test_closing_the_stream_early_disconnects_the_upstream(upstream: FaultUpstream) -> None:
    upstream.script(Ok(tokens=["t"] * 100, token_delay_s=0.02))
    worker = _worker(upstream)

    async def first_token_only() -> None:
        stream = worker.generate(_job(), Generation())
        assert await anext(stream) == "t"
        await stream.aclose()  # type: ignore[attr-defined]

    _run(worker, first_token_only)
    _wait_for(lambda: upstream.open_connections == 0)
    [call] = upstream.calls
    [(_, closed_at)] = upstream.disconnects
    assert closed_at - call.at < 1.0  # RELIABILITY #22: upstream cancelled in <= 1 s


def test_a_timed_out_call_lets_go_of_its_connection(upstream: FaultUpstream) -> None:
    upstream.script(Hang(), StallAfter(1))
    worker = _worker(upstream, timeouts=FAST)

    async def two_timeouts() -> None:
        for _ in range(2):
            with pytest.raises(UpstreamFailure, match="timed out"):
                await _stream(worker, _job(), Generation())

    _run(worker, two_timeouts)
    _wait_for(lambda: len(upstream.disconnects) == 2)
    assert upstream.open_connections == 0


def _wait_for(condition: Callable[[], bool], timeout_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


def test_in_stream_error_object(upstream: FaultUpstream) -> None:
    events = (
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        b'data: {"error":{"message":"boom sk-canary","type":"server_error"}}\n\n'
    )
    upstream.script(Status(200, body=events, content_type="text/event-stream"))
    worker = _worker(upstream)
    with pytest.raises(UpstreamFailure) as info:
        _run(worker, lambda: _stream(worker, _job(), Generation()))
    assert str(info.value) == "upstream failed mid-stream (server_error)"
    assert info.value.retryable and info.value.counts


def test_stream_that_ends_without_done(upstream: FaultUpstream) -> None:
    events = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    upstream.script(Status(200, body=events, content_type="text/event-stream"))
    worker = _worker(upstream)
    with pytest.raises(UpstreamFailure, match="upstream stream ended early"):
        _run(worker, lambda: _stream(worker, _job(), Generation()))


def test_json_body_where_a_stream_belongs(upstream: FaultUpstream) -> None:
    upstream.script(Status(200, body=b'{"choices": []}'))
    worker = _worker(upstream)
    with pytest.raises(UpstreamFailure, match="malformed SSE"):
        _run(worker, lambda: _stream(worker, _job(), Generation()))


TIMEOUT = ("timed out", ErrorCode.UPSTREAM_TIMEOUT, True, True)
BROKEN = ErrorCode.UPSTREAM_ERROR


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "complete"])
@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (Status(500), ("HTTP 500", BROKEN, True, True)),
        (Status(503), ("HTTP 503", BROKEN, True, True)),
        (Status(529), ("HTTP 529", BROKEN, True, True)),
        (Status(400), ("HTTP 400", BROKEN, False, False)),
        (Status(404), ("HTTP 404", BROKEN, False, False)),
        (Status(401), ("HTTP 401 (invalid_api_key)", BROKEN, False, True)),
        (Status(403), ("HTTP 403", BROKEN, False, True)),
        (Status(429, retry_after=2), ("HTTP 429", ErrorCode.UPSTREAM_RATE_LIMITED, True, False)),
        (AnthropicError("overloaded_error"), ("HTTP 529", BROKEN, True, True)),
        (DropAfter(1), ("truncated", BROKEN, True, True)),
        (TruncatedChunked(), ("truncated", BROKEN, True, True)),
        (InvalidJSON(), ("malformed JSON", BROKEN, True, True)),
        (Hang(), TIMEOUT),
        (HangAfterHeaders(), TIMEOUT),
        (StallAfter(1), TIMEOUT),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, tuple) else "",
)
def test_faults_are_classified(
    upstream: FaultUpstream,
    behaviour: Behaviour,
    expected: tuple[str, ErrorCode, bool, bool],
    stream: bool,
) -> None:
    upstream.script(behaviour)
    worker = _worker(upstream, **({"timeouts": FAST} if expected is TIMEOUT else {}))

    async def call() -> object:
        if stream:
            return await _stream(worker, _job(), Generation())
        return await worker.complete(_job(), Generation())

    with pytest.raises(UpstreamFailure) as info:
        _run(worker, call)
    failure = info.value
    message, code, retryable, counts = expected
    assert message in str(failure)
    assert (failure.code, failure.retryable, failure.counts) == (code, retryable, counts)
    if isinstance(behaviour, Status) and behaviour.retry_after is not None:
        assert failure.retry_after_s == float(behaviour.retry_after)
    _assert_no_canary(failure, worker)
    assert len(upstream.calls) == 1  # one attempt: no retries below the shard


def test_malformed_sse(upstream: FaultUpstream) -> None:
    upstream.script(MalformedSSE(), MalformedSSE())
    worker = _worker(upstream)
    with pytest.raises(UpstreamFailure, match="upstream sent malformed SSE") as info:
        _run(worker, lambda: _stream(worker, _job(), Generation()))
    assert info.value.retryable and info.value.counts
    with pytest.raises(UpstreamFailure, match="malformed JSON"):
        _run(worker, lambda: worker.complete(_job(), Generation()))


def test_connection_refused(upstream: FaultUpstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = _worker(upstream, base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(UpstreamFailure, match="connection failed") as info:
        _run(worker, lambda: worker.complete(_job(), Generation()))
    assert info.value.retryable and info.value.counts


def test_the_key_never_leaks(upstream: FaultUpstream) -> None:
    upstream.script(Status(401), Status(401))
    worker = _worker(upstream)
    for call in (
        lambda: _stream(worker, _job(), Generation()),
        lambda: worker.complete(_job(), Generation()),
    ):
        with pytest.raises(UpstreamFailure) as info:
            _run(worker, call)
        _assert_no_canary(info.value, worker)
    assert upstream.calls[0].headers["authorization"] == f"Bearer {CANARY}"


def _assert_no_canary(failure: BaseException, worker: OpenAIUpstream) -> None:
    shown = [
        str(failure),
        repr(failure),
        "".join(traceback.format_exception(failure)),
        repr(worker),
        str(worker),
        repr(vars(worker)),
    ]
    for text in shown:
        assert CANARY not in text
        assert CANARY[:8] not in text  # the upstream's 401 text quotes a prefix
