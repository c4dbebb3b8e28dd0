"""``mpipeline dlq list|show|replay``: the operator's side of the dead-letter queue.

Listing and showing only read ``<run_dir>/dlq.jsonl`` and its rotated files
(``dlq.1.jsonl``...), so they work with or without a pipeline running. Replay
needs one: it claims the records it will take (so that two replays at once
never both submit one), attaches as an API client, submits each record's
request again as the client first sent it, and appends a ``replayed`` marker
per record, so the file keeps the whole history and ``replay --all`` never
resubmits a request twice (``_dlq_replay``).

Only argparse and the standard library are imported at module level: the
parser is built on every ``mpipeline`` call, the runtime only when a handler
runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mpipeline.errors import ExitCode, MPipelineError
from mpipeline.ops import _dlq_render as render
from mpipeline.ops.args import add_where

if TYPE_CHECKING:
    from mpipeline.dlq import Listed


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``dlq`` command and its actions."""
    dlq = commands.add_parser(
        "dlq",
        help="list, show and replay failed requests",
        description="Every accepted request that ended in an error is in the dead-letter "
        "queue (<run_dir>/dlq.jsonl, and dlq.1.jsonl... once rotated) with its payload and "
        "the reason.",
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
        "--all takes every record with a whole request that no replay was accepted for "
        "yet and no other running replay holds. Exits 1 if any replay failed.",
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
    """``10m``, ``2h``... before ``now``, or an ISO 8601 time (local if no zone): unix time.

    ``mpipeline.dlq.parse_since`` (shared with the MCP tools), loaded only when
    ``--since`` is given, as argparse wants its refusal.
    """
    from mpipeline.dlq import parse_since as since

    try:
        return since(text, now)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        out.writelines(json.dumps(render.as_json(item)) + "\n" for item in items)
        return int(ExitCode.OK)
    if items:
        rows = [render.list_row(item) for item in items]
        head = ("ID", "TIME", "REASON", "STAGE", "REPLAYED", "INPUT")
        out.write(render.table(head, rows) + "\n")
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
        out.writelines(json.dumps(render.as_json(item), indent=2) + "\n" for item in items)
    else:
        out.write("\n\n".join(render.describe(item) for item in items) + "\n")
    return int(ExitCode.OK)


def handle_replay(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr  # looked up now, so a test can capture them
    from mpipeline.ops._dlq_replay import claim_and_replay
    from mpipeline.rundir import lock_holder

    if bool(args.ids) == bool(args.all):
        err.write("mpipeline dlq replay: name the records to replay, or --all (not both)\n")
        return int(ExitCode.USAGE)
    path = _dlq_path(args, err)
    if path is None:
        return int(ExitCode.USAGE)
    items = _load(path, err, reasons=args.reason, since=args.since, ids=args.ids)
    items, bad = _pending(items, err) if args.all else _named(items, args.ids, err)
    if not items:
        out.write("nothing to replay\n")
        return int(ExitCode.FAILURE if bad else ExitCode.OK)
    if lock_holder(path.parent) is None:
        err.write(f"mpipeline dlq replay: no supervisor is running in {path.parent}\n")
        return int(ExitCode.FAILURE)
    try:
        done, failed = claim_and_replay(
            path,
            items,
            only_pending=args.all,
            deadline_ms=args.deadline_ms,
            timeout_s=args.timeout,
            out=out,
            err=err,
        )
    except (MPipelineError, OSError) as exc:  # no slot free, the pipeline went away...
        err.write(f"mpipeline dlq replay: {exc}\n")
        return int(ExitCode.FAILURE)
    if not done:
        out.write("nothing to replay\n")
    else:
        out.write(f"replayed {done}: {done - failed} ok, {failed} failed\n")
    # A named record another replay holds was not replayed here: say so in the status.
    bad += 0 if args.all else len(items) - done
    return int(ExitCode.FAILURE if failed or bad else ExitCode.OK)


def _pending(items: list[Listed], err: TextIO) -> tuple[list[Listed], int]:
    """What ``--all`` takes: records with a whole request and no accepted replay yet."""
    cut = sum(1 for item in items if item.record.request is not None and not item.replayable)
    if cut:
        err.write(f"{cut} records were cut to fit the DLQ's record cap; they are not replayed\n")
    return [item for item in items if item.pending_replay], 0


def _named(items: list[Listed], ids: list[str], err: TextIO) -> tuple[list[Listed], int]:
    """The named records that can be replayed (one per id), and how many cannot."""
    bad = 0
    found = {item.record.id for item in items}
    for rid in dict.fromkeys(ids):
        if rid not in found:
            err.write(f"{rid}: no such record (or filtered out)\n")
            bad += 1
    for item in items:
        if item.record.request is None:
            err.write(f"{item.record.id}: a {item.record.reason} record holds no request\n")
            bad += 1
        elif not item.replayable:
            err.write(
                f"{item.record.id}: the record was cut to fit the DLQ's record cap; "
                "its request is not whole and is not replayed\n"
            )
            bad += 1
    # One replay per id even if it failed more than once (a gone client's twin).
    chosen = {item.record.id: item for item in items if item.replayable}
    return list(chosen.values()), bad


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
