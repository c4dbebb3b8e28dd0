"""The pipeline's configuration: typed tables for ``pipeline.toml`` and their checks.

Everything the supervisor needs to know before it creates a segment or a process
is decided here, so that a bad file fails with exit 2 and every problem named by
field and line (RELIABILITY scenario 32) instead of with a SIGBUS or an EINVAL
from ``cpu_affinity`` halfway through start-up. The tables are frozen msgspec
Structs: the same types decode the file, describe it (``json_schema``) and write
it back (``dump_toml``). Secrets never live in the file; it names environment
variables that hold them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mpipeline import _config_toml as _toml
from mpipeline.errors import ConfigError as ConfigError
from mpipeline.errors import ConfigIssue as ConfigIssue

MIB = 1 << 20
GIB = 1 << 30
# The stages between the gateway's ingress and its return rings, in flow order.
STAGE_ORDER = ("rag", "assemble", "inference", "post", "stream")
# Smaller rings hold too few records to be worth a segment.
RING_MIN_BYTES = 4096
# One segment above this is a typo; /dev/shm rarely holds it.
RING_MAX_BYTES = GIB
# Ring positions are 8-byte aligned single stores (RELIABILITY 2.5).
RING_ALIGN = 8
# Error rings (every replica but the last stage's, to every client) carry only
# Failed messages: small and rarely busy.
ERROR_RING_BYTES = 256 * 1024
# /dev/shm must hold this multiple of the rings: headers, alignment, other tenants.
SHM_HEADROOM = 1.2
SHM_DIR = "/dev/shm"
_LOOPBACK_NAMES = ("localhost",)
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


# Public helpers


def load(path: Path) -> PipelineConfig:
    """Read, decode and check a config file.

    :raises ConfigError: listing every issue (also in ``.issues``), one per line
    """
    cfg, issues = _check(path)
    if cfg is None or issues:
        raise ConfigError("\n".join(map(str, issues)), issues)
    return cfg


def validate(path: Path) -> list[ConfigIssue]:
    """Every problem with the file at ``path``, ordered by line; empty when it is valid."""
    return _check(path)[1]


def warnings(cfg: PipelineConfig) -> list[str]:
    """Legal but doubtful settings: oversubscribed cores, an open unauthenticated gateway."""
    out = []
    available = _available_cpus()
    plan = pinning(cfg, available)
    wanted = sum(len(cores) for cores in plan.values())
    users: dict[int, list[str]] = {}
    for name, cores in plan.items():
        for core in cores:
            users.setdefault(core, []).append(name)
    shared = [f"{c} ({', '.join(n)})" for c, n in sorted(users.items()) if len(n) > 1]
    if wanted > len(available):
        out.append(
            f"{len(plan)} pinned processes (stage replicas and the gateway/client) want "
            f"{wanted} cores but only {len(available)} are "
            f"available ({_ranges(available)}): they will share cores"
        )
    elif shared:
        out.append("cores shared by several replicas: " + "; ".join(shared))
    env = cfg.gateway.auth_token_env
    if env is None and not _is_loopback(cfg.gateway.host):
        out.append(
            f"gateway listens on {cfg.gateway.host} with no auth_token_env: anyone can use it"
        )
    if env is not None and env not in os.environ:
        out.append(f"gateway.auth_token_env names {env}, which is not set here")
    return out


def json_schema() -> dict[str, Any]:
    """JSON Schema of ``pipeline.toml`` (editors use it for TOML completion too)."""
    return msgspec.json.schema(PipelineConfig)


def dump_toml(cfg: PipelineConfig) -> str:
    """The effective config as TOML; unset optional fields are left out."""
    return _toml.write_toml(msgspec.to_builtins(cfg))


def active_stages(cfg: PipelineConfig) -> list[tuple[str, StageConfig]]:
    """The stages the topology runs, in flow order: rag is left out when disabled."""
    skip = () if cfg.stages.rag.enabled else ("rag",)
    return [(name, getattr(cfg.stages, name)) for name in STAGE_ORDER if name not in skip]


def ring_bytes(cfg: PipelineConfig) -> dict[str, int]:
    """Bytes of ring memory per consuming stage ("gateway" for the return rings,
    "errors" for the error rings).

    One ring per (producer replica, consumer replica) pair, sized by the consumer.
    The gateway side counts every client slot: the gateway replicas and the
    ``api_clients`` slots for Python clients and the CLI.
    """
    gateway = cfg.gateway.replicas + cfg.gateway.api_clients
    out = {}
    producers = gateway
    for name, stage in active_stages(cfg):
        out[name] = producers * stage.replicas * stage.ring_capacity
        producers = stage.replicas
    out["gateway"] = producers * gateway * cfg.gateway.ring_capacity
    # Error rings: every replica but the last stage's has one to every client.
    senders = sum(stage.replicas for _, stage in active_stages(cfg)[:-1])
    out["errors"] = senders * gateway * ERROR_RING_BYTES
    return out


def ring_bytes_total(cfg: PipelineConfig) -> int:
    """Bytes of every ring the topology creates."""
    return sum(ring_bytes(cfg).values())


def cpus_for(
    stage_cfg: PinnedConfig, index: int, n_available: list[int], stage_offset: int = 0
) -> list[int]:
    """The cores replica ``index`` is pinned to, sorted.

    A ``cpus`` list is dealt out ``cores_per_replica`` at a time, wrapping around.
    ``"auto"`` deals from ``n_available`` (the affinity mask) the same way, starting
    at ``stage_offset`` so that consecutive stages land on different cores.
    """
    k = stage_cfg.cores_per_replica
    cpus = stage_cfg.cpus
    pool, start = (n_available, stage_offset) if cpus == "auto" else (cpus, 0)
    start += index * k
    return sorted({pool[(start + j) % len(pool)] for j in range(k)})


def pinning(cfg: PipelineConfig, available: list[int] | None = None) -> dict[str, list[int]]:
    """Cores of every replica, by name (``"gateway-0"``, ``"inference-1"``...).

    "auto" stages get consecutive blocks of the affinity mask in flow order. The
    supervisor is not included: ``supervisor.cpus == "auto"`` means unpinned.
    """
    available = _available_cpus() if available is None else available
    plan = {}
    offset = 0
    sets: list[tuple[str, PinnedConfig]] = [("gateway", cfg.gateway), *active_stages(cfg)]
    for name, pinned in sets:
        for i in range(pinned.replicas):
            plan[f"{name}-{i}"] = cpus_for(pinned, i, available, offset)
        offset += pinned.replicas * pinned.cores_per_replica
    return plan


# Checks


def _available_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _free_shm_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None  # no /dev/shm on this OS; creating the segments will tell
    return st.f_bavail * st.f_frsize


def _check(path: Path) -> tuple[PipelineConfig | None, list[ConfigIssue]]:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [ConfigIssue(file, None, "", "no such file")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [ConfigIssue(file, None, "", f"cannot read: {exc}")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, message = _toml.syntax_error(text, exc)
        return None, [ConfigIssue(file, line, "", f"TOML syntax: {message}")]
    problems: list[_toml.Problem] = []
    cfg = _toml.decode_table(PipelineConfig, data, "", problems)
    problems += _semantics(cfg)
    lines = _toml.key_lines(text)
    issues = [ConfigIssue(file, _toml.line_of(lines, f), f, m) for f, m in problems]
    return cfg, sorted(issues, key=lambda i: (i.line is None, i.line or 0))


def _semantics(cfg: PipelineConfig) -> list[_toml.Problem]:
    """Checks that span fields or depend on this machine."""
    out: list[_toml.Problem] = []
    available = _available_cpus()
    _check_cpus(out, "supervisor", cfg.supervisor.cpus, 1, available)
    pinned: list[tuple[str, PinnedConfig]] = [("gateway", cfg.gateway)]
    pinned += [(f"stages.{name}", s) for name, s in active_stages(cfg)]
    for path, p in pinned:
        _check_cpus(out, path, p.cpus, p.cores_per_replica, available)
    for path, host in (("gateway.host", cfg.gateway.host), ("metrics.host", cfg.metrics.host)):
        if not _valid_host(host):
            out.append((path, f"{host!r} is neither an IP address nor a hostname"))
    if cfg.metrics.enabled and cfg.metrics.port == cfg.gateway.port != 0:
        out.append(("metrics.port", f"is the same as gateway.port ({cfg.gateway.port})"))
    env = cfg.gateway.auth_token_env
    if env is not None and not _ENV_NAME.fullmatch(env):
        # Never echo it: someone may have pasted the token itself here.
        out.append(("gateway.auth_token_env", "must be the NAME of an environment variable"))
    out += _check_worker(cfg.stages.inference)
    slots = cfg.gateway.rate_limit.session_slots
    if slots & (slots - 1):
        out.append(("gateway.rate_limit.session_slots", f"{slots} is not a power of two"))
    sup = cfg.supervisor
    if sup.backoff_initial_s > sup.backoff_max_s:
        out.append(("supervisor.backoff_max_s", "must be >= backoff_initial_s"))
    if sup.liveness_timeout_s <= sup.heartbeat_interval_s:
        out.append(("supervisor.liveness_timeout_s", "must be > heartbeat_interval_s"))
    by_stage = ring_bytes(cfg)
    need = sum(by_stage.values())
    free = _free_shm_bytes()
    if free is not None and need * SHM_HEADROOM > free:
        top = max(by_stage, key=by_stage.__getitem__)
        field = "gateway.ring_capacity" if top == "gateway" else f"stages.{top}.ring_capacity"
        message = (
            f"rings need {_mib(need)} (x{SHM_HEADROOM} = {_mib(need * SHM_HEADROOM)}) but "
            f"{SHM_DIR} has {_mib(free)} free; the largest share is {top}'s "
            f"({_mib(by_stage[top])}). Shrink rings or replicas, or grow {SHM_DIR} "
            "(docker run --shm-size)"
        )
        out.append((field, message))
    return out


def _check_worker(inf: InferenceConfig) -> list[_toml.Problem]:
    """The chosen worker's table: URLs, key variable names, pool members."""
    out: list[_toml.Problem] = []
    upstreams: list[tuple[str, UpstreamConfig]] = []
    if inf.worker in ("openai", "anthropic"):
        upstreams.append((f"stages.inference.{inf.worker}", getattr(inf, inf.worker)))
    elif inf.worker == "pool":
        members = inf.pool.upstreams
        if not members:
            out.append(("stages.inference.pool.upstreams", "worker is pool but none are listed"))
        names = [m.name for m in members]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            out.append(("stages.inference.pool.upstreams", f"names used twice: {', '.join(twice)}"))
        upstreams += [(f"stages.inference.pool.upstreams[{i}]", m) for i, m in enumerate(members)]
    for path, up in upstreams:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", up.base_url):
            # No echo of the value: a URL may carry credentials.
            out.append((f"{path}.base_url", "must be an http:// or https:// URL without a query"))
        if up.api_key_env and not _ENV_NAME.fullmatch(up.api_key_env):
            out.append((f"{path}.api_key_env", "must be the NAME of an environment variable"))
        if not up.model:
            out.append((f"{path}.model", "must name the model to call"))
    return out


def _check_cpus(
    out: list[_toml.Problem], path: str, cpus: Cpus, k: int, available: list[int]
) -> None:
    if cpus == "auto":
        if k > len(available):
            message = f"is {k} but only {_ranges(available)} are available"
            out.append((f"{path}.cores_per_replica", message))
        return
    if not cpus:
        out.append((f"{path}.cpus", 'must list at least one core (or be "auto")'))
        return
    twice = sorted({c for c in cpus if cpus.count(c) > 1})
    if twice:
        out.append((f"{path}.cpus", f"lists {_ranges(twice)} more than once"))
    outside = sorted(set(cpus) - set(available))
    if outside:
        message = f"{_ranges(outside)} outside the CPU affinity (allowed: {_ranges(available)})"
        out.append((f"{path}.cpus", message))
    if k > len(set(cpus)):
        out.append((f"{path}.cores_per_replica", f"is {k} but cpus lists {len(set(cpus))}"))


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return (
            len(host) <= 253
            and all(_HOST_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit()
        )
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in _LOOPBACK_NAMES


def _ranges(cores: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``, the way taskset and cpusets write them."""
    spans: list[list[int]] = []
    for c in cores:
        if spans and spans[-1][1] == c - 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"
