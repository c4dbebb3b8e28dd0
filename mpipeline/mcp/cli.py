"""``mpipeline mcp``: its parser, and the handler that finds the run and serves.

Only argparse and the standard library at module level: the parser is built
on every ``mpipeline`` call, the SDK and the runtime load when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from mpipeline.errors import ExitCode
from mpipeline.ops.args import add_where


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mcp = commands.add_parser(
        "mcp",
        help="serve MCP (Model Context Protocol) on stdio for AI agents",
        description="Attach to the running pipeline and serve MCP on standard input and "
        "output until the client closes its side: tools infer, batch_infer, "
        "pipeline_status, dlq_list, dlq_replay and configure (live settings, as "
        "`mpipeline reload --set`); resources mpipeline://config/effective "
        "and mpipeline://metrics. Exit 1 when no pipeline runs there, 2 on a bad config.",
    )
    add_where(mcp)
    mcp.set_defaults(handler=_mcp)


def _mcp(args: argparse.Namespace) -> int:
    import asyncio

    from mpipeline.errors import ConfigError, MPipelineError
    from mpipeline.mcp.server import serve_stdio
    from mpipeline.rundir import check, find_run_dir, lock_holder

    err = sys.stderr  # stdout carries the protocol and nothing else
    try:
        run_dir = find_run_dir(args.run_dir, args.config)
        check(run_dir)
    except ConfigError as exc:
        err.write(f"mpipeline mcp: invalid configuration:\n{exc}\n")
        return int(ExitCode.USAGE)
    except MPipelineError as exc:
        err.write(f"mpipeline mcp: {exc}\n")
        return int(ExitCode.FAILURE)
    if lock_holder(run_dir) is None:
        err.write(f"mpipeline mcp: no supervisor is running in {run_dir}\n")
        return int(ExitCode.FAILURE)
    try:
        asyncio.run(serve_stdio(run_dir))
    except (MPipelineError, OSError) as exc:  # no client slot free, the pipeline went away...
        err.write(f"mpipeline mcp: {exc}\n")
        return int(ExitCode.FAILURE)
    except KeyboardInterrupt:
        return int(ExitCode.OK)
    err.write(f"mpipeline mcp: the client closed the connection; detached from {run_dir}\n")
    return int(ExitCode.OK)
