"""The official anthropic SDK with tools against ``POST /v1/messages`` of a supervised
gateway (issue 14: "the official anthropic SDK against /v1/messages, streaming and
not, with tools").

Three models (``[[models]]``) behind one supervisor:

- ``gpt-tools``: the openai worker in front of ``tests/fault_upstream.py``, which
  records each request (so the test sees the exact OpenAI body an Anthropic
  request became) and answers with scripted OpenAI tool calls (``Shaped``);
- ``claude-up``: the anthropic worker in front of a second fake upstream replaying
  recorded Anthropic replies (``tests/data/anthropic``), so an Anthropic client ->
  mpipeline -> Anthropic upstream round trip shows what survives both translations;
- ``local``: echo, which calls no tools (refused by name).

No system prompt, retrieval, result cache or coalescing: the conversation reaches
the upstream as the client sent it, and every request is a call of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from mpipeline.config import AnthropicConfig, ModelConfig, OpenAIConfig
from tests.fault_upstream import FaultUpstream, Ok, Shaped, Status
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DATA = Path(__file__).resolve().parents[1] / "data" / "anthropic"
GPT = "gpt-tools"
CLAUDE = "claude-up"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
# Any: the SDK's TypedDicts, which a dict literal checked by mypy does not match.
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": SCHEMA,
}
FUNCTION = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": SCHEMA,
    },
}
QUESTION: Any = {"role": "user", "content": "What is the weather in Paris?"}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FaultUpstream, FaultUpstream]]:
    with FaultUpstream() as openai_up, FaultUpstream() as anthropic_up:
        yield openai_up, anthropic_up


@pytest.fixture(scope="module")
def supervisor(
    tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> Iterator[SupervisorProcess]:
    openai_up, anthropic_up = upstreams
    models = [
        ModelConfig(
            name=GPT,
            worker="openai",
            openai=OpenAIConfig(base_url=openai_up.openai_url, api_key_env=""),
        ),
        ModelConfig(
            name=CLAUDE,
            worker="anthropic",
            anthropic=AnthropicConfig(base_url=anthropic_up.url, api_key_env=""),
        ),
        ModelConfig(name="local", worker="echo"),
    ]
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("anthropic-tools")))
    try:
        yield factory(
            {
                "models": models,
                "gateway.replicas": 1,
                "stages.assemble.system_prompt": "",
                "stages.inference.retry.max_retries": 0,
                "stages.inference.dedup.cache_entries": 0,
                "stages.inference.dedup.coalesce": False,
                # One chunk per upstream chunk, as the upstream sent them.
                "stages.inference.coalesce_reads": False,
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture
def sdk(
    supervisor: SupervisorProcess, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> Iterator[anthropic.Anthropic]:
    for up in upstreams:
        up.default = Ok()
    with anthropic.Anthropic(
        base_url=supervisor.url, api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def _sent(up: FaultUpstream, model: str) -> dict[str, Any]:
    """The last request the upstream got, less what the worker itself sets."""
    body = dict(up.calls[-1].body)
    assert body.pop("model") == model
    body.pop("stream")
    body.pop("max_tokens", None)
    return body


def _call(call_id: str, arguments: str) -> dict[str, Any]:
    fn = {"name": "get_weather", "arguments": arguments}
    return {"id": call_id, "type": "function", "function": fn}


def _result_turns(reply: Any, result: str) -> list[Any]:
    """The conversation after a tool_use reply, as the SDK's docs build it."""
    [use] = [b for b in reply.content if b.type == "tool_use"]
    answer = {"type": "tool_result", "tool_use_id": use.id, "content": result}
    return [
        QUESTION,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]},
        {"role": "user", "content": [answer]},
    ]


