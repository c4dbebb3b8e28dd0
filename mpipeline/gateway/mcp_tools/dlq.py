"""``dlq_list`` and ``dlq_replay``: ``mpipeline dlq list|replay`` for an agent.

The records, filters and JSON are the CLI's (``mpipeline.dlq``'s ``listing``,
``parse_since``, ``as_json``); a replay claims its records the same way
(``mpipeline.dlq.claim``: two replays at once, from here or the CLI, never
submit one twice), resubmits each with the CLI's ``resubmit``
(``gateway.dlq_replay``: the request exactly as the client first sent it) and
appends a ``replayed`` marker per record before reporting it. The one
difference: a replay here sends through the server's own pipeline client (the
stdio server's attachment, or the gateway replica's own client) instead of
attaching another, so it needs no second client slot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpipeline.dlq import (
    DLQ_FILE,
    DeadLetterQueue,
    as_json,
    claim,
    listing,
    parse_since,
    read_entries,
)
from mpipeline.gateway.dlq_replay import REPLAY_CONCURRENCY, resubmit
from mpipeline.gateway.mcp_tools.args import DlqListArgs, DlqReplayArgs, parse
from mpipeline.gateway.mcp_tools.tools import ToolFailedError

if TYPE_CHECKING:
    from mpipeline.dlq import Claimed, Listed
    from mpipeline.pipeline import Pipeline


def _load(
    run_dir: Path, reasons: list[str], since: str | None, ids: list[str], notes: list[str]
) -> list[Listed]:
    try:
        after = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise ToolFailedError(f"invalid arguments (argument `since`): {exc}") from None
    entries = read_entries(run_dir / DLQ_FILE, notes.append)
    return listing(entries, reasons=reasons, since=after, ids=ids)


async def dlq_list(run_dir: Path, arguments: dict[str, Any] | None) -> Any:
    """The records ``mpipeline dlq list --json`` prints (the newest ``limit``), and counts."""
    args = parse(DlqListArgs, arguments)
    notes: list[str] = []
    items = await asyncio.to_thread(_load, run_dir, args.reasons, args.since, args.ids, notes)
    return {
        "path": str(run_dir / DLQ_FILE),
        "total": len(items),
        "not_replayed": sum(item.pending_replay for item in items),
        "records": [as_json(item) for item in items[-args.limit :]],
        "warnings": notes,
    }


async def dlq_replay(p: Pipeline, run_dir: Path, arguments: dict[str, Any] | None) -> Any:
    """Resubmit the named records (or ``all`` not yet replayed); each outcome, and why
    a record was not replayed."""
    args = parse(DlqReplayArgs, arguments)
    if bool(args.ids) == args.all:
        raise ToolFailedError("name the records to replay in `ids`, or set `all` (not both)")
    notes: list[str] = []
    items = await asyncio.to_thread(_load, run_dir, args.reasons, args.since, args.ids, notes)
    chosen = _pending(items, notes) if args.all else _named(items, args.ids, notes)
    path = run_dir / DLQ_FILE
    ids = [item.record.id for item in chosen]
    taken, claim_notes = await asyncio.to_thread(claim, path, ids, only_pending=args.all)
    notes += claim_notes
    replays = await _replay(p, path, taken, args.deadline_ms)
    failed = sum(r["outcome"] != "ok" for r in replays)
    return {"replays": replays, "ok": len(replays) - failed, "failed": failed, "notes": notes}


async def _replay(
    p: Pipeline, path: Path, taken: list[Claimed], deadline_ms: float | None
) -> list[dict[str, Any]]:
    dlq = DeadLetterQueue(path)
    gate = asyncio.Semaphore(REPLAY_CONCURRENCY)

    async def one(claimed: Claimed) -> dict[str, Any]:
        async with gate:
            marker = await resubmit(p, claimed, deadline_ms)
        await dlq.record((marker,))  # on disk before it is reported, as the CLI does
        return {
            "id": marker.replay_of,
            "new_request_id": marker.new_request_id,
            "outcome": marker.outcome,
            "message": marker.message,
        }

    try:
        return list(await asyncio.gather(*(one(claimed) for claimed in taken)))
    finally:
        await dlq.aclose()


def _pending(items: list[Listed], notes: list[str]) -> list[Listed]:
    """What ``all`` takes: records with a whole request and no accepted replay yet."""
    cut = sum(1 for item in items if item.record.request is not None and not item.replayable)
    if cut:
        notes.append(f"{cut} records were cut to fit the DLQ's record cap; they are not replayed")
    return [item for item in items if item.pending_replay]


def _named(items: list[Listed], ids: list[str], notes: list[str]) -> list[Listed]:
    """The named records that can be replayed (one per id); a note for each that cannot."""
    found = {item.record.id for item in items}
    notes += [f"{rid}: no such record (or filtered out)" for rid in ids if rid not in found]
    for item in items:
        if item.record.request is None:
            notes.append(f"{item.record.id}: a {item.record.reason} record holds no request")
        elif not item.replayable:
            notes.append(f"{item.record.id}: the record was cut to fit the DLQ's record cap")
    chosen = {item.record.id: item for item in items if item.replayable}
    return list(chosen.values())
