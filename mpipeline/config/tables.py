"""The tables of ``pipeline.toml``: one frozen msgspec Struct per table.

The same types decode the file, describe it (``json_schema``), write it back
(``dump_toml``) and give every field its default and its one-line doc
(``Annotated[..., Meta(description=...)]``). Secrets never live in the file:
fields ending in ``_env`` name the environment variable that holds them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from mpipeline.messages import STAGE_ORDER

MIB = 1 << 20
GIB = 1 << 30
# Smaller rings hold too few records to be worth a segment.
RING_MIN_BYTES = 4096
# One segment above this is a typo; /dev/shm rarely holds it.
RING_MAX_BYTES = GIB
# Ring positions are 8-byte aligned single stores (RELIABILITY 2.5).
RING_ALIGN = 8
# Error rings (every replica but the last stage's, to every client) carry only
# Failed messages: small and rarely busy.
ERROR_RING_BYTES = 256 * 1024


def _doc(text: str) -> Meta:
    return Meta(description=text)


_GE0 = Meta(ge=0)
_GE1 = Meta(ge=1)
_SECONDS = Meta(gt=0)
_PORT = Meta(ge=0, le=65535)
_RATE = Meta(ge=0, le=1e9)
_RING = Meta(ge=RING_MIN_BYTES, le=RING_MAX_BYTES, multiple_of=RING_ALIGN)
Cpus = list[int] | Literal["auto"]
_CPUS = _doc('Cores to pin to, or "auto": spread over the affinity mask.')


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every table: immutable, keyword-only, unknown keys rejected."""


class SupervisorConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The parent process: restarts, liveness, shutdown."""

    restart_intensity: Annotated[int, _GE0, _doc("Restarts per period, then FATAL.")] = 5
    restart_period_s: Annotated[float, _SECONDS, _doc("Window for restart_intensity.")] = 30.0
    backoff_initial_s: Annotated[float, _SECONDS, _doc("First restart delay.")] = 0.1
    backoff_max_s: Annotated[float, _SECONDS, _doc("Cap of the doubling delay.")] = 3.2
    boot_timeout_s: Annotated[float, _SECONDS, _doc("Time to report ready.")] = 30.0
    heartbeat_interval_s: Annotated[float, _SECONDS, _doc("Replica beat period.")] = 0.5
    liveness_timeout_s: Annotated[float, _SECONDS, _doc("Beat age that means hung.")] = 3.0
    drain_timeout_s: Annotated[float, _SECONDS, _doc("Grace for in-flight work.")] = 25.0
    cpus: Annotated[Cpus, _doc('Own cores; "auto" leaves it unpinned.')] = "auto"


class PinnedConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A set of replicas pinned to cores (the gateway and every stage)."""

    replicas: Annotated[int, _GE1, _doc("Processes running this.")] = 1
    cpus: Annotated[Cpus, _CPUS] = "auto"
    cores_per_replica: Annotated[int, _GE1, _doc("Cores each replica is pinned to.")] = 1


class RateLimitConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token buckets the gateway checks before a request enters the pipeline."""

    requests_per_s: Annotated[float, _RATE, _doc("Across all gateway replicas; 0: off.")] = 0.0
    burst: Annotated[int, _GE0, _doc("Bucket size; 0: one second's worth.")] = 0
    session_requests_per_s: Annotated[float, _RATE, _doc("Per session; 0: off.")] = 0.0
    session_burst: Annotated[int, _GE0, _doc("Session bucket size; 0: one second's worth.")] = 0
    session_slots: Annotated[
        int, Meta(ge=1, le=1 << 22), _doc("Session buckets kept (a power of two).")
    ] = 65536

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0 or self.session_requests_per_s > 0


class GatewayConfig(PinnedConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """HTTP ingress and egress."""

    replicas: Annotated[int, _GE0, _doc("Gateway processes; 0: no HTTP, library only.")] = 1
    host: Annotated[str, _doc("Listen address (IP or hostname).")] = "127.0.0.1"
    port: Annotated[int, _PORT, _doc("Listen port; 0: any free one.")] = 8080
    api_clients: Annotated[
        int, _GE1, _doc("Client slots beside the gateways (Pipeline.attach, dlq replay).")
    ] = 2
    ring_capacity: Annotated[int, _RING, _doc("Bytes of each return ring.")] = 4 * MIB
    auth_token_env: Annotated[str | None, _doc("NAME of the bearer-token env var.")] = None
    max_body_bytes: Annotated[int, _GE1, _doc("Largest request body.")] = MIB
    rate_limit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)


class MetricsConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Prometheus endpoint served by the supervisor."""

    enabled: Annotated[
        bool,
        _doc(
            "Count in shared memory and serve /metrics; false records nothing "
            "(mpipeline top then shows structure, not rates)."
        ),
    ] = True
    host: Annotated[str, _doc("Listen address.")] = "127.0.0.1"
    port: Annotated[int, _PORT, _doc("Listen port; 0: any free one (state.json has it).")] = 9090


