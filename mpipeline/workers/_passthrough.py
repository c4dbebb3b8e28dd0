"""OpenAI's endpoints beyond chat, passed through: ``/completions`` and ``/embeddings``.

A request for one of them (``PromptRequest.endpoint``) carries the client's
whole body in ``params``; the ``openai`` worker posts it, byte for byte, to
the same path under its ``base_url``, and the reply goes back as the upstream
sent it: the whole JSON body (``Generation.raw``), or a stream's chunks, each
a ``Structured`` piece with its own JSON (they are not chat chunks, so the
chat decoder keeps them whole). Only the shard's counts are read from it:
usage, the finish reason and, for a completion, its text (for post, the DLQ
and the cache).

Kept apart from ``openai.py`` so the chat path, the hot one, stays as it
was: a chat request pays one attribute test for this module's existence.
"""

from __future__ import annotations

import msgspec

from mpipeline.workers import _failures, _http
from mpipeline.workers._client import Client
from mpipeline.workers._conn import Conn
from mpipeline.workers.base import Generation

__all__ = ["ENDPOINTS", "body_for", "completed", "fetch_body", "open_stream"]

# The paths under ``base_url`` (which ends in ``/v1``) that an upstream may take as they are.
ENDPOINTS = frozenset({"/completions", "/embeddings"})
_STREAM_HEADERS = {"accept": "text/event-stream", "accept-encoding": "identity"}
_UNARY_HEADERS = {"accept": "application/json", "accept-encoding": "identity"}


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    finish_reason: str | None = None


class _Reply(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: object = None


_REPLY = msgspec.json.Decoder(_Reply)
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENCODE = msgspec.json.Encoder().encode


def body_for(params: bytes, routed: bool, upstream_model: str) -> bytes:
    """The body to send: the client's, byte for byte, unless the request was routed
    to a ``[[models]]`` entry (``routed``), whose ``upstream_model`` replaces the
    public name the client used (the rest of the body stays as it came).

    :raises UpstreamFailure: ``invalid_request`` when ``params`` is not a JSON object
    """
    if not routed:
        return params
    try:
        fields = _FIELDS.decode(params)
    except msgspec.DecodeError:
        raise _failures.invalid_request("params is not a JSON object") from None
    fields["model"] = msgspec.Raw(_ENCODE(upstream_model))
    return _ENCODE(fields)


def _request(client: Client, endpoint: str, body: bytes, *, stream: bool) -> bytes:
    """The call's bytes; its head is made per call (a few µs, for these endpoints only).

    :raises UpstreamFailure: ``invalid_request`` for an endpoint that is not passed through
    """
    if endpoint not in ENDPOINTS:
        raise _failures.invalid_request(f"endpoint {endpoint!r} is not one the worker passes on")
    head = client.request_head(endpoint, _STREAM_HEADERS if stream else _UNARY_HEADERS)
    return head.render(body)


async def open_stream(client: Client, endpoint: str, body: bytes, read_s: float) -> Conn:
    """Start a streamed call; its connection once a 200 event stream answers.

    :raises UpstreamFailure: the call failed, or the reply is not an event stream
    """
    conn = await _http.send(client, _request(client, endpoint, body, stream=True), read_s)
    ctype = conn.header(b"content-type")
    if ctype and not ctype.lower().startswith("text/event-stream"):
        client.release(conn)
        raise _failures.protocol_failure("upstream sent malformed SSE (wrong content-type)")
    return conn


async def fetch_body(client: Client, endpoint: str, body: bytes, read_s: float) -> bytes:
    """The whole reply of a call that is not streamed, as the upstream sent it.

    :raises UpstreamFailure: the call failed, another status came, or the body was cut
    """
    return await _http.fetch(client, _request(client, endpoint, body, stream=False), read_s)


def completed(body: bytes, gen: Generation) -> str:
    """Keep ``body`` as the reply and take the shard's counts from it; the text of a
    completion (an embedding has none).

    :raises UpstreamFailure: the body is not JSON, or reports an error
    """
    reply = _http.decode(_REPLY, body)
    if reply.error is not None:
        raise _failures.error_failure(reply.error, what="upstream reported an error")
    gen.raw = body
    gen.raw_bytes = len(body)
    choice = reply.choices[0] if reply.choices else None
    if choice is not None and choice.finish_reason is not None:
        gen.finish_reason = choice.finish_reason
    usage = reply.usage
    if usage is not None:
        gen.prompt_tokens = usage.prompt_tokens or 0
        gen.completion_tokens = usage.completion_tokens or 0
    return choice.text or "" if choice is not None else ""
