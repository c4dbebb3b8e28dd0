"""Every message that crosses a process boundary, and the union each edge carries.

Messages are msgspec Structs on one tagged base, so a typed decoder rejects a
message that does not belong on an edge instead of handing a stage the wrong
type. The tag travels in the field ``"t"`` with short explicit values; they are
the wire format, so never reuse one for a different shape.

Errors travel as ``Failed`` data (an ``ErrorCode`` plus a reason), never as
pickled exceptions, and a ``Failed`` may appear on every edge after ``rag`` so
that a request that broke anywhere still reaches the gateway that holds its
client.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import msgspec

from mpipeline.errors import ErrorCode

__all__ = [
    "EDGE_TYPES",
    "FLOW",
    "STAGE_ORDER",
    "Assembled",
    "Citation",
    "Completed",
    "Failed",
    "Message",
    "Passage",
    "Priority",
    "PromptRequest",
    "Reply",
    "Retrieved",
    "StructuredChunk",
    "ToAssemble",
    "ToGateway",
    "ToInference",
    "ToPost",
    "ToRag",
    "ToStream",
    "TokenChunk",
    "Turn",
    "Usage",
    "failed_from",
    "reply_info",
]

# Struct options, chosen by bench/micro/test_codec.py (numbers in codec.py's docstring):
# array_like=True encodes a Struct as a msgpack array in field order instead of a
# map keyed by field name, and gc=False keeps instances out of the cyclic garbage
# collector. Both are safe because ring records never outlive one run of one code
# version (anything persisted, like the DLQ, must use its own self-describing
# format) and no message can take part in a reference cycle.
# Subclasses inherit every option at runtime; they repeat frozen/kw_only only
# because mypy does not carry those through msgspec's dataclass_transform.


class Priority(enum.IntEnum):
    """Scheduling class of a request; lower values are served first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


class Message(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    tag=True,
    tag_field="t",
    array_like=True,
    gc=False,
):
    """Base of every tagged message; subclasses set a short explicit ``tag``."""


