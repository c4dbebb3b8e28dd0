"""How ``mpipeline dlq list|show`` print records: a table row, a full description, JSON."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpipeline.dlq import Listed, ReplayMarker

_INPUT_COLUMN = 40


def as_json(item: Listed) -> dict[str, Any]:
    """``mpipeline.dlq.as_json``: the one JSON shape, shared with the MCP tools."""
    from mpipeline.dlq import as_json as record_json

    return record_json(item)


def list_row(item: Listed) -> tuple[str, ...]:
    r = item.record
    text = r.request.input if r.request is not None else (r.result.text if r.result else None)
    return (r.id, when(r.ts), r.reason, r.stage, _replay_cell(item), _clip(text))


def _replay_cell(item: Listed) -> str:
    if item.record.request is None:
        return "n/a"
    if item.record.truncated_from is not None:
        return "cut"  # its request is not whole: never replayed
    m = item.replayed
    if m is None:
        holder = item.live_claim()
        return f"(pid {holder.pid} replaying)" if holder is not None else "-"
    return f"{m.new_request_id or '(not accepted)'} {m.outcome}"


def describe(item: Listed) -> str:
    r = item.record
    lines = [
        f"id:       {r.id}",
        f"time:     {when(r.ts, precise=True)} ({r.ts:.3f})",
        f"reason:   {r.reason}",
        f"stage:    {r.stage}",
        f"message:  {r.message}",
    ]
    if r.truncated_from is not None:
        lines.append(
            f"cut:      the record was {r.truncated_from} bytes, over the DLQ's record cap; "
            "its texts were cut to fit, so it cannot be replayed"
        )
    if r.request is not None:
        q = r.request
        lines += [
            "request:",
            f"  session_id:  {q.session_id}",
            f"  priority:    {q.priority}",
            f"  deadline_ms: {q.deadline_ms}",
            f"  max_tokens:  {q.max_tokens}",
            f"  stream:      {str(q.stream).lower()}",
            f"  metadata:    {json.dumps(q.metadata)}",
            f"  input ({len(q.input)} characters):",
            *_indent(q.input),
        ]
    if r.result is not None:
        res = r.result
        lines += ["result:", f"  outcome:     {res.outcome}"]
        if res.error is not None:
            lines += [f"  error:       {res.error} (stage {res.stage})"]
        if res.text is not None:
            usage = f"{res.prompt_tokens} prompt + {res.completion_tokens} completion tokens"
            lines += [f"  usage:       {usage}", f"  finish:      {res.finish_reason}", "  text:"]
            lines += _indent(res.text)
    if item.replays:
        lines.append("replays:")
        lines += [replay_line(m) for m in item.replays]
    else:
        lines.append("replays:  none")
    return "\n".join(lines)


def replay_line(m: ReplayMarker) -> str:
    detail = f" ({m.message})" if m.message else ""
    new_id = m.new_request_id or "(not accepted)"
    return f"  {when(m.ts)}  -> {new_id}: {m.outcome}{detail}"


def _indent(text: str) -> list[str]:
    return [f"    {line}" for line in text.splitlines() or [""]]


def when(ts: float, precise: bool = False) -> str:
    moment = datetime.datetime.fromtimestamp(ts)
    return moment.isoformat(" ", "milliseconds" if precise else "seconds")


def _clip(text: str | None) -> str:
    if text is None:
        return ""
    shown = json.dumps(text, ensure_ascii=False)
    if len(shown) <= _INPUT_COLUMN:
        return shown
    return shown[: _INPUT_COLUMN - 2] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), *map(line, rows)])
