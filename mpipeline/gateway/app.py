"""The gateway: the API styles over a ``Pipeline`` client, behind one HTTP server.

For now it runs in-process on the Python client's slot (``serve``); the
gateway stage runs the same ``Gateway`` on a gateway replica's slot. It owns
admission: routing, the bearer token, body size and shape, the rate limits
(``admission.py``), all refused with a clear 4xx before anything reaches a
ring. Once a request is in the pipeline, its one outcome comes back as a
result or as a ``RequestFailed``, which becomes an HTTP status here
(``schemas.STATUS_FOR_CODE``).

The routes belong to four API styles (``style.py``): native REST
(``native.py``: ``POST /v1/prompt``, ``GET /healthz``, ``GET /readyz``,
``GET /v1/status``), OpenAI (``openai.py``: ``POST /v1/chat/completions``,
``GET /v1/models``; ``openai_endpoints.py``: ``POST /v1/completions`` and
``POST /v1/embeddings``, passed through), Anthropic's Messages (``anthropic_ingress.py``:
``POST /v1/messages``), async requests (``jobs_routes.py``: ``POST /v1/requests``,
``GET``/``DELETE /v1/requests/{id}``), OpenAI's Batch API (``batch_routes.py``:
``/v1/files``, ``/v1/batches``) and the WebSocket of prompts (``websocket.py``:
``GET /v1/stream``) and MCP over streamable HTTP (``mcp_http.py``: ``POST /mcp``).
This module builds them, hands each the admission, and
serves them through a ``Router`` that also says whose error shape answers a
path. Only the two health routes skip the token.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Mapping
from typing import Self

from mpipeline.auth import BearerAuth, open_bind_warning
from mpipeline.config import Catalog, GatewayConfig, InferenceConfig, PipelineConfig
from mpipeline.errors import ErrorCode, MPipelineError, RequestFailed
from mpipeline.gateway import mcp_http, openapi, schemas
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.anthropic_ingress import AnthropicMessages
from mpipeline.gateway.batch_routes import Batches
from mpipeline.gateway.exchange import Reply, Request, Response, Switch
from mpipeline.gateway.fds import connection_budget
from mpipeline.gateway.jobs import JobTable
from mpipeline.gateway.jobs_routes import AsyncRequests, RequestJobs
from mpipeline.gateway.mcp_http import McpHttp
from mpipeline.gateway.metrics import GatewayMetrics
from mpipeline.gateway.models import Models
from mpipeline.gateway.native import NativeApi
from mpipeline.gateway.openai import Backend, ChatCompletions
from mpipeline.gateway.openai_endpoints import OpenAIEndpoints
from mpipeline.gateway.ratelimit import RateLimiter
from mpipeline.gateway.router import Router
from mpipeline.gateway.server import HttpServer, bind
from mpipeline.gateway.style import Headers
from mpipeline.gateway.websocket import KeepAlive, WebSocketApi
from mpipeline.pipeline import Pipeline

log = logging.getLogger(__name__)

DEFAULT_MODEL = "mpipeline-echo"
# Seconds between SSE comments while a stream waits for its first token.
SSE_KEEPALIVE_S = 15.0
# How long requests in progress get to finish when the gateway closes.
DRAIN_TIMEOUT_S = 10.0
# Liveness and readiness probes come from the orchestrator, which has no token.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def model_name(cfg: PipelineConfig) -> str:
    """The default model's name: the first of ``[[models]]``, else ``mpipeline-<worker>``."""
    return Catalog.of(cfg).default.name


