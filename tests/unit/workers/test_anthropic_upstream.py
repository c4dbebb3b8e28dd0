"""AnthropicUpstream against the fault upstream: the Messages API event for event."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from mpipeline.config import AnthropicConfig, PoolUpstreamConfig, TimeoutsConfig
from mpipeline.errors import ConfigError, ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled, PromptRequest, Turn
from mpipeline.workers._anthropic_wire import conversation as _conversation
from mpipeline.workers.anthropic import AnthropicUpstream, stop_reason
from mpipeline.workers.base import Generation
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

CANARY = "sk-ant-canary-93be41d07a"
KEY_ENV = "MPL_TEST_ANTHROPIC_KEY"
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


def _worker(up: FaultUpstream, **overrides: Any) -> AnthropicUpstream:
    fields: dict[str, Any] = {
        "base_url": up.url,
        "model": "claude-test",
        "api_key_env": KEY_ENV,
        "timeouts": ROOMY,
    }
    return AnthropicUpstream(AnthropicConfig(**(fields | overrides)))


def _turns(*pairs: tuple[str, str]) -> list[Turn]:
    return [Turn(role=role, content=content) for role, content in pairs]


def _job(text: str = "hello there world", *, max_tokens: int | None = None) -> Assembled:
    request = PromptRequest(request_id="r1", input=text, max_tokens=max_tokens)
    turns = _turns(("system", "Be brief."), ("system", "Context: none."), ("user", text))
    return Assembled(request=request, prompt=text, dedup_key="k", messages=turns)


def _run(worker: AnthropicUpstream, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        await worker.start()
        try:
            return await body()
        finally:
            await worker.stop()

    return asyncio.run(asyncio.wait_for(main(), 5))


async def _stream(worker: AnthropicUpstream, job: Assembled, gen: Generation) -> list[str]:
    return [token async for token in worker.generate(job, gen)]


def test_stream_happy_path_with_usage(upstream: FaultUpstream) -> None:
    upstream.script(Ok(tokens=["Hel", "lo", "!"], cached_tokens=2))
    worker = _worker(upstream, temperature=0.2)
    gen = Generation()
    assert _run(worker, lambda: _stream(worker, _job(), gen)) == ["Hel", "lo", "!"]
    # Anthropic's input_tokens leaves the cache hits out; prompt_tokens has them in.
    assert gen == Generation(
        prompt_tokens=7, completion_tokens=3, finish_reason="stop", cached_tokens=2
    )
    [call] = upstream.calls
    assert call.path == "/v1/messages"
    assert call.headers["x-api-key"] == CANARY
    assert call.headers["anthropic-version"] == "2023-06-01"
    assert call.headers["content-type"] == "application/json"
    assert "authorization" not in call.headers
    assert call.body == {
        "model": "claude-test",
        "max_tokens": 1024,
        "system": "Be brief.\n\nContext: none.",
        "messages": [{"role": "user", "content": "hello there world"}],
        "temperature": 0.2,
        "stream": True,
    }


def test_complete_happy_path(upstream: FaultUpstream) -> None:
    upstream.script(Ok(text="the whole reply"))
    worker = _worker(upstream)
    gen = Generation()
    assert _run(worker, lambda: worker.complete(_job(), gen)) == "the whole reply"
    assert gen == Generation(prompt_tokens=7, completion_tokens=3, finish_reason="stop")
    assert upstream.calls[0].body["stream"] is False


def test_max_tokens_stop_is_length(upstream: FaultUpstream) -> None:
    worker = _worker(upstream)
    gen = Generation()
    tokens = _run(worker, lambda: _stream(worker, _job("a b c d", max_tokens=2), gen))
    assert tokens == ["a ", "b "]
    assert (gen.finish_reason, gen.completion_tokens) == ("length", 2)
    assert upstream.calls[0].body["max_tokens"] == 2


def test_pool_member_config_without_max_tokens_gets_the_default(
    upstream: FaultUpstream,
) -> None:
    config = PoolUpstreamConfig(
        name="claude",
        kind="anthropic",
        base_url=upstream.url,
        model="m",
        api_key_env=None,
        version="2099-01-01",
        timeouts=ROOMY,
    )
    worker = AnthropicUpstream(config, name=config.name)
    assert worker.name == "claude"
    _run(worker, lambda: worker.complete(_job(), Generation()))
    call = upstream.calls[0]
    assert call.body["max_tokens"] == 1024
    assert call.headers["anthropic-version"] == "2099-01-01"
    assert "x-api-key" not in call.headers


def test_missing_key_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPL_TEST_UNSET_KEY", raising=False)
    config = AnthropicConfig(base_url="http://127.0.0.1:9", api_key_env="MPL_TEST_UNSET_KEY")
    with pytest.raises(ConfigError, match="MPL_TEST_UNSET_KEY"):
        asyncio.run(AnthropicUpstream(config).start())


def test_conversation_shape() -> None:
    request = PromptRequest(request_id="r", input="fallback")
    turns = _turns(
        ("assistant", "greeting dropped"),
        ("system", "s1"),
        ("user", "u1"),
        ("tool", "t1"),
        ("assistant", "a1"),
        ("assistant", "a2"),
        ("system", "s2"),
        ("user", "u2"),
    )
    job = Assembled(request=request, prompt="", dedup_key="", messages=turns)
    assert _conversation(job) == (
        "s1\n\ns2",
        [
            {"role": "user", "content": "u1\n\nt1"},
            {"role": "assistant", "content": "a1\n\na2"},
            {"role": "user", "content": "u2"},
        ],
    )
    only_system = Assembled(
        request=request, prompt="", dedup_key="", messages=_turns(("system", "s"))
    )
    assert _conversation(only_system) == ("s", [{"role": "user", "content": "fallback"}])


def test_stop_reasons() -> None:
    assert [stop_reason(r) for r in ("end_turn", "stop_sequence", "max_tokens", "tool_use")] == [
        "stop",
        "stop",
        "length",
        "tool_calls",
    ]
    assert stop_reason(None) == "stop"


def _events(*names: str) -> bytes:
    """A hand-made stream of the named events, one text delta as the content."""
    data = {
        "message_start": '{"type":"message_start","message":{"usage":{"input_tokens":3}}}',
        "content_block_start": '{"type":"content_block_start","index":0,'
        '"content_block":{"type":"text","text":""}}',
        "content_block_delta": '{"type":"content_block_delta","index":0,'
        '"delta":{"type":"text_delta","text":"hi"}}',
        "input_json_delta": '{"type":"content_block_delta","index":0,'
        '"delta":{"type":"input_json_delta","partial_json":"{"}}',
        "future_event": '{"type":"future_event","whatever":[1,2]}',
        "message_delta": '{"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        '"usage":{"output_tokens":1}}',
        "message_stop": '{"type":"message_stop"}',
    }
    return b"".join(f"event: {n}\ndata: {data[n]}\n\n".encode() for n in names)


def test_other_delta_types_and_unknown_events_are_ignored(upstream: FaultUpstream) -> None:
    body = _events(
        "message_start",
        "content_block_start",
        "input_json_delta",
        "future_event",
        "content_block_delta",
        "message_delta",
        "message_stop",
    )
    upstream.script(Status(200, body=body, content_type="text/event-stream"))
    worker = _worker(upstream)
    gen = Generation()
    assert _run(worker, lambda: _stream(worker, _job(), gen)) == ["hi"]
    assert (gen.prompt_tokens, gen.completion_tokens) == (3, 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_events("message_start", "content_block_delta"), "upstream stream ended early"),
        (_events("message_start") + b"event: content_block_delta\ndata: {", "truncated"),
    ],
    ids=["no-message-stop", "cut-mid-event"],
)
def test_stream_that_ends_before_message_stop(
    upstream: FaultUpstream, body: bytes, message: str
) -> None:
    upstream.script(Status(200, body=body, content_type="text/event-stream"))
    worker = _worker(upstream)
    with pytest.raises(UpstreamFailure, match=message) as info:
        _run(worker, lambda: _stream(worker, _job(), Generation()))
    assert info.value.retryable and info.value.counts


@pytest.mark.parametrize(
    ("kind", "retryable", "counts"),
    [
        ("overloaded_error", True, True),
        ("api_error", True, True),
        ("invalid_request_error", False, False),
        ("authentication_error", False, True),
    ],
)
def test_error_events_mid_stream(
    upstream: FaultUpstream, kind: str, retryable: bool, counts: bool
) -> None:
    upstream.script(AnthropicError(kind, after_tokens=2))
    worker = _worker(upstream)
    got: list[str] = []

    async def consume() -> None:
        async for token in worker.generate(_job(), Generation()):
            got.append(token)  # noqa: PERF401 - keeps the tokens that came before the error

    with pytest.raises(UpstreamFailure) as info:
        _run(worker, consume)
    assert got == ["hello ", "there "]
    assert str(info.value) == f"upstream failed mid-stream ({kind})"
    assert (info.value.retryable, info.value.counts) == (retryable, counts)
    assert info.value.status is None


TIMEOUT = ("timed out", ErrorCode.UPSTREAM_TIMEOUT, True, True)
BROKEN = ErrorCode.UPSTREAM_ERROR


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "complete"])
@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (Status(500), ("HTTP 500 (api_error)", BROKEN, True, True)),
        (Status(529), ("HTTP 529 (overloaded_error)", BROKEN, True, True)),
        (Status(400), ("HTTP 400 (invalid_request_error)", BROKEN, False, False)),
        (Status(401), ("HTTP 401 (authentication_error)", BROKEN, False, True)),
        (Status(429, retry_after=3), ("HTTP 429", ErrorCode.UPSTREAM_RATE_LIMITED, True, False)),
        (Status(503, retry_after=1), ("HTTP 503", ErrorCode.UPSTREAM_RATE_LIMITED, True, True)),
        (DropAfter(1), ("truncated", BROKEN, True, True)),
        (TruncatedChunked(), ("truncated", BROKEN, True, True)),
        (InvalidJSON(), ("malformed JSON", BROKEN, True, True)),
        (Hang(), TIMEOUT),
        (HangAfterHeaders(), TIMEOUT),
        (StallAfter(2), TIMEOUT),
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
    for text in (str(failure), "".join(traceback.format_exception(failure)), repr(worker)):
        assert CANARY not in text
    assert len(upstream.calls) == 1


def test_malformed_sse(upstream: FaultUpstream) -> None:
    upstream.script(MalformedSSE())
    worker = _worker(upstream)
    with pytest.raises(UpstreamFailure, match="upstream sent malformed SSE"):
        _run(worker, lambda: _stream(worker, _job(), Generation()))


def test_streams_reuse_one_keep_alive_connection(upstream: FaultUpstream) -> None:
    worker = _worker(upstream)

    async def three() -> None:
        for _ in range(3):
            assert await _stream(worker, _job(), Generation())

    _run(worker, three)
    assert {call.connection for call in upstream.calls} == {1}