class StageConfig(PinnedConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields every stage has."""

    ring_capacity: Annotated[int, _RING, _doc("Bytes of each input ring.")] = MIB
    full_policy: Annotated[Literal["block", "shed"], _doc("When the input is full.")] = "block"
    timeout_s: Annotated[float, _SECONDS, _doc("Per-message stage timeout.")] = 30.0
    batch: Annotated[int, _GE1, _doc("Max records taken per read.")] = 64


class RagConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Retrieval of context for the prompt."""

    enabled: Annotated[bool, _doc("false: the pipeline skips rag.")] = True
    documents: Annotated[str | None, _doc("Folder of .txt/.md; none: pass-through.")] = None
    top_k: Annotated[int, _GE1, _doc("Passages retrieved per prompt.")] = 3


class AssembleConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Prompt templating and budgeting."""

    template: Annotated[Literal["plain", "chatml"], _doc("Prompt format.")] = "chatml"
    system_prompt: Annotated[str, _doc("System message.")] = "You are a helpful assistant."
    max_prompt_chars: Annotated[int, _GE1, _doc("Longest prompt sent on.")] = 32768


class EchoConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The echo worker: replies with the prompt's tokens, for tests and benchmarks."""

    token_delay_ms: Annotated[float, _GE0, _doc("Sleep before each token.")] = 0.0
    max_tokens: Annotated[int, _GE1, _doc("Tokens per reply.")] = 16


class TimeoutsConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How long an upstream may take, phase by phase; each failure counts for its circuit."""

    connect_s: Annotated[float, _SECONDS, _doc("TCP and TLS connect.")] = 5.0
    # Below the default request deadline (30 s), so a hung upstream times out as
    # itself (and counts for its circuit) before the request expires.
    first_token_s: Annotated[float, _SECONDS, _doc("Request sent to first token.")] = 20.0
    between_tokens_s: Annotated[float, _SECONDS, _doc("Longest gap inside a stream.")] = 10.0
    total_s: Annotated[float, _SECONDS, _doc("Whole call, all tokens.")] = 600.0


class UpstreamConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One remote model server; the key is read from the environment, never from here."""

    base_url: Annotated[str, _doc("Root of the API, scheme included.")] = ""
    model: Annotated[str, _doc("Model name sent upstream.")] = ""
    api_key_env: Annotated[
        str | None, _doc('NAME of the env var with the API key; "": no key.')
    ] = None
    max_tokens: Annotated[int, _GE1, _doc("Default when a request sets none.")] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2), _doc("Sampling temperature.")] | None = None
    max_concurrency: Annotated[int, _GE1, _doc("Calls in flight per shard; more wait.")] = 64
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)


