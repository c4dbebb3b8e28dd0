"""The anthropic worker sends OpenAI tool turns, images, tool_choice and
response_format in the Messages API's shape, and refuses what it cannot
translate before anything is sent (issue 14, item 2)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.workers.base import Generation
from tests.fault_upstream import FaultUpstream, Ok
from tests.unit.workers._anthropic_tooling import (
    WEATHER,
    WEATHER_DOCS,
    WEATHER_QUESTION,
    anthropic_worker,
    last_body,
    openai_job,
    run_worker,
    upstream,
)

__all__ = ["upstream"]  # the fixture


def test_tool_turns_images_and_a_named_choice_are_sent_as_anthropic_blocks(
    upstream: FaultUpstream,
) -> None:
    upstream.script(Ok(text="Paris is at 18C and Rome at 21C."))
    calls = [
        {
            "id": f"call_{city}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"location": city})},
        }
        for city in ("Paris", "Rome")
    ]
    question = "Where is this, and the weather in Paris and Rome?"
    image: list[dict[str, Any]] = [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": image},
        {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_Rome", "content": [{"type": "text", "text": "21C"}]},
    ]
    body = {
        "messages": messages,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "stop": ["END"],
        "temperature": 0.2,
    }
    worker = anthropic_worker(upstream.url)
    gen = Generation()
    text = run_worker(worker, lambda: worker.complete(openai_job(body, stream=False), gen))
    assert text == "Paris is at 18C and Rome at 21C." and gen.raw == b""
    assert last_body(upstream) == {
        "model": "claude-opus-5",
        "max_tokens": 1024,
        "system": "Be brief.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "iVBORw0KGgo=",
                        },
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "call_Paris",
                        "name": "get_weather",
                        "input": {"location": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "call_Rome",
                        "name": "get_weather",
                        "input": {"location": "Rome"},
                    },
                ],
            },
            # Consecutive tool results: one user turn.
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_Paris", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "call_Rome", "content": "21C"},
                ],
            },
        ],
        "temperature": 0.2,
        "stop_sequences": ["END"],
        "tools": [WEATHER_DOCS],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "stream": False,
    }


def test_json_answer_beside_client_tools_lets_the_model_call_either(
    upstream: FaultUpstream,
) -> None:
    worker = anthropic_worker(upstream.url)
    body = {
        "messages": [WEATHER_QUESTION],
        "tools": [WEATHER],
        "response_format": {"type": "json_object"},
        "parallel_tool_calls": False,
    }
    run_worker(worker, lambda: worker.complete(openai_job(body, stream=False), Generation()))
    sent = last_body(upstream)
    assert [t["name"] for t in sent["tools"]] == ["get_weather", "json"]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_no_tools_and_no_format_leave_the_body_as_it_was(upstream: FaultUpstream) -> None:
    worker = anthropic_worker(upstream.url)
    body = {"messages": [WEATHER_QUESTION], "tool_choice": "auto", "parallel_tool_calls": False}
    run_worker(worker, lambda: worker.complete(openai_job(body, stream=False), Generation()))
    assert last_body(upstream) == {
        "model": "claude-opus-5",
        "max_tokens": 1024,
        "messages": [WEATHER_QUESTION],
        "stream": False,
    }


BAD_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "messages": [
                    WEATHER_QUESTION,
                    {"role": "assistant", "content": None, "tool_calls": [BAD_CALL]},
                    {"role": "tool", "tool_call_id": "c1", "content": "x"},
                ]
            },
            "arguments must be a JSON object",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}],
                    }
                ]
            },
            "an image URL must be",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png,"}}],
                    }
                ]
            },
            "base64",
        ),
        (
            {"messages": [WEATHER_QUESTION], "tools": [{"type": "custom", "custom": {}}]},
            "tools[0].type",
        ),
        ({"messages": [WEATHER_QUESTION], "tool_choice": "required"}, "no tools"),
        (
            {
                "messages": [WEATHER_QUESTION],
                "tools": [{"type": "function", "function": {"name": "json"}}],
                "response_format": {"type": "json_object"},
            },
            "also a tool's name",
        ),
    ],
    ids=["arguments", "image-scheme", "data-url", "tool-type", "choice", "name-clash"],
)
def test_what_cannot_be_translated_is_the_requests_error_and_never_sent(
    upstream: FaultUpstream, body: dict[str, Any], message: str
) -> None:
    worker = anthropic_worker(upstream.url)
    with pytest.raises(UpstreamFailure, match=message.replace("[", r"\[")) as info:
        run_worker(worker, lambda: worker.complete(openai_job(body, stream=False), Generation()))
    failure = info.value
    assert (failure.code, failure.retryable, failure.counts) == (
        ErrorCode.INVALID_REQUEST,
        False,
        False,
    )
    assert upstream.calls == []
