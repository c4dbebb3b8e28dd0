"""Resubmitting one dead-letter record through a pipeline client: the one copy.

``mpipeline dlq replay`` (``ops``) and the MCP tool ``dlq_replay``
(``gateway.mcp_tools``) both resubmit a claimed record exactly as its client
first sent it and turn the outcome into a ``replayed`` marker. The MCP tool is
also served by every gateway replica (``/mcp``), and the gateway may not import
``ops`` (pyproject.toml's layers), so the code lives here and ``ops`` imports it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mpipeline.dlq import ChatPayload, ReplayMarker
from mpipeline.errors import RequestFailed

if TYPE_CHECKING:
    from mpipeline.dlq import Claimed
    from mpipeline.pipeline import Pipeline

# Replays in flight at once: enough to drain a backlog fast, few enough that a
# replay never sheds its own requests on a pipeline that is just recovering.
REPLAY_CONCURRENCY = 32


async def resubmit(p: Pipeline, claimed: Claimed, deadline_ms: float | None) -> ReplayMarker:
    """Submit ``claimed``'s request again through ``p``; its outcome as a ``replayed`` marker.

    ``deadline_ms``, when given, replaces the record's own deadline.
    """
    rid, token = claimed.item.record.id, claimed.claim.claim
    req = claimed.item.record.request
    assert req is not None
    # The conversation, fields and model of a chat request; none of a plain prompt.
    chat = req.chat or ChatPayload()
    try:
        done = await p.submit(
            req.input,
            session_id=req.session_id,
            metadata=dict(req.metadata),
            priority=req.priority_value(),
            deadline_ms=deadline_ms if deadline_ms is not None else req.deadline_ms,
            max_tokens=req.max_tokens,
            history=[t.turn() for t in chat.history] or None,
            params=bytes(chat.params) or None,
            input_raw=bytes(chat.input_raw) or None,
            model=chat.model or None,
            endpoint=chat.endpoint or None,
        )
    except RequestFailed as exc:
        return ReplayMarker(
            replay_of=rid,
            ts=time.time(),
            # "" when refused before acceptance: nothing reached the pipeline.
            new_request_id=exc.request_id or None,
            outcome=str(exc.code),
            message=exc.failed.reason,
            claim=token,
        )
    return ReplayMarker(
        replay_of=rid, ts=time.time(), new_request_id=done.request_id, outcome="ok", claim=token
    )
