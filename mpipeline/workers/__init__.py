"""Model backends behind one ``Upstream`` protocol, built from the inference config.

The network and local-model backends are imported only when configured: a
pipeline that runs echo never loads the HTTP client or llama.cpp.
"""

from __future__ import annotations

from mpipeline.config import InferenceConfig, PoolUpstreamConfig
from mpipeline.errors import UpstreamFailure
from mpipeline.workers.base import Generation, Upstream, WorkerContext
from mpipeline.workers.echo import EchoWorker


def build_upstreams(cfg: InferenceConfig, ctx: WorkerContext) -> list[Upstream]:
    """The upstreams one shard calls: one, or a pool's members in config order."""
    if cfg.worker == "echo":
        return [EchoWorker(cfg.echo, ctx)]
    if cfg.worker == "openai":
        from mpipeline.workers.openai import OpenAIUpstream

        return [OpenAIUpstream(cfg.openai, ctx, name="openai")]
    if cfg.worker == "anthropic":
        from mpipeline.workers.anthropic import AnthropicUpstream

        return [AnthropicUpstream(cfg.anthropic, ctx, name="anthropic")]
    if cfg.worker == "llama_cpp":
        from mpipeline.workers.llama_cpp import LlamaCppUpstream

        return [LlamaCppUpstream(cfg.llama_cpp, ctx)]
    return [_member(m, ctx) for m in cfg.pool.upstreams]


def upstream_names(cfg: InferenceConfig) -> list[str]:
    """The names ``build_upstreams`` gives, without building anything (metrics labels)."""
    if cfg.worker == "pool":
        return [m.name for m in cfg.pool.upstreams]
    return [cfg.worker]


def _member(cfg: PoolUpstreamConfig, ctx: WorkerContext) -> Upstream:
    if cfg.kind == "anthropic":
        from mpipeline.workers.anthropic import AnthropicUpstream

        return AnthropicUpstream(cfg, ctx, name=cfg.name)
    from mpipeline.workers.openai import OpenAIUpstream

    return OpenAIUpstream(cfg, ctx, name=cfg.name)


__all__ = [
    "EchoWorker",
    "Generation",
    "Upstream",
    "UpstreamFailure",
    "WorkerContext",
    "build_upstreams",
    "upstream_names",
]
