"""The peer of ``mpipeline bench --http``: one uvicorn+Starlette process, same echo worker.

This is the design a reader would reach for first, so it is the yardstick
the gateway has to beat: a single process serving ``POST /v1/prompt`` (JSON,
or SSE with ``"stream": true``) by calling ``EchoWorker`` directly, with
uvicorn on uvloop and httptools, its fastest settings. It decodes and
encodes with the gateway's own msgspec shapes and reads the echo table of
the same config file, so the two answer the same bytes for the same work
and the difference is the architecture, not the workload. It does only what
the bench needs: no auth, no deadlines, no OpenAI route.

Run as ``python -m mpipeline.bench.peer --config FILE --port N``; SIGTERM
stops it. ``GET /readyz`` answers 200 once it listens.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mpipeline.config import EchoConfig, load
from mpipeline.gateway import schemas, sse
from mpipeline.gateway.schemas import ChunkOut, ErrorBody, ErrorDetail, Problem, PromptBody
from mpipeline.messages import Assembled, PromptRequest
from mpipeline.workers.base import Generation
from mpipeline.workers.echo import EchoWorker

JSON = "application/json"
_PROMPT = msgspec.json.Decoder(PromptBody)
_ENCODE = msgspec.json.Encoder().encode


def build_app(echo: EchoConfig, per_chunk: int = 1) -> Starlette:
    """The peer's routes over one ``EchoWorker`` built from ``echo``."""
    worker = EchoWorker(echo)
    ids = itertools.count()

    async def prompt(request: Request) -> Response:
        body = schemas.decode(_PROMPT, await request.body())
        if isinstance(body, Problem):
            error = ErrorBody(
                error=ErrorDetail(type="invalid_request", message=body.message, field=body.field)
            )
            return Response(_ENCODE(error), status_code=body.status, media_type=JSON)
        req = PromptRequest(
            request_id=f"peer-{next(ids)}",
            session_id=body.session_id or request.headers.get("x-session-id"),
            input=body.input,
            metadata=body.metadata,
            stream=body.stream,
            max_tokens=schemas.whole(body.max_tokens),
        )
        if body.stream:
            return StreamingResponse(
                _events(worker, req, per_chunk),
                media_type=sse.CONTENT_TYPE,
                headers=dict(sse.HEADERS),
            )
        gen = Generation()
        text = await worker.complete(_job(req), gen)
        return Response(
            _ENCODE(_result(req, text, gen)),
            media_type=JSON,
            headers={"x-request-id": req.request_id},
        )

    async def readyz(request: Request) -> Response:
        return Response(b'{"status":"ready"}', media_type=JSON)

    return Starlette(
        routes=[
            Route("/v1/prompt", prompt, methods=["POST"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/healthz", readyz, methods=["GET"]),
        ]
    )


async def _events(worker: EchoWorker, req: PromptRequest, per_chunk: int) -> AsyncIterator[bytes]:
    """``chunk`` events as the tokens come, then ``done``: the gateway's ``/v1/prompt`` stream."""
    gen = Generation()
    parts: list[str] = []
    pending: list[str] = []
    index = 0
    async for token in worker.generate(_job(req), gen):
        parts.append(token)
        pending.append(token)
        if len(pending) >= per_chunk:
            chunk = ChunkOut(request_id=req.request_id, index=index, text="".join(pending))
            yield sse.event(_ENCODE(chunk), "chunk")
            index += 1
            pending.clear()
    if pending:
        chunk = ChunkOut(request_id=req.request_id, index=index, text="".join(pending))
        yield sse.event(_ENCODE(chunk), "chunk")
    yield sse.event(_ENCODE(_result(req, "".join(parts), gen)), "done")


def _job(req: PromptRequest) -> Assembled:
    # The peer has no assemble stage: echo reads only the request's input.
    return Assembled(request=req, prompt=req.input, dedup_key="")


def _result(req: PromptRequest, text: str, gen: Generation) -> schemas.PromptResult:
    return schemas.PromptResult(
        request_id=req.request_id,
        session_id=req.session_id,
        text=text,
        finish_reason=gen.finish_reason,
        usage=schemas.UsageOut(
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            total_tokens=gen.prompt_tokens + gen.completion_tokens,
        ),
        timings={},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpipeline.bench.peer", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config/pipeline.toml"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    inference = load(args.config).stages.inference
    uvicorn.run(
        build_app(inference.echo, inference.chunk_tokens),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
