"""The official openai SDK through a supervised gateway whose worker is anthropic: a
tool round trip, streamed tool calls and a json_schema answer, translated both
ways (issue 14, item 2).

The upstream is ``tests/fault_upstream.py`` replaying the recorded Anthropic
replies of ``tests/data/anthropic`` (sources in
``tests/unit/workers/test_anthropic_tools.py``), so the client meets what the
Messages API sends, as OpenAI's shape; and it records each request, so the
test sees the exact Anthropic body each OpenAI request became. One
supervisor serves the module: no system prompt and no retrieval (the
conversation reaches the upstream unchanged), no result cache or coalescing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from mpipeline.config import AnthropicConfig
from tests.fault_upstream import FaultUpstream, Ok, Status
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DATA = Path(__file__).resolve().parents[1] / "data" / "anthropic"
CLAUDE = "claude-opus-5"
# Any: the SDK's TypedDicts, which a dict literal checked by mypy does not match.
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
QUESTION: Any = {"role": "user", "content": "What is the weather like in San Francisco?"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def supervisor(
    tmp_path_factory: pytest.TempPathFactory, upstream: FaultUpstream
) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("anthropic-tools")))
    try:
        yield factory(
            {
                "gateway.replicas": 1,
                "stages.assemble.system_prompt": "",
                "stages.inference.worker": "anthropic",
                "stages.inference.anthropic": AnthropicConfig(
                    base_url=upstream.url, model=CLAUDE, api_key_env=""
                ),
                "stages.inference.retry.max_retries": 0,
                "stages.inference.dedup.cache_entries": 0,
                "stages.inference.dedup.coalesce": False,
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture
def sdk(supervisor: SupervisorProcess, upstream: FaultUpstream) -> Iterator[openai.OpenAI]:
    upstream.default = Ok()
    with openai.OpenAI(
        base_url=f"{supervisor.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def _replay(name: str) -> Status:
    ctype = "text/event-stream" if name.endswith(".sse") else "application/json"
    return Status(200, body=(DATA / name).read_bytes(), content_type=ctype)


def _sent(upstream: FaultUpstream) -> dict[str, Any]:
    """The last request the upstream got, less what the worker itself sets."""
    call = upstream.calls[-1]
    assert call.path == "/v1/messages"
    body = dict(call.body)
    assert (body.pop("model"), body.pop("max_tokens")) == (CLAUDE, 1024)
    body.pop("stream")
    return body


def test_a_tool_round_trip_through_the_anthropic_worker(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.script(_replay("tool_use_message.json"), Ok(text="It is 15 degrees and sunny."))
    first = sdk.chat.completions.create(model="any", messages=[QUESTION], tools=[WEATHER])
    tool = {
        "name": "get_weather",
        "description": WEATHER["function"]["description"],
        "input_schema": WEATHER["function"]["parameters"],
    }
    assert _sent(upstream) == {"messages": [QUESTION], "tools": [tool]}
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I'll check the current weather in San Francisco for you."
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.id == "toolu_01A09q90qw90lq917835lq9" and call.type == "function"
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert arguments == {"location": "San Francisco, CA", "unit": "celsius"}
    assert first.model == "any" and first.id.startswith("chatcmpl-")

    # The client runs the tool and sends the result, as the SDK's docs show.
    messages: Any = [
        QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "15 degrees, sunny"},
    ]
    final = sdk.chat.completions.create(model="any", messages=messages, tools=[WEATHER])
    assert _sent(upstream)["messages"] == [
        QUESTION,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": choice.message.content},
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": "get_weather",
                    "input": arguments,
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "15 degrees, sunny"}
            ],
        },
    ]
    assert final.choices[0].message.content == "It is 15 degrees and sunny."
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None


def test_streamed_tool_use_arrives_as_openai_tool_call_deltas(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.script(_replay("tool_use_stream.sse"))
    stream = sdk.chat.completions.create(
        model="any",
        messages=[QUESTION],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert _sent(upstream)["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Okay, let's check the weather for San Francisco, CA:"
    parts = [
        t.model_dump(exclude_none=True)
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for t in c.choices[0].delta.tool_calls
    ]
    assert parts[0] == {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(p["index"] == 0 and "id" not in p for p in parts[1:])
    arguments = "".join(p["function"]["arguments"] for p in parts)
    assert json.loads(arguments) == {"location": "San Francisco, CA"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes.count("tool_calls") == 1 and finishes[-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 89
    assert len({c.id for c in chunks}) == 1


def test_a_json_schema_answer_is_the_message_text(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.script(_replay("tool_use_json_stream.sse"))
    schema = {
        "type": "object",
        "properties": {"elements": {"type": "array", "items": {"type": "object"}}},
        "required": ["elements"],
    }
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "json", "schema": schema},
    }
    stream = sdk.chat.completions.create(
        model="any", messages=[QUESTION], response_format=response_format, stream=True
    )
    chunks = list(stream)
    sent = _sent(upstream)
    assert sent["tools"][0]["input_schema"] == schema
    assert sent["tool_choice"] == {"type": "tool", "name": "json"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text)["elements"][0]["location"] == "San Francisco"
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_what_anthropic_cannot_honour_is_refused_naming_it(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="any", messages=[QUESTION], seed=7)
    assert refused.value.code == "unsupported_parameter"
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "seed"
