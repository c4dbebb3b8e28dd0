"""What the DLQ holds: dead records, replay claims and replay outcomes, and the size cap.

The file is an operator's file that must outlive code changes, so every entry
is a self-describing JSON object tagged by ``kind``, never the rings'
positional (array_like) encoding, and entries are only ever appended.
"""

from __future__ import annotations

import time
from typing import TypeAlias

import msgspec

from mpipeline.errors import ErrorCode
from mpipeline.messages import Completed, Failed, Priority, PromptRequest, Turn

# A record is cut to this many bytes (the JSON line, newline included): big
# enough for a long prompt, small enough that one odd request never costs the
# disk (or a reader's memory) more than this.
MAX_RECORD_BYTES = 256 * 1024
# Texts are cut first to this share of the cap; halved until the record fits.
_FIRST_CUT = 2


# The default of the optional JSON fields below: omit_defaults leaves a field out
# only when it holds this very object, so empty JSON is always this one.
_NO_JSON = msgspec.Raw()


def _json(data: bytes) -> msgspec.Raw:
    return msgspec.Raw(data) if data else _NO_JSON


class TurnPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One message of the conversation before the input, by name (not the rings'
    positional ``Turn``); ``raw`` is the client's own JSON of a structured one."""

    role: str
    content: str
    raw: msgspec.Raw = _NO_JSON

    @classmethod
    def of(cls, turn: Turn) -> TurnPayload:
        return cls(role=turn.role, content=turn.content, raw=_json(turn.raw))

    def turn(self) -> Turn:
        return Turn(role=self.role, content=self.content, raw=bytes(self.raw))


class ChatPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a chat (or other OpenAI) request carries beyond its input: the
    conversation before it, its other fields and its input message as the client
    sent them (JSON, kept as JSON so the file stays readable), its model and
    endpoint. A replay without them would be another request."""

    history: list[TurnPayload] = []
    params: msgspec.Raw = _NO_JSON
    input_raw: msgspec.Raw = _NO_JSON
    model: str = ""
    endpoint: str = ""

    @classmethod
    def of(cls, request: PromptRequest) -> ChatPayload | None:
        """None for a plain prompt, the usual case (the record stays as it was)."""
        if not (request.history or request.params or request.input_raw):
            if not (request.model or request.endpoint):
                return None
        return cls(
            history=[TurnPayload.of(t) for t in request.history],
            params=_json(request.params),
            input_raw=_json(request.input_raw),
            model=request.model,
            endpoint=request.endpoint,
        )


class RequestPayload(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the client sent, enough to submit the request again (``chat``:
    the conversation, fields, model and endpoint of a request that has them)."""

    input: str
    session_id: str | None = None
    metadata: dict[str, str] = {}
    # The Priority's name in lower case: stable even if the numbers change.
    priority: str = "normal"
    # The request's whole budget as accepted; None when unknown.
    deadline_ms: float | None = None
    max_tokens: int | None = None
    stream: bool = False
    chat: ChatPayload | None = None

    def priority_value(self) -> Priority:
        try:
            return Priority[self.priority.upper()]
        except KeyError:
            return Priority.NORMAL