class OpenAIConfig(UpstreamConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Any OpenAI-compatible server: OpenAI, vLLM, llama.cpp server, SGLang, Ollama."""

    base_url: Annotated[str, _doc("Root of the API, /v1 included.")] = "https://api.openai.com/v1"
    model: Annotated[str, _doc("Model name sent upstream.")] = "gpt-4o-mini"
    api_key_env: Annotated[str | None, _doc("NAME of the API key env var.")] = "OPENAI_API_KEY"


class AnthropicConfig(UpstreamConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The Anthropic Messages API."""

    base_url: Annotated[str, _doc("Root of the API.")] = "https://api.anthropic.com"
    model: Annotated[str, _doc("Model name sent upstream.")] = "claude-3-5-haiku-latest"
    api_key_env: Annotated[str | None, _doc("NAME of the API key env var.")] = "ANTHROPIC_API_KEY"
    max_tokens: Annotated[int, _GE1, _doc("Default when a request sets none.")] | None = 1024
    version: Annotated[str, _doc("anthropic-version header.")] = "2023-06-01"


class PoolUpstreamConfig(UpstreamConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One member of a pool: a named OpenAI-compatible or Anthropic upstream."""

    name: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$"), _doc("Label.")]
    kind: Annotated[Literal["openai", "anthropic"], _doc("API spoken.")] = "openai"
    version: Annotated[str, _doc("anthropic-version header (kind anthropic).")] = "2023-06-01"


class PoolConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Several upstreams behind one worker; an open circuit takes one out of rotation."""

    strategy: Annotated[
        Literal["round_robin", "least_outstanding", "session_hash"], _doc("How to pick.")
    ] = "least_outstanding"
    upstreams: Annotated[list[PoolUpstreamConfig], _doc("The members, by name.")] = []


class LlamaCppConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A local GGUF model inside each shard process (llama-cpp-python)."""

    model_path: Annotated[str, _doc('GGUF file; "": the packaged Gemma 3 270M.')] = ""
    n_ctx: Annotated[int, Meta(ge=256, le=1 << 20), _doc("Context window in tokens.")] = 4096
    n_threads: Annotated[int, _GE0, _doc("Threads; 0: the shard's pinned cores.")] = 0
    n_batch: Annotated[int, _GE1, _doc("Prompt tokens evaluated per batch.")] = 512
    max_tokens: Annotated[int, _GE1, _doc("Default when a request sets none.")] = 256
    temperature: Annotated[float, Meta(ge=0, le=2), _doc("0: greedy.")] = 0.0
    seed: Annotated[int, _GE0, _doc("Sampling seed.")] = 0
    session_cache_mib: Annotated[int, _GE0, _doc("KV state kept for sessions; 0: none.")] = 256
    chat_format: Annotated[
        str | None,
        _doc('"gemma", a llama-cpp-python format name, or none: the GGUF\'s own template.'),
    ] = None


class BreakerConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A circuit per upstream, shared by every shard through shared memory."""

    enabled: Annotated[bool, _doc("false: never open.")] = True
    consecutive_failures: Annotated[int, _GE1, _doc("Failures in a row that open it.")] = 5
    failure_rate: Annotated[float, Meta(gt=0, le=1), _doc("Rate over the window that opens.")] = 0.5
    window_s: Annotated[float, _SECONDS, _doc("Window of the failure rate.")] = 10.0
    min_calls: Annotated[int, _GE1, _doc("Calls in the window before the rate counts.")] = 20
    open_s: Annotated[float, _SECONDS, _doc("Open this long, then half-open.")] = 5.0
    probes: Annotated[int, Meta(ge=1, le=64), _doc("Half-open probes, one at a time.")] = 3
    probe_success_rate: Annotated[
        float, Meta(gt=0, le=1), _doc("Share of probes that must succeed to close.")
    ] = 1.0


class RetryConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The shard's retry loop: the only one (SDK and transport retries are off)."""

    max_retries: Annotated[int, Meta(ge=0, le=20), _doc("Retries per request.")] = 3
    backoff_initial_s: Annotated[float, _SECONDS, _doc("First backoff cap.")] = 0.2
    backoff_max_s: Annotated[float, _SECONDS, _doc("Cap of the doubling backoff.")] = 10.0
    budget_ratio: Annotated[float, Meta(ge=0, le=10), _doc("Retries per request, on average.")] = (
        0.2
    )
    budget_min_per_s: Annotated[float, _GE0, _doc("Retries always allowed per second.")] = 1.0
    max_retry_after_s: Annotated[float, _GE0, _doc("Longest Retry-After honoured.")] = 60.0


class DedupConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Identical requests in flight share one call; recent results are reused."""

    coalesce: Annotated[bool, _doc("Identical in-flight requests share one call.")] = True
    cache_entries: Annotated[int, _GE0, _doc("Results kept; 0: no cache.")] = 4096
    cache_ttl_s: Annotated[float, _SECONDS, _doc("How long a result is reused.")] = 60.0
    cache_max_chars: Annotated[int, _GE1, _doc("Longer results are not cached.")] = 65536


class InferenceConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Model shards, chosen per session by hash."""

    replicas: Annotated[int, _GE1, _doc("Shards.")] = 2
    concurrency: Annotated[
        int, _GE1, _doc("Requests a shard runs at once; more wait, critical first.")
    ] = 256
    worker: Annotated[
        Literal["echo", "openai", "anthropic", "llama_cpp", "pool"], _doc("Model backend.")
    ] = "echo"
    chunk_tokens: Annotated[int, _GE1, _doc("Tokens per streamed chunk.")] = 1
    echo: EchoConfig = msgspec.field(default_factory=EchoConfig)
    openai: OpenAIConfig = msgspec.field(default_factory=OpenAIConfig)
    anthropic: AnthropicConfig = msgspec.field(default_factory=AnthropicConfig)
    llama_cpp: LlamaCppConfig = msgspec.field(default_factory=LlamaCppConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    dedup: DedupConfig = msgspec.field(default_factory=DedupConfig)

    @property
    def remote(self) -> bool:
        """Whether the worker calls servers over the network (and so needs circuits)."""
        return self.worker in ("openai", "anthropic", "pool")


class PostConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Output filtering and formatting."""

    strip: Annotated[bool, _doc("Trim surrounding whitespace.")] = True
    max_output_chars: Annotated[int, _GE1, _doc("Longer output is cut.")] = 65536


class StreamConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Delivery back to the gateway and to sinks."""

    sink_jsonl: Annotated[str | None, _doc("Also append results to this file.")] = None


class StagesConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One table per stage, in flow order."""

    rag: RagConfig = msgspec.field(default_factory=RagConfig)
    assemble: AssembleConfig = msgspec.field(default_factory=AssembleConfig)
    inference: InferenceConfig = msgspec.field(default_factory=InferenceConfig)
    post: PostConfig = msgspec.field(default_factory=PostConfig)
    stream: StreamConfig = msgspec.field(default_factory=StreamConfig)


if tuple(StagesConfig.__struct_fields__) != STAGE_ORDER:  # pragma: no cover - a dev's slip
    raise ImportError(f"[stages.*] tables {StagesConfig.__struct_fields__} != {STAGE_ORDER}")


class PipelineConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole of ``pipeline.toml``."""

    name: Annotated[
        str,
        Meta(pattern=r"^(?:[a-z0-9][a-z0-9_.-]{0,63})?$"),
        _doc('This pipeline\'s run dir under the default base; "": port-<gateway.port>.'),
    ] = ""
    run_dir: Annotated[str, _doc('Lock, state, DLQ; "": per-user base / the name.')] = ""
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    stages: StagesConfig = msgspec.field(default_factory=StagesConfig)


__all__ = [
    "AnthropicConfig",
    "AssembleConfig",
    "BreakerConfig",
    "Cpus",
    "DedupConfig",
    "ERROR_RING_BYTES",
    "EchoConfig",
    "GIB",
    "GatewayConfig",
    "InferenceConfig",
    "LlamaCppConfig",
    "MIB",
    "MetricsConfig",
    "OpenAIConfig",
    "PinnedConfig",
    "PipelineConfig",
    "PoolConfig",
    "PoolUpstreamConfig",
    "PostConfig",
    "RING_ALIGN",
    "RING_MAX_BYTES",
    "RING_MIN_BYTES",
    "RagConfig",
    "RateLimitConfig",
    "RetryConfig",
    "STAGE_ORDER",
    "StageConfig",
    "StagesConfig",
    "StreamConfig",
    "SupervisorConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
]
