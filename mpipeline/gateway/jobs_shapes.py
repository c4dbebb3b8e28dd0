"""The wire shapes of the async requests (``jobs_routes.py``), apart from the routes.

Kept in a module of their own so that the OpenAPI document (``openapi.py``)
can name them without importing the routes, which import the native style,
which imports the document's path: a cycle.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from mpipeline.gateway.schemas import ErrorDetail, PromptBody, PromptResult

Status = Literal["queued", "running", "completed", "failed", "cancelled"]


class JobBody(PromptBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/requests``: ``POST /v1/prompt``'s body, without a stream (OpenAPI only:
    the route decodes a ``PromptBody`` and refuses ``stream: true`` in its own words)."""

    stream: Literal[False] = False


class JobOut(msgspec.Struct, frozen=True, kw_only=True):
    """An async request as ``POST`` (202), ``GET`` and ``DELETE`` answer it; every
    field is always there (null until it applies), so a client reads one shape."""

    id: str
    object: Literal["request"] = "request"
    status: Status
    # Unix seconds.
    created_at: float
    finished_at: float | None = None
    # When the outcome is forgotten (GET then answers 404).
    expires_at: float | None = None
    # completed: what POST /v1/prompt would have answered.
    result: PromptResult | None = None
    # failed or cancelled: POST /v1/prompt's error, and the HTTP status it would have had.
    error: ErrorDetail | None = None
    http_status: int | None = None
