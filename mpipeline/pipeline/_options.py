"""``RequestOptions``: how to run one request, everything but its text.

Every way in takes the same options: ``Pipeline.submit``/``submit_nowait``/
``stream``/``stream_events``, the native and OpenAI routes and the WebSocket.
One frozen Struct instead of six keyword parameters repeated at each of them
(the WebSocket's copy had already lost ``history``). Callers that prefer
keywords still pass them: ``p.submit("hi", session_id="s1")`` builds the
options; ``p.submit("hi", opts)`` passes prepared ones.

Their bounds are in ``limits.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import msgspec

from mpipeline.messages import Priority, Turn


class RequestOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How to run one request (its text aside)."""

    # Affinity and order: a session's turns reach one shard, in order.
    session_id: str | None = None
    # Free-form labels carried to the result and the dead-letter queue.
    metadata: dict[str, str] | None = None
    # Where work waits inside a process: critical before high before normal before low.
    priority: Priority = Priority.NORMAL
    # The whole request's deadline; None: the client's ``timeout_s``.
    deadline_ms: float | None = None
    # Tokens to generate at most; None: the worker's default.
    max_tokens: int | None = None
    # The conversation before the text, oldest first.
    history: Sequence[Turn] | None = None
    # The request's other fields as a JSON object in OpenAI's names (sampling,
    # tools, response_format...), for an OpenAI-compatible upstream as they are.
    params: bytes | None = None
    # The input as the JSON message the client sent, when it is more than text.
    input_raw: bytes | None = None
    # The model's canonical name (``[[models]]``); None: the run's default model.
    model: str | None = None
    # An OpenAI endpoint other than chat, whose body is ``params`` (``PromptRequest.endpoint``).
    endpoint: str | None = None


class RequestFields(TypedDict, total=False):
    """``RequestOptions``' fields as keyword arguments (for ``**fields`` typing)."""

    session_id: str | None
    metadata: dict[str, str] | None
    priority: Priority
    deadline_ms: float | None
    max_tokens: int | None
    history: Sequence[Turn] | None
    params: bytes | None
    input_raw: bytes | None
    model: str | None
    endpoint: str | None


DEFAULT = RequestOptions()


def merged(options: RequestOptions | None, fields: RequestFields) -> RequestOptions:
    """``options`` (or the defaults) with ``fields`` put over them.

    :raises TypeError: for a keyword that is not an option
    """
    if not fields:
        return options or DEFAULT
    if options is None:
        return RequestOptions(**fields)
    return msgspec.structs.replace(options, **fields)
