"""``[[models]]``: the config's checks, the catalog's resolution, each model's
upstream names, the gateway's answers and the shard's choice of call path
(issue 14, item 5)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from mpipeline import config
from mpipeline.config import (
    Catalog,
    InferenceConfig,
    ModelConfig,
    OpenAIConfig,
    PipelineConfig,
    PoolConfig,
    PoolUpstreamConfig,
)
from mpipeline.config.catalog import check_models
from mpipeline.errors import UpstreamFailure
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai import ChatCompletions
from mpipeline.gateway.openai_request import Chat
from mpipeline.gateway.schemas import Problem
from mpipeline.messages import Assembled, Completed, Message, PromptRequest
from mpipeline.routing import dedup_key
from mpipeline.stages import StageContext
from mpipeline.stages.inference import Inference
from mpipeline.workers import breaker_slots, served_upstream_names, upstream_names

URL = "http://127.0.0.1:9/v1"


def _openai(name: str, **fields: Any) -> ModelConfig:
    return ModelConfig(
        name=name, worker="openai", openai=OpenAIConfig(base_url=URL, api_key_env=""), **fields
    )


def _issues(tmp_path: Path, text: str) -> list[tuple[int | None, str, str]]:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    return [(i.line, i.field, i.message) for i in config.validate(path) if "rings" not in i.message]


# The config


def test_a_config_without_models_is_one_model_answering_to_any_name() -> None:
    catalog = Catalog.of(PipelineConfig())
    assert [m.name for m in catalog.models] == ["mpipeline-echo"]
    assert catalog.find("gpt-4o") is catalog.find("") is catalog.default
    assert catalog.default.key == "" and catalog.default.label is None
    assert catalog.names == ["mpipeline-echo"]
    assert not catalog.remote


def test_names_and_aliases_resolve_to_their_model_and_nothing_else() -> None:
    cfg = PipelineConfig(models=[_openai("alpha", aliases=["a"]), _openai("beta")])
    catalog = Catalog.of(cfg)
    alpha = catalog.find("alpha")
    assert alpha is not None and catalog.find("a") is alpha and catalog.find("") is alpha
    assert catalog.find("beta") is catalog.by_key("beta") is catalog.models[1]
    assert catalog.find("gamma") is None and catalog.find("ALPHA") is None
    assert catalog.names == ["alpha", "a", "beta"]
    assert catalog.remote


def test_a_models_settings_become_its_own_inference_table() -> None:
    pool = PoolConfig(
        upstreams=[
            PoolUpstreamConfig(name="x", base_url=URL),
            PoolUpstreamConfig(name="y", base_url=URL, model="pinned"),
        ]
    )
    models = [
        _openai("alpha"),
        _openai("beta", upstream_model="vendor/beta", drop_params=True),
        ModelConfig(name="gamma", worker="pool", pool=pool),
    ]
    inference = InferenceConfig(drop_params=False, replicas=3)
    alpha, beta, gamma = Catalog.build(models, inference).models
    assert alpha.inference.openai.model == "alpha" and not alpha.inference.drop_params
    assert beta.inference.openai.model == "vendor/beta" and beta.inference.drop_params
    assert [u.model for u in gamma.inference.pool.upstreams] == ["gamma", "pinned"]
    assert gamma.inference.replicas == 3  # the stage's own settings stay the stage's
    assert upstream_names(gamma.inference, gamma.label) == ["gamma/x", "gamma/y"]
    catalog = Catalog.build(models, inference)
    assert served_upstream_names(catalog) == ["alpha", "beta", "gamma/x", "gamma/y"]
    assert breaker_slots(catalog) == 64


def test_without_models_the_upstreams_keep_the_workers_names() -> None:
    catalog = Catalog.of(PipelineConfig())
    assert served_upstream_names(catalog) == ["echo"]
    pool = PoolConfig(upstreams=[PoolUpstreamConfig(name="m", base_url=URL, model="x")])
    assert upstream_names(InferenceConfig(worker="pool", pool=pool)) == ["m"]


def test_names_aliases_and_labels_must_be_unique_and_fit_a_circuit() -> None:
    long = "meta-llama/Llama-3.1-70B-Instruct-Turbo"
    models = [
        _openai("alpha", aliases=["a"]),
        _openai("beta", aliases=["a", "alpha"]),
        _openai(long),
        _openai(long + "-2", label="llama70"),
        _openai("llama70"),
        ModelConfig(name=""),
    ]
    assert check_models(models) == [
        ("models[1].aliases", "'a' is already a name of models[0]"),
        ("models[1].aliases", "'alpha' is already a name of models[0]"),
        (
            "models[2].name",
            f"{long!r} is too long or not ASCII for the label of a circuit and its "
            "metrics (32 bytes at most); set models[2].label",
        ),
        ("models[4].name", "label 'llama70' is already models[3]'s"),
        ("models[5].name", "must name the model"),
    ]


def test_a_models_upstream_model_is_upstream_model_not_the_tables_model() -> None:
    cfg = ModelConfig(name="m", openai=OpenAIConfig(base_url=URL, model="other"))
    assert check_models([cfg]) == [
        (
            "models[0].openai.model",
            "is set by models[0].upstream_model (unset: the model's name) here",
        )
    ]


def test_every_problem_names_its_member_and_line(tmp_path: Path) -> None:
    text = (
        '[[models]]\nname = "a"\nworker = "openai"\n'
        '[models.openai]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = ""\n'
        '\n[[models]]\nname = "b"\nworker = "pool"\nlabl = "x"\n'
        '[[models.pool.upstreams]]\nname = "m"\nbase_url = "ftp://x"\n'
        '\n[[models]]\nname = "a"\nworker = "nope"\n'
    )
    assert _issues(tmp_path, text) == [
        (11, "models[1].labl", "unknown key; did you mean 'label'?"),
        (
            14,
            "models[1].pool.upstreams[0].base_url",
            "must be an http:// or https:// URL without a query",
        ),
        (17, "models[2].name", "'a' is already a name of models[0]"),
        (
            18,
            "models[2].worker",
            "must be 'echo' or 'openai' or 'anthropic' or 'llama_cpp' or 'pool', not 'nope'",
        ),
    ]


def test_a_member_that_is_not_a_table_is_said_to_be(tmp_path: Path) -> None:
    issues = _issues(tmp_path, "models = [1]\n")
    assert issues == [(1, "models[0]", "expected a table, got int")]


def test_the_effective_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = PipelineConfig(models=[_openai("alpha", aliases=["a"]), _openai("beta")])
    path = tmp_path / "effective.toml"
    path.write_text(config.dump_toml(cfg), encoding="utf-8")
    assert config.load(path).models == cfg.models


# The gateway


def _route(models: list[ModelConfig]) -> ChatCompletions:
    catalog = Catalog.build(models, InferenceConfig())
    return ChatCompletions(None, "", 1.0, admission=Admission(None), models=Models(catalog))  # type: ignore[arg-type]


def _read(route: ChatCompletions, model: str, **extra: Any) -> Chat | Problem:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return route.read(json.dumps(body).encode())


def test_the_chat_route_resolves_the_model_to_its_canonical_key() -> None:
    route = _route([_openai("alpha", aliases=["a"]), ModelConfig(name="local", worker="echo")])
    for sent, key in (("alpha", "alpha"), ("a", "alpha"), ("local", "local")):
        chat = _read(route, sent)
        assert isinstance(chat, Chat) and chat.model_key == key and chat.model == sent
    missing = _read(route, "gamma")
    assert missing == Problem(
        "The model 'gamma' does not exist; GET /v1/models lists the models served",
        "model",
        status=404,
        code="model_not_found",
    )


def test_the_fields_are_checked_against_the_chosen_models_worker() -> None:
    route = _route([_openai("alpha"), ModelConfig(name="local", worker="echo")])
    passed = _read(route, "alpha", temperature=0.5)
    assert isinstance(passed, Chat) and json.loads(passed.params) == {"temperature": 0.5}
    refused = _read(route, "local", temperature=0.5)
    assert isinstance(refused, Problem) and refused.field == "temperature"
    assert _read(route, "gamma", temperature=0.5) == _read(route, "gamma")  # 404 first


def test_the_models_list_and_each_entry() -> None:
    models = Models(Catalog.build([_openai("alpha", aliases=["a"])], InferenceConfig()))
    assert json.loads(models.listing) == {
        "object": "list",
        "data": [
            {"id": "alpha", "object": "model", "created": 0, "owned_by": "mpipeline"},
            {"id": "a", "object": "model", "created": 0, "owned_by": "mpipeline"},
        ],
    }
    assert json.loads(models.entries["a"])["id"] == "a"
    route = _route([_openai("alpha", aliases=["a"])])
    # One subtree route answers every name (tests/unit/gateway/test_models_route.py).
    assert {"/v1/models", "/v1/models/"} <= set(route.routes)


# The shard and the keys


def _shard(models: list[ModelConfig]) -> Inference:
    ctx = StageContext("inference", 0, 1, PipelineConfig(models=models))
    return Inference(InferenceConfig(), ctx)


def _run(stage: Inference, model: str) -> list[Message]:
    req = PromptRequest(request_id="r", input="one two three four", model=model)

    async def go() -> list[Message]:
        msg = Assembled(request=req, prompt="", dedup_key=dedup_key(req))
        return [out async for out in stage.handle(msg)]

    return asyncio.run(go())


def test_a_shard_runs_each_request_on_its_models_worker() -> None:
    from mpipeline.config import EchoConfig

    short = ModelConfig(name="short", aliases=["s"], worker="echo", echo=EchoConfig(max_tokens=1))
    long = ModelConfig(name="long", worker="echo", echo=EchoConfig(max_tokens=3))
    stage = _shard([short, long])
    texts = {}
    for model in ("short", "s", "long", ""):
        [done] = _run(stage, model)
        assert isinstance(done, Completed)
        texts[model] = done.usage.completion_tokens
    assert texts == {"short": 1, "s": 1, "long": 3, "": 1}
    try:
        _run(stage, "gamma")
    except UpstreamFailure as exc:
        assert exc.code == "invalid_request" and "'gamma'" in str(exc)
    else:
        raise AssertionError("an unknown model ran")


def test_the_dedup_key_tells_models_apart() -> None:
    one = PromptRequest(request_id="r", input="same", model="alpha")
    other = PromptRequest(request_id="r", input="same", model="beta")
    default = PromptRequest(request_id="r", input="same")
    assert len({dedup_key(one), dedup_key(other), dedup_key(default)}) == 3
