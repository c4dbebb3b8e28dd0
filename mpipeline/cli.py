"""The ``mpipeline`` command: parse the command line and dispatch, nothing more.

``run``, ``config`` and ``shm`` are here; the operator commands (``status``,
``top``, ``profile``, ``dlq``) add their parsers from ``ops.cli`` and
``bench`` from ``bench.cli``. Each handler imports what it needs when it
runs, so ``mpipeline --help`` and argument errors stay fast and never import
the runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mpipeline import __version__
from mpipeline.bench import cli as bench_cli
from mpipeline.errors import ConfigError, ExitCode
from mpipeline.ops import cli as ops_cli
from mpipeline.ops.args import DEFAULT_CONFIG

# The same as mpipeline.logs.FORMAT_ENV and FORMATS, which `run` alone imports.
LOG_FORMAT_ENV = "MPIPELINE_LOG_FORMAT"
LOG_FORMATS = ("auto", "text", "json")

Handler = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpipeline",
        description="A multi-core pipeline for LLM inference requests.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the pipeline in the foreground")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="FILE")
    run.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="lock, state and client slots (default: from the config)",
    )
    run.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help=f"text for people, JSON lines for log shippers (default: ${LOG_FORMAT_ENV}, "
        "else auto = text)",
    )
    run.set_defaults(handler=_run)
    bench_cli.add_parser(commands)
    ops_cli.add_parsers(commands)

    config = commands.add_parser("config", help="check or print the configuration")
    config_commands = config.add_subparsers(
        title="config commands", required=True, metavar="ACTION"
    )
    validate = config_commands.add_parser("validate", help="check a config file")
    _add_config_file(validate)
    validate.set_defaults(handler=_config_validate)
    schema = config_commands.add_parser("schema", help="print the config JSON schema")
    schema.set_defaults(handler=_config_schema)
    show = config_commands.add_parser("show", help="print the effective config as TOML")
    _add_config_file(show)
    show.set_defaults(handler=_config_show)

    shm = commands.add_parser("shm", help="manage shared-memory segments")
    shm_commands = shm.add_subparsers(title="shm commands", required=True, metavar="ACTION")
    sweep = shm_commands.add_parser("sweep", help="remove segments left by dead runs")
    sweep.set_defaults(handler=_shm_sweep)
    return parser


def _run(args: argparse.Namespace) -> int:
    import logging

    from mpipeline import supervisor

    fmt = args.log_format or os.environ.get(LOG_FORMAT_ENV, "auto")
    if fmt not in LOG_FORMATS:
        print(
            f"mpipeline run: ${LOG_FORMAT_ENV} must be one of {', '.join(LOG_FORMATS)}: {fmt!r}",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    # Spawned replicas inherit os.environ: this is how they learn the format.
    os.environ[LOG_FORMAT_ENV] = fmt
    level = logging.DEBUG if args.verbose else logging.INFO
    return supervisor.main(args.config, args.run_dir, args.parent_pid, level)


def _add_config_file(parser: argparse.ArgumentParser) -> None:
    """The file as a positional argument or as ``--config FILE``, like every other command."""
    parser.add_argument("file", type=Path, nargs="?", default=None, metavar="FILE")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"the same as FILE (default {DEFAULT_CONFIG})",
    )


def _config_file(args: argparse.Namespace) -> Path | None:
    """The one config file the command names (default ``DEFAULT_CONFIG``); None if two."""
    if args.file is not None and args.config is not None and args.file != args.config:
        print(f"name one config file, not {args.file} and {args.config}", file=sys.stderr)
        return None
    path: Path = args.file or args.config or DEFAULT_CONFIG
    return path


def _config_validate(args: argparse.Namespace) -> int:
    from mpipeline import config

    path = _config_file(args)
    if path is None:
        return ExitCode.USAGE
    try:
        issues = config.validate(path)
    except (ConfigError, OSError) as exc:
        return _config_failed(path, exc)
    for issue in issues:
        print(issue, file=sys.stderr)
    if issues:
        return ExitCode.USAGE
    print(f"{path}: ok")
    return ExitCode.OK


def _config_schema(args: argparse.Namespace) -> int:
    import json

    from mpipeline import config

    print(json.dumps(config.json_schema(), indent=2))
    return ExitCode.OK


def _config_show(args: argparse.Namespace) -> int:
    from mpipeline import config

    path = _config_file(args)
    if path is None:
        return ExitCode.USAGE
    try:
        text = config.dump_toml(config.load(path))
    except (ConfigError, OSError) as exc:
        return _config_failed(path, exc)
    print(text, end="" if text.endswith("\n") else "\n")
    return ExitCode.OK


def _config_failed(path: Path, exc: ConfigError | OSError) -> int:
    # config.py maps read errors to ConfigError; an OSError that slips past still reads well.
    if isinstance(exc, OSError):
        print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
    else:
        print(exc, file=sys.stderr)
    return ExitCode.USAGE


def _shm_sweep(args: argparse.Namespace) -> int:
    from mpipeline import _shm

    removed = _shm.sweep_stale()
    for name in removed:
        print(name)
    print(f"removed {len(removed)} stale segments")
    return ExitCode.OK
