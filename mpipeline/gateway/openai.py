"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Enough of the Chat Completions API for the official SDKs and the usual tools,
and everything of it an OpenAI-compatible upstream takes: the request's
fields reach it as they came, unknown ones included, and its reply comes
back as it sent it, tool calls streamed as deltas, refusal, logprobs,
``system_fingerprint`` and all (``openai_request``, ``openai_reply``). A
field the configured worker cannot honour is refused with 400 naming it, or
dropped with ``drop_params`` (``openai_fields``); none is accepted and then
ignored.

The last message (from the user, or a tool result) becomes the request's
input and the ones before it its history; the assemble stage adds the system
prompt and context and each worker sends the turns on in its own API's
shape. ``user`` (or an ``X-Session-Id`` header, which wins) becomes the
session, so a conversation keeps to one inference shard. A request's
deadline is its ``X-Request-Timeout`` header, or the openai SDK's own
timeout for a call that is not a stream, or the gateway's default
(``deadlines``). Stop sequences go to the model, which stops generating.

``ChatCompletions`` is the gateway's OpenAI style (``style.ApiStyle``): every
refusal on its routes, and any unknown path under ``/v1/chat/`` or
``/v1/models``, is in OpenAI's error shape, since that is what the SDKs parse
to pick their exception class.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from mpipeline.gateway import deadlines, openai_request, sse
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.exchange import Request, Response
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai_fields import Backend
from mpipeline.gateway.openai_reply import (
    ChunkRenderer,
    OpenAIErrors,
    completion,
    error_reply,
    failure_reply,
    problem_reply,
)
from mpipeline.gateway.openai_request import Chat, ChatBody, ChatMessage, ContentPart
from mpipeline.gateway.schemas import Problem
from mpipeline.gateway.style import Handler, Upgrade
from mpipeline.pipeline import Pipeline, RequestOptions

__all__ = [
    "Backend",
    "ChatBody",
    "ChatCompletions",
    "ChatMessage",
    "ContentPart",
    "error_reply",
    "failure_reply",
    "problem_reply",
]

# A backend of the defaults: the echo worker, which honours little (``fields.ECHO``).
_DEFAULT_BACKEND = Backend.for_worker("echo")
MODELS_PATH = "/v1/models"


class ChatCompletions(OpenAIErrors):
    """The two OpenAI routes over one pipeline client, and OpenAI's error replies."""

    prefixes: tuple[str, ...] = ("/v1/chat/", "/v1/models")
    upgrades: Mapping[str, Upgrade] = {}

    def __init__(
        self,
        pipeline: Pipeline,
        model: str,
        keepalive_s: float,
        *,
        admission: Admission,
        backend: Backend = _DEFAULT_BACKEND,
        models: Models | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._keepalive_s = keepalive_s
        self._admission = admission
        # The run's models (``[[models]]``); else ``model``, checked by ``backend``.
        self._models = models or Models.single(model, backend)
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self.create},
            MODELS_PATH: {"GET": self.models},
            # Every name, so an unknown one is model_not_found (router.py: a subtree).
            f"{MODELS_PATH}/": {"GET": self.model},
        }

    # Routes (the error replies are OpenAIErrors')

    async def models(self, request: Request, response: Response) -> None:
        response.send(200, self._models.listing)

    async def model(self, request: Request, response: Response) -> None:
        """``GET /v1/models/{name}``: a name ``GET /v1/models`` lists, else 404
        ``model_not_found``, which the SDKs raise as ``NotFoundError``."""
        name = request.path.removeprefix(f"{MODELS_PATH}/")
        entry = self._models.entries.get(name)
        if entry is None:
            response.send_reply(problem_reply(self._models.not_found(name)))
            return
        response.send(200, entry)

    def read(self, body: bytes) -> Chat | Problem:
        """The request in ``body``, checked against the schema, its model (404 when
        there is none of that name) and what the model's worker honours."""
        chat = openai_request.plain(body)
        if chat is not None:
            model = self._models.resolve(chat.model)
            if isinstance(model, Problem):
                return model
            return dataclasses.replace(chat, model_key=model.key) if model.key else chat
        parsed = openai_request.parse(body)
        if isinstance(parsed, Problem):
            return parsed
        model = self._models.resolve(parsed.body.model)
        if isinstance(model, Problem):
            return model
        refused = self._models.backend(model).admit(parsed)
        if refused is not None:
            return refused
        checked = openai_request.chat(parsed)
        if isinstance(checked, Problem):
            return checked
        return dataclasses.replace(checked, model_key=model.key)

    async def create(self, request: Request, response: Response) -> None:
        chat = self.read(request.body)
        if isinstance(chat, Problem):
            response.send_reply(problem_reply(chat))
            return
        deadline_ms = deadlines.requested_ms(request, stream=chat.stream)
        if isinstance(deadline_ms, Problem):
            response.send_reply(problem_reply(deadline_ms))
            return
        session = request.header("x-session-id") or chat.user
        refused = self._admission.check(session)
        if refused is not None:
            response.send_reply(self.rate_limited(refused))
            return
        created = int(time.time())
        options = RequestOptions(
            session_id=session,
            metadata=chat.metadata,
            deadline_ms=deadline_ms,
            max_tokens=chat.max_tokens,
            history=chat.history,
            params=chat.params or None,
            input_raw=chat.input_raw or None,
            model=chat.model_key or None,
        )
        if not chat.stream:
            done = await self._pipeline.submit(chat.text, options)
            response.send(200, completion(done, created, chat.model))
            return
        events = sse.pipeline_events(self._pipeline, chat.text, options)
        renderer = ChunkRenderer(chat.model, created, chat.include_usage)
        await sse.respond(response, events, renderer, self._keepalive_s, self._pipeline.cancel)
