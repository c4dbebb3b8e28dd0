"""The models a client can name: ``model`` resolved before a request enters the pipeline.

A request's ``model`` (a name or an alias) becomes its model's canonical key
on the ``PromptRequest``, so the shards, the dedup key and the cache see one
name per model, and the chat fields are checked against that model's worker
(each model has its own ``Backend``). An unknown name is refused here with
404 ``model_not_found``, OpenAI's answer, which the SDKs raise as
``NotFoundError``; nothing unknown reaches a ring. Without ``[[models]]`` the
one model answers to any name, as the gateway always did.

``GET /v1/models`` lists every name a client may send, aliases included, each
as its own entry (OpenAI's list shape), and ``GET /v1/models/{name}`` answers
for each of them, with the same 404 for any other name.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from mpipeline.config import Catalog, InferenceConfig, ServedModel
from mpipeline.gateway.openai_fields import Backend
from mpipeline.gateway.openai_shapes import Model, ModelList
from mpipeline.gateway.schemas import Problem

__all__ = ["MODEL_NOT_FOUND", "OWNER", "Models"]

# OpenAI's code for a model that does not exist.
MODEL_NOT_FOUND = "model_not_found"
OWNER = "mpipeline"
_ENCODE = msgspec.json.Encoder().encode


class Models:
    """The catalog as the gateway uses it: names to models, each model's backend."""

    def __init__(self, catalog: Catalog, backends: Mapping[str, Backend] | None = None) -> None:
        self.catalog = catalog
        self._backends = dict(backends or {})
        for model in catalog.models:
            self._backends.setdefault(model.key, Backend.of(model.inference))
        self.listing = _ENCODE(ModelList(data=[_entry(n) for n in catalog.names]))
        self.entries = {n: _ENCODE(_entry(n)) for n in catalog.names}

    @classmethod
    def single(
        cls, name: str, backend: Backend, inference: InferenceConfig | None = None
    ) -> Models:
        """One model that answers to any name, checked by ``backend``, served by
        ``inference`` (the defaults' echo when None): tests and tools."""
        only = ServedModel(name, "", (), None, inference or InferenceConfig())
        return cls(Catalog([only], open_names=True), {"": backend})

    def resolve(self, name: str) -> ServedModel | Problem:
        """The model ``name`` asks for, or the 404 that says there is none."""
        model = self.catalog.find(name)
        return self.not_found(name) if model is None else model

    def not_found(self, name: str) -> Problem:
        """The 404 ``model_not_found`` for a name there is no model of."""
        message = f"The model '{name}' does not exist; GET /v1/models lists the models served"
        return Problem(message, "model", status=404, code=MODEL_NOT_FOUND)

    def backend(self, model: ServedModel) -> Backend:
        """What ``model``'s worker honours, and whether it drops the rest."""
        return self._backends[model.key]


def _entry(name: str) -> Model:
    return Model(id=name, owned_by=OWNER)