class Turn(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """One message of a conversation: ``role`` is system, user or assistant.

    ``raw`` is the message exactly as an OpenAI client sent it (a JSON object),
    kept only when it says more than a role and a text: content parts (images),
    an assistant's ``tool_calls``, a tool result's ``tool_call_id``, a name, a
    ``developer`` role, fields we do not know. An OpenAI-compatible upstream
    gets it as it came; ``role`` and ``content`` (the text parts, joined) are
    what every other stage and worker reads.
    """

    role: str
    content: str
    raw: bytes = b""


class PromptRequest(Message, tag="req", frozen=True, kw_only=True):
    """A client request as the gateway accepted it.

    ``deadline_ns`` is an absolute ``time.monotonic_ns()``; CLOCK_MONOTONIC is
    system-wide on Linux, so every process on the host can compare against it.
    0 means no deadline. ``reply_to`` is the index of the gateway replica (and
    so of the return ring) that holds the client connection.

    ``stamps`` maps a stage name to the ``monotonic_ns`` at which that stage
    received the request. It is the one deliberately mutable part of a frozen
    message: the runner stamps in place, which costs one dict store instead of
    a copy of the whole struct (and its 0.5 kB+ input) per stage.
    """

    request_id: str
    session_id: str | None = None
    input: str
    metadata: dict[str, str] = {}
    priority: Priority = Priority.NORMAL
    deadline_ns: int = 0
    reply_to: int = 0
    stream: bool = False
    max_tokens: int | None = None
    stamps: dict[str, int] = {}
    # The conversation before ``input`` (oldest first), as chat APIs take it;
    # ``input`` is the newest user turn.
    history: list[Turn] = []
    # The request's other fields, as a JSON object in OpenAI's names (sampling,
    # tools, response_format, fields we do not know...), passed to an
    # OpenAI-compatible upstream as they came; b"": none (the usual case).
    params: bytes = b""
    # The input message as the client sent it, when it is more than text
    # (``Turn.raw``: image parts, a tool result).
    input_raw: bytes = b""
    # The model asked for, by its canonical name (the gateway resolves aliases);
    # "": the run's default model (the only one without ``[[models]]``).
    model: str = ""
    # An OpenAI endpoint other than chat (``/completions``, ``/embeddings``):
    # ``params`` is then the client's whole body, which an OpenAI-compatible
    # upstream gets as it came, and rag and assemble leave the request alone.
    # "": a chat request (every other field above applies).
    endpoint: str = ""
    # Where rag's context came from, set by rag and carried on to the reply
    # (``Completed.citations``) so that assemble need not know about them.
    citations: list[Citation] = []


class Passage(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """One piece of retrieved context; only ever nested, so it carries no tag."""

    source: str
    text: str
    score: float
    # Which chunk of ``source`` (from 0): chunks overlap, so (source, chunk) names one.
    chunk: int = 0


class Citation(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """Where a passage of the context came from: what the gateway returns to the client."""

    source: str
    chunk: int
    score: float


class Retrieved(Message, tag="ret", frozen=True, kw_only=True):
    """A request with the context that rag found for it (possibly none)."""

    request: PromptRequest
    context: list[Passage] = []


class Assembled(Message, tag="asm", frozen=True, kw_only=True):
    """The exact prompt the model will see, and the key that dedups it.

    ``prompt`` is the rendered text (for completion-style backends and echo);
    ``messages`` is the same conversation as chat turns (system with the
    retrieved context first, then the history, then the user's input) for the
    chat APIs and for local models that apply their own chat template.
    """

    request: PromptRequest
    prompt: str
    dedup_key: str
    messages: list[Turn] = []


class Usage(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """Token counts of one completion, as the worker reported them."""

    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens the backend reused instead of evaluating (a session's KV cache).
    cached_tokens: int = 0


class Reply(Message, frozen=True, kw_only=True):
    """Base of the messages that travel back to a client.

    They carry the request's identity and return address themselves, so that
    post, stream and the gateway never need the original request.
    """

    request_id: str
    session_id: str | None
    reply_to: int


class TokenChunk(Reply, tag="tok", frozen=True, kw_only=True):
    """One streamed piece of output; ``index`` counts from 0 per request."""

    index: int
    text: str


class StructuredChunk(TokenChunk, tag="stok", frozen=True, kw_only=True):
    """A streamed piece that is more than text: ``raw`` is the upstream's own chunk
    (JSON) with its tool-call delta, refusal or logprobs, which the OpenAI route
    passes on as it came; ``text`` is its content (often none), for every other route.

    A message of its own rather than a field of every ``TokenChunk``: plain
    tokens are the hottest message of all, and stay as small and cheap as before.
    """

    raw: bytes


class Completed(Reply, tag="done", frozen=True, kw_only=True):
    """The final result of a request (the whole text, also after a stream).

    ``raw`` is the upstream's own JSON when the reply is more than text: the
    whole chat completion (tool calls, refusal, logprobs, system_fingerprint),
    or a stream's final usage chunk; the OpenAI route answers with it. Post's
    transforms touch ``text`` only, and not even that when ``verbatim`` (the
    model was asked for JSON: a trimmed or cut JSON document is a broken one).
    """

    text: str
    usage: Usage
    finish_reason: str = "stop"
    stamps: dict[str, int] = {}
    raw: bytes = b""
    verbatim: bool = False
    # The request's ``citations`` (rag's sources), for the gateway to return.
    citations: list[Citation] = []


class Failed(Reply, tag="fail", frozen=True, kw_only=True):
    """A terminal error for one request; ``stage`` names where it happened."""

    code: ErrorCode
    reason: str
    stage: str
    # Seconds the client should wait before trying again (0: no advice).
    retry_after_s: float = 0.0


# One union per edge, named for the stage that consumes it. Failed rides every
# edge after rag so that an error keeps its place in the session's order.
ToRag: TypeAlias = PromptRequest
ToAssemble: TypeAlias = Retrieved | Failed
ToInference: TypeAlias = Assembled | Failed
ToPost: TypeAlias = TokenChunk | StructuredChunk | Completed | Failed
ToStream: TypeAlias = ToPost
ToGateway: TypeAlias = TokenChunk | StructuredChunk | Completed | Failed

# The stage registry: the stages between the gateway's ingress and its return
# rings, in flow order, each with what its input ring carries. The one list of
# stage names: config's tables, the stage classes (stages.STAGES), topology and
# the metrics schema are checked against or built from it.
FLOW: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "rag": ToRag,
        "assemble": ToAssemble,
        "inference": ToInference,
        "post": ToPost,
        "stream": ToStream,
    }
)
STAGE_ORDER: Final = tuple(FLOW)
# What each consumer's input ring carries: the stages, and the gateway's return rings.
EDGE_TYPES: Final[Mapping[str, Any]] = MappingProxyType({**FLOW, "gateway": ToGateway})


def request_of(msg: Message) -> PromptRequest | None:
    """The request a message carries whole (request, retrieved, assembled), else None."""
    if isinstance(msg, PromptRequest):
        return msg
    if isinstance(msg, Retrieved | Assembled):
        return msg.request
    return None


def reply_info(msg: Message) -> tuple[str, str | None, int]:
    """Return ``(request_id, session_id, reply_to)`` of any message.

    :raises TypeError: if ``msg`` is not one of the messages defined here
    """
    if isinstance(msg, Reply):
        return msg.request_id, msg.session_id, msg.reply_to
    req = request_of(msg)
    if req is not None:
        return req.request_id, req.session_id, req.reply_to
    raise TypeError(f"no reply info in {type(msg).__name__}")


def failed_from(
    msg: Message, code: ErrorCode, reason: str, stage: str, retry_after_s: float = 0.0
) -> Failed:
    """Build the ``Failed`` that answers whatever request ``msg`` belongs to.

    :raises TypeError: if ``msg`` is not one of the messages defined here
    """
    request_id, session_id, reply_to = reply_info(msg)
    return Failed(
        request_id=request_id,
        session_id=session_id,
        reply_to=reply_to,
        code=code,
        reason=reason,
        stage=stage,
        retry_after_s=retry_after_s,
    )
