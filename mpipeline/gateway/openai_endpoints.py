"""OpenAI's legacy text completions and embeddings: ``POST /v1/completions``, ``/v1/embeddings``.

Passed through to a backend that has them, an OpenAI-compatible upstream
(``worker = "openai"``, or a pool of openai members): the body goes upstream
as the client sent it, at the same path under the upstream's ``base_url``,
and the reply comes back as the upstream sent it, a completion's stream
chunk by chunk. It flows through the pipeline like a chat request (an
inference shard makes the call, with its deadline, retries, circuit and
one outcome, dead-lettered if it fails) as a ``PromptRequest`` whose
``endpoint`` names the path and whose ``params`` is the body; rag and
assemble leave it alone.

The body's ``model`` picks the model (``[[models]]``; 404 ``model_not_found``
for a name there is none of), and that model's worker decides: its upstream
gets the body with ``model`` set to the model's ``upstream_model``. A backend
without the endpoint (echo, anthropic, llama_cpp) answers 404 in OpenAI's
shape, ``code: unsupported_endpoint``, saying so, as OpenAI answers a model
that lacks an endpoint; a body that is not a JSON object
with a ``model`` is a 400 first. Errors are OpenAI's shape throughout: the
SDK picks its exception class from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from mpipeline.config import InferenceConfig
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import deadlines, schemas, sse
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.exchange import Request, Response
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai_reply import OpenAIErrors, error_reply, failure_reply, problem_reply
from mpipeline.gateway.schemas import Problem
from mpipeline.gateway.style import Handler, Upgrade
from mpipeline.messages import Completed, StructuredChunk, TokenChunk
from mpipeline.pipeline import Pipeline, RequestOptions

__all__ = ["CompletionBody", "EmbeddingBody", "OpenAIEndpoints", "passes_through"]

COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
UNSUPPORTED = "unsupported_endpoint"


class CompletionBody(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /v1/completions``: checked for what the gateway reads, the rest the
    upstream's to judge (every field reaches it as it came)."""

    model: schemas.Name
    # A string, a list of strings, or of token ids: the upstream judges which.
    prompt: Any = None
    stream: bool = False
    max_tokens: schemas.MaxTokens | None = None
    user: schemas.SessionId | None = None


class EmbeddingBody(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /v1/embeddings``: the same, without a stream."""

    model: schemas.Name
    input: str | Annotated[list[Any], Meta(min_length=1)]
    user: schemas.SessionId | None = None


_BODIES: dict[str, msgspec.json.Decoder[Any]] = {
    COMPLETIONS: msgspec.json.Decoder(CompletionBody),
    EMBEDDINGS: msgspec.json.Decoder(EmbeddingBody),
}


def passes_through(cfg: InferenceConfig) -> bool:
    """Whether the configured worker is an OpenAI-compatible upstream (every member, for a pool)."""
    if cfg.worker == "pool":
        return all(m.kind == "openai" for m in cfg.pool.upstreams)
    return cfg.worker == "openai"


class _Passed:
    """A completion's stream as the upstream sent it (``sse.Renderer``)."""

    def opening(self) -> bytes:
        return b""

    def render(self, event: TokenChunk | Completed) -> bytes:
        if isinstance(event, StructuredChunk):
            return sse.event(event.raw)
        if isinstance(event, TokenChunk):
            return b""  # a chunk without its JSON: none comes from a passed-through call
        return (sse.event(event.raw) if event.raw else b"") + sse.DONE

    def failure(self, exc: RequestFailed) -> bytes:
        return sse.event(failure_reply(exc).body)


class OpenAIEndpoints(OpenAIErrors):
    """The two routes over one pipeline client, in OpenAI's error shape."""

    prefixes: tuple[str, ...] = (COMPLETIONS, EMBEDDINGS)
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(
        self,
        pipeline: Pipeline,
        keepalive_s: float,
        *,
        admission: Admission,
        models: Models,
    ) -> None:
        self._pipeline = pipeline
        self._keepalive_s = keepalive_s
        self._admission = admission
        self._models = models
        self.routes: dict[str, dict[str, Handler]] = {
            COMPLETIONS: {"POST": self.completions},
            EMBEDDINGS: {"POST": self.embeddings},
        }

    async def completions(self, request: Request, response: Response) -> None:
        await self._pass(COMPLETIONS, request, response)

    async def embeddings(self, request: Request, response: Response) -> None:
        await self._pass(EMBEDDINGS, request, response)

    async def _pass(self, path: str, request: Request, response: Response) -> None:
        body = schemas.decode(_BODIES[path], request.body)
        if isinstance(body, Problem):
            response.send_reply(problem_reply(body))
            return
        model = self._models.resolve(body.model)
        if isinstance(model, Problem):
            response.send_reply(problem_reply(model))
            return
        worker = model.inference.worker
        if not passes_through(model.inference):
            message = (
                f"the backend (worker {worker}) has no {path}; it is passed through "
                "only to an OpenAI-compatible upstream (worker openai, or a pool of them)"
            )
            response.send_reply(error_reply(404, message, code=UNSUPPORTED))
            return
        stream = isinstance(body, CompletionBody) and body.stream
        deadline_ms = deadlines.requested_ms(request, stream=stream)
        if isinstance(deadline_ms, Problem):
            response.send_reply(problem_reply(deadline_ms))
            return
        session = request.header("x-session-id") or body.user
        refused = self._admission.check(session)
        if refused is not None:
            response.send_reply(self.rate_limited(refused))
            return
        options = RequestOptions(
            session_id=session,
            deadline_ms=deadline_ms,
            params=request.body.strip(),
            endpoint=path.removeprefix("/v1"),
            model=model.key or None,
        )
        if not stream:
            done = await self._pipeline.submit("", options)
            if not done.raw:  # never from a passed-through call: said, not sent empty
                message = (
                    f"the upstream's reply to {path} was not kept; request_id {done.request_id}"
                )
                response.send_reply(error_reply(502, message, code=ErrorCode.UPSTREAM_ERROR))
                return
            response.send(200, done.raw)
            return
        events = sse.pipeline_events(self._pipeline, "", options)
        await sse.respond(response, events, _Passed(), self._keepalive_s, self._pipeline.cancel)
