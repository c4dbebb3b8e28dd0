"""The official openai SDK through a supervised gateway to an OpenAI-compatible upstream
that records every request: each field arrives exactly as the client sent it, and
each reply comes back as the upstream sent it (issue 14, items 1 and 4).

The upstream is ``tests/fault_upstream.py`` (``Shaped`` scripts structured replies).
One supervisor serves the module: the openai worker, no system prompt and no
retrieval (so the conversation reaches the upstream unchanged), no result cache
or coalescing (so every request is a call of its own), and a short between-token
timeout for the stalled-upstream test.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpipeline.config import OpenAIConfig, TimeoutsConfig
from tests.fault_upstream import FaultUpstream, Ok, Shaped, StallAfter
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MODEL = "fault-model"
BETWEEN_TOKENS_S = 1.0
# Any: the SDK's TypedDicts, which a dict literal checked by mypy does not match.
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def supervisor(
    tmp_path_factory: pytest.TempPathFactory, upstream: FaultUpstream
) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("passthrough")))
    openai_cfg = OpenAIConfig(
        base_url=upstream.openai_url,
        model=MODEL,
        api_key_env="",
        timeouts=TimeoutsConfig(between_tokens_s=BETWEEN_TOKENS_S),
    )
    try:
        yield factory(
            {
                "gateway.replicas": 1,
                "stages.assemble.system_prompt": "",
                "stages.inference.worker": "openai",
                "stages.inference.openai": openai_cfg,
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
def sdk(supervisor: SupervisorProcess, upstream: FaultUpstream) -> Iterator[openai.OpenAI]:
    upstream.default = Ok()
    with openai.OpenAI(
        base_url=f"{supervisor.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def _sent(upstream: FaultUpstream) -> dict[str, Any]:
    """The last request the upstream got, less what the worker itself sets."""
    body = dict(upstream.calls[-1].body)
    assert body.pop("model") == MODEL
    body.pop("stream")
    return body


def test_a_tool_round_trip_reaches_the_upstream_exactly(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    upstream.script(
        Shaped(
            message={"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
            finish_reason="tool_calls",
            extra={"system_fingerprint": "fp_tools"},
        ),
        Shaped(message={"role": "assistant", "content": "It is sunny in Paris."}),
    )
    question: Any = {"role": "user", "content": "What is the weather in Paris?"}
    first = sdk.chat.completions.create(
        model=MODEL, messages=[question], tools=[WEATHER], tool_choice="auto"
    )
    assert _sent(upstream) == {"messages": [question], "tools": [WEATHER], "tool_choice": "auto"}
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and first.system_fingerprint == "fp_tools"
    assert choice.message.content is None and choice.message.tool_calls is not None
    assert choice.message.tool_calls[0].model_dump() == call
    assert first.model == MODEL and first.id.startswith("chatcmpl-")

    asked = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": "call_abc", "content": '{"sky": "sunny"}'}
    messages: list[Any] = [question, asked, result]
    final = sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert _sent(upstream) == {"messages": messages, "tools": [WEATHER]}
    assert final.choices[0].message.content == "It is sunny in Paris."
    assert final.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_stream_as_deltas_with_index_id_and_fragments(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    deltas = [
        {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]},
    ]  # fmt: skip
    upstream.script(Shaped(deltas=deltas, finish_reason="tool_calls"))
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris and Rome?"}],
        tools=[WEATHER],
        parallel_tool_calls=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert _sent(upstream)["parallel_tool_calls"] is True
    got = [
        c.choices[0].delta.model_dump(exclude_none=True)["tool_calls"]
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    ]
    assert got == [d["tool_calls"] for d in deltas]
    calls: dict[int, dict[str, str]] = {}
    for part in (t for tool_calls in got for t in tool_calls):
        call = calls.setdefault(part["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] += part.get("id", "")
        call["name"] += part["function"].get("name", "")
        call["arguments"] += part["function"]["arguments"]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert [c["id"] for c in calls.values()] == ["call_a", "call_b"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes.count("tool_calls") == 1 and finishes[-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8
    assert len({c.id for c in chunks}) == 1 and {c.model for c in chunks} == {MODEL}


def test_json_schema_output_comes_back_verbatim(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    schema: Any = {
        "type": "json_schema",
        "json_schema": {
            "name": "city",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
                "additionalProperties": False,
            },
        },
    }
    document = ' {"name": "Paris"}\n'  # post would trim a text reply; JSON is left alone
    upstream.script(Ok(tokens=[document]))
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city."}],
        response_format=schema,
    )
    assert _sent(upstream)["response_format"] == schema
    assert reply.choices[0].message.content == document


def test_sampling_fields_stop_and_seed_reach_the_upstream(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    fields: dict[str, Any] = {
        "temperature": 0.35,
        "top_p": 0.9,
        "seed": 424242,
        "stop": ["\n\n", "END"],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {"50256": -100},
        "n": 1,
        "max_completion_tokens": 64,
        "logprobs": True,
        "top_logprobs": 2,
        "user": "user-7",
        "metadata": {"team": "search"},
    }
    logprobs = {
        "content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]
    }
    upstream.script(
        Shaped(
            message={"role": "assistant", "content": "Hi", "refusal": None},
            logprobs=logprobs,
            extra={"system_fingerprint": "fp_9", "service_tier": "default"},
        )
    )
    messages: Any = [{"role": "user", "content": "Say hi."}]
    reply = sdk.chat.completions.create(model=MODEL, messages=messages, **fields)
    assert _sent(upstream) == {"messages": messages, **fields}
    choice = reply.choices[0]
    assert (
        choice.logprobs is not None and choice.logprobs.model_dump(exclude_unset=True) == logprobs
    )
    assert (reply.system_fingerprint, reply.service_tier) == ("fp_9", "default")


def test_image_parts_and_unknown_fields_pass_both_ways(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
            },
        ],
        "name": "alice",
    }
    unknown = {"reasoning_effort": "low", "x_vendor": {"depth": [1, {"a": None}], "on": True}}
    upstream.script(
        Shaped(
            message={"role": "assistant", "content": "A cat.", "annotations": [], "x_note": 1},
            extra={"x_top": {"k": "v"}},
        )
    )
    reply = sdk.chat.completions.create(model=MODEL, messages=[image], extra_body=unknown)  # type: ignore[list-item]
    assert _sent(upstream) == {"messages": [image], **unknown}
    assert reply.choices[0].message.content == "A cat."
    assert reply.choices[0].message.model_extra == {"x_note": 1}
    assert reply.model_extra == {"x_top": {"k": "v"}}


def test_a_refusal_comes_back_as_the_upstream_sent_it(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.script(
        Shaped(message={"role": "assistant", "content": None, "refusal": "I can't help."}),
        Shaped(deltas=[{"refusal": "I can't"}, {"refusal": " help."}]),
    )
    messages: Any = [{"role": "user", "content": "Something bad."}]
    reply = sdk.chat.completions.create(model=MODEL, messages=messages)
    assert reply.choices[0].message.refusal == "I can't help."
    assert reply.choices[0].message.content is None
    stream = sdk.chat.completions.create(model=MODEL, messages=messages, stream=True)
    refusal = "".join(c.choices[0].delta.refusal or "" for c in stream if c.choices)
    assert refusal == "I can't help."


def test_an_idle_upstream_is_cut_by_the_between_token_timeout_with_an_error_event(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.script(StallAfter(2))
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two three four five"}],
        stream=True,
    )
    texts: list[str] = []
    with pytest.raises(openai.APIError) as cut:
        # extend keeps what arrived before the error event raised.
        texts.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "".join(texts) == "one two "
    assert f"no token for {BETWEEN_TOKENS_S:g} s mid-stream" in str(cut.value)
    assert isinstance(cut.value.body, dict) and cut.value.body["code"] == "upstream_timeout"


# Random valid requests survive the trip, JSON-equal after parsing.

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
_WORDS = st.text(string.ascii_letters + " ", min_size=1, max_size=20).filter(str.strip)
_NAME = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=16)
_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
# Two levels of nesting, spelled out (st.recursive warns here under hypothesis 6.170).
_NESTED = _SCALAR | st.lists(_SCALAR, max_size=3) | st.dictionaries(_NAME, _SCALAR, max_size=3)
_JSON = _SCALAR | st.lists(_NESTED, max_size=3) | st.dictionaries(_NAME, _NESTED, max_size=3)
_CALL = st.fixed_dictionaries(
    {
        "id": _NAME,
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": _NAME, "arguments": _TEXT}),
    }
)
_IMAGE = st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.fixed_dictionaries({"url": _NAME.map("https://x/{}".format)}),
    }
)
_TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT})
_PARTS = st.lists(_TEXT_PART | _IMAGE, min_size=1, max_size=3)
_ROLES = st.sampled_from(["system", "developer", "user"])
_EARLIER = st.one_of(
    st.fixed_dictionaries({"role": _ROLES, "content": _TEXT}),
    st.fixed_dictionaries({"role": st.just("user"), "content": _PARTS}, optional={"name": _NAME}),
    st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": st.none() | _TEXT},
        optional={"tool_calls": st.lists(_CALL, min_size=1, max_size=2)},
    ),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": _NAME, "content": _TEXT}),
)
_LAST = st.fixed_dictionaries({"role": st.just("user"), "content": _WORDS}) | st.fixed_dictionaries(
    {"role": st.just("tool"), "tool_call_id": _NAME, "content": _WORDS}
)
_FUNCTION = st.fixed_dictionaries(
    {"name": _NAME}, optional={"parameters": st.just({"type": "object"})}
)
_TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": _FUNCTION})
_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": _WORDS | st.lists(_WORDS, min_size=1, max_size=4),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "logit_bias": st.dictionaries(
            st.integers(0, 10**6).map(str), st.integers(-100, 100), max_size=3
        ),
        "max_tokens": st.integers(1, 2**31 - 1),
        "max_completion_tokens": st.integers(1, 4096),
        "n": st.just(1),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 20),
        "tools": st.lists(_TOOL, min_size=1, max_size=3),
        "tool_choice": st.sampled_from(["none", "auto", "required"]),
        "parallel_tool_calls": st.booleans(),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
        "user": _NAME,
        "metadata": st.dictionaries(_NAME, _TEXT, max_size=4),
    },
)  # fmt: skip
_UNKNOWN = st.dictionaries(_NAME.map("x_{}".format), _JSON, max_size=3)


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(earlier=st.lists(_EARLIER, max_size=4), last=_LAST, fields=_FIELDS, unknown=_UNKNOWN)
def test_random_valid_requests_reach_the_upstream_json_equal(
    sdk: openai.OpenAI,
    upstream: FaultUpstream,
    earlier: list[dict[str, Any]],
    last: dict[str, Any],
    fields: dict[str, Any],
    unknown: dict[str, Any],
) -> None:
    messages = [*earlier, last]
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        extra_body=unknown,
        **fields,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert _sent(upstream) == {"messages": messages, **fields, **unknown}
