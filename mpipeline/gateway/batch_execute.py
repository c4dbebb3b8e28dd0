"""One batch line, run by the synchronous route's own handler, at the batch priority.

A batch line must be taken and answered exactly as the same body sent to
``POST /v1/chat/completions`` (or ``/v1/completions``, ``/v1/embeddings``)
would be: the same fields passed, refused or dropped, the same model lookup,
the same reply and the same OpenAI error body. So the line is not translated
by a second copy of that logic: it is handed, as an in-memory ``Request``,
to a ``ChatCompletions`` and an ``OpenAIEndpoints`` of its own, and the
``Response`` they write is captured (``_Capture`` is the ``Wire``).

Those two differ from the gateway's in two ways only. Their pipeline client
(``_AtPriority``) stamps every request with the batch priority
(``gateway.batch_priority``, low by default), so the shards serve
interactive traffic first. Their admission has no rate limit: a batch is
bounded by ``gateway.batch_concurrency`` instead, and a line refused 429
would only fail for a limit meant for interactive clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

import msgspec

from mpipeline.errors import MPipelineError, RequestFailed
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.exchange import JSON, Request, Response
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai import ChatCompletions
from mpipeline.gateway.openai_endpoints import OpenAIEndpoints
from mpipeline.gateway.router import Router
from mpipeline.messages import Completed, Priority
from mpipeline.pipeline import Pipeline, RequestOptions

if TYPE_CHECKING:
    from mpipeline.gateway.style import ApiStyle

log = logging.getLogger(__name__)
_HEAD_END = b"\r\n\r\n"


class _AtPriority:
    """The one call the non-streaming handlers make of a ``Pipeline``, at ``priority``."""

    def __init__(self, pipeline: Pipeline, priority: Priority) -> None:
        self._pipeline = pipeline
        self._priority = priority

    async def submit(self, text: str, options: RequestOptions | None = None) -> Completed:
        opts = msgspec.structs.replace(options or RequestOptions(), priority=self._priority)
        return await self._pipeline.submit(text, opts)


class _Capture:
    """A ``Wire`` that keeps what the handler writes (one whole response, no stream)."""

    closing = False

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def date(self) -> bytes:
        return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()


class LineExecutor:
    """``execute(url, body)``: the HTTP status and JSON body the route answered."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        model: str,
        models: Models,
        priority: Priority,
        keepalive_s: float,
    ) -> None:
        # Only ``submit`` is ever called: a batch line is never a stream (batch_input).
        low = cast("Pipeline", _AtPriority(pipeline, priority))
        open_door = Admission(None)
        chat = ChatCompletions(low, model, keepalive_s, admission=open_door, models=models)
        endpoints = OpenAIEndpoints(low, keepalive_s, admission=open_door, models=models)
        styles: tuple[ApiStyle, ...] = (chat, endpoints)
        self._router = Router(styles, default=chat)

    async def execute(self, url: str, body: bytes) -> tuple[int, bytes]:
        route = self._router.route(url)
        assert route is not None, url  # batch_input lets only the served urls through
        request = Request("POST", url, "", {"content-type": JSON}, body)
        request.arrived_ns = time.monotonic_ns()
        wire = _Capture()
        response = Response(wire, request)
        try:
            await route.methods["POST"](request, response)
        except RequestFailed as exc:  # as Gateway.handle answers it
            if not response.started:
                response.send_reply(route.style.failure_reply(exc))
        except (asyncio.CancelledError, MPipelineError):
            raise  # cancelled, or the client closing: no outcome, the line runs again
        except Exception:
            # A fault of ours on one line is that line's outcome (500), not a
            # batch stopped and resumed onto the same line forever.
            log.exception("batch line to %s failed", url)
            if not response.started:
                message = "internal error running this line; see the gateway log"
                response.send_reply(route.style.error_reply(500, message))
        _, _, answer = bytes(wire.data).partition(_HEAD_END)
        return response.status, answer
