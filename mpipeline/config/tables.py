"""The tables of ``pipeline.toml``: one frozen msgspec Struct per table.

The same types decode the file, describe it (``json_schema``), write it back
(``dump_toml``), write the commented default file (``config init``) and give
every field its default and its text (``Annotated[..., _doc(...)]``; a table's
docstring is its text). So the text is written for the person editing the
file. Secrets never live in the file: fields ending in ``_env`` name the
environment variable that holds them. The supervisor, gateway and metrics
tables are in ``serving.py``, the inference worker tables in ``workers.py``;
this module re-exports them all.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from mpipeline.config._base import (
    _DEADLINE,
    _GE0,
    _GE1,
    _RING,
    _SECONDS,
    GIB,
    MAX_DEADLINE_S,
    MIB,
    RING_ALIGN,
    RING_MAX_BYTES,
    RING_MIN_BYTES,
    Cpus,
    PinnedConfig,
    _doc,
    _Table,
)
from mpipeline.config.models import MODELS_DOC, ModelConfig
from mpipeline.config.redact import RedactConfig, RedactPattern
from mpipeline.config.serving import (
    GatewayConfig,
    MetricsConfig,
    RateLimitConfig,
    SupervisorConfig,
)
from mpipeline.config.workers import (
    AnthropicConfig,
    BreakerConfig,
    DedupConfig,
    EchoConfig,
    LlamaCppConfig,
    OpenAIConfig,
    PoolConfig,
    PoolUpstreamConfig,
    RetryConfig,
    TimeoutsConfig,
    UpstreamConfig,
)
from mpipeline.messages import STAGE_ORDER

# Error rings (every replica but the last stage's, to every client) carry only
# Failed messages: small and rarely busy.
ERROR_RING_BYTES = 256 * 1024
# The longest busy-poll a stage may ask for: past a millisecond, spinning is a
# core given away, not a faster hop.
MAX_SPIN_US = 1000


class StageConfig(PinnedConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every [stages.*] table starts with these fields."""

    ring_capacity: Annotated[
        int,
        _RING,
        _doc(
            "Bytes of each input ring of the stage (a multiple of 8, 4096 to 1 GiB); "
            "/dev/shm must hold 1.2 x all rings."
        ),
    ] = MIB
    full_policy: Annotated[
        Literal["block", "shed"],
        _doc(
            'When the input ring is full, the producer either "block"s (waits, bounded by '
            'the request\'s deadline) or "shed"s (fails the request at once with 503 and '
            "a DLQ record)."
        ),
    ] = "block"
    timeout_s: Annotated[float, _SECONDS, _doc("Seconds one message may take in the stage.")] = 30.0
    batch: Annotated[int, _GE1, _doc("Most records taken from the input rings per read.")] = 64
    spin_us: Annotated[
        Annotated[int, Meta(ge=0, le=MAX_SPIN_US)] | Literal["auto"],
        _doc(
            "Microseconds a replica busy-polls an empty input ring (or a full output ring) "
            "before it sleeps on the doorbell, 0 to 1000: cheaper, faster hops under steady "
            'traffic for a core of CPU. "auto": 20 when the replica has its cores to itself, '
            "0 when it shares one with another replica (spinning there steals the core from "
            "the very process it waits for)."
        ),
    ] = "auto"
    group: Annotated[
        str,
        Meta(pattern=r"^([a-z][a-z0-9_]{0,31})?$"),
        _doc(
            "Placement group: consecutive stages with the same group name run in one "
            "process per replica (operator chaining), passing messages as Python objects "
            "with no ring, encode or wake between them; rings remain between groups. "
            "Every stage of a group has the first one's replicas and runs on its cores. "
            '"" (the default): a process of its own.'
        ),
    ] = ""


class RagConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Retrieval: finds context for the prompt."""

    enabled: Annotated[
        bool, _doc("false takes rag out of the pipeline: the gateway feeds assemble directly.")
    ] = True
    documents: Annotated[
        str | None,
        _doc(
            "Folder of .txt/.md documents to retrieve from (relative: to the working "
            "directory); it must exist and hold at least one such file. Unset: rag passes "
            "requests through with no context. A change to its files (checked every "
            "reload_poll_s) or a SIGHUP to a rag replica rebuilds the index in the "
            "background; requests keep the old one until the new one is swapped in.",
            "docs/",
        ),
    ] = None
    index_dir: Annotated[
        str | None,
        _doc(
            "Folder of built indexes, one sub-folder per state of the corpus, which every "
            "rag replica memory-maps (`mpipeline index build` fills it ahead of a start). "
            "Unset: rag-index in the run dir.",
            "/var/cache/mpipeline/rag-index",
        ),
    ] = None
    top_k: Annotated[int, _GE1, _doc("Passages retrieved per prompt.")] = 3
    chunk_tokens: Annotated[
        int, _GE1, _doc("Length of a passage, in tokens (a word or a punctuation mark).")
    ] = 200
    chunk_overlap: Annotated[
        int,
        Meta(ge=0),
        _doc("Tokens that consecutive passages of a file share; less than chunk_tokens."),
    ] = 40
    context_tokens: Annotated[
        int,
        Meta(ge=0),
        _doc(
            "Most tokens of retrieved context per prompt: passages are taken best first "
            "until the next would go over. 0: no limit but top_k."
        ),
    ] = 1000
    reload_poll_s: Annotated[
        float,
        Meta(ge=0),
        _doc("Seconds between checks of the documents for changes. 0: only SIGHUP reloads."),
    ] = 2.0


class AssembleConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Builds the exact prompt the model sees."""

    template: Annotated[
        Literal["plain", "chatml"],
        _doc('Prompt format: "chatml" (role-tagged turns) or "plain" (text only).'),
    ] = "chatml"
    system_prompt: Annotated[str, _doc("System message placed before the user's input.")] = (
        "You are a helpful assistant."
    )
    budget_tokens: Annotated[
        int,
        _GE0,
        _doc(
            "Most prompt tokens assemble sends on: system prompt, retrieved context, history "
            "and input, with the chat framing. 0: the model's own limit where assemble knows "
            "it (llama_cpp: n_ctx minus the request's max_tokens, counted with the model's "
            "vocabulary), else none. Other workers' tokens are estimated (README: assemble). "
            "What does not fit goes whole, oldest history turns first, then the least "
            "relevant context (the last passage kept may be cut); a request whose system "
            "prompt and input alone do not fit gets 400 invalid_request."
        ),
    ] = 0
    max_prompt_chars: Annotated[
        int,
        _GE0,
        _doc(
            "Most characters of turn text (system, context, history, input; not the "
            "template's framing) assemble sends on, fitted as budget_tokens is; 0: no "
            "bound. Superseded by budget_tokens, which counts what models limit; kept as "
            "a second bound."
        ),
    ] = 0


class InferenceConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Model shards: a session always reaches shard hash(session_id) % replicas."""

    replicas: Annotated[int, _GE1, _doc("Shards: processes running the model worker.")] = 2
    timeout_s: Annotated[
        float,
        _DEADLINE,
        _doc(
            "Seconds one request may take in the shard: its whole generation, streamed "
            "or not. As long as the longest deadline, so that the request's own deadline "
            "(gateway.timeout_s, gateway.stream_timeout_s, X-Request-Timeout, "
            "deadline_ms) and the upstream's timeouts are what end a generation, never "
            "a shorter stage limit."
        ),
    ] = float(MAX_DEADLINE_S)
    concurrency: Annotated[
        int,
        _GE1,
        _doc(
            "Requests one shard runs at once. More wait inside the shard, highest priority "
            "first (critical, high, normal, low), up to max(batch, concurrency) read ahead; "
            "beyond that they wait in the shard's input rings, in order."
        ),
    ] = 256
    worker: Annotated[
        Literal["echo", "openai", "anthropic", "llama_cpp", "pool"],
        _doc(
            "Model backend, configured in the table of its name below:\n"
            '  "echo"       replies with the prompt\'s own tokens (tests, benchmarks);\n'
            '  "openai"     any OpenAI-compatible server (OpenAI, vLLM, llama.cpp server,\n'
            "               SGLang, Ollama);\n"
            '  "anthropic"  the Anthropic Messages API;\n'
            '  "llama_cpp"  a local GGUF model inside each shard (mpipeline[llama]);\n'
            '  "pool"       several OpenAI/Anthropic upstreams behind one worker.'
        ),
    ] = "echo"
    chunk_tokens: Annotated[
        int, _GE1, _doc("Tokens per streamed chunk sent on to post and the client.")
    ] = 1
    drop_params: Annotated[
        bool,
        _doc(
            "A /v1/chat/completions field the worker cannot honour (echo: temperature; "
            "llama_cpp: tools; anthropic: seed...) is refused with 400 "
            "invalid_request_error naming it. true drops such fields instead, as "
            "LiteLLM's drop_params does (README: fields and backends)."
        ),
    ] = False
    coalesce_reads: Annotated[
        bool,
        _doc(
            "A remote stream goes on read by read: the tokens that arrived in one network "
            "read become one chunk (one message per hop instead of one per token; 4x to 7x "
            "the streamed tokens/s, bench/RESULTS.md). false: chunk_tokens tokens per chunk."
        ),
    ] = True
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
    """Filters and formats the output, chunk by chunk on streams."""

    strip: Annotated[bool, _doc("Trim whitespace around the finished output.")] = True
    max_output_chars: Annotated[
        int, _GE1, _doc("Output beyond this many characters is cut, on streams too.")
    ] = 65536
    redact: RedactConfig = msgspec.field(default_factory=RedactConfig)


class StreamConfig(StageConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Delivers results to the gateway replica holding the client, and to sinks."""

    sink_jsonl: Annotated[
        str | None,
        _doc("Also append every result to this JSON Lines file. Unset: no file.", "results.jsonl"),
    ] = None


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
    """The configuration of an mpipeline run: every field, its default and what it does.

    `mpipeline config init` writes this file from the config's own types, the
    source of `mpipeline config schema` too (the JSON Schema; editors such as
    Taplo use it for completion). Check a file with
      mpipeline config validate --config FILE
    and print what a run would actually use with `mpipeline config show`.
    Unknown keys are errors, so a typo never passes silently. With no file,
    `mpipeline run` uses these defaults.

    Each arrow of the flow is one shared-memory ring per (producer replica,
    consumer replica):
      gateway -> rag -> assemble -> inference[0..N-1] -> post -> stream -> gateway
    Secrets never go in this file: fields ending in _env hold the NAME of an
    environment variable, never its value.
    """

    name: Annotated[
        str,
        Meta(pattern=r"^(?:[a-z0-9][a-z0-9_.-]{0,63})?$"),
        _doc(
            "Names this pipeline: its run dir (lock, state, dead-letter queue) is "
            "<base>/<name>, where <base> is $XDG_RUNTIME_DIR/mpipeline, or "
            '/tmp/mpipeline-<uid> without it. "" means port-<gateway.port> (two pipelines '
            'cannot share a port anyway), or "default" when the gateway has no fixed port. '
            'Lower-case letters, digits, ".", "_" and "-"; give two pipelines of one user '
            "two names to keep their state and DLQ apart."
        ),
    ] = ""
    run_dir: Annotated[
        str,
        _doc(
            "Where the lock file, state and dead-letter queue live, overriding the above. "
            "`mpipeline run --run-dir` overrides it."
        ),
    ] = ""
    models: Annotated[list[ModelConfig], MODELS_DOC] = []
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
    "MAX_DEADLINE_S",
    "MIB",
    "MetricsConfig",
    "ModelConfig",
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
    "RedactConfig",
    "RedactPattern",
    "RetryConfig",
    "STAGE_ORDER",
    "StageConfig",
    "StagesConfig",
    "StreamConfig",
    "SupervisorConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
]
