"""What the MCP tools do: requests through the attached pipeline, and its status.

Each tool answers with a JSON object (the same shapes as the HTTP routes and
the CLI's ``--json``), or raises ``ToolFailedError`` with a message for the agent:
the server turns that into an ``isError`` result, never a traceback. The DLQ
tools are in ``dlq.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec

from mpipeline.errors import ErrorCode, MPipelineError, RequestFailed
from mpipeline.gateway import schemas
from mpipeline.gateway.mcp_tools.args import BatchArgs, InferArgs, parse
from mpipeline.messages import Completed, TokenChunk
from mpipeline.metrics.snapshot import snapshot
from mpipeline.pipeline import Pipeline, RequestOptions
from mpipeline.rundir import connect

# Reports progress for the request being served: (progress, total, message).
Progress = Callable[[float, float | None, str | None], Awaitable[None]]
# The gateway's rate limits for one request of a session: None to go on, else why not.
# Over HTTP (``/mcp``) every prompt is admitted as ``POST /v1/prompt`` is, so MCP is
# no way around the limits; over stdio the server is an API client, which has none.
Admit = Callable[[str | None], str | None]


class ToolFailedError(Exception):
    """A tool call that ended in an error the agent should read (``isError``)."""


def failure_text(exc: RequestFailed) -> str:
    """A pipeline failure in words: its code, where, why, and the request id."""
    detail = schemas.failure_detail(exc)
    where = f" in {exc.stage}" if exc.stage else ""
    rid = f" (request {detail.request_id})" if detail.request_id else ""
    return f"{detail.type}{where}: {detail.message}{rid}"


def _options(args: InferArgs | BatchArgs, prompt: str) -> tuple[str, RequestOptions]:
    """The native route's options for ``prompt``: checked by its own ``PromptBody``.

    :raises msgspec.ValidationError: when ``prompt`` is not one the route would take
    """
    fields: dict[str, Any] = {
        "input": prompt,
        "session_id": args.session_id,
        "model": args.model,
        "max_tokens": args.max_tokens,
        "deadline_ms": args.deadline_ms,
        "priority": args.priority,
        "metadata": args.metadata,
    }
    if isinstance(args, InferArgs):
        fields["history"] = msgspec.to_builtins(args.history)
    body = msgspec.convert(fields, schemas.PromptBody, strict=True)
    return body.input, schemas.request_options(body, body.session_id)


def _result(done: Completed, received_ns: int) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(schemas.prompt_result(done, received_ns))
    return out


async def infer(
    p: Pipeline, arguments: dict[str, Any] | None, progress: Progress, admit: Admit | None = None
) -> Any:
    """One request, streamed so that each chunk can be reported as progress.

    The result is ``POST /v1/prompt``'s: text, finish reason, usage, timings, citations.
    """
    args = parse(InferArgs, arguments)
    try:
        text, options = _options(args, args.prompt)
    except msgspec.ValidationError as exc:  # the route's own checks, beyond the schema's
        raise ToolFailedError(f"invalid arguments: {exc}") from None
    refused = admit(args.session_id) if admit is not None else None
    if refused is not None:
        raise ToolFailedError(f"{ErrorCode.RATE_LIMITED}: {refused}")
    received = time.monotonic_ns()
    total = float(args.max_tokens) if args.max_tokens is not None else None
    chunks = 0
    try:
        async for event in p.stream_events(text, options):
            if isinstance(event, TokenChunk):
                if event.text:
                    chunks += 1
                    await progress(float(chunks), total, event.text)
                continue
            return _result(event, received)
    except RequestFailed as exc:
        raise ToolFailedError(failure_text(exc)) from None
    raise ToolFailedError("the pipeline ended the stream without a result")  # pragma: no cover


async def batch_infer(
    p: Pipeline, arguments: dict[str, Any] | None, progress: Progress, admit: Admit | None = None
) -> Any:
    """Every prompt as its own request, at most ``concurrency`` in flight; results in order.

    A prompt that is refused (invalid, rate-limited) or fails is an error entry
    in its place; the others still run. Progress counts the prompts answered so far.
    """
    args = parse(BatchArgs, arguments)
    gate = asyncio.Semaphore(args.concurrency)
    total = len(args.prompts)
    answered = 0

    async def one(index: int, prompt: str) -> dict[str, Any]:
        nonlocal answered
        try:
            text, options = _options(args, prompt)
        except msgspec.ValidationError as exc:
            problem = schemas.validation_problem(str(exc))
            field = "prompt" if problem.field == "input" else problem.field
            message = f"invalid prompt: {problem.message}" if field == "prompt" else problem.message
            return _error(index, "invalid_request", message)
        async with gate:
            received = time.monotonic_ns()
            refused = admit(args.session_id) if admit is not None else None
            if refused is not None:
                entry = _error(index, str(ErrorCode.RATE_LIMITED), refused)
            else:
                try:
                    done = await p.submit(text, options)
                except RequestFailed as exc:
                    entry = _error(index, str(exc.code), failure_text(exc))
                else:
                    entry = {"index": index, "ok": True, **_result(done, received)}
        answered += 1
        await progress(float(answered), float(total), None)
        return entry

    results = await asyncio.gather(*(one(i, prompt) for i, prompt in enumerate(args.prompts)))
    failed = sum(not r["ok"] for r in results)
    return {"results": results, "completed": total - failed, "failed": failed}


def _error(index: int, kind: str, message: str) -> dict[str, Any]:
    return {"index": index, "ok": False, "error": {"type": kind, "message": message}}


def pipeline_status(run_dir: Path) -> Any:
    """The snapshot ``mpipeline status --json`` prints, read the same way."""
    try:
        with connect(run_dir) as run:
            return asdict(snapshot(run))
    except MPipelineError as exc:
        raise ToolFailedError(str(exc)) from None
