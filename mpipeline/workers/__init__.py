"""Model backends behind one ``Upstream`` protocol, built from the inference config.

The network and local-model backends are imported only when configured: a
pipeline that runs echo never loads the HTTP client or llama.cpp.

An upstream's name labels its circuit and its metrics, so it is unique in a
run: the worker's own name (``openai``, a pool member's) when the config has
one model, else the model's label (``label/member`` for a pool's members).
"""

from __future__ import annotations

from mpipeline.config import Catalog, InferenceConfig, PoolUpstreamConfig
from mpipeline.errors import UpstreamFailure
from mpipeline.workers.base import Generation, Upstream, WorkerContext
from mpipeline.workers.echo import EchoWorker

# The fewest circuits a breaker board is made with (BreakerBoard's own default).
BREAKER_SLOTS = 64


def build_upstreams(
    cfg: InferenceConfig, ctx: WorkerContext, label: str | None = None
) -> list[Upstream]:
    """The upstreams one shard calls for one model: one, or a pool's members in
    config order (named as ``upstream_names`` says)."""
    names = upstream_names(cfg, label)
    if cfg.worker == "echo":
        echo = EchoWorker(cfg.echo, ctx)
        echo.name = names[0]
        return [echo]
    if cfg.worker == "openai":
        from mpipeline.workers.openai import OpenAIUpstream

        return [OpenAIUpstream(cfg.openai, ctx, name=names[0])]
    if cfg.worker == "anthropic":
        from mpipeline.workers.anthropic import AnthropicUpstream

        return [AnthropicUpstream(cfg.anthropic, ctx, name=names[0])]
    if cfg.worker == "llama_cpp":
        from mpipeline.workers.llama_cpp import LlamaCppUpstream

        return [LlamaCppUpstream(cfg.llama_cpp, ctx, name=names[0])]
    return [_member(m, ctx, n) for m, n in zip(cfg.pool.upstreams, names, strict=True)]


def upstream_names(cfg: InferenceConfig, label: str | None = None) -> list[str]:
    """The names ``build_upstreams`` gives, without building anything (metrics labels)."""
    if cfg.worker == "pool":
        members = [m.name for m in cfg.pool.upstreams]
        return members if label is None else [f"{label}/{m}" for m in members]
    return [label or cfg.worker]


def served_upstream_names(catalog: Catalog) -> list[str]:
    """The names of every model's upstreams, models in config order."""
    return [n for m in catalog.models for n in upstream_names(m.inference, m.label)]


def breaker_slots(catalog: Catalog) -> int:
    """Circuits the run's breaker board holds: one per upstream of every model, and
    never fewer than ``BREAKER_SLOTS``."""
    return max(BREAKER_SLOTS, len(served_upstream_names(catalog)))


def _member(cfg: PoolUpstreamConfig, ctx: WorkerContext, name: str) -> Upstream:
    if cfg.kind == "anthropic":
        from mpipeline.workers.anthropic import AnthropicUpstream

        return AnthropicUpstream(cfg, ctx, name=name)
    from mpipeline.workers.openai import OpenAIUpstream

    return OpenAIUpstream(cfg, ctx, name=name)


__all__ = [
    "EchoWorker",
    "Generation",
    "Upstream",
    "UpstreamFailure",
    "WorkerContext",
    "breaker_slots",
    "build_upstreams",
    "served_upstream_names",
    "upstream_names",
]
