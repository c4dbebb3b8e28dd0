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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from mpipeline.errors import MPipelineError, RequestFailed
from mpipeline.gateway import asgi, schemas
from mpipeline.gateway.admission import Admission, Refused
from mpipeline.gateway.exchange import Reply, Request, Response
from mpipeline.gateway.style import Handler, Headers, Upgrade
from mpipeline.pipeline import Pipeline

if TYPE_CHECKING:  # the SDK itself loads on the first request (``_manager``)
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from mpipeline.gateway.mcp_tools.tools import Admit

log = logging.getLogger(__name__)

PATH = "/mcp"
# JSON-RPC 2.0's codes (the SDK's ``mcp_types`` names them; not loaded until first use).
_INVALID_REQUEST = -32600
_INTERNAL_ERROR = -32603
_ENCODE = msgspec.json.Encoder().encode


class McpHttp:
    """The ``/mcp`` route (``style.ApiStyle``) and the SDK session manager behind it."""

    prefixes: tuple[str, ...] = ()
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(self, pipeline: Pipeline, *, admission: Admission, max_body: int) -> None:
        self._pipeline = pipeline
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
            _manager, self._pipeline, run_dir, self._admit, self._max_body
        )
        running: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(manager, running))
        await running
        handle: asgi.AsgiApp = manager.handle_request
        return handle

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


def _manager(
    pipeline: Pipeline, run_dir: Path, admit: Admit, max_body: int
) -> StreamableHTTPSessionManager:
    """The stateless session manager over the shared server (imports the SDK: in a thread)."""
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from mpipeline.gateway.mcp_tools.server import build

    # Stateless, every request's transport is torn down after it, which the SDK logs
    # at INFO ("Terminating session: None"): a line per request, which no other
    # route writes. Its warnings and errors still reach the replica's log.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)
    return StreamableHTTPSessionManager(
        build(pipeline, run_dir, admit=admit), stateless=True, max_request_body_size=max_body
    )
