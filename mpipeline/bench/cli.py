"""``mpipeline bench``'s parser and handlers (the harness itself loads when it runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

from mpipeline.bench.layout import LAYOUTS, Layout
from mpipeline.errors import ExitCode
from mpipeline.ops.args import positive_int


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mpipeline bench``: the parser; the harness loads when it runs."""
    bench = commands.add_parser(
        "bench",
        help="throughput, latency and CPU per core count",
        description="Drive the echo pipeline at full speed and at fixed rates for each core "
        "count, beside a single-process asyncio pipeline running the same stage code.",
    )
    _add_load(bench)
    _add_http(bench)
    _add_upstream(bench)
    bench.add_argument(
        "--metrics",
        choices=("on", "off", "both"),
        default="on",
        help="count metrics in the stages and serve /metrics (default on, as deployed); "
        "both: each core count with metrics on, then off, and the cost between them",
    )
    bench.add_argument(
        "--workload",
        choices=("echo", "realistic"),
        default="echo",
        help="echo: every stage passes requests on (the pipeline's own cost); realistic: "
        "rag over 10,000 generated passages, a token budget, replies with planted PII "
        "redacted by post (default echo)",
    )
    bench.add_argument(
        "--layout",
        type=_layouts,
        default=("per-stage",),
        metavar="LIST",
        help="process layouts to measure, comma-separated, each at every core count: "
        "per-stage (a process per stage replica, the default config) and chained (the "
        "whole flow as one placement group per core); the first gives the ratio and the "
        "targets (default per-stage)",
    )
    bench.add_argument("--quick", action="store_true", help="short phases (a smoke test)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.add_argument("--json", type=Path, default=None, metavar="FILE")
    bench.add_argument("--plot", type=Path, default=None, metavar="FILE.png")
    bench.set_defaults(handler=_bench)


def _add_load(bench: argparse.ArgumentParser) -> None:
    """What to measure: core counts, how much load, the baseline."""
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


def _add_http(bench: argparse.ArgumentParser) -> None:
    """``--http`` and the options only it takes."""
    bench.add_argument(
        "--http",
        action="store_true",
        help="drive the HTTP gateway with wrk beside a uvicorn+starlette peer instead "
        "(--cores, --duration, --baseline, --quick, --json apply)",
    )
    bench.add_argument(
        "--connections",
        type=positive_int,
        default=None,
        metavar="N",
        help="--http, --upstream: wrk's keep-alive connections (default 64; --upstream: 32)",
    )
    bench.add_argument(
        "--wrk-cpus",
        type=_cpu_list,
        default=None,
        metavar="0,1",
        help="--http: cores for wrk and the probes (default: the cores under test)",
    )


def _add_upstream(bench: argparse.ArgumentParser) -> None:
    """``--upstream`` and the options only it takes."""
    bench.add_argument(
        "--upstream",
        action="store_true",
        help="the real job: proxy a fast fake OpenAI-compatible upstream with worker "
        '"openai", beside a uvicorn+Starlette+httpx proxy with 1 and 2 workers, under wrk '
        "(the largest --cores count; --duration, --connections, --baseline, --quick, --json apply)",
    )
    bench.add_argument(
        "--streams",
        type=positive_int,
        default=None,
        metavar="N",
        help="--upstream: concurrent SSE streams of 64 tokens (default 500)",
    )
    bench.add_argument(
        "--dedup",
        action="store_true",
        help="--upstream: keep the result cache and coalescing on (default off)",
    )
    bench.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="--upstream: py-spy every process during the load phases (raw files in DIR) "
        "and report where each one's CPU goes",
    )


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


def _layouts(text: str) -> tuple[Layout, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in LAYOUTS]
    if not values or bad or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"one or more of {', '.join(LAYOUTS)}, each once: {text!r}"
        )
    return cast(tuple[Layout, ...], values)


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of core ids: {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"core ids must be >= 0: {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    if args.workload != "echo" and (args.http or args.upstream or args.metrics == "both"):
        print(
            "mpipeline bench: --workload realistic runs in-process: "
            "not with --http, --upstream or --metrics both",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    if args.layout != ("per-stage",) and args.upstream:
        print("mpipeline bench: --layout is not for --upstream", file=sys.stderr)
        return ExitCode.USAGE
    if args.upstream and args.http:
        print("mpipeline bench: --upstream and --http are separate benches", file=sys.stderr)
        return ExitCode.USAGE
    if args.upstream:
        return _bench_upstream(args)
    if args.streams is not None or args.dedup or args.profile is not None:
        print("mpipeline bench: --streams, --dedup and --profile need --upstream", file=sys.stderr)
        return ExitCode.USAGE
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
        layouts=args.layout,
    )
    _bench_logging()
    if args.workload == "echo":
        return benchmark.main(opts)
    import dataclasses

    from mpipeline.bench import workload

    with workload.temp_folder() as tmp:
        realistic = workload.realistic(Path(tmp), quick=args.quick)
        rates = realistic.rates if args.rates is None else opts.rates
        return benchmark.main(dataclasses.replace(opts, workload=realistic, rates=rates))


def _bench_http(args: argparse.Namespace) -> int:
    from mpipeline.bench import over_http as _bench_http

    if _misfits(args, "--http"):
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
        layouts=args.layout,
    )
    _bench_logging()
    return _bench_http.main(opts)


def _bench_upstream(args: argparse.Namespace) -> int:
    from mpipeline.bench import upstream

    if _misfits(args, "--upstream", wrk_cpus=True):
        return ExitCode.USAGE
    opts = upstream.options(
        quick=args.quick,
        cores=max(args.cores),
        duration_s=args.duration,
        connections=args.connections,
        streams=args.streams,
        peer=args.baseline,
        dedup=args.dedup,
        progress=not args.no_progress,
        json_path=args.json,
        profile_dir=args.profile,
    )
    _bench_logging()
    return upstream.main(opts)


def _misfits(args: argparse.Namespace, mode: str, *, wrk_cpus: bool = False) -> bool:
    """Say which of the in-process bench's options were given to an HTTP mode; True if any."""
    given = {
        "--requests": args.requests is not None,
        "--rates": args.rates is not None,
        "--rate-duration": args.rate_duration is not None,
        "--window": args.window is not None,
        "--shared-cores": args.shared_cores,
        "--plot": args.plot is not None,
        "--wrk-cpus": wrk_cpus and args.wrk_cpus is not None,
    }
    unused = [flag for flag, on in given.items() if on]
    if unused:
        print(f"mpipeline bench: {', '.join(unused)} do not apply to {mode}", file=sys.stderr)
    return bool(unused)


def _bench_logging() -> None:
    """Log like the pipeline does (format, redaction), WARNING and up: the report is the output."""
    import logging

    from mpipeline import logs

    logs.setup(logging.WARNING, "auto", stage="bench", replica=None)
