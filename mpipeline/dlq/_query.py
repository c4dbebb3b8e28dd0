"""What a reader of the queue asks for: records since a moment, and a record as JSON.

Shared by ``mpipeline dlq list|replay`` (``ops``) and the MCP tools
``dlq_list``/``dlq_replay`` (``gateway.mcp_tools``, served over stdio and by
every gateway replica at ``/mcp``): both filter and print alike because this is
the one copy. It lives here, in the lowest layer that knows the records, since
the gateway may not import ``ops``.
"""

from __future__ import annotations

import datetime
import re
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpipeline.dlq._reader import Listed

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``, ``2h``... before ``now``, or an ISO 8601 time (local if no zone): unix time.

    :raises ValueError: naming what was given, when it is neither
    """
    match = _DURATION.match(text)
    if match:
        ago = float(match.group(1)) * _UNIT_S[match.group(2)]
        return (time.time() if now is None else now) - ago
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"not a duration (30s, 10m, 2h, 1d) or an ISO time: {text!r}") from None


def as_json(item: Listed) -> dict[str, Any]:
    """The record with its replays, as ``dlq list --json`` prints it."""
    import msgspec

    record: dict[str, Any] = msgspec.to_builtins(item.record)
    record["replays"] = msgspec.to_builtins(item.replays)
    return record
