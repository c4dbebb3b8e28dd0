"""The MCP server: the tools and resources on the SDK's low-level ``Server``.

One server definition for both transports: ``mpipeline mcp`` serves it on
stdio (``mpipeline.mcp.server``) and every gateway replica at ``/mcp`` over
streamable HTTP (``gateway.mcp_http``), each over its own pipeline client.

The low-level server rather than ``MCPServer``'s decorators: the tools'
input schemas are msgspec's, written from the same structs that check the
arguments (``args.py``), so ``tools/list`` shows exactly what a call accepts.
Every tool error (bad arguments, a failed request, no pipeline) comes back as
an ``isError`` result with a message; only a bug would reach the SDK's own
error path, and it is logged there with its traceback.

``configure`` (live settings, ``configure.py``) is listed and called only
when the transport's ``authorize`` allows the request: over HTTP a request
without the admin token neither sees it in ``tools/list`` nor may call it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError

from mpipeline import __version__
from mpipeline.errors import MPipelineError
from mpipeline.gateway.mcp_tools import configure, dlq, tools
from mpipeline.gateway.mcp_tools.args import (
    MAX_BATCH,
    BadArgumentsError,
    BatchArgs,
    DlqListArgs,
    DlqReplayArgs,
    InferArgs,
    StatusArgs,
    input_schema,
    parse,
)
from mpipeline.gateway.mcp_tools.resources import RESOURCES, read
from mpipeline.pipeline import Pipeline

Call = Callable[[dict[str, Any] | None, tools.Progress], Awaitable[Any]]

_TOOLS = [
    types.Tool(
        name="infer",
        description="Run one prompt through the pipeline and return the model's text, "
        "finish_reason, usage, timings and rag citations (POST /v1/prompt's result). "
        "Sends a progress notification per streamed chunk when the call has a progressToken.",
        input_schema=input_schema(InferArgs),
    ),
    types.Tool(
        name="batch_infer",
        description=f"Run up to {MAX_BATCH} prompts with the same options, at most "
        "`concurrency` at once; results in the prompts' order, a failed prompt as an error "
        "entry in its place. Priority is low by default, below interactive traffic.",
        input_schema=input_schema(BatchArgs),
    ),
    types.Tool(
        name="pipeline_status",
        description="Replicas, ring edges and circuits of the running pipeline: the "
        "snapshot `mpipeline status --json` prints.",
        input_schema=input_schema(StatusArgs),
        annotations=types.ToolAnnotations(read_only_hint=True),
    ),
    types.Tool(
        name="dlq_list",
        description="Dead-letter queue records (failed requests with their payload and "
        "reason, and their replays), oldest first: `mpipeline dlq list --json`.",
        input_schema=input_schema(DlqListArgs),
        annotations=types.ToolAnnotations(read_only_hint=True),
    ),
    types.Tool(
        name="dlq_replay",
        description="Resubmit dead-letter records (named in `ids`, or `all` not yet "
        "replayed) and record each outcome: `mpipeline dlq replay`.",
        input_schema=input_schema(DlqReplayArgs),
        annotations=types.ToolAnnotations(destructive_hint=False, idempotent_hint=True),
    ),
]
_CONFIGURE = types.Tool(
    name=configure.NAME,
    description="Set live settings of the running pipeline (timeouts, rate limits, the "
    "supervisor's restart policy) and the log level, without a restart: "
    "`mpipeline reload --set FIELD=VALUE`. Returns the reload outcome (config version, "
    "fields applied); a refused change changes nothing and says why. Needs admin: over "
    "HTTP, the admin bearer token (gateway.admin_token_env).",
    input_schema=configure.schema(),
    annotations=types.ToolAnnotations(destructive_hint=False, idempotent_hint=True),
)


def build(
    p: Pipeline,
    run_dir: Path,
    *,
    authorize: configure.Authorize,
    admit: tools.Admit | None = None,
) -> Server[Any]:
    """The server for the pipeline client ``p`` of the run in ``run_dir``; ``authorize``
    says which requests may see and call ``configure``; ``admit``, when given,
    rate-limits each prompt of ``infer`` and ``batch_infer``."""

    def status(arguments: dict[str, Any] | None, _: tools.Progress) -> Awaitable[Any]:
        return _status(run_dir, arguments)

    calls: dict[str, Call] = {
        "infer": lambda a, progress: tools.infer(p, a, progress, admit),
        "batch_infer": lambda a, progress: tools.batch_infer(p, a, progress, admit),
        "pipeline_status": status,
        "dlq_list": lambda a, _: dlq.dlq_list(run_dir, a),
        "dlq_replay": lambda a, _: dlq.dlq_replay(p, run_dir, a),
        configure.NAME: lambda a, _: configure.configure(run_dir, a),
    }

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        admin = authorize(ctx.request) is None
        return types.ListToolsResult(tools=[*_TOOLS, _CONFIGURE] if admin else _TOOLS)

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        call = calls.get(params.name)
        if call is None:
            return _error(f"no tool {params.name!r}; the tools are {', '.join(calls)}")
        if params.name == configure.NAME:
            refused = authorize(ctx.request)
            if refused is not None:
                return _error(refused)
        try:
            result = await call(params.arguments, ctx.session.report_progress)
        except (BadArgumentsError, tools.ToolFailedError, MPipelineError) as exc:
            return _error(str(exc))  # MPipelineError: the client closed, a claim refused...
        except OSError as exc:  # the DLQ's files
            return _error(f"{exc.filename or 'I/O'}: {exc.strerror or exc}")
        text = json.dumps(result, indent=2)
        content: list[types.ContentBlock] = [types.TextContent(type="text", text=text)]
        return types.CallToolResult(content=content, structured_content=result)

    async def list_resources(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=RESOURCES)

    async def read_resource(
        ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        try:
            contents = await read(run_dir, str(params.uri))
        except LookupError as exc:
            raise MCPError(types.INVALID_PARAMS, str(exc)) from None
        return types.ReadResourceResult(contents=[contents])

    return Server(
        "mpipeline",
        version=__version__,
        instructions="Send prompts through a running mpipeline and look after it: "
        "status, dead-letter queue, effective config and metrics.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )


async def _status(run_dir: Path, arguments: dict[str, Any] | None) -> Any:
    parse(StatusArgs, arguments)
    return tools.pipeline_status(run_dir)


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=message)], is_error=True
    )
