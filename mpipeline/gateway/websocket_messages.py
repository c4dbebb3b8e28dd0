"""The WebSocket's message protocol as types: what a client sends, what it gets back.

Kept apart from ``websocket_session.py`` (the connection's state machine), so
that the wire shapes, which the README and tests describe, are read in one
place and the session stays under the module size limit.
"""

from __future__ import annotations

import time
from typing import Annotated

import msgspec
from msgspec import Meta

from mpipeline.gateway import schemas
from mpipeline.gateway.schemas import ChunkOut, ErrorDetail, PromptBody, PromptResult
from mpipeline.messages import Completed, TokenChunk

__all__ = [
    "DECODE",
    "MAX_REF",
    "AcceptedOut",
    "ChunkMessage",
    "DoneOut",
    "ErrorOut",
    "Event",
    "StreamBody",
    "ref_of",
    "render",
]

MAX_REF = 256
Event = TokenChunk | Completed


class StreamBody(PromptBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One request: ``POST /v1/prompt``'s body plus the client's ``ref``."""

    ref: Annotated[str, Meta(max_length=MAX_REF)] | None = None


class _Ref(msgspec.Struct):
    """Just the ``ref`` of a message refused for another field, to echo it."""

    ref: str | None = None


class AcceptedOut(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="accepted"):
    ref: str | None
    request_id: str


class ChunkMessage(ChunkOut, frozen=True, kw_only=True, tag_field="type", tag="chunk"):
    ref: str | None


class DoneOut(PromptResult, frozen=True, kw_only=True, tag_field="type", tag="done"):
    ref: str | None


class ErrorOut(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="error"
):
    ref: str | None
    request_id: str | None = None
    error: ErrorDetail


DECODE = msgspec.json.Decoder(StreamBody)
_DECODE_REF = msgspec.json.Decoder(_Ref)


def render(event: Event, ref: str | None) -> ChunkMessage | DoneOut:
    if isinstance(event, TokenChunk):
        return ChunkMessage(
            request_id=event.request_id, index=event.index, text=event.text, ref=ref
        )
    assert isinstance(event, Completed)
    result = schemas.prompt_result(event, time.monotonic_ns())
    return DoneOut(ref=ref, **msgspec.structs.asdict(result))


def ref_of(data: bytes) -> str | None:
    """The ``ref`` of a message that is not a valid request, when it has a readable one."""
    try:
        return _DECODE_REF.decode(data).ref
    except (msgspec.DecodeError, RecursionError):
        return None
