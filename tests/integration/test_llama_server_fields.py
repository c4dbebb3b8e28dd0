"""The OpenAI fields a real llama.cpp server honours, through the gateway (issue 14).

The official ``openai`` SDK talks to mpipeline's supervised gateway, whose
``openai`` worker passes each request on to llama-cpp-python's server
(``python -m llama_cpp.server``, tests/llama_server.py) serving the packaged
Gemma 3 270M. The fake upstream's tests check that every field arrives as
sent; these check that the server then does what the field asks, so a field
lost or mangled on the way shows up as a wrong answer: ``stop`` (the model
stops, not just the text), ``seed`` with ``temperature``, ``max_tokens``,
``response_format`` and ``logprobs``/``top_logprobs``, streamed and not.

What this server (llama-cpp-python 0.3.36) does not do is left out:
``response_format`` ``{"type": "json_schema"}`` fails its request validation
(only ``text`` and ``json_object`` exist there), so structured output is its
own form, ``{"type": "json_object", "schema": {...}}``, which the gateway
passes on unchanged like any field it does not know; and streams carry no
``usage`` (it ignores ``stream_options``).

Determinism: at temperature 0 the server decodes greedily, so a prompt's
answer is known by asking once; sampled answers are compared only for
equality under one seed, and for "not all the same" over several seeds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from mpipeline.config import OpenAIConfig
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess
from tests.llama_server import LlamaServer, llama_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
__all__ = ["llama_server"]  # the fixture, imported to be used here

PROMPT: Any = [{"role": "user", "content": "Once upon a time"}]
# Long enough for a few words, short enough to keep each call well under a second.
MAX_TOKENS = 12
COLOURS = ["red", "green", "blue"]
COLOUR_SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": COLOURS}},
    "required": ["colour"],
}


@pytest.fixture(scope="module")
def supervisor(
    tmp_path_factory: pytest.TempPathFactory, llama_server: LlamaServer
) -> Iterator[SupervisorProcess]:
    upstream = OpenAIConfig(
        base_url=llama_server.url, model=llama_server.model, api_key_env="", max_tokens=MAX_TOKENS
    )
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("llama-fields")))
    try:
        yield factory(
            {
                "gateway.replicas": 1,
                "stages.inference.worker": "openai",
                "stages.inference.openai": upstream,
                "stages.inference.retry.max_retries": 0,
                # Each request a call of its own: a cached or joined answer would
                # make "the same text twice" true without the server's doing.
                "stages.inference.dedup.cache_entries": 0,
                "stages.inference.dedup.coalesce": False,
                # The text exactly as the server wrote it (post trims the final
                # text by default, not the chunks: a stream and its reply would differ).
                "stages.post.strip": False,
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def sdk(supervisor: SupervisorProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{supervisor.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def _ask(sdk: openai.OpenAI, **fields: Any) -> Any:
    """A chat completion (of ``PROMPT``, greedy, at most ``MAX_TOKENS`` unless told)."""
    fields = {"messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return sdk.chat.completions.create(model="gemma", **fields)


def _stream(sdk: openai.OpenAI, **fields: Any) -> list[Any]:
    """The choices of a streamed answer, one per chunk that has one."""
    chunks = _ask(sdk, stream=True, **fields)
    return [c.choices[0] for c in chunks if c.choices]


def _text(choices: list[Any]) -> str:
    return "".join(c.delta.content or "" for c in choices)


def _finish(choices: list[Any]) -> str | None:
    reasons = [c.finish_reason for c in choices if c.finish_reason]
    assert len(reasons) == 1, reasons
    return str(reasons[0])


def test_stop_ends_the_text_before_it_and_the_model_stops_generating(
    sdk: openai.OpenAI,
) -> None:
    whole = _ask(sdk)
    text = whole.choices[0].message.content or ""
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    # A word from the middle of the greedy answer: generation must end before it.
    words = text.split()
    assert len(words) >= 3, text
    stop = words[len(words) // 2]
    before = text[: text.find(stop)]
    assert before.strip(), (text, stop)

    cut = _ask(sdk, stop=[stop])
    assert cut.choices[0].message.content == before
    assert cut.choices[0].finish_reason == "stop"
    # The server stopped (fewer tokens generated), not the gateway cutting a full answer.
    assert cut.usage.completion_tokens < whole.usage.completion_tokens

    streamed = _stream(sdk, stop=stop)
    assert _text(streamed) == before
    assert _finish(streamed) == "stop"


def test_a_seed_repeats_a_sampled_answer_and_temperature_zero_ignores_it(
    sdk: openai.OpenAI,
) -> None:
    sampled = [_ask(sdk, temperature=1.0, seed=seed).choices[0].message.content for seed in (1, 1)]
    assert sampled[0] and sampled[0] == sampled[1]
    assert _text(_stream(sdk, temperature=1.0, seed=1)) == sampled[0]
    # Other seeds sample other words: the seed reaches the server (all three the
    # same for 12 tokens of a base model at temperature 1 is vanishingly unlikely).
    others = {_ask(sdk, temperature=1.0, seed=seed).choices[0].message.content for seed in (2, 3)}
    assert others | {sampled[0]} != {sampled[0]}
    # Greedy decoding does not sample: with temperature 0 the seed changes nothing,
    # so temperature reaches the server too (its default is 0.8).
    greedy = {_ask(sdk, seed=seed).choices[0].message.content for seed in (1, 2)}
    assert len(greedy) == 1


def test_max_tokens_bounds_the_answer(sdk: openai.OpenAI) -> None:
    short = _ask(sdk, max_tokens=3)
    assert short.usage.completion_tokens == 3
    assert short.choices[0].finish_reason == "length"
    streamed = _stream(sdk, max_tokens=3)
    assert 1 <= len([c for c in streamed if c.delta.content]) <= 3
    assert _finish(streamed) == "length"
    # A request that names none gets the configured bound (``OpenAIConfig.max_tokens``).
    unbounded = sdk.chat.completions.create(model="gemma", messages=PROMPT, temperature=0)
    assert unbounded.usage is not None and unbounded.usage.completion_tokens == MAX_TOKENS


def _colour(text: str) -> str:
    """The document the grammar constrained, checked against ``COLOUR_SCHEMA``."""
    document = json.loads(text)
    assert isinstance(document, dict) and list(document) == ["colour"], text
    assert document["colour"] in COLOURS, text
    return str(document["colour"])


def test_a_json_schema_response_format_gives_a_matching_document(sdk: openai.OpenAI) -> None:
    # llama-cpp-python's form of structured output (see the module docstring).
    fmt = {"type": "json_object", "schema": COLOUR_SCHEMA}
    question = [{"role": "user", "content": "Name a colour as JSON."}]
    fields: dict[str, Any] = {"messages": question, "response_format": fmt, "max_tokens": 24}
    reply = _ask(sdk, **fields)
    # The grammar ends the document, and the server the answer, before max_tokens.
    assert reply.choices[0].finish_reason == "stop"
    colour = _colour(reply.choices[0].message.content or "")
    streamed = _stream(sdk, **fields)
    assert _colour(_text(streamed)) == colour
    assert _finish(streamed) == "stop"


def test_logprobs_come_back_with_the_top_alternatives(sdk: openai.OpenAI) -> None:
    reply = _ask(sdk, logprobs=True, top_logprobs=2, max_tokens=4)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == reply.usage.completion_tokens == 4
    for token in logprobs.content:
        assert len(token.top_logprobs) == 2
        # Greedy: the token chosen is the likeliest one.
        assert token.top_logprobs[0].token == token.token
        assert token.logprob == token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
    assert "".join(t.token for t in logprobs.content) == reply.choices[0].message.content

    streamed = _stream(sdk, logprobs=True, top_logprobs=2, max_tokens=4)
    tokens = [t for c in streamed if c.logprobs and c.logprobs.content for t in c.logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in logprobs.content]
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    # Without asking, none come back.
    assert _ask(sdk, max_tokens=2).choices[0].logprobs is None
