"""The official openai SDK's ``completions`` and ``embeddings`` through a supervised
gateway (issue 14, item 7): passed through the pipeline to an OpenAI-compatible
upstream, which gets the body exactly as the client sent it, and the client gets
the upstream's reply exactly as it sent it; a backend without them answers 404.

The upstream is ``tests/fault_upstream.py``, scripted with ``Status(200, body=...)``
so the replies are byte-for-byte what a test says. The pipeline has no result
cache or coalescing, so every request is a call of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from mpipeline.config import GatewayConfig, OpenAIConfig
from tests.fault_upstream import FaultUpstream, Status
from tests.integration._live import Gateways
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "fault-model"
COMPLETION = {
    "id": "cmpl-upstream-1",
    "object": "text_completion",
    "created": 1700000000,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_legacy",
    "choices": [{"text": " Paris.", "index": 0, "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8},
}
EMBEDDING = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]},
        {"object": "embedding", "index": 1, "embedding": [1.0, 0.0, -1.0]},
    ],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 5, "total_tokens": 5},
}


def _chunk(text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": "cmpl-upstream-2",
        "object": "text_completion",
        "created": 1700000001,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }


STREAM = [_chunk(" Par", None), _chunk("is", None), _chunk("", "stop")]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def supervisor(
    tmp_path_factory: pytest.TempPathFactory, upstream: FaultUpstream
) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("endpoints")))
    openai_cfg = OpenAIConfig(base_url=upstream.openai_url, model=MODEL, api_key_env="")
    try:
        yield factory(
            {
                "gateway.replicas": 1,
                "stages.inference.worker": "openai",
                "stages.inference.openai": openai_cfg,
                "stages.inference.retry.max_retries": 0,
                "stages.inference.dedup.cache_entries": 0,
                "stages.inference.dedup.coalesce": False,
                "stages.inference.coalesce_reads": False,
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture
def sdk(supervisor: SupervisorProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{supervisor.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def test_a_completion_goes_upstream_and_back_exactly(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.script(Status(200, body=json.dumps(COMPLETION).encode()))
    reply = sdk.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0.25,
        logit_bias={"50256": -100},
        user="user-1",
        extra_body={"best_of": 1, "a_field_nobody_knows": {"x": [1, 2]}},
    )
    assert upstream.calls[-1].path == "/v1/completions"
    assert upstream.calls[-1].body == {
        "model": "gpt-3.5-turbo-instruct",
        "prompt": "The capital of France is",
        "max_tokens": 5,
        "temperature": 0.25,
        "logit_bias": {"50256": -100},
        "user": "user-1",
        "best_of": 1,
        "a_field_nobody_knows": {"x": [1, 2]},
    }
    assert reply.model_dump(exclude_unset=True) == COMPLETION


def test_a_streamed_completion_comes_back_chunk_by_chunk(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in STREAM)
    body = events + b"data: [DONE]\n\n"
    upstream.script(Status(200, body=body, content_type="text/event-stream"))
    chunks = list(sdk.completions.create(model="m", prompt="The capital", stream=True))
    assert upstream.calls[-1].body == {"model": "m", "prompt": "The capital", "stream": True}
    assert [c.model_dump(exclude_unset=True) for c in chunks] == STREAM


def test_embeddings_go_upstream_and_back_exactly(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.script(Status(200, body=json.dumps(EMBEDDING).encode()))
    reply = sdk.embeddings.create(
        model="text-embedding-3-small",
        input=["hello", "world"],
        encoding_format="float",
        dimensions=3,
    )
    assert upstream.calls[-1].path == "/v1/embeddings"
    assert upstream.calls[-1].body == {
        "model": "text-embedding-3-small",
        "input": ["hello", "world"],
        "encoding_format": "float",
        "dimensions": 3,
    }
    assert reply.model_dump(exclude_unset=True) == EMBEDDING


def test_an_upstream_failure_is_an_openai_error(
    sdk: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.script(Status(503))
    with pytest.raises(openai.APIStatusError) as failed:
        sdk.embeddings.create(model="text-embedding-3-small", input="hello")
    body: Any = failed.value.body
    assert (failed.value.status_code, body["code"]) == (502, "upstream_error"), body
    assert "upstream answered HTTP 503" in body["message"]


def test_a_bad_body_is_a_400(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model="m", input=[])
    body: Any = refused.value.body
    assert body["param"] == "input"


def test_a_backend_without_the_endpoints_answers_404(supervisor: SupervisorProcess) -> None:
    # A gateway configured for the echo worker (the defaults), on the same pipeline.
    echo = Gateways(supervisor.run_dir, [(GatewayConfig(), None)])
    try:
        with openai.OpenAI(base_url=f"{echo.urls[0]}/v1", api_key="x", max_retries=0) as sdk:
            with pytest.raises(openai.NotFoundError) as embeddings:
                sdk.embeddings.create(model="m", input="hello")
            with pytest.raises(openai.NotFoundError) as completions:
                sdk.completions.create(model="m", prompt="hello")
    finally:
        echo.close()
    for refused, path in ((embeddings, "/v1/embeddings"), (completions, "/v1/completions")):
        body: Any = refused.value.body
        assert body["code"] == "unsupported_endpoint"
        assert f"worker echo) has no {path}" in body["message"]