class Gateway:
    """HTTP routes over ``pipeline``; ``start`` listens, ``close`` drains and stops.

    ``inference`` is the pipeline's inference table: what its worker honours
    decides which chat fields are passed, refused or dropped (the defaults'
    echo worker when None). ``catalog``, when given, is the run's models
    (``[[models]]``) and replaces ``model`` and ``inference``. The gateway gives
    ``pipeline`` its default deadlines (``cfg.timeout_s``, ``cfg.stream_timeout_s``).

    :raises ConfigError: (from the constructor) when ``cfg.auth_token_env``
        names a variable that is unset or empty
    """

    def __init__(
        self,
        pipeline: Pipeline,
        cfg: GatewayConfig,
        *,
        model: str = DEFAULT_MODEL,
        keepalive_s: float = SSE_KEEPALIVE_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        environ: Mapping[str, str] | None = None,
        limiter: RateLimiter | None = None,
        inference: InferenceConfig | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._cfg = cfg
        self._auth = BearerAuth.from_env(cfg.auth_token_env, environ)
        self._drain_timeout_s = drain_timeout_s
        self._server = HttpServer(
            self,
            max_body=cfg.max_body_bytes,
            stall_timeout_s=cfg.stall_timeout_s,
            max_connections=cfg.max_connections,
        )
        # The same stall limit for streams the client library holds for a reader,
        # and the deadlines of requests that name none.
        pipeline.stall_timeout_s = cfg.stall_timeout_s
        pipeline.timeout_s = cfg.timeout_s
        pipeline.stream_timeout_s = cfg.stream_timeout_s
        self._draining = False
        # A gateway replica gets the supervisor's shared buckets; on its own a
        # gateway keeps private ones (closed with it), or none when limits are off.
        self._admission = Admission.for_gateway(cfg.rate_limit, limiter)
        admission = self._admission
        backend = Backend.of(inference or InferenceConfig())
        if catalog is not None:
            models = Models(catalog)
        else:
            models = Models.single(model, backend, inference)
        native = NativeApi(
            pipeline, self, admission=admission, keepalive_s=keepalive_s, models=models
        )
        chat = ChatCompletions(pipeline, model, keepalive_s, admission=admission, models=models)
        messages = AnthropicMessages(pipeline, keepalive_s, admission=admission, models=models)
        endpoints = OpenAIEndpoints(pipeline, keepalive_s, admission=admission, models=models)
        keepalive = KeepAlive(cfg.ws_ping_interval_s, cfg.ws_idle_timeout_s)
        stream = WebSocketApi(
            pipeline,
            max_message=cfg.max_body_bytes,
            admission=admission,
            keepalive=keepalive,
            models=models,
        )
        table: RequestJobs = JobTable(ttl_s=cfg.jobs_ttl_s, max_jobs=cfg.jobs_max)
        self._jobs = AsyncRequests(pipeline, native, table)
        self._batches = Batches(pipeline, cfg, model=model, models=models, keepalive_s=keepalive_s)
        # MCP over streamable HTTP (``POST /mcp``), over this gateway's own client.
        self._mcp = McpHttp(
            pipeline,
            admission=admission,
            max_body=cfg.max_body_bytes,
            admin_token_env=cfg.admin_token_env,
            environ=environ,
        )
        styles = (native, self._jobs, chat, endpoints, messages, stream, self._batches, self._mcp)
        self._router = Router(styles, default=native)
        self._openapi = openapi.document(model=model, auth=self._auth.enabled)

    def use_metrics(self, metrics: GatewayMetrics) -> None:
        """Count every answer (route, status, duration) in the replica's metrics region."""
        self._server.answered = metrics.answered

    # Lifecycle

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock``, or bind ``cfg.host:cfg.port``.

        :raises MPipelineError: when the address is in use, or the pipeline's
            run directory has no state to read readiness from
        """
        warning = open_bind_warning(self._cfg.host, self._auth)
        if warning:
            log.warning("%s", warning)
        if self._pipeline.run_dir is None:
            raise MPipelineError("the pipeline client is not started")
        if sock is None:
            sock = bind(self._cfg.host, self._cfg.port)
        self._server.max_connections = connection_budget(self._cfg.max_connections)
        await self._server.start(sock)
        self._batches.start(self._pipeline.run_dir)
        log.info("gateway listening on %s", self.url)

    async def close(self) -> None:
        """Fail readiness, stop accepting, let requests finish (bounded), close."""
        self._draining = True
        await self._server.stop(self._drain_timeout_s)
        await self._jobs.close()
        await self._batches.close()
        await self._mcp.close()
        self._admission.close()

    def reconfigure(self, cfg: GatewayConfig) -> None:
        """Take a reloaded table's live fields (``config.diff.LIVE``): the default
        deadlines and the stall limit, for requests that arrive from now on. The
        rate limits live in the shared limiter, which the replica refreshes."""
        self._cfg = cfg
        pipeline = self._pipeline
        pipeline.stall_timeout_s = cfg.stall_timeout_s
        pipeline.timeout_s = cfg.timeout_s
        pipeline.stream_timeout_s = cfg.stream_timeout_s
        self._server.stall_timeout_s = cfg.stall_timeout_s

    def stop_accepting(self) -> None:
        """Fail readiness and close the listening socket; connections carry on."""
        self._draining = True
        self._server.stop_accepting()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def openapi(self) -> bytes:
        """``GET /openapi.json``: generated from the routes' msgspec types."""
        return self._openapi

    @property
    def connections(self) -> int:
        """Client connections open now, WebSocket ones included."""
        return len(self._server.connections)

    @property
    def jobs(self) -> dict[str, int]:
        """Async requests held now by state; refused: POSTs turned away (table full);
        evicted: finished ones forgotten before their TTL to make room."""
        table = self._jobs.table
        return {**table.counts(), "refused": table.refused, "evicted": table.evicted}

    def not_ready(self) -> str | None:
        """Why the gateway should get no traffic, or None when it should."""
        if self._draining:
            return "the gateway is shutting down"
        return self._pipeline.not_ready()

    # server.App

    def precheck(self, request: Request) -> Reply | None:
        path = request.path
        # The token first: without it, a 404 or 405 would map the routes for anyone.
        if path not in OPEN_PATHS and not self._authorized(request):
            message = "missing or wrong bearer token"
            headers = (("www-authenticate", "Bearer"),)
            return self.error_reply(path, 401, message, headers=headers)
        route = self._router.route(path)
        if route is None:
            return self.error_reply(path, 404, f"no route {path}")
        method = "GET" if request.method == "HEAD" else request.method
        if method not in route.methods:
            allow = ", ".join(route.methods)
            message = f"{request.method} is not allowed on {path}; use {allow}"
            return route.style.error_reply(405, message, headers=(("allow", allow),))
        return None

    async def handle(self, request: Request, response: Response) -> None:
        route = self._router.route(request.path)
        assert route is not None  # precheck refused every other path
        handler = route.methods.get(request.method) or route.methods["GET"]
        try:
            await handler(request, response)
        except RequestFailed as exc:
            if not response.started:
                response.send_reply(route.style.failure_reply(exc))
        except MPipelineError as exc:
            # The client is closed or closing: the gateway is on its way down.
            if not response.started:
                reply = route.style.error_reply(
                    503,
                    str(exc),
                    kind=ErrorCode.SHUTTING_DOWN,
                    headers=schemas.failure_headers(503),
                )
                response.send_reply(reply)

    def error_reply(
        self,
        path: str,
        status: int,
        message: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: Headers = (),
    ) -> Reply:
        """The error shape of the style that owns ``path``; ``kind`` overrides the type."""
        style = self._router.style_for(path)
        return style.error_reply(status, message, field=field, kind=kind, headers=headers)

    def _authorized(self, request: Request) -> bool:
        """The token as ``Authorization: Bearer``, or bare as ``x-api-key`` (Anthropic's SDK);
        on ``/mcp`` the admin token too (``McpHttp.admits``)."""
        auth = self._auth
        key = request.header("x-api-key")
        authorization = request.header("authorization")
        return (
            auth.allows(authorization)
            or (key is not None and auth.allows_key(key))
            or (request.path == mcp_http.PATH and self._mcp.admits(authorization))
        )

    def upgrade(self, request: Request) -> Reply | Switch | None:
        upgrade = self._router.upgrade(request.path)
        if upgrade is None:
            return None  # answered as plain HTTP, then the connection closes
        return upgrade(request)


async def serve(
    pipeline: Pipeline,
    cfg: GatewayConfig,
    *,
    stop: Awaitable[object] | None = None,
    sock: socket.socket | None = None,
    model: str = DEFAULT_MODEL,
    keepalive_s: float = SSE_KEEPALIVE_S,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    inference: InferenceConfig | None = None,
) -> None:
    """Serve HTTP for ``pipeline`` until ``stop`` completes (or this task is cancelled).

    :raises ConfigError: when the token variable is named but unset
    :raises MPipelineError: when the address is in use
    """
    gateway = Gateway(
        pipeline,
        cfg,
        model=model,
        keepalive_s=keepalive_s,
        drain_timeout_s=drain_timeout_s,
        inference=inference,
    )
    await gateway.start(sock)
    try:
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop
    finally:
        await gateway.close()
