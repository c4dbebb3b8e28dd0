"""``python -m mpipeline.gateway --config FILE``: the pipeline with its HTTP gateway.

The same as ``mpipeline run``: the supervisor binds the gateway's socket and
runs ``gateway.replicas`` gateway processes on it. Kept as the entry point
that says what it is for, and that refuses a config with no gateway.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mpipeline import cli
from mpipeline.config import DEFAULTS, ConfigError, load, locate
from mpipeline.errors import ExitCode


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.build_parser().parse_args(["run", *(sys.argv[1:] if argv is None else argv)])
    path = locate(args.config)  # the file `mpipeline run` would take
    try:
        cfg = load(path, cli.run_overrides(args))
    except ConfigError as exc:
        sys.stderr.write(f"invalid configuration:\n{exc}\n")
        return ExitCode.USAGE
    if cfg.gateway.replicas == 0:
        sys.stderr.write(f"{path or DEFAULTS}: gateway.replicas is 0: no HTTP gateway to run\n")
        return ExitCode.USAGE
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
