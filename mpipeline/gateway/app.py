"""The gateway: HTTP routes in front of a ``Pipeline`` client.

For now it runs in-process on the Python client's slot (``serve``); the
gateway stage will run the same ``Gateway`` on a gateway replica's slot. It
owns admission: routing, the bearer token, body size and shape, the rate
limits (``ratelimit.py``), all refused with a clear 4xx before anything
reaches a ring. Once a request is in the
pipeline, its one outcome comes back as a result or as a ``RequestFailed``,
which becomes an HTTP status here (``schemas.STATUS_FOR_CODE``).

Routes: ``POST /v1/prompt`` (JSON or SSE), ``GET /v1/stream`` (a WebSocket
of prompts, ``websocket.py``), ``POST /v1/chat/completions`` and
``GET /v1/models`` (``openai.py``), ``GET /healthz`` (the process answers),
``GET /readyz`` (every replica is ready and we are not draining) and
``GET /v1/status``. Only the two health routes skip the token.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Self

import msgspec

from mpipeline import rundir
from mpipeline.config import GatewayConfig, PipelineConfig
from mpipeline.errors import ErrorCode, MPipelineError, RequestFailed
from mpipeline.gateway import openai, schemas, sse, websocket
from mpipeline.gateway.auth import BearerAuth, open_bind_warning
from mpipeline.gateway.exchange import Reply, Request, Response, Switch
from mpipeline.gateway.metrics import GatewayMetrics
from mpipeline.gateway.ratelimit import RateLimiter, retry_after_s
from mpipeline.gateway.schemas import ChunkOut, ErrorBody, ErrorDetail, Problem, PromptBody
from mpipeline.gateway.server import HttpServer, bind
from mpipeline.messages import Completed, TokenChunk
from mpipeline.metrics.snapshot import snapshot
from mpipeline.pipeline import Pipeline

log = logging.getLogger(__name__)

DEFAULT_MODEL = "mpipeline-echo"
# Seconds between SSE comments while a stream waits for its first token.
SSE_KEEPALIVE_S = 15.0
# How long requests in progress get to finish when the gateway closes.
DRAIN_TIMEOUT_S = 10.0
# Liveness and readiness probes come from the orchestrator, which has no token.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_OPENAI_PATHS = ("/v1/chat/", "/v1/models")
_TYPE_FOR_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "invalid_request",
    426: "upgrade_required",
    431: "invalid_request",
}
_PROMPT = msgspec.json.Decoder(PromptBody)
_ENCODE = msgspec.json.Encoder().encode

Handler = Callable[[Request, Response], Awaitable[None]]


def model_name(cfg: PipelineConfig) -> str:
    """The one model ``GET /v1/models`` lists: named for the inference worker."""
    return f"mpipeline-{cfg.stages.inference.worker}"


class Gateway:
    """HTTP routes over ``pipeline``; ``start`` listens, ``close`` drains and stops.

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
    ) -> None:
        self._pipeline = pipeline
        # A gateway replica gets the supervisor's shared buckets; on its own a
        # gateway keeps private ones (closed with it), or none when limits are off.
        self._own_limiter = limiter is None and cfg.rate_limit.enabled
        self._limiter = RateLimiter.private(cfg.rate_limit) if self._own_limiter else limiter
        self._cfg = cfg
        self._auth = BearerAuth.from_env(cfg.auth_token_env, environ)
        self._keepalive_s = keepalive_s
        self._drain_timeout_s = drain_timeout_s
        self._server = HttpServer(self, max_body=cfg.max_body_bytes)
        self._draining = False
        chat = openai.ChatCompletions(
            pipeline, model, keepalive_s, admit=lambda s: self.admit("/v1/chat/completions", s)
        )
        self._routes: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/v1/status": {"GET": self._status},
            "/v1/prompt": {"POST": self._prompt},
            websocket.PATH: {"GET": self._stream_without_upgrade},
            "/v1/chat/completions": {"POST": chat.create},
            "/v1/models": {"GET": chat.models},
        }

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
        await self._server.start(sock)
        log.info("gateway listening on %s", self.url)

    async def close(self) -> None:
        """Fail readiness, stop accepting, let requests finish (bounded), close."""
        self._draining = True
        await self._server.stop(self._drain_timeout_s)
        if self._own_limiter and self._limiter is not None:
            self._limiter.close()
            self._limiter = None

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

    def not_ready(self) -> str | None:
        """Why the gateway should get no traffic, or None when it should."""
        if self._draining:
            return "the gateway is shutting down"
        return self._pipeline.not_ready()

    def admit(self, path: str, session: str | None) -> Reply | None:
        """None when the rate limits let a request in, else the 429 to send.

        Called once the body is decoded (the session is known) and before the
        request reaches the pipeline, so a refusal costs no ring space and is
        never dead-lettered.
        """
        limiter = self._limiter
        if limiter is None:
            return None
        wait = limiter.acquire(session)
        if not wait:
            return None
        seconds = retry_after_s(wait)
        which = "this session's" if limiter.refused_by == "session" else "the gateway's"
        message = f"{which} rate limit is exhausted; retry in {seconds} s"
        headers = (("retry-after", str(seconds)),)
        return self.error_reply(path, 429, message, kind=ErrorCode.RATE_LIMITED, headers=headers)

    # server.App

    def precheck(self, request: Request) -> Reply | None:
        methods = self._routes.get(request.path)
        if methods is None:
            return self.error_reply(request.path, 404, f"no route {request.path}")
        method = "GET" if request.method == "HEAD" else request.method
        if method not in methods:
            allow = ", ".join(methods)
            message = f"{request.method} is not allowed on {request.path}; use {allow}"
            return self.error_reply(request.path, 405, message, headers=(("allow", allow),))
        token = request.header("authorization")
        if request.path not in OPEN_PATHS and not self._auth.allows(token):
            message = "missing or wrong bearer token"
            headers = (("www-authenticate", "Bearer"),)
            return self.error_reply(request.path, 401, message, headers=headers)
        return None

    async def handle(self, request: Request, response: Response) -> None:
        methods = self._routes[request.path]
        handler = methods.get(request.method) or methods["GET"]
        try:
            await handler(request, response)
        except RequestFailed as exc:
            if not response.started:
                response.send_reply(self._failure_reply(request.path, exc))
        except MPipelineError as exc:
            # The client is closed or closing: the gateway is on its way down.
            if not response.started:
                reply = self.error_reply(
                    request.path,
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
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Reply:
        """Our error shape, or OpenAI's on its routes; ``kind`` overrides the type."""
        if path.startswith(_OPENAI_PATHS):
            return openai.error_reply(status, message, param=field, code=kind, headers=headers)
        if kind is None:
            kind = _TYPE_FOR_STATUS.get(status, "internal" if status >= 500 else "invalid_request")
        body = ErrorBody(error=ErrorDetail(type=kind, message=message, field=field))
        return Reply(status, _ENCODE(body), headers)

    def upgrade(self, request: Request) -> Reply | Switch | None:
        if request.path != websocket.PATH:
            return None  # answered as plain HTTP, then the connection closes
        opened = websocket.accept(
            request,
            self._pipeline,
            max_message=self._cfg.max_body_bytes,
            admit=lambda session: self.admit(request.path, session),
        )
        if isinstance(opened, websocket.Refusal):
            return self.error_reply(
                request.path, opened.status, opened.message, headers=opened.headers
            )
        return opened

    def _failure_reply(self, path: str, exc: RequestFailed) -> Reply:
        if path.startswith(_OPENAI_PATHS):
            return openai.failure_reply(exc)
        status = schemas.failure_status(exc)
        detail = ErrorDetail(
            type=str(exc.code),
            message=schemas.failure_message(exc),
            request_id=exc.request_id or None,
        )
        headers = schemas.failure_headers(status, exc.failed.retry_after_s)
        return Reply(status, _ENCODE(ErrorBody(error=detail)), headers)

    # Routes

    async def _healthz(self, request: Request, response: Response) -> None:
        response.send(200, b'{"status":"ok"}')

    async def _readyz(self, request: Request, response: Response) -> None:
        reason = self.not_ready()
        if reason is None:
            response.send(200, b'{"status":"ready"}')
        else:
            response.send(503, _ENCODE({"status": "not_ready", "reason": reason}))

    async def _status(self, request: Request, response: Response) -> None:
        run_dir = self._pipeline.run_dir
        assert run_dir is not None
        gateway = {
            "url": self.url,
            "ready": self.not_ready() is None,
            "not_ready": self.not_ready(),
            "connections": len(self._server.connections),
            "requests": dict(self._pipeline.stats),
        }
        try:
            with rundir.connect(run_dir) as run:
                pipeline = asdict(snapshot(run))
        except MPipelineError as exc:
            body = {"gateway": gateway, "pipeline": None, "error": str(exc)}
            response.send(503, _ENCODE(body))
            return
        response.send(200, _ENCODE({"gateway": gateway, "pipeline": pipeline}))

    async def _prompt(self, request: Request, response: Response) -> None:
        body = schemas.decode(_PROMPT, request.body)
        if isinstance(body, Problem):
            response.send_reply(self._problem(request.path, body))
            return
        session = body.session_id or request.header("x-session-id")
        if session is not None and len(session) > schemas.MAX_SESSION_ID:
            limit = f"X-Session-Id is longer than {schemas.MAX_SESSION_ID} characters"
            response.send_reply(self._problem(request.path, Problem(limit)))
            return
        refused = self.admit(request.path, session)
        if refused is not None:
            response.send_reply(refused)
            return
        options = schemas.request_options(body, session)
        if body.stream:
            events = sse.pipeline_events(self._pipeline, body.input, options)
            await sse.respond(response, events, _PromptRenderer(), self._keepalive_s)
            return
        done = await self._pipeline.submit(body.input, options)
        result = schemas.prompt_result(done, time.monotonic_ns())
        response.send(200, _ENCODE(result), (("x-request-id", done.request_id),))

    async def _stream_without_upgrade(self, request: Request, response: Response) -> None:
        message = f"{request.path} is a WebSocket: send Upgrade: websocket"
        headers = (("upgrade", "websocket"),)
        response.send_reply(self.error_reply(request.path, 426, message, headers=headers))

    def _problem(self, path: str, problem: Problem) -> Reply:
        return self.error_reply(path, problem.status, problem.message, field=problem.field)


class _PromptRenderer:
    """``/v1/prompt`` streams: ``chunk`` events, then ``done`` with the whole result."""

    def opening(self) -> bytes:
        return b""

    def render(self, event: TokenChunk | Completed) -> bytes:
        if isinstance(event, TokenChunk):
            chunk = ChunkOut(request_id=event.request_id, index=event.index, text=event.text)
            return sse.event(_ENCODE(chunk), "chunk")
        return sse.event(_ENCODE(schemas.prompt_result(event, time.monotonic_ns())), "done")

    def failure(self, exc: RequestFailed) -> bytes:
        detail = ErrorDetail(
            type=str(exc.code),
            message=schemas.failure_message(exc),
            request_id=exc.request_id or None,
        )
        return sse.event(_ENCODE(ErrorBody(error=detail)), "error")


async def serve(
    pipeline: Pipeline,
    cfg: GatewayConfig,
    *,
    stop: Awaitable[object] | None = None,
    sock: socket.socket | None = None,
    model: str = DEFAULT_MODEL,
    keepalive_s: float = SSE_KEEPALIVE_S,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
) -> None:
    """Serve HTTP for ``pipeline`` until ``stop`` completes (or this task is cancelled).

    :raises ConfigError: when the token variable is named but unset
    :raises MPipelineError: when the address is in use
    """
    gateway = Gateway(
        pipeline, cfg, model=model, keepalive_s=keepalive_s, drain_timeout_s=drain_timeout_s
    )
    await gateway.start(sock)
    try:
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop
    finally:
        await gateway.close()
