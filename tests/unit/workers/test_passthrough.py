"""Fields and structure through the workers: what each sends upstream, and what a
structured OpenAI reply turns into (``Structured`` pieces, ``Generation.raw``).

The OpenAI worker splices the request's raw parts in and keeps a structured
reply's JSON; echo and the Anthropic worker honour or translate their fields.
The fault upstream records each request exactly as it arrived.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import msgspec
import pytest

from mpipeline.config import AnthropicConfig, EchoConfig, OpenAIConfig, TimeoutsConfig
from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled, PromptRequest, Turn
from mpipeline.workers._params import json_mode
from mpipeline.workers.anthropic import AnthropicUpstream
from mpipeline.workers.base import Generation, Structured
from mpipeline.workers.echo import EchoWorker
from mpipeline.workers.openai import OpenAIUpstream
from tests.fault_upstream import FaultUpstream, Ok, Shaped

T = TypeVar("T")
TIMEOUTS = TimeoutsConfig(connect_s=1, first_token_s=2, between_tokens_s=2, total_s=4)
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}


@pytest.fixture
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream() as up:
        yield up


def _job(params: dict[str, Any] | None = None, *, stream: bool = False) -> Assembled:
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    request = PromptRequest(
        request_id="r1",
        input="sunny",
        stream=stream,
        params=msgspec.json.encode(params) if params else b"",
        input_raw=msgspec.json.encode(tool),
    )
    asked = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    turns = [
        Turn(role="user", content="weather?"),
        Turn(role="assistant", content="", raw=msgspec.json.encode(asked)),
        Turn(role="user", content="sunny", raw=request.input_raw),
    ]
    return Assembled(request=request, prompt="", dedup_key="k", messages=turns)


def _run(worker: OpenAIUpstream | AnthropicUpstream, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        await worker.start()
        try:
            return await body()
        finally:
            await worker.stop()

    return asyncio.run(asyncio.wait_for(main(), 5))


def _openai(up: FaultUpstream, **fields: Any) -> OpenAIUpstream:
    config = OpenAIConfig(base_url=up.openai_url, model="m", api_key_env="", timeouts=TIMEOUTS)
    return OpenAIUpstream(msgspec.structs.replace(config, **fields))


def test_the_openai_request_is_the_clients_with_the_worker_parts_set(
    upstream: FaultUpstream,
) -> None:
    params = {
        "temperature": 0.2,
        "max_completion_tokens": 5,
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "stream_options": {"include_obfuscation": False},
        "model": "not-this-one",
        "x_unknown": [1, None, {"a": "b"}],
    }
    worker = _openai(upstream, temperature=0.9, max_tokens=100)
    _run(worker, lambda: worker.complete(_job(params), Generation()))
    sent = upstream.calls[-1].body
    assert sent["model"] == "m" and sent["stream"] is False
    assert sent["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    # The client's values win over the config's; no max_tokens beside max_completion_tokens.
    assert {k: sent[k] for k in params if k != "model"} == {
        k: v for k, v in params.items() if k != "model"
    }
    assert "max_tokens" not in sent
    gen = Generation()
    job = _job(params, stream=True)
    _run(worker, lambda: _collect(worker.generate(job, gen)))
    options = upstream.calls[-1].body["stream_options"]
    assert options == {"include_obfuscation": False, "include_usage": True}
    plain = Assembled(request=PromptRequest(request_id="r", input="hi"), prompt="", dedup_key="")
    _run(worker, lambda: worker.complete(plain, Generation()))
    sent = upstream.calls[-1].body
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    assert (sent["max_tokens"], sent["temperature"]) == (100, 0.9)


def test_a_null_length_bound_gives_way_to_the_configured_one(upstream: FaultUpstream) -> None:
    """The openai SDK sends ``max_tokens=None`` as null; passed on, an upstream would
    generate without bound (a local server until its context is full)."""
    worker = _openai(upstream, max_tokens=100)
    _run(worker, lambda: worker.complete(_job({"max_tokens": None}), Generation()))
    assert upstream.calls[-1].body["max_tokens"] == 100
    _run(worker, lambda: worker.complete(_job({"max_completion_tokens": None}), Generation()))
    sent = upstream.calls[-1].body
    assert sent["max_tokens"] == 100 and "max_completion_tokens" not in sent


async def _collect(pieces: Any) -> list[str]:
    return [piece async for piece in pieces]


def test_a_structured_reply_keeps_its_json_and_a_plain_one_does_not(
    upstream: FaultUpstream,
) -> None:
    worker = _openai(upstream)
    message = {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None}
    upstream.script(
        Shaped(message=message, finish_reason="tool_calls", extra={"system_fingerprint": "fp"}),
        Ok(text="just text"),
    )
    gen = Generation()
    text = _run(worker, lambda: worker.complete(_job(), gen))
    assert (text, gen.finish_reason) == ("", "tool_calls")
    reply = json.loads(gen.raw)
    assert reply["choices"][0]["message"] == message and reply["system_fingerprint"] == "fp"
    plain = Generation()
    assert _run(worker, lambda: worker.complete(_job(), plain)) == "just text"
    assert plain.raw == b""


@pytest.mark.parametrize("per_read", [False, True])
def test_streamed_tool_call_deltas_are_pieces_of_their_own(
    upstream: FaultUpstream, per_read: bool
) -> None:
    deltas = [
        {"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
    ]
    usage = {"prompt_tokens": 4, "completion_tokens": 9, "completion_tokens_details": {"r": 0}}
    upstream.script(Shaped(deltas=deltas, finish_reason="tool_calls", usage=usage))
    worker = _openai(upstream)
    gen = Generation()
    stream = worker.generate_reads if per_read else worker.generate
    pieces = _run(worker, lambda: _collect(stream(_job(stream=True), gen)))
    structured = [p for p in pieces if isinstance(p, Structured)]
    sent = [json.loads(p.raw)["choices"][0]["delta"] for p in structured]
    assert sent[-len(deltas) :] == deltas and all(p == "" for p in structured)
    assert gen.finish_reason == "tool_calls" and gen.completion_tokens == 9
    assert json.loads(gen.raw)["usage"] == usage  # the usage chunk, for the route
    assert gen.raw_bytes >= len(gen.raw) + sum(len(p.raw) for p in structured)


def test_echo_stops_at_a_stop_sequence_streamed_or_not() -> None:
    worker = EchoWorker(EchoConfig(max_tokens=50))
    request = PromptRequest(
        request_id="r", input="one two STOP three", params=b'{"stop": ["STOP", "zz"]}'
    )
    job = Assembled(request=request, prompt="", dedup_key="")
    gen, streamed = Generation(), Generation()
    assert asyncio.run(worker.complete(job, gen)) == "one two "
    pieces = asyncio.run(_collect(worker.generate(job, streamed)))
    assert "".join(pieces) == "one two " and streamed.finish_reason == gen.finish_reason == "stop"
    bad = Assembled(
        request=PromptRequest(request_id="r", input="x", params=b'{"stop": 5}'),
        prompt="",
        dedup_key="",
    )
    with pytest.raises(UpstreamFailure) as refused:
        asyncio.run(worker.complete(bad, Generation()))
    assert refused.value.code == ErrorCode.INVALID_REQUEST


def test_anthropic_translates_stop_and_sampling(upstream: FaultUpstream) -> None:
    config = AnthropicConfig(base_url=upstream.url, api_key_env="", timeouts=TIMEOUTS)
    worker = AnthropicUpstream(config)
    request = PromptRequest(
        request_id="r",
        input="hi",
        max_tokens=7,
        params=(
            b'{"stop": "END", "temperature": 0.5, "top_p": 0.9, "top_k": 40, '
            b'"max_completion_tokens": 7}'
        ),
    )
    job = Assembled(
        request=request, prompt="", dedup_key="", messages=[Turn(role="user", content="hi")]
    )
    _run(worker, lambda: worker.complete(job, Generation()))
    sent = upstream.calls[-1].body
    assert sent["stop_sequences"] == ["END"] and sent["max_tokens"] == 7
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.5, 0.9, 40)
    assert "stop" not in sent and "max_completion_tokens" not in sent


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b"", False),
        (b'{"response_format": {"type": "json_object"}}', True),
        (b'{"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}', True),
        (b'{"response_format": {"type": "text"}}', False),
        (b'{"response_format": null}', False),
        (b'{"temperature": 1}', False),
    ],
)
def test_json_mode_is_read_from_response_format(params: bytes, expected: bool) -> None:
    assert json_mode(params) is expected
