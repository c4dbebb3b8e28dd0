"""The models a run serves: every name a client may send, resolved to one model.

Both forms of the config give one ``Catalog``: ``[[models]]`` tables, or, with
none, ``[stages.inference]``'s worker as the one model (``mpipeline-<worker>``),
which answers whatever ``model`` a client sends, as it always did. Each
``ServedModel`` carries a whole ``InferenceConfig`` holding its worker and that
worker's settings, so what reads the inference table (the workers' builders,
``workers.fields``) reads a model's without knowing that models exist.

The gateway resolves a request's ``model`` here before the request enters
the pipeline and puts the canonical ``key`` on it (aliases become the name),
and every inference shard finds the same model by that key. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from mpipeline.config._base import ENV_NAME
from mpipeline.config._toml import Problem
from mpipeline.config.models import ModelConfig
from mpipeline.config.tables import (
    AnthropicConfig,
    InferenceConfig,
    OpenAIConfig,
    PipelineConfig,
    UpstreamConfig,
)

__all__ = ["Catalog", "ServedModel", "check_models", "check_served"]

# A circuit breaker's name holds at most this many ASCII bytes.
LABEL_BYTES = 32


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model as the gateway and the shards see it.

    ``key`` is what ``PromptRequest.model`` carries: the name, or "" for the one
    model of a config without ``[[models]]``. ``label`` names the model's
    upstreams (circuits, metrics): None keeps the workers' own names
    (``openai``, a pool member's), as a config without models always had.
    """

    name: str
    key: str
    aliases: tuple[str, ...]
    label: str | None
    inference: InferenceConfig


class Catalog:
    """Every model of a run, by each of its names."""

    def __init__(self, models: Sequence[ServedModel], *, open_names: bool) -> None:
        if not models:
            raise ValueError("a catalog needs at least one model")
        self.models = tuple(models)
        self.default = self.models[0]
        # True without [[models]]: the one model answers to any name.
        self.open_names = open_names
        self._by_name = {n: m for m in self.models for n in (m.name, *m.aliases)}
        self._by_key = {m.key: m for m in self.models}

    @classmethod
    def of(cls, cfg: PipelineConfig) -> Catalog:
        return cls.build(cfg.models, cfg.stages.inference)

    @classmethod
    def build(cls, models: Sequence[ModelConfig], inference: InferenceConfig) -> Catalog:
        """The catalog of ``models`` (``[[models]]``) over the inference table."""
        if not models:
            only = ServedModel(f"mpipeline-{inference.worker}", "", (), None, inference)
            return cls([only], open_names=True)
        served = [
            ServedModel(
                m.name, m.name, tuple(m.aliases), m.label or m.name, _effective(inference, m)
            )
            for m in models
        ]
        return cls(served, open_names=False)

    def find(self, name: str) -> ServedModel | None:
        """The model a client's ``model`` names (None: no such model); "" is the default."""
        if not name or self.open_names:
            return self.default
        return self._by_name.get(name)

    def by_key(self, key: str) -> ServedModel | None:
        """The model a request's ``model`` key names ("" is the default)."""
        if not key:
            return self.default
        return self._by_key.get(key)

    @property
    def names(self) -> list[str]:
        """Every name a client may send, each model's name before its aliases."""
        return [n for m in self.models for n in (m.name, *m.aliases)]

    @property
    def remote(self) -> bool:
        """Whether any model calls servers over the network (and so needs circuits)."""
        return any(m.inference.remote for m in self.models)


def _effective(inference: InferenceConfig, model: ModelConfig) -> InferenceConfig:
    """The inference table as ``model`` sees it: its worker, settings and model name."""
    upstream = model.upstream_model or model.name
    replace = msgspec.structs.replace
    members = [u if u.model else replace(u, model=upstream) for u in model.pool.upstreams]
    drop = inference.drop_params if model.drop_params is None else model.drop_params
    return replace(
        inference,
        worker=model.worker,
        drop_params=drop,
        echo=model.echo,
        openai=replace(model.openai, model=upstream),
        anthropic=replace(model.anthropic, model=upstream),
        llama_cpp=model.llama_cpp,
        pool=replace(model.pool, upstreams=members),
    )


def check_models(models: Sequence[ModelConfig]) -> list[Problem]:
    """Names and aliases present and unique, labels that fit a circuit, and the
    ``model`` fields that ``upstream_model`` replaces left alone."""
    out: list[Problem] = []
    owner: dict[str, str] = {}
    labels: dict[str, str] = {}
    default_model = {"openai": OpenAIConfig().model, "anthropic": AnthropicConfig().model}
    for i, m in enumerate(models):
        at = f"models[{i}]"
        if not m.name:
            out.append((f"{at}.name", "must name the model"))
        # A name said twice is said once: not again as a label.
        taken = m.name in owner
        for field, name in [("name", m.name), *(("aliases", a) for a in m.aliases)]:
            if not name:
                continue
            if name in owner:
                out.append((f"{at}.{field}", f"{name!r} is already a name of {owner[name]}"))
            else:
                owner[name] = at
        if m.worker in default_model:
            table = getattr(m, m.worker)
            if table.model != default_model[m.worker]:
                message = f"is set by {at}.upstream_model (unset: the model's name) here"
                out.append((f"{at}.{m.worker}.model", message))
        label = m.label or m.name
        where = f"{at}.label" if m.label else f"{at}.name"
        members = [f"{label}/{u.name}" for u in m.pool.upstreams] if m.worker == "pool" else [label]
        for full in members:
            if not full:
                continue
            if not full.isascii() or len(full) > LABEL_BYTES:
                out.append(
                    (
                        where,
                        f"{full!r} is too long or not ASCII for the label of a circuit and "
                        f"its metrics ({LABEL_BYTES} bytes at most); set {at}.label",
                    )
                )
            elif full in labels and not (taken and not m.label):
                out.append((where, f"label {full!r} is already {labels[full]}'s"))
            else:
                labels[full] = at
    return out


def check_served(cfg: PipelineConfig) -> list[Problem]:
    """The models' own checks, then each served worker's table: URLs, key variable
    names, pool members (only what is served: with [[models]], the inference
    table's worker is not)."""
    if not cfg.models:
        return _check_worker(cfg.stages.inference, "stages.inference")
    out = check_models(cfg.models)
    for i, model in enumerate(Catalog.of(cfg).models):
        out += _check_worker(model.inference, f"models[{i}]")
    return out


def _check_worker(inf: InferenceConfig, at: str) -> list[Problem]:
    out: list[Problem] = []
    upstreams: list[tuple[str, UpstreamConfig]] = []
    if inf.worker in ("openai", "anthropic"):
        upstreams.append((f"{at}.{inf.worker}", getattr(inf, inf.worker)))
    elif inf.worker == "pool":
        members = inf.pool.upstreams
        if not members:
            out.append((f"{at}.pool.upstreams", "worker is pool but none are listed"))
        names = [m.name for m in members]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            out.append((f"{at}.pool.upstreams", f"names used twice: {', '.join(twice)}"))
        upstreams += [(f"{at}.pool.upstreams[{i}]", m) for i, m in enumerate(members)]
    for path, up in upstreams:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", up.base_url):
            # No echo of the value: a URL may carry credentials.
            out.append((f"{path}.base_url", "must be an http:// or https:// URL without a query"))
        if up.api_key_env and not ENV_NAME.fullmatch(up.api_key_env):
            out.append((f"{path}.api_key_env", "must be the NAME of an environment variable"))
        if not up.model:
            out.append((f"{path}.model", "must name the model to call"))
    return out
