"""Anthropic's Messages API as a way in: ``POST /v1/messages`` over the same pipeline.

So a client written against the official ``anthropic`` SDK (or a tool built
on it) works against mpipeline, whatever worker the pipeline runs: the
request is translated into the pipeline's own (``anthropic_request``), goes
through rag, assemble, an inference shard and post like any other, with the
same deadlines, resilience and one outcome, and its result is rendered in
Anthropic's shape, streamed as Anthropic's events (``anthropic_reply``).

Authentication: the SDK sends its key as ``x-api-key``, which the gateway
takes as the bearer token (``auth.BearerAuth.allows_key``), and an
``anthropic-version`` header, which is ignored: the route speaks one
version of the shape. A deadline is ``X-Request-Timeout`` or the SDK's own
timeout header, as on the OpenAI route (``deadlines``).

``AnthropicMessages`` is a style of its own (``style.ApiStyle``): every
refusal on ``/v1/messages`` and the paths under it (``count_tokens``, the
batches) is in Anthropic's error shape, which the SDK parses to pick its
exception class.
"""

from __future__ import annotations

from collections.abc import Mapping

from mpipeline.errors import RequestFailed
from mpipeline.gateway import anthropic_reply, anthropic_request, deadlines, sse
from mpipeline.gateway.admission import Admission, Refused
from mpipeline.gateway.exchange import Reply, Request, Response
from mpipeline.gateway.models import Models
from mpipeline.gateway.schemas import Problem
from mpipeline.gateway.style import Handler, Headers, Upgrade
from mpipeline.pipeline import Pipeline, RequestOptions

__all__ = ["PATH", "AnthropicMessages"]

PATH = "/v1/messages"


class AnthropicMessages:
    """``POST /v1/messages`` over one pipeline client, and Anthropic's error replies."""

    prefixes: tuple[str, ...] = (PATH,)
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
        # The run's models: ``model`` resolves to one (404 for none), whose worker
        # decides which fields are honoured.
        self._models = models
        self.routes: dict[str, dict[str, Handler]] = {PATH: {"POST": self.create}}

    # Error replies

    def error_reply(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        kind: str | None = None,
        headers: Headers = (),
    ) -> Reply:
        # ``kind`` is the pipeline's code; Anthropic's type follows from the status.
        if kind is not None:
            message = f"{kind}: {message}"
        return anthropic_reply.error_reply(status, message, field=field, headers=headers)

    def failure_reply(self, exc: RequestFailed) -> Reply:
        return anthropic_reply.failure_reply(exc)

    def rate_limited(self, refused: Refused) -> Reply:
        return anthropic_reply.error_reply(429, refused.message, headers=refused.headers)

    # The route

    async def create(self, request: Request, response: Response) -> None:
        messages = anthropic_request.read(request.body, self._models)
        if isinstance(messages, Problem):
            response.send_reply(anthropic_reply.problem_reply(messages))
            return
        deadline_ms = deadlines.requested_ms(request, stream=messages.stream)
        if isinstance(deadline_ms, Problem):
            response.send_reply(anthropic_reply.problem_reply(deadline_ms))
            return
        session = request.header("x-session-id") or messages.user
        refused = self._admission.check(session)
        if refused is not None:
            response.send_reply(self.rate_limited(refused))
            return
        options = RequestOptions(
            session_id=session,
            deadline_ms=deadline_ms,
            max_tokens=messages.max_tokens,
            history=messages.history or None,
            params=messages.params or None,
            input_raw=messages.input_raw or None,
            model=messages.model_key or None,
        )
        if not messages.stream:
            done = await self._pipeline.submit(messages.text, options)
            response.send(200, anthropic_reply.message(done, messages.model))
            return
        events = sse.pipeline_events(self._pipeline, messages.text, options)
        renderer = anthropic_reply.EventRenderer(messages.model)
        await sse.respond(response, events, renderer, self._keepalive_s, self._pipeline.cancel)
