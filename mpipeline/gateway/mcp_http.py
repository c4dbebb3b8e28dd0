"""MCP over streamable HTTP at ``POST /mcp``: the MCP SDK's transport inside the gateway.

The tools and resources are the stdio server's (``mcp_tools``: one
definition), run over this replica's own pipeline client, as ``/v1/prompt``
is: an ``infer`` here takes no API client slot. The route sits behind the
gateway's bearer token and body bound like every other (``Gateway.precheck``
and the server's ``max_body``; the SDK's own body limit is set to the same).

Choices, and why:

* **Stateless** (``StreamableHTTPSessionManager(stateless=True)``): gateway
  replicas share one listening socket and the kernel spreads connections
  among them, so the request after ``initialize`` may reach another replica,
  which would not know an ``Mcp-Session-Id``. Stateless, every POST is served
  whole by the replica that receives it, with a fresh transport; nothing is
  kept between requests. What is given up: server-to-client requests
  (sampling, elicitation) and resumable streams; notifications (``infer``'s
  progress) still travel on the POST's own SSE response.
* **SSE replies** (the SDK's default, ``json_response=False``): a client that
  accepts ``text/event-stream`` gets its progress notifications as the tool
  runs, then the result; a client that accepts only JSON is refused by the
  SDK (406), as a streamable HTTP server may.
* **POST only**: in stateless mode there is no session for ``GET`` to open a
  stream on or ``DELETE`` to end, so both get the gateway's 405 with
  ``Allow: POST`` (the spec's answer for a server with no GET stream); the
  SDK's client sends neither when the server gives it no session id.
* **Rate limits**: each prompt of ``infer`` and ``batch_infer`` is admitted
  as ``POST /v1/prompt`` is (the session's and the gateway's buckets), so MCP
  is no way around them; a refused prompt is a ``rate_limited`` tool error (a
  batch's entry), not an HTTP 429, because the POST carrying the call, and
  perhaps other calls' answers, was already accepted. ``dlq_replay`` is an
  operator's resubmission and is not limited, as ``mpipeline dlq replay`` is not.
* **Admin**: ``configure`` (live settings) is listed and may be called only
  by a request whose bearer token is the admin token (the variable that
  ``gateway.admin_token_env`` names; compared in constant time by
  ``auth.BearerAuth``). That token is also let through the gateway's own
  token check on ``/mcp`` (``admits``), so an admin needs to send only one.
  With no admin token configured (or its variable unset), ``configure`` is
  refused over HTTP, saying how to enable it; ``mpipeline mcp`` (stdio, run
  as the run dir's owner) may always call it.
* **Errors**: what the SDK decides (a bad JSON-RPC body, a wrong content type
  or ``Accept``) is its own reply; what the gateway decides before it (401,
  405, 413, 429) is a JSON-RPC error object in the same shape.
* **Loaded on first use**: the SDK costs about 0.6 s of imports, so the
  first ``/mcp`` request of each replica imports it in a worker thread (the
  loop keeps serving meanwhile) and starts the session manager's task group,
  which lives until the gateway closes; a replica that never sees ``/mcp``
  never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from mpipeline.auth import BearerAuth
from mpipeline.errors import MPipelineError, RequestFailed
from mpipeline.gateway import asgi, schemas
from mpipeline.gateway.admission import Admission, Refused
from mpipeline.gateway.exchange import Reply, Request, Response
from mpipeline.gateway.style import Handler, Headers, Upgrade
from mpipeline.pipeline import Pipeline

if TYPE_CHECKING:  # the SDK itself loads on the first request (``_manager``)
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from mpipeline.gateway.mcp_tools.configure import Authorize
    from mpipeline.gateway.mcp_tools.tools import Admit

log = logging.getLogger(__name__)

PATH = "/mcp"
# JSON-RPC 2.0's codes (the SDK's ``mcp_types`` names them; not loaded until first use).
_INVALID_REQUEST = -32600
_INTERNAL_ERROR = -32603
_ENCODE = msgspec.json.Encoder().encode
ADMIN_FIELD = "gateway.admin_token_env"
_HOW = (
    f"set {ADMIN_FIELD} to the NAME of an environment variable holding an admin token, "
    "restart the gateway replicas with it set, and send it as the bearer token; or use "
    "`mpipeline mcp` (stdio) as the run dir's owner"
)


class McpHttp:
    """The ``/mcp`` route (``style.ApiStyle``) and the SDK session manager behind it."""

    prefixes: tuple[str, ...] = ()
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        admission: Admission,
        max_body: int,
        admin_token_env: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._admin, self._no_admin = _admin(admin_token_env, environ)
        self._admission = admission
        self._max_body = max_body
        self._app: asgi.AsgiApp | None = None
        self._starting: asyncio.Task[asgi.AsgiApp] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self.routes: dict[str, dict[str, Handler]] = {PATH: {"POST": self._post}}

    async def _post(self, request: Request, response: Response) -> None:
        app = self._app or await self._ready()
        await asgi.serve(app, request, response)

    async def _ready(self) -> asgi.AsgiApp:
        """The SDK's ASGI app, started by the first request; the others wait for it.

        :raises MPipelineError: when the gateway is closing, or the SDK's task group
            could not start (any other failure is a bug: the server's 500)
        """
        if self._closed.is_set():
            raise MPipelineError("the gateway is shutting down")
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
        starting = self._starting
        try:
            # Shielded: a first client that hangs up must not cancel the start for the rest.
            self._app = await asyncio.shield(starting)
        except Exception:
            if self._starting is starting and starting.done():
                self._starting = None  # it failed: the next request tries again
            raise
        return self._app

    async def _start(self) -> asgi.AsgiApp:
        run_dir = self._pipeline.run_dir
        if run_dir is None:
            raise MPipelineError("the pipeline client is not started")
        manager = await asyncio.to_thread(
            _manager, self._pipeline, run_dir, self._admit, self._authorize, self._max_body
        )
        running: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(manager, running))
        await running
        handle: asgi.AsgiApp = manager.handle_request
        return handle

    def admits(self, authorization: str | None) -> bool:
        """True when ``authorization`` bears the admin token (none configured: False)."""
        return self._admin is not None and self._admin.allows(authorization)

    def _authorize(self, request: object | None) -> str | None:
        """``configure``'s check for one MCP request (the SDK's HTTP request)."""
        if self._admin is None:
            return self._no_admin
        headers = getattr(request, "headers", None)
        authorization = headers.get("authorization") if headers is not None else None
        if self.admits(authorization):
            return None
        return (
            f"configure needs admin: this request's bearer token is not the admin token "
            f"({ADMIN_FIELD}); send that one instead"
        )

    def _admit(self, session: str | None) -> str | None:
        """The rate limits for one prompt, as ``POST /v1/prompt`` applies them."""
        refused = self._admission.check(session)
        return None if refused is None else refused.message

    async def _run(
        self, manager: StreamableHTTPSessionManager, running: asyncio.Future[None]
    ) -> None:
        """Hold the manager's task group open (its stateless servers run in it) until close."""
        try:
            async with manager.run():
                if not running.done():  # done: the start was cancelled (the gateway closes)
                    running.set_result(None)
                await self._closed.wait()
        except Exception as exc:
            if not running.done():
                running.set_exception(MPipelineError(f"the MCP transport did not start: {exc}"))
                return
            log.exception("the MCP transport failed")

    async def close(self) -> None:
        """Stop the session manager (after the gateway drained its requests)."""
        self._closed.set()
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, MPipelineError):
                await self._starting
        if self._runner is not None:
            await self._runner

    # Error replies (style.ApiStyle): a JSON-RPC error object with no id, as the SDK writes.

    def error_reply(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: Headers = (),
    ) -> Reply:
        code = _INTERNAL_ERROR if status >= 500 else _INVALID_REQUEST
        error: dict[str, object] = {"code": code, "message": message}
        if field is not None or kind is not None:
            error["data"] = {k: v for k, v in (("field", field), ("type", kind)) if v is not None}
        body = _ENCODE({"jsonrpc": "2.0", "id": None, "error": error})
        return Reply(status, body, headers)

    def failure_reply(self, exc: RequestFailed) -> Reply:
        status = schemas.failure_status(exc)
        message = schemas.failure_message(exc)
        headers = schemas.failure_headers(status, exc.failed.retry_after_s)
        return self.error_reply(status, message, kind=str(exc.code), headers=headers)

    def rate_limited(self, refused: Refused) -> Reply:
        return self.error_reply(429, refused.message, headers=refused.headers)


def _admin(name: str | None, environ: Mapping[str, str] | None) -> tuple[BearerAuth | None, str]:
    """The admin token's check, or None and why there is none (never the token itself)."""
    if name is None:
        return None, f"configure is refused over HTTP: no admin token is configured ({_HOW})"
    token = (os.environ if environ is None else environ).get(name, "")
    if not token:
        why = f"{ADMIN_FIELD} names {name}, which is not set (or is empty) for the gateway"
        return None, f"configure is refused over HTTP: {why} ({_HOW})"
    return BearerAuth(token), ""


def _manager(
    pipeline: Pipeline, run_dir: Path, admit: Admit, authorize: Authorize, max_body: int
) -> StreamableHTTPSessionManager:
    """The stateless session manager over the shared server (imports the SDK: in a thread)."""
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from mpipeline.gateway.mcp_tools.server import build

    # Stateless, every request's transport is torn down after it, which the SDK logs
    # at INFO ("Terminating session: None"): a line per request, which no other
    # route writes. Its warnings and errors still reach the replica's log.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)
    return StreamableHTTPSessionManager(
        build(pipeline, run_dir, admit=admit, authorize=authorize),
        stateless=True,
        max_request_body_size=max_body,
    )
