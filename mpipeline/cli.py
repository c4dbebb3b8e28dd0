"""The ``mpipeline`` command: parse the command line and dispatch, nothing more.

Each handler imports what it needs when it runs, so ``mpipeline --help`` and
argument errors stay fast and never import the runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mpipeline import __version__
from mpipeline.errors import ConfigError, ExitCode

DEFAULT_CONFIG = Path("config/pipeline.toml")
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
    _add_bench(commands)
    _add_dlq(commands)
    _add_status_profile(commands)

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


# bench


def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench",
        help="throughput, latency and CPU per core count",
        description="Drive the echo pipeline at full speed and at fixed rates for each core "
        "count, beside a single-process asyncio pipeline running the same stage code.",
    )
    bench.add_argument(
        "--cores",
        type=_int_list,
        default=(1, 2),
        metavar="1,2,4",
        help="core counts to measure; counts above the affinity are skipped",
    )
    amount = bench.add_mutually_exclusive_group()
    amount.add_argument(
        "--requests",
        type=int,
        default=None,
        metavar="N",
        help="full-speed phase: this many requests",
    )
    amount.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="full-speed phase: this many seconds (default 5)",
    )
    bench.add_argument(
        "--rates",
        type=_float_list,
        default=None,
        metavar="1000,5000",
        help="fixed-rate phases for latency, req/s (default 1000,5000,20000)",
    )
    bench.add_argument(
        "--rate-duration",
        type=float,
        default=None,
        metavar="S",
        help="seconds per fixed-rate phase (default 4)",
    )
    bench.add_argument(
        "--window",
        type=int,
        default=None,
        metavar="N",
        help="requests in flight at full speed (default 512 per rag replica)",
    )
    bench.add_argument(
        "--shared-cores",
        action="store_true",
        help="let every replica run on all c cores instead of one each",
    )
    bench.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the single-process asyncio pipeline (default on)",
    )
    bench.add_argument(
        "--http",
        action="store_true",
        help="drive the HTTP gateway with wrk beside a uvicorn+starlette peer instead "
        "(--cores, --duration, --baseline, --quick, --json apply)",
    )
    bench.add_argument(
        "--connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="--http: wrk's keep-alive connections (default 64)",
    )
    bench.add_argument(
        "--wrk-cpus",
        type=_cpu_list,
        default=None,
        metavar="0,1",
        help="--http: cores for wrk and the probes (default: the cores under test)",
    )
    bench.add_argument(
        "--metrics",
        choices=("on", "off", "both"),
        default="on",
        help="count metrics in the stages and serve /metrics (default on, as deployed); "
        "both: each core count with metrics on, then off, and the cost between them",
    )
    bench.add_argument("--quick", action="store_true", help="short phases (a smoke test)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.add_argument("--json", type=Path, default=None, metavar="FILE")
    bench.add_argument("--plot", type=Path, default=None, metavar="FILE.png")
    bench.set_defaults(handler=_bench)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"core counts must be >= 1: {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be > 0: {text!r}")
    return values


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of core ids: {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"core ids must be >= 0: {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    if args.http:
        return _bench_http(args)
    if args.connections is not None or args.wrk_cpus is not None:
        print("mpipeline bench: --connections and --wrk-cpus need --http", file=sys.stderr)
        return ExitCode.USAGE
    from mpipeline.bench import cores as benchmark

    opts = benchmark.options(
        quick=args.quick,
        cores=args.cores,
        requests=args.requests,
        duration_s=args.duration,
        rates=args.rates,
        rate_duration_s=args.rate_duration,
        window=args.window,
        baseline=args.baseline,
        progress=not args.no_progress,
        json_path=args.json,
        plot_path=args.plot,
        shared=args.shared_cores,
        metrics=args.metrics,
    )
    _bench_logging()
    return benchmark.main(opts)


def _bench_http(args: argparse.Namespace) -> int:
    from mpipeline.bench import over_http as _bench_http

    misfits = {
        "--requests": args.requests is not None,
        "--rates": args.rates is not None,
        "--rate-duration": args.rate_duration is not None,
        "--window": args.window is not None,
        "--shared-cores": args.shared_cores,
        "--plot": args.plot is not None,
    }
    unused = [flag for flag, given in misfits.items() if given]
    if unused:
        print(f"mpipeline bench: {', '.join(unused)} do not apply to --http", file=sys.stderr)
        return ExitCode.USAGE
    opts = _bench_http.options(
        quick=args.quick,
        cores=args.cores,
        duration_s=args.duration,
        connections=args.connections,
        wrk_cpus=args.wrk_cpus,
        peer=args.baseline,
        progress=not args.no_progress,
        json_path=args.json,
    )
    _bench_logging()
    return _bench_http.main(opts)


def _bench_logging() -> None:
    """Log like the pipeline does (format, redaction), WARNING and up: the report is the output."""
    import logging

    from mpipeline import logs

    logs.setup(logging.WARNING, "auto", stage="bench", replica=None)


# dlq


def _add_dlq(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # _cli_dlq imports only argparse and the stdlib; its handlers load the runtime.
    from mpipeline.ops import dlq as _cli_dlq

    _cli_dlq.add_parser(commands, _add_where)


# status and profile


def _add_status_profile(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="replicas and rings of the running pipeline")
    _add_where(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    profile = commands.add_parser(
        "profile",
        help="sample a running replica with py-spy",
        description="Record a flamegraph of one replica with py-spy, or print its hottest "
        "functions (--top). The pipeline is only read, never changed.",
    )
    profile.add_argument("replica", metavar="STAGE[-REPLICA]", help="e.g. assemble or inference-1")
    _add_where(profile)
    profile.add_argument("--duration", type=_positive_int, default=10, metavar="S")
    profile.add_argument("--output", type=Path, default=None, metavar="FILE.svg")
    profile.add_argument("--top", action="store_true", help="print the hottest functions")
    profile.add_argument("--limit", type=_positive_int, default=20, metavar="N", help="for --top")
    profile.add_argument("--rate", type=_positive_int, default=100, metavar="HZ")
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
    _add_where(top)
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


def _add_where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--run-dir", type=Path, default=None, metavar="DIR")
    where.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"find the run dir from this config (default {DEFAULT_CONFIG})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _status(args: argparse.Namespace) -> int:
    from mpipeline.ops import status

    return status.main(args.run_dir, args.config, as_json=args.json, out=sys.stdout, err=sys.stderr)


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
