"""The wire and disk shapes of OpenAI's Batch API (``/v1/files``, ``/v1/batches``).

One set of msgspec Structs serves both the HTTP answers and the state files
under the run dir (``batch_files.py``): a batch on disk *is* the object
``GET /v1/batches/{id}`` returns, so any gateway replica answers a GET by
reading one file, and what a client sees can never drift from what the
runner (``batch_runner.py``) wrote. Field names and statuses are OpenAI's,
since the official SDKs parse them into their own types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mpipeline.gateway import schemas

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
# The endpoints a batch may run (each line must name the batch's own).
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)
# OpenAI's only completion window: a batch not finished within it expires.
WINDOW_S = {"24h": 24 * 3600}
MAX_CUSTOM_ID = 512

Status = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
# Statuses a runner still has work in (a replica adopts such a batch when its lock is free).
UNFINISHED: frozenset[str] = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
Purpose = Literal["batch", "batch_output"]


class FileObject(msgspec.Struct, frozen=True, kw_only=True):
    """``object: "file"``: an uploaded input, or a batch's output or error file."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchError(msgspec.Struct, frozen=True, kw_only=True):
    """Why a batch failed validation; ``line`` is 1-based in the input file."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(msgspec.Struct, frozen=True, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """``object: "batch"``, as OpenAI's API answers it; timestamps are Unix seconds."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: Status = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


class BatchList(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class CreateBatchBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/batches``."""

    input_file_id: schemas.Name
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"] = "24h"
    metadata: schemas.Metadata | None = None


class InputLine(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One line of a batch's input file; ``body`` is the request the endpoint takes,
    kept as its raw JSON so the endpoint reads the very bytes the user wrote."""

    custom_id: Annotated[str, Meta(min_length=1, max_length=MAX_CUSTOM_ID)]
    method: Literal["POST"]
    url: str
    body: msgspec.Raw


class StreamFlag(msgspec.Struct, frozen=True):
    """The one field of a line's body the batch itself reads (a stream has no client)."""

    stream: Any = None


class LineResponse(msgspec.Struct, frozen=True, kw_only=True):
    status_code: int
    request_id: str
    # The endpoint's JSON answer, as the synchronous route sent it.
    body: msgspec.Raw


class LineError(msgspec.Struct, frozen=True, kw_only=True):
    code: str | None
    message: str


class OutputLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of an output (``error`` null) or error file (``error`` set)."""

    id: str
    custom_id: str
    response: LineResponse | None
    error: LineError | None = None


class Done(msgspec.Struct, frozen=True, kw_only=True):
    """The part of an output line a resuming runner reads: which line it answered."""

    custom_id: str
