"""``mpipeline dlq list|show|replay``: the operator's side of the dead-letter queue.

Listing and showing only read ``<run_dir>/dlq.jsonl``, so they work with or
without a pipeline running. Replay needs one: it attaches as an API client,
submits each record's request again as the client first sent it, and appends
a ``replayed`` marker per record, so the file keeps the whole history and
``replay --all`` never resubmits a request twice.

Only argparse and the standard library are imported at module level: the
parser is built on every ``mpipeline`` call, the runtime only when a handler
runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mpipeline.errors import ExitCode, MPipelineError
from mpipeline.ops.args import add_where

if TYPE_CHECKING:
    from mpipeline.dlq import Listed, ReplayMarker
    from mpipeline.pipeline import Pipeline

# Replays in flight at once: enough to drain a backlog fast, few enough that a
# replay never sheds its own requests on a pipeline that is just recovering.
REPLAY_CONCURRENCY = 32
_INPUT_COLUMN = 40
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``dlq`` command and its actions."""
    dlq = commands.add_parser(
        "dlq",
        help="list, show and replay failed requests",
        description="Every accepted request that ended in an error is in the dead-letter "
        "queue (<run_dir>/dlq.jsonl) with its full payload and the reason.",
    )
    actions = dlq.add_subparsers(title="dlq commands", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="one line per record, oldest first")
    add_where(listing)
    _add_filters(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=handle_list)

    show = actions.add_parser("show", help="one record in full")
    show.add_argument("id", metavar="ID", help="the request id the client saw")
    add_where(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=handle_show)

    replay = actions.add_parser(
        "replay",
        help="resubmit records to the running pipeline",
        description="Submit each record's request again (same input, session, metadata, "
        "priority, max_tokens and deadline; never streaming) and wait for the outcomes. "
        "--all takes every record with a request that no replay was accepted for yet. "
        "Exits 1 if any replay failed.",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="records to replay")
    replay.add_argument("--all", action="store_true", help="every record not yet replayed")
    add_where(replay)
    _add_filters(replay)
    replay.add_argument(
        "--deadline-ms",
        type=_positive_float,
        default=None,
        metavar="MS",
        help="deadline for every replay instead of each record's own",
    )
    replay.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="deadline for records that carry none (default 30)",
    )
    replay.set_defaults(handler=handle_replay)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reason",
        action="append",
        default=[],
        metavar="CODE",
        help="only records with this reason (deadline_exceeded, ring_full...); repeatable",
    )
    parser.add_argument(
        "--since",
        type=parse_since,
        default=None,
        metavar="WHEN",
        help="only records from this long ago (30s, 10m, 2h, 1d) or since an ISO time",
    )


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``, ``2h``... before ``now``, or an ISO 8601 time (local if no zone): unix time."""
    match = _DURATION.match(text)
    if match:
        ago = float(match.group(1)) * _UNIT_S[match.group(2)]
        return (time.time() if now is None else now) - ago
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration (30s, 10m, 2h, 1d) or an ISO time: {text!r}"
        ) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


# Handlers


def handle_list(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr  # looked up now, so a test can capture them
    path = _dlq_path(args, err)
    if path is None:
        return int(ExitCode.USAGE)
    items = _load(path, err, reasons=args.reason, since=args.since)
    if args.json:
        out.writelines(json.dumps(_as_json(item)) + "\n" for item in items)
        return int(ExitCode.OK)
    if items:
        rows = [_list_row(item) for item in items]
        out.write(_table(("ID", "TIME", "REASON", "STAGE", "REPLAYED", "INPUT"), rows) + "\n")
    waiting = sum(item.pending_replay for item in items)
    out.write(f"{len(items)} records in {path} ({waiting} not replayed)\n")
    return int(ExitCode.OK)


def handle_show(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr  # looked up now, so a test can capture them
    path = _dlq_path(args, err)
    if path is None:
        return int(ExitCode.USAGE)
    items = _load(path, err, ids=[args.id])
    if not items:
        err.write(f"mpipeline dlq show: no record {args.id!r} in {path}\n")
        return int(ExitCode.FAILURE)
    if args.json:
        out.writelines(json.dumps(_as_json(item), indent=2) + "\n" for item in items)
    else:
        out.write("\n\n".join(_describe(item) for item in items) + "\n")
    return int(ExitCode.OK)


def handle_replay(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr  # looked up now, so a test can capture them
    import asyncio

    from mpipeline.rundir import lock_holder

    if bool(args.ids) == bool(args.all):
        err.write("mpipeline dlq replay: name the records to replay, or --all (not both)\n")
        return int(ExitCode.USAGE)
    path = _dlq_path(args, err)
    if path is None:
        return int(ExitCode.USAGE)
    items = _load(path, err, reasons=args.reason, since=args.since, ids=args.ids)
    bad = 0
    if args.all:
        items = [item for item in items if item.pending_replay]
    else:
        found = {item.record.id for item in items}
        for rid in dict.fromkeys(args.ids):
            if rid not in found:
                err.write(f"{rid}: no such record (or filtered out)\n")
                bad += 1
        for item in items:
            if item.record.request is None:
                err.write(f"{item.record.id}: a {item.record.reason} record holds no request\n")
                bad += 1
        items = [item for item in items if item.record.request is not None]
        # One replay per id even if it failed more than once (a gone client's twin).
        items = list({item.record.id: item for item in items}.values())
    if not items:
        out.write("nothing to replay\n")
        return int(ExitCode.FAILURE if bad else ExitCode.OK)
    if lock_holder(path.parent) is None:
        err.write(f"mpipeline dlq replay: no supervisor is running in {path.parent}\n")
        return int(ExitCode.FAILURE)
    try:
        failed = asyncio.run(_replay(path, items, args.deadline_ms, args.timeout, out))
    except (MPipelineError, OSError) as exc:  # no slot free, the pipeline went away...
        err.write(f"mpipeline dlq replay: {exc}\n")
        return int(ExitCode.FAILURE)
    out.write(f"replayed {len(items)}: {len(items) - failed} ok, {failed} failed\n")
    return int(ExitCode.FAILURE if failed or bad else ExitCode.OK)


async def _replay(
    path: Path, items: list[Listed], deadline_ms: float | None, timeout_s: float, out: TextIO
) -> int:
    """Resubmit every item and record a marker per outcome; the number that failed."""
    import asyncio

    from mpipeline.dlq import DeadLetterQueue
    from mpipeline.pipeline import Pipeline

    dlq = DeadLetterQueue(path)
    gate = asyncio.Semaphore(REPLAY_CONCURRENCY)
    failed = 0

    async def one(p: Pipeline, item: Listed) -> None:
        nonlocal failed
        async with gate:
            marker = await _resubmit(p, item, deadline_ms)
        # On disk before it is reported, like the records themselves.
        await dlq.record((marker,))
        failed += marker.outcome != "ok"
        detail = f" ({marker.message})" if marker.message else ""
        new_id = marker.new_request_id or "(not accepted)"
        out.write(f"{marker.replay_of} -> {new_id}: {marker.outcome}{detail}\n")
        out.flush()

    try:
        async with Pipeline.attach(path.parent, timeout_s=timeout_s) as p:
            await asyncio.gather(*(one(p, item) for item in items))
    finally:
        await dlq.aclose()
    return failed


async def _resubmit(p: Pipeline, item: Listed, deadline_ms: float | None) -> ReplayMarker:
    from mpipeline.dlq import ReplayMarker
    from mpipeline.errors import RequestFailed

    req = item.record.request
    assert req is not None
    try:
        done = await p.submit(
            req.input,
            session_id=req.session_id,
            metadata=dict(req.metadata),
            priority=req.priority_value(),
            deadline_ms=deadline_ms if deadline_ms is not None else req.deadline_ms,
            max_tokens=req.max_tokens,
        )
    except RequestFailed as exc:
        return ReplayMarker(
            replay_of=item.record.id,
            ts=time.time(),
            # "" when refused before acceptance: nothing reached the pipeline.
            new_request_id=exc.request_id or None,
            outcome=str(exc.code),
            message=exc.failed.reason,
        )
    return ReplayMarker(
        replay_of=item.record.id, ts=time.time(), new_request_id=done.request_id, outcome="ok"
    )


# Reading and rendering


def _dlq_path(args: argparse.Namespace, err: TextIO) -> Path | None:
    """The DLQ file of the run dir the arguments name; None (said on ``err``) when the
    config is invalid or the run dir is one another user could have planted records in."""
    from mpipeline.dlq import DLQ_FILE
    from mpipeline.errors import ConfigError
    from mpipeline.rundir import check, find_run_dir

    try:
        run_dir = find_run_dir(args.run_dir, args.config)
        if os.path.lexists(run_dir):
            check(run_dir)
    except ConfigError as exc:
        err.write(f"mpipeline dlq: invalid configuration:\n{exc}\n")
        return None
    except MPipelineError as exc:
        err.write(f"mpipeline dlq: {exc}\n")
        return None
    return run_dir / DLQ_FILE


def _load(
    path: Path,
    err: TextIO,
    *,
    reasons: Sequence[str] = (),
    since: float | None = None,
    ids: Sequence[str] = (),
) -> list[Listed]:
    from mpipeline.dlq import listing, read_entries

    def warn(text: str) -> None:
        err.write(f"warning: {text}\n")

    return listing(read_entries(path, warn), reasons=reasons, since=since, ids=ids)


def _as_json(item: Listed) -> dict[str, Any]:
    import msgspec

    record: dict[str, Any] = msgspec.to_builtins(item.record)
    record["replays"] = msgspec.to_builtins(item.replays)
    return record


def _list_row(item: Listed) -> tuple[str, ...]:
    r = item.record
    text = r.request.input if r.request is not None else (r.result.text if r.result else None)
    return (r.id, _when(r.ts), r.reason, r.stage, _replay_cell(item), _clip(text))


def _replay_cell(item: Listed) -> str:
    if item.record.request is None:
        return "n/a"
    m = item.replayed
    if m is None:
        return "-"
    return f"{m.new_request_id or '(not accepted)'} {m.outcome}"


def _describe(item: Listed) -> str:
    r = item.record
    lines = [
        f"id:       {r.id}",
        f"time:     {_when(r.ts, precise=True)} ({r.ts:.3f})",
        f"reason:   {r.reason}",
        f"stage:    {r.stage}",
        f"message:  {r.message}",
    ]
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
        lines += [_replay_line(m) for m in item.replays]
    else:
        lines.append("replays:  none")
    return "\n".join(lines)


def _replay_line(m: ReplayMarker) -> str:
    detail = f" ({m.message})" if m.message else ""
    new_id = m.new_request_id or "(not accepted)"
    return f"  {_when(m.ts)}  -> {new_id}: {m.outcome}{detail}"


def _indent(text: str) -> list[str]:
    return [f"    {line}" for line in text.splitlines() or [""]]


def _when(ts: float, precise: bool = False) -> str:
    moment = datetime.datetime.fromtimestamp(ts)
    return moment.isoformat(" ", "milliseconds" if precise else "seconds")


def _clip(text: str | None) -> str:
    if text is None:
        return ""
    shown = json.dumps(text, ensure_ascii=False)
    if len(shown) <= _INPUT_COLUMN:
        return shown
    return shown[: _INPUT_COLUMN - 2] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), *map(line, rows)])
