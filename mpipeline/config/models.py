"""The ``[[models]]`` tables: the names clients send as ``model``, each with its own worker.

Apart from ``tables.py`` for size and because it is one idea: a model is a
public name (and aliases) in front of a worker and that worker's settings,
the same tables ``[stages.inference]`` has. With no ``[[models]]`` the
inference table's worker is the one model, as it always was; ``catalog.py``
turns either form into what the gateway and the shards use.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from mpipeline.config._base import _doc, _Table
from mpipeline.config.workers import (
    AnthropicConfig,
    EchoConfig,
    LlamaCppConfig,
    OpenAIConfig,
    PoolConfig,
)

# What a client may send as ``model``: any name without spaces ("gpt-4o-mini",
# "meta-llama/Llama-3.1-8B-Instruct", "llama3.1:8b", "ft:gpt-4o:org::id").
MODEL_NAME = r"^\S{1,128}$"
# A circuit's and a metric's label: breakers hold 1-32 ASCII bytes, and "/"
# joins a model's label to a pool member's name.
LABEL = r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,31}$"

Worker = Literal["echo", "openai", "anthropic", "llama_cpp", "pool"]
_Name = Annotated[str, Meta(pattern=MODEL_NAME)]

_EXAMPLE = {
    "name": "llama-8b",
    "aliases": ["llama"],
    "worker": "openai",
    "upstream_model": "meta-llama/Llama-3.1-8B-Instruct",
    "openai": {"base_url": "http://10.0.0.5:8000/v1", "api_key_env": ""},
}


class ModelConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model clients can ask for by name: a worker and its settings."""

    name: Annotated[
        str,
        Meta(pattern=r"^(?:\S{1,128})?$"),
        _doc("The public name: what clients send as `model` and GET /v1/models lists."),
    ] = ""
    aliases: Annotated[
        list[_Name],
        _doc("Other names clients may send for this model (GET /v1/models lists them too)."),
    ] = []
    worker: Annotated[
        Worker,
        _doc(
            'Model backend, as stages.inference.worker: "echo", "openai", "anthropic", '
            '"llama_cpp" or "pool", configured in the table of its name '
            "([models.openai]...)."
        ),
    ] = "openai"
    upstream_model: Annotated[
        str | None,
        _doc(
            "The model name sent upstream (openai, anthropic, and pool members that name "
            "none); unset: the public name.",
            "meta-llama/Llama-3.1-8B-Instruct",
        ),
    ] = None
    label: (
        Annotated[
            str,
            Meta(pattern=LABEL),
            _doc(
                "The label of the model's circuits and metrics (a pool member's is "
                "label/member); unset: the name, which must then fit (32 ASCII bytes).",
                "llama-8b",
            ),
        ]
        | None
    ) = None
    drop_params: Annotated[
        bool | None,
        _doc("As stages.inference.drop_params, for this model; unset: that one.", True),
    ] = None
    echo: EchoConfig = msgspec.field(default_factory=EchoConfig)
    openai: OpenAIConfig = msgspec.field(default_factory=OpenAIConfig)
    anthropic: AnthropicConfig = msgspec.field(default_factory=AnthropicConfig)
    llama_cpp: LlamaCppConfig = msgspec.field(default_factory=LlamaCppConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)


MODELS_DOC = _doc(
    "The models clients choose with `model`, each a [[models]] table: a public name, "
    "aliases, a worker and that worker's table ([models.openai], [models.anthropic], "
    "[models.pool]...). Every inference shard serves every model, with its own "
    "circuits, cache and limits per model; a session keeps to one shard whatever the "
    "model. An unknown name gets 404 model_not_found; a request that names none (the "
    "native API) gets the first. Empty: one model, [stages.inference]'s worker, named "
    "mpipeline-<worker>, which answers whatever name a client sends.",
    [_EXAMPLE],
)

__all__ = ["LABEL", "MODELS_DOC", "MODEL_NAME", "ModelConfig", "Worker"]
