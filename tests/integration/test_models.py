"""Several models behind one gateway (``[[models]]``, issue 14 item 5): the official
openai SDK names a model, and its request reaches that model's upstream only.

Two fake OpenAI upstreams (``tests/fault_upstream.py``) serve ``alpha`` (with
two aliases, sent upstream under its own name) and ``beta`` (sent upstream as
its ``upstream_model``); ``local`` is an echo model, whose worker honours no
sampling, so the same field is passed to one model and refused for another.
Two shards, so every shard serves every model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest
from websockets.sync.client import connect

from mpipeline.config import ModelConfig, OpenAIConfig
from tests.fault_upstream import FaultUpstream, Ok, Status
from tests.integration.conftest import ConfigFactory, SupervisorFactory, SupervisorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BETA_UPSTREAM = "vendor/beta-7b"
NAMES = ["alpha", "a", "alpha-latest", "beta", "local"]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FaultUpstream, FaultUpstream]]:
    with FaultUpstream() as a, FaultUpstream() as b:
        yield a, b


@pytest.fixture(scope="module")
def supervisor(
    tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> Iterator[SupervisorProcess]:
    a, b = upstreams
    models = [
        ModelConfig(
            name="alpha",
            aliases=["a", "alpha-latest"],
            worker="openai",
            openai=OpenAIConfig(base_url=a.openai_url, api_key_env=""),
        ),
        ModelConfig(
            name="beta",
            worker="openai",
            upstream_model=BETA_UPSTREAM,
            openai=OpenAIConfig(base_url=b.openai_url, api_key_env=""),
        ),
        ModelConfig(name="local", worker="echo"),
    ]
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("models")))
    try:
        yield factory(
            {
                "models": models,
                "gateway.replicas": 1,
                "stages.inference.replicas": 2,
                "stages.inference.retry.max_retries": 0,
                # Every request a call of its own, so the upstreams' counts are exact.
                "stages.inference.dedup.cache_entries": 0,
                "stages.inference.dedup.coalesce": False,
            }
        )
    finally:
        factory.stop_all()


@pytest.fixture
def sdk(
    supervisor: SupervisorProcess, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> Iterator[openai.OpenAI]:
    for up in upstreams:
        up.default = Ok()
    with openai.OpenAI(
        base_url=f"{supervisor.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def _models_sent(up: FaultUpstream, since: int) -> list[str]:
    return [str(call.body["model"]) for call in up.calls[since:]]


def _ask(sdk: openai.OpenAI, model: str, text: str, **extra: Any) -> str:
    reply = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **extra
    )
    assert reply.model == model  # the name the client used, as OpenAI answers
    return reply.choices[0].message.content or ""


def test_each_model_reaches_only_its_own_upstream(
    sdk: openai.OpenAI, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    a, b = upstreams
    seen_a, seen_b = len(a.calls), len(b.calls)
    assert _ask(sdk, "alpha", "one for alpha") == "one for alpha"
    assert _ask(sdk, "beta", "one for beta") == "one for beta"
    streamed = sdk.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "streamed beta"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        "streamed beta"
    )
    # Sessions spread over both shards; each shard serves both models.
    for i in range(4):
        _ask(sdk, "alpha", f"alpha session {i}", user=f"s{i}")
    assert _models_sent(a, seen_a) == ["alpha"] * 5
    assert _models_sent(b, seen_b) == [BETA_UPSTREAM] * 2


def test_aliases_reach_the_same_upstream_under_the_models_name(
    sdk: openai.OpenAI, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    a, b = upstreams
    seen_a, seen_b = len(a.calls), len(b.calls)
    assert _ask(sdk, "a", "by the short alias") == "by the short alias"
    assert _ask(sdk, "alpha-latest", "by the long alias") == "by the long alias"
    assert _models_sent(a, seen_a) == ["alpha", "alpha"]
    assert len(b.calls) == seen_b


def test_an_unknown_model_is_404_model_not_found_and_reaches_nothing(
    sdk: openai.OpenAI, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    a, b = upstreams
    seen = len(a.calls) + len(b.calls)
    with pytest.raises(openai.NotFoundError) as caught:
        _ask(sdk, "gamma", "hello")
    assert caught.value.code == "model_not_found"
    body: Any = caught.value.body
    assert body["param"] == "model" and body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(
            model="gamma", messages=[{"role": "user", "content": "x"}], stream=True
        )
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gamma")
    assert len(a.calls) + len(b.calls) == seen


def test_the_models_list_has_every_name_in_openais_shape(sdk: openai.OpenAI) -> None:
    listed = sdk.models.list()
    assert [m.id for m in listed.data] == NAMES
    assert {m.object for m in listed.data} == {"model"}
    assert sdk.models.retrieve("beta").id == "beta"
    assert sdk.models.retrieve("alpha-latest").id == "alpha-latest"


def test_a_field_is_checked_against_the_chosen_models_worker(
    sdk: openai.OpenAI, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    a, _ = upstreams
    _ask(sdk, "alpha", "warm", temperature=0.3)
    assert a.calls[-1].body["temperature"] == 0.3
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(sdk, "local", "warm", temperature=0.3)
    assert caught.value.code == "unsupported_parameter"
    assert _ask(sdk, "local", "echo me") == "echo me"


def test_the_native_route_takes_a_model_and_defaults_to_the_first(
    supervisor: SupervisorProcess, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    a, b = upstreams
    seen_a, seen_b = len(a.calls), len(b.calls)
    with httpx.Client(base_url=supervisor.url, timeout=30) as http:
        named = http.post("/v1/prompt", json={"input": "native beta", "model": "beta"})
        first = http.post("/v1/prompt", json={"input": "native default"})
        unknown = http.post("/v1/prompt", json={"input": "x", "model": "gamma"})
    assert named.status_code == 200 and named.json()["text"] == "native beta"
    assert first.status_code == 200 and first.json()["text"] == "native default"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "model_not_found"
    assert unknown.json()["error"]["field"] == "model"
    assert _models_sent(a, seen_a) == ["alpha"]
    assert _models_sent(b, seen_b) == [BETA_UPSTREAM]


def test_each_model_has_its_own_circuit(supervisor: SupervisorProcess) -> None:
    with httpx.Client(base_url=supervisor.url, timeout=30) as http:
        status = http.get("/v1/status").json()
    circuits = {c["upstream"] for c in status["pipeline"]["circuits"]}
    assert {"alpha", "beta"} <= circuits


EMBEDDING = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
    "model": BETA_UPSTREAM,
    "usage": {"prompt_tokens": 1, "total_tokens": 1},
}


def test_embeddings_and_completions_route_by_model_too(
    sdk: openai.OpenAI, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    """The passed-through routes resolve ``model`` as chat does: the model's upstream
    gets the body under its ``upstream_model``; an unknown name, or a model whose
    worker has no such endpoint, is a 404 and calls nothing."""
    a, b = upstreams
    b.script(Status(200, body=msgspec.json.encode(EMBEDDING)))
    seen_a, seen_b = len(a.calls), len(b.calls)
    reply = sdk.embeddings.create(model="beta", input="hello", encoding_format="float")
    assert reply.data[0].embedding == [0.5, -0.25]
    assert b.calls[-1].path == "/v1/embeddings"
    sent = {"model": BETA_UPSTREAM, "input": "hello", "encoding_format": "float"}
    assert b.calls[-1].body == sent
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.embeddings.create(model="gamma", input="hello")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as echo:
        sdk.completions.create(model="local", prompt="hello")
    assert echo.value.code == "unsupported_endpoint"
    assert len(a.calls) == seen_a and len(b.calls) == seen_b + 1


def test_the_anthropic_route_routes_by_model(
    supervisor: SupervisorProcess, upstreams: tuple[FaultUpstream, FaultUpstream]
) -> None:
    a, b = upstreams
    for up in upstreams:
        up.default = Ok()
    seen_b = len(b.calls)
    with anthropic.Anthropic(
        base_url=supervisor.url, api_key="unused", max_retries=0, timeout=30
    ) as claude:
        user: Any = [{"role": "user", "content": "hello beta"}]
        reply = claude.messages.create(model="beta", max_tokens=16, messages=user)
        assert reply.model == "beta"
        assert [block.text for block in reply.content if block.type == "text"] == ["hello beta"]
        with pytest.raises(anthropic.NotFoundError) as unknown:
            claude.messages.create(model="gamma", max_tokens=16, messages=user)
    assert "gamma" in str(unknown.value)
    assert _models_sent(b, seen_b) == [BETA_UPSTREAM]


def test_an_unknown_model_is_model_not_found_on_models_retrieve_and_the_websocket(
    supervisor: SupervisorProcess,
    sdk: openai.OpenAI,
    upstreams: tuple[FaultUpstream, FaultUpstream],
) -> None:
    """``GET /v1/models/{name}`` answers OpenAI's code, not the router's 404; a
    WebSocket message is resolved at the gateway as ``POST /v1/prompt`` is: an
    error message for that request, and the connection goes on."""
    a, b = upstreams
    seen_a, seen_b = len(a.calls), len(b.calls)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("gamma")
    assert caught.value.code == "model_not_found"
    url = supervisor.url.replace("http://", "ws://") + "/v1/stream"
    with connect(url, open_timeout=30) as ws:
        ws.send(json.dumps({"input": "x", "model": "gamma", "ref": "g"}))
        refused = json.loads(ws.recv(timeout=30))
        assert (refused["type"], refused["ref"]) == ("error", "g")
        assert (refused["error"]["type"], refused["error"]["field"]) == ("model_not_found", "model")
        ws.send(json.dumps({"input": "ws beta", "model": "beta", "ref": "b"}))
        messages = [json.loads(ws.recv(timeout=30))]
        while messages[-1]["type"] not in ("done", "error"):
            messages.append(json.loads(ws.recv(timeout=30)))
    assert (messages[-1]["type"], messages[-1]["text"]) == ("done", "ws beta")
    assert len(a.calls) == seen_a and _models_sent(b, seen_b) == [BETA_UPSTREAM]
