"""mpipeline's native REST style: ``POST /v1/prompt``, the probes and ``/v1/status``.

Its errors are ``{"error": {"type", "message", "field"?, "request_id"?}}``
(``schemas.error_reply``), with the pipeline's error code as the type of a
failed request. It also answers a plain ``GET /v1/stream`` (no ``Upgrade``)
with 426: the WebSocket style (``websocket.py``) owns the switch on that path,
and a client that forgot the upgrade should be told so in our shape.

``/healthz`` says the process answers; ``/readyz`` and ``/v1/status`` need
to know whether the gateway as a whole should get traffic, which they ask of
the ``Serving`` they were built with (the ``Gateway``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Protocol

import msgspec

from mpipeline import rundir
from mpipeline.errors import MPipelineError, RequestFailed
from mpipeline.gateway import deadlines, schemas, sse
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.exchange import Reply, Request, Response
from mpipeline.gateway.models import Models
from mpipeline.gateway.openapi import PATH as OPENAPI_PATH
from mpipeline.gateway.schemas import ChunkOut, ErrorBody, Problem, PromptBody
from mpipeline.gateway.style import Handler, Upgrade
from mpipeline.gateway.websocket import PATH as STREAM_PATH
from mpipeline.messages import Completed, TokenChunk
from mpipeline.metrics.snapshot import snapshot
from mpipeline.pipeline import Pipeline, RequestOptions

_PROMPT = msgspec.json.Decoder(PromptBody)
_ENCODE = msgspec.json.Encoder().encode
_HEALTHY = _ENCODE(schemas.Health())
_READY = _ENCODE(schemas.Readiness(status="ready"))


class Serving(Protocol):
    """What the probes and ``/v1/status`` report of the gateway that serves them."""

    @property
    def url(self) -> str: ...

    @property
    def connections(self) -> int: ...

    @property
    def openapi(self) -> bytes:
        """The gateway's OpenAPI document, encoded (``openapi.py``)."""

    def not_ready(self) -> str | None: ...

    @property
    def jobs(self) -> dict[str, int]:
        """Async requests held (``POST /v1/requests``) by state, and those refused or evicted."""


class NativeApi(schemas.NativeErrors):
    """The native routes over one pipeline client (``style.ApiStyle``)."""

    prefixes: tuple[str, ...] = ()
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(
        self,
        pipeline: Pipeline,
        serving: Serving,
        *,
        admission: Admission,
        keepalive_s: float,
        models: Models | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._serving = serving
        # Resolves the body's ``model``; None: the default model, whatever it names.
        self._models = models
        self._admission = admission
        self._keepalive_s = keepalive_s
        self.routes: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/v1/status": {"GET": self._status},
            OPENAPI_PATH: {"GET": self._openapi},
            "/v1/prompt": {"POST": self._prompt},
            STREAM_PATH: {"GET": self._stream_without_upgrade},
        }

    # Error replies

    def _problem(self, problem: Problem) -> Reply:
        return self.error_reply(
            problem.status, problem.message, field=problem.field, kind=problem.code
        )

    # Routes

    async def _healthz(self, request: Request, response: Response) -> None:
        response.send(200, _HEALTHY)

    async def _readyz(self, request: Request, response: Response) -> None:
        reason = self._serving.not_ready()
        if reason is None:
            response.send(200, _READY)
        else:
            response.send(503, _ENCODE(schemas.Readiness(status="not_ready", reason=reason)))

    async def _openapi(self, request: Request, response: Response) -> None:
        response.send(200, self._serving.openapi)

    async def _status(self, request: Request, response: Response) -> None:
        run_dir = self._pipeline.run_dir
        assert run_dir is not None
        serving = self._serving
        gateway = {
            "url": serving.url,
            "ready": serving.not_ready() is None,
            "not_ready": serving.not_ready(),
            "connections": serving.connections,
            "requests": dict(self._pipeline.stats),
            "jobs": serving.jobs,
        }
        try:
            with rundir.connect(run_dir) as run:
                pipeline = asdict(snapshot(run))
        except MPipelineError as exc:
            body = {"gateway": gateway, "pipeline": None, "error": str(exc)}
            response.send(503, _ENCODE(body))
            return
        response.send(200, _ENCODE({"gateway": gateway, "pipeline": pipeline}))

    def prepare(
        self, request: Request, *, no_stream: str | None = None
    ) -> tuple[PromptBody, RequestOptions] | Reply:
        """A ``POST /v1/prompt`` body decoded, checked and admitted, with how to run it;
        else the refusal to send. Shared with ``POST /v1/requests`` (``jobs_routes.py``)
        so the two routes accept, bound and refuse exactly alike; ``no_stream``, when
        given, refuses ``stream: true`` with that message (before a rate-limit token
        is spent on it)."""
        body = schemas.decode(_PROMPT, request.body)
        if isinstance(body, Problem):
            return self._problem(body)
        if no_stream is not None and body.stream:
            return self._problem(Problem(no_stream, "stream"))
        session = body.session_id or request.header("x-session-id")
        if session is not None and len(session) > schemas.MAX_SESSION_ID:
            limit = f"X-Session-Id is longer than {schemas.MAX_SESSION_ID} characters"
            return self._problem(Problem(limit))
        deadline_ms = deadlines.requested_ms(request, stream=body.stream)
        if isinstance(deadline_ms, Problem):
            return self._problem(deadline_ms)
        refused = self._admission.check(session)
        if refused is not None:
            return self.rate_limited(refused)
        key = None
        if self._models is not None:
            model = self._models.resolve(body.model or "")
            if isinstance(model, Problem):
                return self._problem(model)
            key = model.key
        return body, schemas.request_options(body, session, deadline_ms, key)

    async def _prompt(self, request: Request, response: Response) -> None:
        prepared = self.prepare(request)
        if isinstance(prepared, Reply):
            response.send_reply(prepared)
            return
        body, options = prepared
        if body.stream:
            events = sse.pipeline_events(self._pipeline, body.input, options)
            renderer = _PromptRenderer()
            cancel = self._pipeline.cancel
            await sse.respond(response, events, renderer, self._keepalive_s, cancel)
            return
        done = await self._pipeline.submit(body.input, options)
        result = schemas.prompt_result(done, time.monotonic_ns())
        response.send(200, _ENCODE(result), (("x-request-id", done.request_id),))

    async def _stream_without_upgrade(self, request: Request, response: Response) -> None:
        message = f"{request.path} is a WebSocket: send Upgrade: websocket"
        headers = (("upgrade", "websocket"),)
        response.send_reply(self.error_reply(426, message, headers=headers))


class _PromptRenderer:
    """``/v1/prompt`` streams: ``chunk`` events, then ``done`` with the whole result."""

    def opening(self) -> bytes:
        return b""

    def render(self, event: TokenChunk | Completed) -> bytes:
        if isinstance(event, TokenChunk):
            if not event.text:
                return b""  # structure with no text (a tool-call delta): not ours to show
            chunk = ChunkOut(request_id=event.request_id, index=event.index, text=event.text)
            return sse.event(_ENCODE(chunk), "chunk")
        return sse.event(_ENCODE(schemas.prompt_result(event, time.monotonic_ns())), "done")

    def failure(self, exc: RequestFailed) -> bytes:
        return sse.event(_ENCODE(ErrorBody(error=schemas.failure_detail(exc))), "error")