def test_a_tool_round_trip_through_an_openai_upstream(
    sdk: anthropic.Anthropic, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    up = upstreams[0]
    message = {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [_call("call_1", '{"city": "Paris"}')],
    }
    up.script(
        Shaped(message=message, finish_reason="tool_calls"),
        Shaped(message={"role": "assistant", "content": "It is sunny in Paris."}),
    )
    first = sdk.messages.create(model=GPT, max_tokens=256, messages=[QUESTION], tools=[WEATHER])
    assert _sent(up, GPT) == {"messages": [QUESTION], "tools": [FUNCTION]}
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    text, use = first.content
    assert text.type == "text" and text.text == "Let me check."
    assert use.type == "tool_use"
    assert (use.id, use.name, use.input) == ("call_1", "get_weather", {"city": "Paris"})

    final = sdk.messages.create(
        model=GPT, max_tokens=256, messages=_result_turns(first, "sunny, 24C"), tools=[WEATHER]
    )
    sent = _sent(up, GPT)
    assert sent["tools"] == [FUNCTION]
    asked, result = sent["messages"][1:]
    assert asked["role"] == "assistant" and asked["content"] == "Let me check."
    [call] = asked["tool_calls"]
    assert (call["id"], call["type"], call["function"]["name"]) == (
        "call_1",
        "function",
        "get_weather",
    )
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert result == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"}
    assert final.stop_reason == "end_turn"
    assert [(b.type, getattr(b, "text", None)) for b in final.content] == [
        ("text", "It is sunny in Paris.")
    ]


def test_a_streamed_tool_call_builds_the_sdks_final_message(
    sdk: anthropic.Anthropic, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    up = upstreams[0]
    deltas: list[dict[str, Any]] = [
        {"content": "Checking."},
        {"tool_calls": [dict(_call("call_a", ""), index=0)]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {"tool_calls": [dict(_call("call_b", ""), index=1)]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]},
    ]
    up.script(Shaped(deltas=deltas, finish_reason="tool_calls"))
    with sdk.messages.stream(
        model=GPT,
        max_tokens=256,
        messages=[QUESTION],
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": False},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    sent = _sent(up, GPT)
    assert sent["tool_choice"] == "required" and "parallel_tool_calls" not in sent
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].type == "text" and final.content[0].text == "Checking."
    uses = [(b.id, b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert uses == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_weather", {"city": "Rome"}),
    ]
    fragments = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert fragments == ['{"city": ', '"Paris"}', '{"city": "Rome"}']  # streamed as they came
    starts = [e.index for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == stops == [0, 1, 2]


@pytest.mark.parametrize(
    ("choice", "openai"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        (
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            {
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": False,
            },
        ),
        ({"type": "none"}, {"tool_choice": "none"}),
    ],
)
def test_tool_choice_reaches_the_upstream_in_openais_terms(
    sdk: anthropic.Anthropic,
    upstreams: tuple[FaultUpstream, FaultUpstream],
    choice: Any,
    openai: dict[str, Any],
) -> None:
    up = upstreams[0]
    up.script(Ok(text="fine"))
    reply = sdk.messages.create(
        model=GPT, max_tokens=64, messages=[QUESTION], tools=[WEATHER], tool_choice=choice
    )
    assert reply.content[0].type == "text" and reply.content[0].text == "fine"
    assert _sent(up, GPT) == {"messages": [QUESTION], "tools": [FUNCTION], **openai}


def test_images_reach_the_upstream_as_image_parts(
    sdk: anthropic.Anthropic, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    up = upstreams[0]
    up.script(Ok(text="a cat"))
    source: Any = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    content: Any = [{"type": "image", "source": source}, {"type": "text", "text": "What is it?"}]
    reply = sdk.messages.create(
        model=GPT, max_tokens=64, messages=[{"role": "user", "content": content}]
    )
    assert reply.content[0].type == "text" and reply.content[0].text == "a cat"
    assert _sent(up, GPT)["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]


def test_a_model_whose_worker_has_no_tools_refuses_them(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(model="local", max_tokens=64, messages=[QUESTION], tools=[WEATHER])
    body: Any = refused.value.body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("tools: tools is not supported")
    assert "worker echo" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match=r"tool_choice\.name"):
        sdk.messages.create(
            model=GPT,
            max_tokens=64,
            messages=[QUESTION],
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "nope"},
        )


def _replay(name: str) -> Status:
    ctype = "text/event-stream" if name.endswith(".sse") else "application/json"
    return Status(200, body=(DATA / name).read_bytes(), content_type=ctype)


def test_an_anthropic_upstream_gets_the_clients_tools_back_in_its_own_shape(
    sdk: anthropic.Anthropic, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    up = upstreams[1]
    up.script(_replay("tool_use_message.json"), Ok(text="It is 15 degrees and sunny."))
    first = sdk.messages.create(
        model=CLAUDE,
        max_tokens=512,
        messages=[QUESTION],
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert up.calls[-1].path == "/v1/messages"
    sent = _sent(up, CLAUDE)
    assert sent == {
        "messages": [QUESTION],
        "tools": [WEATHER],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    assert first.stop_reason == "tool_use"
    recorded = json.loads((DATA / "tool_use_message.json").read_text())
    assert [b.model_dump(exclude_none=True) for b in first.content] == recorded["content"]

    turns = _result_turns(first, "15 degrees, sunny")
    final = sdk.messages.create(model=CLAUDE, max_tokens=512, messages=turns, tools=[WEATHER])
    assert _sent(up, CLAUDE) == {"messages": turns, "tools": [WEATHER]}
    assert final.content[0].type == "text"
    assert final.content[0].text == "It is 15 degrees and sunny."
    assert final.stop_reason == "end_turn"
