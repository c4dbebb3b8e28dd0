"""The MCP tools' arguments: typed structs, their JSON schemas, and clear refusals.

The fields and bounds of ``infer`` are the native route's (``POST /v1/prompt``:
``gateway.schemas``' types), so an agent can send exactly what an HTTP client
can and is refused for the same reasons. msgspec both checks the arguments and
writes the schema that ``tools/list`` shows, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from mpipeline.gateway.schemas import (
    MAX_DEADLINE_MS,
    MaxTokens,
    Metadata,
    Name,
    SessionId,
    TurnIn,
    validation_problem,
)
from mpipeline.pipeline import limits

T = TypeVar("T")

# Prompts in one batch_infer call, and requests of one batch in flight at once:
# enough for an agent's fan-out, few enough that one call never floods the rings.
MAX_BATCH = 256
MAX_CONCURRENCY = 16
DEFAULT_CONCURRENCY = 4
# DLQ records one dlq_list call returns at most (the newest): an agent's context is small.
MAX_LIST = 1000
# Ids one dlq_list or dlq_replay call may name (as many as one list returns), reasons
# it may filter on (far more than there are), and the length of ``since``: a call's
# arguments are bounded before any of them reaches the DLQ reader.
MAX_IDS = MAX_LIST
MAX_REASONS = 32
MAX_SINCE = 64
Priority = Literal["critical", "high", "normal", "low"]
DeadlineMs = Annotated[float, Meta(ge=1, le=MAX_DEADLINE_MS)]
Reason = Annotated[str, Meta(min_length=1, max_length=64)]
RecordId = Annotated[str, Meta(min_length=1, max_length=256)]
Since = Annotated[str, Meta(min_length=1, max_length=MAX_SINCE)]
_SINCE = "only records from this long ago (30s, 10m, 2h, 1d) or since an ISO 8601 time"


class Args(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every tool's arguments: unknown names are refused, a typo never passes silently."""


class InferArgs(Args, frozen=True):
    """``infer``: one request, as ``POST /v1/prompt`` takes it."""

    prompt: Annotated[str, Meta(min_length=1, description="the text to send to the model")]
    session_id: Annotated[
        SessionId | None, Meta(description="a session's turns reach one shard, in order")
    ] = None
    model: Annotated[Name | None, Meta(description="a [[models]] name or alias")] = None
    max_tokens: Annotated[MaxTokens | None, Meta(description="tokens to generate at most")] = None
    deadline_ms: Annotated[DeadlineMs | None, Meta(description="the whole request's deadline")] = (
        None
    )
    priority: Priority = "normal"
    metadata: Metadata = {}
    history: Annotated[
        list[TurnIn],
        Meta(max_length=limits.MAX_HISTORY, description="earlier turns, oldest first"),
    ] = []


class BatchArgs(Args, frozen=True):
    """``batch_infer``: many prompts with the same options; results in the prompts' order.

    The prompts are plain strings with no bounds of their own here: one that the
    pipeline refuses (empty, too long) is an error entry in its place, never a
    refused batch.
    """

    prompts: Annotated[list[str], Meta(min_length=1, max_length=MAX_BATCH)]
    concurrency: Annotated[
        int,
        Meta(ge=1, le=MAX_CONCURRENCY, description="requests of this batch in flight at once"),
    ] = DEFAULT_CONCURRENCY
    session_id: SessionId | None = None
    model: Name | None = None
    max_tokens: MaxTokens | None = None
    deadline_ms: DeadlineMs | None = None
    priority: Priority = "low"
    metadata: Metadata = {}


class StatusArgs(Args, frozen=True):
    """``pipeline_status`` takes nothing."""


class DlqListArgs(Args, frozen=True):
    """``dlq_list``: the filters of ``mpipeline dlq list``."""

    reasons: Annotated[
        list[Reason],
        Meta(
            max_length=MAX_REASONS,
            description="only records with one of these reasons (ring_full...)",
        ),
    ] = []
    since: Annotated[Since | None, Meta(description=_SINCE)] = None
    ids: Annotated[
        list[RecordId], Meta(max_length=MAX_IDS, description="only these request ids")
    ] = []
    limit: Annotated[int, Meta(ge=1, le=MAX_LIST, description="the newest N records")] = 100


class DlqReplayArgs(Args, frozen=True):
    """``dlq_replay``: ``mpipeline dlq replay``: named records, or ``all`` not yet replayed."""

    ids: Annotated[list[RecordId], Meta(max_length=MAX_IDS, description="records to replay")] = []
    all: Annotated[bool, Meta(description="every record not yet replayed")] = False
    reasons: Annotated[list[Reason], Meta(max_length=MAX_REASONS)] = []
    since: Annotated[Since | None, Meta(description=_SINCE)] = None
    deadline_ms: Annotated[
        DeadlineMs | None, Meta(description="deadline for every replay instead of each record's")
    ] = None


class BadArgumentsError(Exception):
    """The arguments do not fit the tool's schema; the message says which and why."""


def parse(kind: type[T], arguments: dict[str, Any] | None) -> T:
    """``arguments`` as the tool's struct.

    :raises BadArgumentsError: naming the argument and what is wrong with it
    """
    try:
        return msgspec.convert(arguments or {}, kind, strict=True)
    except msgspec.ValidationError as exc:
        problem = validation_problem(str(exc))
        where = f" (argument `{problem.field}`)" if problem.field else ""
        raise BadArgumentsError(f"invalid arguments{where}: {problem.message}") from None


def input_schema(kind: type[Args]) -> dict[str, Any]:
    """The JSON schema of ``kind`` as MCP wants it: an object at the top, ``$defs`` beside."""
    (top,), components = msgspec.json.schema_components([kind], ref_template="#/$defs/{name}")
    schema: dict[str, Any] = dict(components.pop(kind.__name__, top))
    schema.pop("title", None)
    if components:
        schema["$defs"] = components
    return schema