class ResultPayload(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome that reached a client slot after its client was gone."""

    # "completed", or the ErrorCode of the Failed that arrived.
    outcome: str
    text: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    # The Failed's reason and stage, for an error outcome.
    error: str | None = None
    stage: str | None = None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="dead"):
    """One failed request: what the client saw (``id``, ``reason``) and what it sent.

    ``request`` is None only for ``client_gone`` records, which hold the
    ``result`` that nobody was left to receive instead.

    ``truncated_from`` is set when the whole record would have been larger
    than the DLQ's per-record cap: it is that size in bytes, and the texts of
    the payload (input, metadata, session, message, result) were cut to fit.
    Such a record still says which request failed, when and why, but it no
    longer holds what the client sent, so it is never replayed.
    """

    id: str
    ts: float
    reason: str
    stage: str
    message: str
    request: RequestPayload | None = None
    result: ResultPayload | None = None
    truncated_from: int | None = None


class ClaimMarker(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="claimed"):
    """A replay took a record, before it submitted it again.

    Appended under the DLQ's exclusive lock by ``dlq replay``, so that two
    replays running at once never both submit the record. A claim holds while
    its ``owner`` (the replaying process) is alive and no ``replayed`` marker
    names it; the claim of a process that died is void, so the record can be
    replayed again.
    """

    replay_of: str
    ts: float
    # Unique per claim; the ``replayed`` marker that settles it names it too.
    claim: str
    pid: int
    # The process, as "<pid>@<start time>": a pid alone may be reused.
    owner: str


class ReplayMarker(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="replayed"):
    """A record was submitted again; appended, never edited in place.

    ``new_request_id`` is None when the pipeline refused the resubmission
    before accepting it; ``outcome`` is "ok" or the new ErrorCode. ``claim`` is
    the claim this outcome settles (None from replays older than claims).
    """

    replay_of: str
    ts: float
    new_request_id: str | None
    outcome: str
    message: str = ""
    claim: str | None = None


Entry: TypeAlias = DeadLetter | ReplayMarker | ClaimMarker


def letter_for(request: PromptRequest, failed: Failed, deadline_ms: float | None) -> DeadLetter:
    """The record of an accepted ``request`` that ended in ``failed``."""
    return DeadLetter(
        id=request.request_id,
        ts=time.time(),
        reason=str(failed.code),
        stage=failed.stage,
        message=failed.reason,
        request=RequestPayload(
            input=request.input,
            session_id=request.session_id,
            metadata=dict(request.metadata),
            priority=_priority_name(request.priority),
            deadline_ms=deadline_ms,
            max_tokens=request.max_tokens,
            stream=request.stream,
            chat=ChatPayload.of(request),
        ),
    )


def gone_letter(msg: Completed | Failed) -> DeadLetter:
    """The record of an outcome that reached a slot whose client had gone away."""
    if isinstance(msg, Completed):
        result = ResultPayload(
            outcome="completed",
            text=msg.text,
            prompt_tokens=msg.usage.prompt_tokens,
            completion_tokens=msg.usage.completion_tokens,
            finish_reason=msg.finish_reason,
        )
    else:
        result = ResultPayload(outcome=str(msg.code), error=msg.reason, stage=msg.stage)
    return DeadLetter(
        id=msg.request_id,
        ts=time.time(),
        reason=str(ErrorCode.CLIENT_GONE),
        stage="client",
        message=f"the client of slot {msg.reply_to} was gone when its outcome arrived",
        result=result,
    )


def _priority_name(value: int) -> str:
    try:
        return Priority(value).name.lower()
    except ValueError:
        return str(value)


# The cap


def encode_line(encoder: msgspec.json.Encoder, entry: Entry, cap: int) -> bytes:
    """``entry`` as one JSON line of at most ``cap`` bytes.

    A dead record over the cap has its texts cut (and is marked with its whole
    size): the request's failure stays on record, its bulk does not. Markers
    hold nothing a client sent beyond an id and a short message, which is cut
    the same way.
    """
    line = encoder.encode(entry) + b"\n"
    if len(line) <= cap:
        return line
    whole = len(line)
    keep = cap // _FIRST_CUT
    while True:
        cut = _cut(entry, keep, whole)
        line = encoder.encode(cut) + b"\n"
        if len(line) <= cap or keep == 0:
            # At keep 0 only ids and codes are left: never dropped, even if over.
            return line
        keep //= 2


def _cut(entry: Entry, keep: int, whole: int) -> Entry:
    """``entry`` with every text a client or a stage could make long cut to ``keep`` characters."""
    if not isinstance(entry, DeadLetter):
        if isinstance(entry, ReplayMarker):
            return msgspec.structs.replace(entry, message=entry.message[:keep])
        return entry
    req = entry.request
    if req is not None:
        req = msgspec.structs.replace(
            req,
            input=req.input[:keep],
            session_id=_clip(req.session_id, keep),
            metadata=_clip_map(req.metadata, keep),
            # Not cut but left out: a cut JSON document or conversation is another
            # request, and a cut record is never replayed anyway.
            chat=None,
        )
    res = entry.result
    if res is not None:
        res = msgspec.structs.replace(res, text=_clip(res.text, keep), error=_clip(res.error, keep))
    return msgspec.structs.replace(
        entry,
        message=entry.message[:keep],
        stage=entry.stage[:keep],
        request=req,
        result=res,
        truncated_from=whole,
    )


def _clip(text: str | None, keep: int) -> str | None:
    return None if text is None else text[:keep]


def _clip_map(metadata: dict[str, str], keep: int) -> dict[str, str]:
    """The first entries of ``metadata`` whose keys and values add up to ``keep`` characters."""
    kept: dict[str, str] = {}
    left = keep
    for key, value in metadata.items():
        left -= len(key) + len(value)
        if left < 0:
            break
        kept[key] = value
    return kept
