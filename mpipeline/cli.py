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
from mpipeline.mcp import cli as mcp_cli
from mpipeline.ops import cli as ops_cli
from mpipeline.ops.args import CONFIG_DEFAULTS, port_number

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

    run = commands.add_parser(
        "run",
        help="run the pipeline in the foreground",
        description="Run the pipeline in the foreground until SIGTERM or Ctrl-C. With no "
        "config file it runs on the built-in defaults (`mpipeline config init` writes them "
        "out); --host, --port and --metrics-port override the config.",
    )
    run.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_DEFAULTS)
    run.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="lock, state and client slots (default: from the config)",
    )
    run.add_argument("--host", default=None, help="the gateway's listen address (gateway.host)")
    run.add_argument(
        "--port",
        type=port_number,
        default=None,
        help="the gateway's port, 0 for any free one (gateway.port)",
    )
    run.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="the /metrics port, 0 for any free one (metrics.port)",
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
    mcp_cli.add_parser(commands)

    config = commands.add_parser("config", help="check, print or write the configuration")
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
    _add_config_writers(config_commands)
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
    return supervisor.main(args.config, args.run_dir, args.parent_pid, level, run_overrides(args))


def run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The config fields that ``run``'s --host, --port and --metrics-port replace."""
    given = {
        "gateway.host": args.host,
        "gateway.port": args.port,
        "metrics.port": args.metrics_port,
    }
    return {field: value for field, value in given.items() if value is not None}


def _add_config_file(parser: argparse.ArgumentParser) -> None:
    """The file as a positional argument or as ``--config FILE``, like every other command."""
    parser.add_argument(
        "file", type=Path, nargs="?", default=None, metavar="FILE", help=CONFIG_DEFAULTS
    )
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="the same as FILE"
    )


def _add_config_writers(
    config_commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """``config init`` and ``config export``: what a package user starts from."""
    init = config_commands.add_parser(
        "init",
        help="write the commented default config",
        description="Write pipeline.toml with every field, its default and what it does: "
        "to FILE, or to standard output without one. Exit 2 if FILE exists (--force "
        "overwrites it), 1 if it cannot be written.",
    )
    init.add_argument("file", type=Path, nargs="?", default=None, metavar="FILE")
    init.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    init.set_defaults(handler=_config_init)
    export = config_commands.add_parser(
        "export",
        help="write the default config, Grafana dashboard and Prometheus files",
        description="Write into DIR (made if missing) the files mpipeline ships: "
        "pipeline.toml (the commented default config), grafana/mpipeline.json (the "
        "dashboard), prometheus/alerts.yml (the alert rules) and prometheus/prometheus.yml "
        "(an example Prometheus config loading them). Nothing is written if one exists, "
        "unless --force (exit 2); exit 1 if one cannot be written.",
    )
    export.add_argument("dir", type=Path, metavar="DIR")
    export.add_argument("--force", action="store_true", help="overwrite files that exist")
    export.set_defaults(handler=_config_export)


def _named_config(args: argparse.Namespace) -> tuple[bool, Path | None]:
    """(ok, the config file the command names, or None); not ok if it names two."""
    if args.file is not None and args.config is not None and args.file != args.config:
        print(f"name one config file, not {args.file} and {args.config}", file=sys.stderr)
        return False, None
    named: Path | None = args.file or args.config
    return True, named


def _config_validate(args: argparse.Namespace) -> int:
    from mpipeline import config

    ok, named = _named_config(args)
    if not ok:
        return ExitCode.USAGE
    path = config.locate(named)
    try:
        issues = config.validate(path)
    except (ConfigError, OSError) as exc:
        return _config_failed(path, exc)
    for issue in issues:
        print(issue, file=sys.stderr)
    if issues:
        return ExitCode.USAGE
    print(f"{path or config.DEFAULTS}: ok")
    return ExitCode.OK


def _config_schema(args: argparse.Namespace) -> int:
    import json

    from mpipeline import config

    print(json.dumps(config.json_schema(), indent=2))
    return ExitCode.OK


def _config_show(args: argparse.Namespace) -> int:
    """The config a run here would use: the named file, else the one ``run`` would
    find, else the built-in defaults."""
    from mpipeline import config

    ok, named = _named_config(args)
    if not ok:
        return ExitCode.USAGE
    path = config.locate(named)
    try:
        text = config.dump_toml(config.load(path))
    except (ConfigError, OSError) as exc:
        return _config_failed(path, exc)
    print(text, end="" if text.endswith("\n") else "\n")
    return ExitCode.OK


def _config_failed(path: Path | None, exc: ConfigError | OSError) -> int:
    # config.py maps read errors to ConfigError; an OSError that slips past still reads well.
    if isinstance(exc, OSError):
        print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
    else:
        print(exc, file=sys.stderr)
    return ExitCode.USAGE


def _config_init(args: argparse.Namespace) -> int:
    from mpipeline import config

    text = config.default_toml()
    if args.file is None:
        print(text, end="")
        return ExitCode.OK
    path: Path = args.file

    def write() -> list[Path]:
        config.write_new(path, text.encode(), args.force)
        return [path]

    return _write_out(write)


def _config_export(args: argparse.Namespace) -> int:
    from mpipeline import config

    return _write_out(lambda: config.export(args.dir, args.force))


def _write_out(write: Callable[[], list[Path]]) -> int:
    """Run ``write`` and list what it wrote; an existing file without --force is
    refused (exit 2), any other OS error reported (exit 1)."""
    try:
        written = write()
    except FileExistsError as exc:
        print(f"{exc.filename}: exists; --force overwrites it", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        print(f"cannot write {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.FAILURE
    for path in written:
        print(f"wrote {path}")
    return ExitCode.OK


def _shm_sweep(args: argparse.Namespace) -> int:
    from mpipeline import _shm

    removed = _shm.sweep_stale()
    for name in removed:
        print(name)
    print(f"removed {len(removed)} stale segments")
    return ExitCode.OK
