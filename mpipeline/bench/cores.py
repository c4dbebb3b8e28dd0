"""``mpipeline bench``: throughput, latency and CPU of the pipeline per core count.

For each core count ``c`` it starts a pipeline whose shards and pinning are
derived from ``c`` (``config_for_cores``), drives it from the Python API at
full speed (closed loop, a bounded window of requests in flight) and at
fixed rates (open loop, for latency), and reads the CPU time of every
process. The load generator runs in this process, pinned to the same ``c``
cores as the pipeline: it plays the gateway, so it is part of the budget.
Then the same stage code runs as a single-process asyncio pipeline on one
core (``bench.baseline``), and the ratio shows what the design buys.

Counts beyond the CPU affinity are skipped with a message, so the same
command runs unchanged on 2 or 64 cores.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import uvloop

from mpipeline import rundir
from mpipeline.bench import report as rep
from mpipeline.bench.baseline import AsyncioPipeline
from mpipeline.bench.cpu import CpuMeter, pin
from mpipeline.bench.layout import Layout, config_for_cores, laid_out, stage_pinning
from mpipeline.bench.load import Load, Phase, Progress, Target, closed_loop, open_loop
from mpipeline.bench.workload import Realistic
from mpipeline.config import PipelineConfig, active_stages
from mpipeline.metrics.snapshot import snapshot
from mpipeline.pipeline import Pipeline

MetricsMode = Literal["on", "off", "both"]

# Requests in flight at full speed, per replica of the first stage. Measured on
# the 2-core box: 256-1024 give the most req/s for both the pipeline and the
# baseline; 2048 and more overfill the 1 MiB rings (about 600 B a request),
# and a full ring costs both sides a park and a wake-up per record.
WINDOW_PER_FRONT_REPLICA = 512
DEFAULT_DURATION_S = 5.0
DEFAULT_RATES = (1000.0, 5000.0, 20000.0)
DEFAULT_RATE_DURATION_S = 4.0
WARMUP_S = 1.0
# --quick: a smoke test of every phase in a few seconds per core count.
QUICK_DURATION_S = 0.5
QUICK_RATES = (1000.0,)
QUICK_WARMUP_S = 0.2


@dataclass(frozen=True)
class Options:
    cores: tuple[int, ...] = (1, 2)
    requests: int | None = None
    duration_s: float | None = DEFAULT_DURATION_S
    rates: tuple[float, ...] = DEFAULT_RATES
    rate_duration_s: float = DEFAULT_RATE_DURATION_S
    warmup_s: float = WARMUP_S
    window: int | None = None  # None: WINDOW_PER_FRONT_REPLICA per rag replica
    baseline: bool = True
    progress: bool = True
    json_path: Path | None = None
    plot_path: Path | None = None
    shared: bool = False
    # "both": each core count with metrics on, then off, side by side (issue 6's 3 % budget).
    metrics: MetricsMode = "on"
    # ``--workload realistic`` (None: echo): its config, prompts and reply checks.
    workload: Realistic | None = None
    # ``--layout``: the first gives ``runs`` and the ratio; the rest ``layout_runs``.
    layouts: tuple[Layout, ...] = ("per-stage",)


def options(
    *,
    quick: bool = False,
    cores: tuple[int, ...] = (1, 2),
    requests: int | None = None,
    duration_s: float | None = None,
    rates: tuple[float, ...] | None = None,
    rate_duration_s: float | None = None,
    window: int | None = None,
    baseline: bool = True,
    progress: bool = True,
    json_path: Path | None = None,
    plot_path: Path | None = None,
    shared: bool = False,
    metrics: MetricsMode = "on",
    layouts: tuple[Layout, ...] = ("per-stage",),
) -> Options:
    """Options from the command line, where None means the (``quick``) default."""
    return Options(
        cores=cores,
        requests=requests,
        duration_s=duration_s or (QUICK_DURATION_S if quick else DEFAULT_DURATION_S),
        rates=rates if rates is not None else (QUICK_RATES if quick else DEFAULT_RATES),
        rate_duration_s=rate_duration_s or (QUICK_DURATION_S if quick else DEFAULT_RATE_DURATION_S),
        warmup_s=QUICK_WARMUP_S if quick else WARMUP_S,
        window=window,
        baseline=baseline,
        progress=progress,
        json_path=json_path,
        plot_path=plot_path,
        shared=shared,
        metrics=metrics,
        layouts=layouts,
    )


def command_line(opts: Options) -> list[str]:
    """The ``mpipeline bench`` command that repeats this run."""
    cmd = ["mpipeline", "bench", "--cores", ",".join(map(str, opts.cores))]
    if opts.requests:
        cmd += ["--requests", str(opts.requests)]
    else:
        cmd += ["--duration", f"{opts.duration_s:g}"]
    cmd += ["--rates", ",".join(f"{r:g}" for r in opts.rates)]
    cmd += ["--rate-duration", f"{opts.rate_duration_s:g}"]
    if opts.window:
        cmd += ["--window", str(opts.window)]
    if opts.shared:
        cmd.append("--shared-cores")
    if not opts.baseline:
        cmd.append("--no-baseline")
    if opts.metrics != "on":
        cmd += ["--metrics", opts.metrics]
    if opts.workload is not None:
        cmd += ["--workload", "realistic"]
    if opts.layouts != ("per-stage",):
        cmd += ["--layout", ",".join(opts.layouts)]
    return cmd


def window_for(cfg: PipelineConfig, opts: Options) -> int:
    """Requests in flight at full speed: ``--window``, else per first-stage replica."""
    if opts.window:
        return opts.window
    _, first = active_stages(cfg)[0]
    return WINDOW_PER_FRONT_REPLICA * first.replicas


def replica_pids(run_dir: Path) -> dict[str, int]:
    """``{"supervisor": pid, "rag-0": pid, ...}`` of the pipeline running in ``run_dir``.

    A placement group is one process, named once (``"chain-0"``): its CPU must
    not be counted once per member.
    """
    with rundir.connect(run_dir) as run:
        snap = snapshot(run)
        group_of = {m.name: g.name for g in run.info.topology.groups for m in g.members}
        pids = {group_of.get(r.name, r.name): r.pid for r in snap.replicas}
        return {"supervisor": run.control.supervisor_pid} | pids


async def _phases(
    source: Pipeline | AsyncioPipeline,
    pids: dict[str, int],
    cores: list[int],
    window: int,
    opts: Options,
    label: str,
    progress: Progress,
) -> list[Phase]:
    load = Load(window=window, texts=opts.workload.prompts()) if opts.workload else Load(window)
    # The realistic workload streams every request; echo submits them whole.
    target: Target = opts.workload.target(source) if opts.workload else source
    cpu = CpuMeter(pids, cores)
    if opts.warmup_s > 0:
        await closed_loop(target, load, requests=None, duration_s=opts.warmup_s)
    phases = []
    name = f"{label} full speed"
    full = await closed_loop(
        target,
        load,
        requests=opts.requests,
        duration_s=None if opts.requests else opts.duration_s,
        cpu=cpu,
        progress=progress,
        label=name,
    )
    progress.done(name, f"{full.throughput_rps:,.0f} req/s, p50 {full.latency.p50_us:,.0f} us")
    phases.append(full)
    for rate in opts.rates:
        name = f"{label} {rate:,.0f} req/s"
        phase = await open_loop(
            target,
            load,
            rate=rate,
            duration_s=opts.rate_duration_s,
            cpu=cpu,
            progress=progress,
            label=name,
        )
        lat = phase.latency
        progress.done(
            name, f"p50 {lat.p50_us:,.0f} us, p95 {lat.p95_us:,.0f}, p99 {lat.p99_us:,.0f}"
        )
        phases.append(phase)
    if opts.workload is not None:
        await opts.workload.check(source, label.rstrip(":"))
    return phases


def _workload(opts: Options) -> tuple[PipelineConfig | None, tuple[str, ...]]:
    """The base config and the stage given a replica per core, for ``opts.workload``."""
    return (opts.workload.config, opts.workload.heavy) if opts.workload else (None, ("inference",))


async def _run_pipeline(
    cores: list[int],
    opts: Options,
    progress: Progress,
    *,
    metrics: bool = True,
    layout: Layout = "per-stage",
) -> rep.Run:
    base, heavy = _workload(opts)
    cfg = laid_out(cores, base, layout, shared=opts.shared, metrics=metrics, heavy=heavy)
    window = window_for(cfg, opts)
    restore = pin(cores)  # before the supervisor starts: it and its children inherit the mask
    try:
        with tempfile.TemporaryDirectory(prefix="mpipeline-bench-") as tmp:
            run_dir = Path(tmp)
            async with Pipeline(cfg, run_dir=run_dir) as p:
                pids = {"client (bench)": os.getpid(), **replica_pids(run_dir)}
                label = f"{len(cores)} core{'s' if len(cores) > 1 else ''}"
                label += f", {layout}" if layout != "per-stage" else ""
                label += ":" if metrics else ", metrics off:"
                phases = await _phases(p, pids, cores, window, opts, label, progress)
    finally:
        restore()
    name = "pipeline" if metrics else rep.METRICS_OFF_NAME
    return rep.Run(
        name=name if layout == "per-stage" else f"{name}, {layout}",
        cores=len(cores),
        cpus=list(cores),
        replicas={name: st.replicas for name, st in active_stages(cfg)},
        pinning=stage_pinning(cfg, list(cores)),
        window=window,
        phases=phases,
    )


async def _run_baseline(cores: list[int], opts: Options, progress: Progress) -> rep.Run:
    base, heavy = _workload(opts)
    cfg = config_for_cores(cores, base, heavy=heavy)
    window = window_for(cfg, opts)
    restore = pin(cores[:1])
    try:
        async with AsyncioPipeline(cfg) as b:
            pids = {"asyncio pipeline": os.getpid()}
            label = "asyncio baseline:"
            phases = await _phases(b, pids, cores[:1], window, opts, label, progress)
    finally:
        restore()
    return rep.Run(
        name="asyncio-baseline",
        cores=1,
        cpus=cores[:1],
        replicas={name: st.replicas for name, st in active_stages(cfg)},
        pinning={"asyncio pipeline": cores[:1]},
        window=window,
        phases=phases,
    )


async def run(opts: Options) -> rep.Report:
    available = sorted(os.sched_getaffinity(0))
    counts = sorted(set(opts.cores))
    skipped = [c for c in counts if c > len(available)]
    if skipped:
        rep.stderr(
            f"skipping core counts {skipped}: this process may use only {len(available)} "
            f"cores ({available})"
        )
    progress = Progress(opts.progress)
    runs = []
    ab = []
    others: dict[Layout, list[rep.Run]] = {layout: [] for layout in opts.layouts[1:]}
    first = opts.layouts[0]
    for c in counts:
        if c in skipped:
            continue
        cores = available[:c]
        on = opts.metrics != "off"
        runs.append(await _run_pipeline(cores, opts, progress, metrics=on, layout=first))
        for layout, done in others.items():
            done.append(await _run_pipeline(cores, opts, progress, metrics=on, layout=layout))
        if opts.metrics == "both":
            # On, off, off, on, back to back on the same cores: run-to-run noise here
            # is several percent, larger than the cost measured, and a drift of the
            # machine over the four runs cancels out of the means.
            ab += [
                await _run_pipeline(cores, opts, progress, metrics=metrics)
                for metrics in (False, False, True)
            ]
    runs = rep.with_efficiency(runs)
    layout_runs = [r for done in others.values() for r in rep.with_efficiency(done)]
    baseline = None
    if opts.baseline and runs:
        baseline = await _run_baseline(available[: runs[-1].cores], opts, progress)
    ratio = None
    top = runs[-1].full if runs else None
    if baseline is not None and baseline.full is not None and top is not None:
        ratio = (
            top.throughput_rps / baseline.full.throughput_rps
            if baseline.full.throughput_rps
            else None
        )
    settings: dict[str, float | int | str | list[int] | list[float] | None] = {
        "cores": list(counts),
        "requests": opts.requests,
        "duration_s": None if opts.requests else opts.duration_s,
        "rates": list(opts.rates),
        "rate_duration_s": opts.rate_duration_s,
        "warmup_s": opts.warmup_s,
        "window": opts.window or f"{WINDOW_PER_FRONT_REPLICA} per rag replica",
        "pinning": "shared" if opts.shared else "spread",
        "prompt_bytes": 512,
        "output_tokens": 16,
        "metrics": opts.metrics,
        "layouts": ",".join(opts.layouts),
    }
    report = rep.Report(
        machine=rep.machine(),
        command=command_line(opts),
        settings=settings,
        runs=runs,
        baseline=baseline,
        skipped_cores=skipped,
        ratio=ratio,
        verdicts=rep.verdicts(runs, baseline),
        metrics_ab=ab,
        layout_runs=layout_runs,
    )
    return opts.workload.report(report) if opts.workload else report


def main(opts: Options) -> int:
    """Run the sweep, print the table, write JSON and plot; the exit code."""
    if opts.plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            rep.stderr("--plot needs matplotlib: pip install 'mpipeline[bench]' (or matplotlib)")
            return 2
    have = len(os.sched_getaffinity(0))
    if not any(c <= have for c in opts.cores):
        rep.stderr(f"no core count in {list(opts.cores)} fits the {have} cores here")
        return 2
    report = uvloop.run(run(opts))
    sys.stdout.write(rep.table(report) + "\n")
    problems = opts.workload.problems() if opts.workload else []
    if opts.workload is not None:
        sys.stdout.write(opts.workload.summary() + "\n")
    for problem in problems:
        rep.stderr(f"the workload did not do its work: {problem}")
    if opts.json_path is not None:
        rep.write_json(report, opts.json_path)
        rep.stderr(f"wrote {opts.json_path}")
    if opts.plot_path is not None:
        from mpipeline.bench.plot import plot

        plot(report, opts.plot_path)
        rep.stderr(f"wrote {opts.plot_path}")
    failed = sum(p.failed for r in report.runs for p in r.phases)
    return 0 if failed == 0 and report.runs and not problems else 1
