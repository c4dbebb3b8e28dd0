"""The tables of what serves the stages: the supervisor, the HTTP gateway, the metrics.

Apart from ``tables.py`` only for size; ``tables`` re-exports every one.
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
    MAX_DEADLINE_S,
    MIB,
    Cpus,
    PinnedConfig,
    _doc,
    _Table,
)

_PORT = Meta(ge=0, le=65535)
_RATE = Meta(ge=0, le=1e9)
# Bounds of the async requests' table (gateway.jobs_ttl_s, gateway.jobs_max).
MAX_JOBS_TTL_S = 7 * 24 * 3600
MAX_JOBS = 1_000_000


class SupervisorConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The parent process: restarts, liveness, shutdown."""

    restart_intensity: Annotated[
        int,
        _GE0,
        _doc(
            "A replica may crash and be restarted this many times within restart_period_s; "
            "one more crash in that window stops the whole pipeline (exit code FATAL)."
        ),
    ] = 5
    restart_period_s: Annotated[
        float, _SECONDS, _doc("Length of the window, in seconds, over which restarts count.")
    ] = 30.0
    backoff_initial_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "Seconds before restarting a crashed replica; the delay doubles with each "
            "crash in a row, up to backoff_max_s."
        ),
    ] = 0.1
    backoff_max_s: Annotated[float, _SECONDS, _doc("Cap of the doubling restart delay.")] = 3.2
    boot_timeout_s: Annotated[
        float,
        _SECONDS,
        _doc("Seconds a replica has to boot and report ready before the start is a failure."),
    ] = 30.0
    heartbeat_interval_s: Annotated[
        float,
        _SECONDS,
        _doc("Seconds between the heartbeats every replica writes into shared memory."),
    ] = 0.5
    liveness_timeout_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "A replica whose last heartbeat is older than this many seconds is hung: it is "
            "killed and restarted. Must be greater than heartbeat_interval_s."
        ),
    ] = 3.0
    drain_timeout_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "On SIGTERM/SIGINT, seconds in-flight requests get to finish before the rest "
            "are failed with 503 and written to the dead-letter queue (under Kubernetes' "
            "30 s)."
        ),
    ] = 25.0
    cpus: Annotated[
        Cpus,
        _doc(
            'Cores for the supervisor itself: a list such as [0], or "auto" to leave it '
            "unpinned (it mostly sleeps)."
        ),
    ] = "auto"


class RateLimitConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token buckets checked before a request enters the pipeline.

    A request over a limit gets 429 with Retry-After and is never queued or
    dead-lettered. The buckets live in shared memory, so the limits hold across
    all gateway replicas.
    """

    requests_per_s: Annotated[
        float,
        _RATE,
        _doc("Requests per second across the whole gateway (all replicas); 0 turns it off."),
    ] = 0.0
    burst: Annotated[
        int,
        _GE0,
        _doc(
            "Requests that may arrive at once above that rate (the bucket's size); 0 means "
            "one second's worth (requests_per_s, at least 1)."
        ),
    ] = 0
    session_requests_per_s: Annotated[
        float,
        _RATE,
        _doc(
            "Requests per second per session (body session_id, X-Session-Id, or OpenAI's "
            "user); 0 turns it off. Requests without a session only meet the global limit."
        ),
    ] = 0.0
    session_burst: Annotated[int, _GE0, _doc("The same as burst, per session.")] = 0
    session_slots: Annotated[
        int,
        Meta(ge=1, le=1 << 22),
        _doc(
            "Sessions tracked at once (a power of two, 32 bytes each). An idle session's "
            "slot is reused; when a session's few candidate slots are all busy, it shares "
            "the fullest of their buckets."
        ),
    ] = 65536

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0 or self.session_requests_per_s > 0


class GatewayConfig(PinnedConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """HTTP ingress and egress: REST, OpenAI-compatible chat completions, WebSocket."""

    replicas: Annotated[
        int,
        _GE0,
        _doc(
            "Gateway processes. They share one listening socket that the supervisor binds. "
            "0 runs no HTTP gateway: the pipeline is used from Python (mpipeline.Pipeline)."
        ),
    ] = 1
    host: Annotated[
        str,
        _doc(
            "Address to listen on: an IP address or hostname. Keep it on loopback unless "
            "auth_token_env is set. `mpipeline run --host` overrides it."
        ),
    ] = "127.0.0.1"
    port: Annotated[
        int,
        _PORT,
        _doc(
            "TCP port to listen on; 0 picks a free one (`mpipeline status` shows it). "
            "`mpipeline run --port` overrides it."
        ),
    ] = 8080
    api_clients: Annotated[
        int,
        _GE1,
        _doc(
            "Client slots beside the gateway replicas, for Python clients "
            "(Pipeline.attach), `mpipeline dlq replay` and `mpipeline bench`."
        ),
    ] = 2
    ring_capacity: Annotated[
        int,
        _RING,
        _doc("Bytes of each return ring (stream -> gateway): a multiple of 8, 4096 to 1 GiB."),
    ] = 4 * MIB
    auth_token_env: Annotated[
        str | None,
        _doc(
            "NAME of the environment variable that holds the bearer token clients must "
            "send. Unset (the default) means no authentication.",
            "MPIPELINE_TOKEN",
        ),
    ] = None
    admin_token_env: Annotated[
        str | None,
        _doc(
            "NAME of the environment variable that holds the admin bearer token: over "
            "/mcp, only a request that sends it may see and call the `configure` tool "
            "(live settings). It is also let in wherever /mcp asks for auth_token_env's "
            "token. Unset (the default): `configure` is refused over HTTP; `mpipeline mcp` "
            "(stdio, the run dir's owner) may always use it.",
            "MPIPELINE_ADMIN_TOKEN",
        ),
    ] = None
    max_body_bytes: Annotated[int, _GE1, _doc("Largest request body accepted, in bytes.")] = MIB
    max_connections: Annotated[
        int,
        _GE1,
        _doc(
            "Connections one gateway replica holds at once, HTTP and WebSocket together; "
            "beyond it a new one gets 503 with Retry-After. Each is a file descriptor: "
            "the replica raises its open-files limit to fit (README: file descriptors)."
        ),
    ] = 10_000
    timeout_s: Annotated[
        float,
        _DEADLINE,
        _doc(
            "Deadline, in seconds, of a request that names none and is not a stream: its "
            "answer (or a 504) comes within it. A request sets its own with the header "
            "X-Request-Timeout (seconds; every route and the WebSocket), deadline_ms "
            "(POST /v1/prompt, WebSocket messages), or, on /v1/chat/completions without "
            "stream, the openai SDK's x-stainless-read-timeout. 600 is the openai SDK's "
            f"own default; at most {MAX_DEADLINE_S}."
        ),
    ] = 600.0
    stream_timeout_s: Annotated[
        float,
        _DEADLINE,
        _doc(
            "Deadline, in seconds, of a stream (SSE, WebSocket) that names none. Within "
            "it a stream is bounded by its upstream's between_tokens_s, so a long "
            "generation goes on while tokens flow and a silent upstream is cut early. "
            f"At most {MAX_DEADLINE_S}."
        ),
    ] = 3600.0
    stall_timeout_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "A streaming client that reads nothing for this long is cut: an error event, "
            "slow_client in the DLQ, the connection closed. Until then its stream is "
            "paused at the model, so no tokens are spent on it."
        ),
    ] = 30.0
    ws_ping_interval_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "A WebSocket that sent nothing for this long is pinged; one silent for "
            "another interval is closed (1011)."
        ),
    ] = 20.0
    ws_idle_timeout_s: Annotated[
        float,
        _SECONDS,
        _doc(
            "A WebSocket with no request in flight and no message for this long is "
            "closed (1001); pongs do not keep it open."
        ),
    ] = 120.0
    jobs_ttl_s: Annotated[
        float,
        Meta(gt=0, le=MAX_JOBS_TTL_S),
        _doc(
            "Seconds the outcome of an async request (POST /v1/requests) is kept after it "
            "ends; after that GET /v1/requests/{id} answers 404. At most a week."
        ),
    ] = 3600.0
    jobs_max: Annotated[
        int,
        Meta(ge=1, le=MAX_JOBS),
        _doc(
            "Async requests one gateway replica holds, finished ones included (in memory). "
            "When it is full the oldest finished one is forgotten early; when every one is "
            "unfinished, POST /v1/requests answers 429 with Retry-After."
        ),
    ] = 1000
    batch_concurrency: Annotated[
        int,
        Meta(ge=1, le=1024),
        _doc(
            "Lines of one batch (POST /v1/batches) run at once; each batch runs on one "
            "gateway replica, so this bounds what a batch takes of the pipeline."
        ),
    ] = 4
    batch_priority: Annotated[
        Literal["critical", "high", "normal", "low"],
        _doc(
            "Priority of batch lines; below interactive traffic (normal) by default, so "
            "the shards serve waiting requests first."
        ),
    ] = "low"
    rate_limit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)


class MetricsConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Prometheus metrics, served by the supervisor at /metrics."""

    enabled: Annotated[
        bool,
        _doc(
            "Replicas count into a shared-memory block and the supervisor serves it at "
            "/metrics; false records nothing (`mpipeline top` then shows structure, not "
            "rates)."
        ),
    ] = True
    host: Annotated[str, _doc("Address of the /metrics endpoint.")] = "127.0.0.1"
    port: Annotated[
        int,
        _PORT,
        _doc(
            "Port of the /metrics endpoint; 0 picks a free one (state.json and `mpipeline "
            "status` show it). `mpipeline run --metrics-port` overrides it. Prometheus "
            "itself defaults to 9090 too: run it on another port, as the example "
            "prometheus.yml shipped with mpipeline does."
        ),
    ] = 9090


__all__ = ["GatewayConfig", "MetricsConfig", "RateLimitConfig", "SupervisorConfig"]
