"""The operator commands' parsers and handlers: ``status``, ``top``, ``profile``, ``dlq``.

Each handler imports its view when it runs, so the parser stays as cheap as
argparse (``mpipeline --help`` never loads the runtime).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpipeline.ops import dlq, index
from mpipeline.ops.args import add_where, positive_int


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands that look at (or, reload, reconfigure) a running pipeline."""
    dlq.add_parser(commands)
    index.add_parser(commands)
    status = commands.add_parser("status", help="replicas and rings of the running pipeline")
    add_where(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    reload = commands.add_parser(
        "reload",
        help="re-read the config file of the running pipeline and apply it live",
        description="Ask the running supervisor to re-read its config file (SIGHUP does the "
        "same), validate it and apply it without closing the socket: live settings at once, "
        "settings read at start by a rolling restart of just the affected replicas. An "
        "invalid file, or one that needs a full restart, changes nothing and says why "
        "(exit 2 invalid, 1 refused or failed).",
    )
    add_where(reload)
    reload.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=None,
        help="also set the log level of every process",
    )
    reload.add_argument(
        "--set",
        action="append",
        default=[],
        type=_setting,
        metavar="FIELD=VALUE",
        help="set a live field over the file's value until the next reload (repeatable), "
        "e.g. gateway.timeout_s=12",
    )
    reload.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="wait this long (default 60)"
    )
    reload.add_argument("--json", action="store_true", help="machine-readable output")
    reload.set_defaults(handler=_reload)

    profile = commands.add_parser(
        "profile",
        help="sample a running replica with py-spy",
        description="Record a flamegraph of one replica with py-spy, or print its hottest "
        "functions (--top). The pipeline is only read, never changed.",
    )
    profile.add_argument("replica", metavar="STAGE[-REPLICA]", help="e.g. assemble or inference-1")
    add_where(profile)
    profile.add_argument("--duration", type=positive_int, default=10, metavar="S")
    profile.add_argument("--output", type=Path, default=None, metavar="FILE.svg")
    profile.add_argument("--top", action="store_true", help="print the hottest functions")
    profile.add_argument("--limit", type=positive_int, default=20, metavar="N", help="for --top")
    profile.add_argument("--rate", type=positive_int, default=100, metavar="HZ")
    profile.add_argument("--idle", action="store_true", help="include waiting stacks")
    profile.add_argument("--nonblocking", action="store_true", help="never pause the replica")
    profile.set_defaults(handler=_profile)

    top = commands.add_parser(
        "top",
        help="live dashboard of the running pipeline",
        description="A live terminal dashboard: stage rates and latencies, ring fill, "
        "throughput, circuits, dedup savings, CPU per core and recent errors. Keys: q quit, "
        "p pause, r reset, h help.",
    )
    add_where(top)
    top.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes (default 1)",
    )
    top.add_argument(
        "--once", action="store_true", help="print one text snapshot (two reads S apart) and exit"
    )
    top.set_defaults(handler=_top)


def _status(args: argparse.Namespace) -> int:
    from mpipeline.ops import status

    return status.main(args.run_dir, args.config, as_json=args.json, out=sys.stdout, err=sys.stderr)


def _reload(args: argparse.Namespace) -> int:
    from mpipeline.ops import reload

    return reload.main(
        args.run_dir,
        args.config,
        log_level=args.log_level,
        settings=dict(args.set),
        timeout_s=args.timeout,
        as_json=args.json,
        out=sys.stdout,
        err=sys.stderr,
    )


def _setting(text: str) -> tuple[str, object]:
    from mpipeline.ops.reload import parse_setting

    try:
        return parse_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _top(args: argparse.Namespace) -> int:
    from mpipeline.ops import top

    return top.main(
        args.run_dir,
        args.config,
        interval=args.interval,
        once=args.once,
        out=sys.stdout,
        err=sys.stderr,
    )


def _profile(args: argparse.Namespace) -> int:
    from mpipeline.ops import profile as profiling

    how = profiling.Sampling(args.duration, args.rate, args.idle, args.nonblocking)
    return profiling.main(
        args.replica,
        args.run_dir,
        args.config,
        how,
        output=args.output,
        top=args.top,
        limit=args.limit,
        out=sys.stdout,
        err=sys.stderr,
    )
