"""``mpipeline dlq replay``: claim records, resubmit them, and record each outcome.

The records are claimed first (``mpipeline.dlq.claim``: under the queue's
exclusive lock, a durable ``claimed`` marker each), so that two replays
started at once split the records between them instead of both submitting
every one. Each outcome is then appended as a ``replayed`` marker naming its
claim, on disk before it is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TextIO

# The one resubmission, shared with the MCP tool ``dlq_replay`` (both transports);
# imported only when a replay runs (this module is), never to build the parser.
from mpipeline.gateway.dlq_replay import REPLAY_CONCURRENCY
from mpipeline.gateway.dlq_replay import resubmit as _resubmit

if TYPE_CHECKING:
    from mpipeline.dlq import Claimed, Listed
    from mpipeline.pipeline import Pipeline


def claim_and_replay(
    path: Path,
    items: list[Listed],
    *,
    only_pending: bool,
    deadline_ms: float | None,
    timeout_s: float,
    out: TextIO,
    err: TextIO,
) -> tuple[int, int]:
    """Claim ``items`` and replay what was taken: (how many were replayed, how many failed).

    :raises MPipelineError, OSError: when the pipeline cannot be joined (no slot free...)
    """
    import asyncio

    from mpipeline.dlq import claim

    taken, notes = claim(path, [item.record.id for item in items], only_pending=only_pending)
    for note in notes:
        err.write(f"{note}\n")
    if not taken:
        return 0, 0
    failed = asyncio.run(_replay(path, taken, deadline_ms, timeout_s, out))
    return len(taken), failed


async def _replay(
    path: Path, taken: list[Claimed], deadline_ms: float | None, timeout_s: float, out: TextIO
) -> int:
    """Resubmit every claimed record and record a marker per outcome; the number that failed."""
    import asyncio

    from mpipeline.dlq import DeadLetterQueue
    from mpipeline.pipeline import Pipeline

    dlq = DeadLetterQueue(path)
    gate = asyncio.Semaphore(REPLAY_CONCURRENCY)
    failed = 0

    async def one(p: Pipeline, claimed: Claimed) -> None:
        nonlocal failed
        async with gate:
            marker = await _resubmit(p, claimed, deadline_ms)
        # On disk before it is reported, like the records themselves.
        await dlq.record((marker,))
        failed += marker.outcome != "ok"
        detail = f" ({marker.message})" if marker.message else ""
        new_id = marker.new_request_id or "(not accepted)"
        out.write(f"{marker.replay_of} -> {new_id}: {marker.outcome}{detail}\n")
        out.flush()

    try:
        async with Pipeline.attach(path.parent, timeout_s=timeout_s) as p:
            await asyncio.gather(*(one(p, claimed) for claimed in taken))
    finally:
        await dlq.aclose()
    return failed
