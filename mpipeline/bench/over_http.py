"""``mpipeline bench --http``: the gateway under a real HTTP load generator, beside a peer.

For each core count ``c`` it starts the whole pipeline with its HTTP gateway
on the first ``c`` cores of this process's affinity, warms it up, and drives
``POST /v1/prompt`` with ``wrk`` over HTTP/1.1 keep-alive: non-streaming JSON,
then SSE streams (``"stream": true``; wrk reads the chunked body to its end).
Then it probes latency at a low fixed rate with a small raw-socket client,
and restarts the pipeline with a 20 ms per-token echo delay to time the first
SSE ``data`` line against the worker's first token. The same four
measurements run on the peer (``bench.peer``: one uvicorn+Starlette process
calling the same echo worker), pinned to the same cores, in the same run, so
the ratio compares like with like on whatever the machine is doing.

Where the load generator runs: on the same ``c`` cores as the system under
test, by default. The issue asks for the load generator on the same box, and
on a 2-core box at 2 cores there is nowhere else to put it; pinning it with
the system at every core count keeps the 1-core and 2-core rows comparable,
and the peer pays the same tax. So the req/s here are what ``c`` cores
deliver while also generating their own load: an understatement of the
server alone. ``--wrk-cpus`` moves wrk (and the probe client) elsewhere on a
bigger machine. wrk's own CPU is reported beside each phase, and CPU that
other processes took from the cores is reported as noise.

Workload: the pipeline bench's 512-byte prompts, unique per request (a
thread id and counter prefix) so identical prompts never meet on one shard,
and 16 output tokens. wrk cycles through a pool of prebuilt requests per
thread, because building each request in Lua would cost wrk more than the
echo costs the server.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from mpipeline.bench import report as rep
from mpipeline.bench.cpu import CpuMeter, pin
from mpipeline.bench.http_report import HttpReport, HttpRun, LoadPhase, table, verdicts, write_json
from mpipeline.bench.layout import Layout
from mpipeline.bench.load import OUTPUT_TOKENS, PROMPT_BYTES, prompt_body
from mpipeline.bench.probe import Probe, latency_probe, ttfb_probe
from mpipeline.bench.servers import (
    CHAINED,
    GATEWAY,
    PEER,
    Server,
    free_port,
    gateway_command,
    gateway_config,
    peer_command,
)
from mpipeline.bench.wrk import package_version, run_wrk, wrk_command, wrk_script, wrk_version
from mpipeline.config import dump_toml

DEFAULT_DURATION_S = 5
DEFAULT_CONNECTIONS = 64
WARMUP_S = 1
# Low-load latency probe: requests per second, over keep-alive connections.
PROBE_RATE = 200.0
PROBE_DURATION_S = 3.0
# Streaming time-to-first-byte probe: the echo worker sleeps this long before
# every token, so the first token leaves the worker this long after it starts.
TOKEN_DELAY_MS = 20.0
TTFB_REQUESTS = 50
# --quick: a smoke test of every phase (wrk takes whole seconds only).
QUICK_DURATION_S = 1
QUICK_PROBE_DURATION_S = 0.5
QUICK_TTFB_REQUESTS = 10


@dataclass(frozen=True)
class Options:
    cores: tuple[int, ...] = (1, 2)
    duration_s: int = DEFAULT_DURATION_S
    connections: int = DEFAULT_CONNECTIONS
    warmup_s: int = WARMUP_S
    probe_rate: float = PROBE_RATE
    probe_duration_s: float = PROBE_DURATION_S
    ttfb_requests: int = TTFB_REQUESTS
    token_delay_ms: float = TOKEN_DELAY_MS
    # None: the load generator shares the cores of the system under test.
    wrk_cpus: tuple[int, ...] | None = None
    peer: bool = True
    progress: bool = True
    json_path: Path | None = None
    # ``--layout``: the gateway in front of each (CHAINED names the chained one).
    layouts: tuple[Layout, ...] = ("per-stage",)


def options(
    *,
    quick: bool = False,
    cores: tuple[int, ...] = (1, 2),
    duration_s: float | None = None,
    connections: int | None = None,
    wrk_cpus: tuple[int, ...] | None = None,
    peer: bool = True,
    progress: bool = True,
    json_path: Path | None = None,
    layouts: tuple[Layout, ...] = ("per-stage",),
) -> Options:
    """Options from the command line, where None means the (``quick``) default."""
    default = QUICK_DURATION_S if quick else DEFAULT_DURATION_S
    return Options(
        cores=cores,
        # wrk counts whole seconds.
        duration_s=max(1, math.ceil(duration_s)) if duration_s else default,
        connections=connections or DEFAULT_CONNECTIONS,
        warmup_s=WARMUP_S,
        probe_duration_s=QUICK_PROBE_DURATION_S if quick else PROBE_DURATION_S,
        ttfb_requests=QUICK_TTFB_REQUESTS if quick else TTFB_REQUESTS,
        wrk_cpus=wrk_cpus,
        peer=peer,
        progress=progress,
        json_path=json_path,
        layouts=layouts,
    )


def command_line(opts: Options) -> list[str]:
    """The ``mpipeline bench --http`` command that repeats this run."""
    cmd = ["mpipeline", "bench", "--http", "--cores", ",".join(map(str, opts.cores))]
    cmd += ["--duration", str(opts.duration_s), "--connections", str(opts.connections)]
    if opts.wrk_cpus is not None:
        cmd += ["--wrk-cpus", ",".join(map(str, opts.wrk_cpus))]
    if not opts.peer:
        cmd.append("--no-baseline")
    if opts.layouts != ("per-stage",):
        cmd += ["--layout", ",".join(opts.layouts)]
    return cmd


# One system at one core count


@dataclass
class _Context:
    opts: Options
    workdir: Path
    leftovers: list[str]

    def say(self, text: str) -> None:
        if self.opts.progress:
            rep.stderr(text)


def _server(system: str, cores: list[int], ctx: _Context, token_delay_ms: float) -> Server:
    """The system, configured for ``cores`` on a free port, not yet started."""
    port = free_port()
    tag = f"{system.replace('+', '-')}-{len(cores)}c-{port}"
    run_dir = ctx.workdir / f"run-{tag}"
    run_dir.mkdir(mode=0o700)  # the supervisor refuses a run dir open to others
    config = ctx.workdir / f"{tag}.toml"
    layout: Layout = "chained" if system == CHAINED else "per-stage"
    cfg = gateway_config(cores, port, run_dir, token_delay_ms=token_delay_ms, layout=layout)
    # The peer reads the same file for its echo settings.
    config.write_text(dump_toml(cfg), encoding="utf-8")
    if system in (GATEWAY, CHAINED):
        return Server(system, gateway_command(config, run_dir), port, ctx.workdir, run_dir)
    return Server(system, peer_command(config, port), port, ctx.workdir)


@contextlib.contextmanager
def _running(server: Server, cpus: list[int], ctx: _Context) -> Iterator[Server]:
    try:
        server.start(cpus)
        yield server
    finally:
        ctx.leftovers += server.stop()


def _script(ctx: _Context, mode: str) -> Path:
    path = ctx.workdir / f"{mode}.lua"
    if not path.exists():
        path.write_text(wrk_script(prompt_body(), stream=mode == "stream"), encoding="utf-8")
    return path


def _load_phase(
    server: Server, mode: str, cores: list[int], loadgen: list[int], ctx: _Context
) -> LoadPhase:
    opts = ctx.opts
    threads = len(loadgen)
    cmd = wrk_command(
        server.url,
        _script(ctx, mode),
        threads=threads,
        connections=opts.connections,
        duration_s=opts.duration_s,
    )
    meter = CpuMeter(server.processes(), cores)
    meter.start()
    t0 = time.monotonic()
    stats, wrk_cpu_s = run_wrk(cmd, loadgen)
    wall = max(time.monotonic() - t0, 1e-9)
    cpu, foreign = meter.stop()
    wrk_percent = 100.0 * wrk_cpu_s / wall
    if set(loadgen) <= set(cores):
        foreign = max(0.0, foreign - wrk_percent)
    busy_s = sum(p.percent for p in cpu) / 100.0 * wall
    return LoadPhase(
        mode=mode,
        connections=max(opts.connections, threads),
        threads=threads,
        throughput_rps=stats.rps,
        wrk=stats,
        cpu=cpu,
        cpu_us_per_request=busy_s / stats.requests * 1e6 if stats.requests else 0.0,
        loadgen_cpu_percent=wrk_percent,
        foreign_cpu_percent=foreign,
    )


def _measure(system: str, cores: list[int], loadgen: list[int], ctx: _Context) -> HttpRun:
    opts = ctx.opts
    label = f"{system}, {len(cores)} core{'s' if len(cores) > 1 else ''}:"
    run_ids: list[str] = []
    server = _server(system, cores, ctx, 0.0)
    start_command = server.cmd
    with _running(server, cores, ctx):
        if server.run_id:
            run_ids.append(server.run_id)
        warm = wrk_command(
            server.url,
            _script(ctx, "json"),
            threads=len(loadgen),
            connections=opts.connections,
            duration_s=opts.warmup_s,
        )
        run_wrk(warm, loadgen)
        phases = []
        for mode in ("json", "stream"):
            phase = _load_phase(server, mode, cores, loadgen, ctx)
            w = phase.wrk
            ctx.say(
                f"{label:<32} {mode:<6} {phase.throughput_rps:>9,.0f} req/s, "
                f"p50 {w.p50_us / 1000:,.2f} ms, p99 {w.p99_us / 1000:,.2f} ms"
                + (f", {w.errors} errors" if w.errors else "")
            )
            phases.append(phase)
        latency = _pinned_probe(
            loadgen, latency_probe(server.port, opts.probe_rate, opts.probe_duration_s)
        )
        ctx.say(
            f"{label:<32} {opts.probe_rate:,.0f}/s  p50 {latency.p50_us:,.0f} us, "
            f"p99 {latency.p99_us:,.0f} us"
        )
    server = _server(system, cores, ctx, opts.token_delay_ms)
    with _running(server, cores, ctx):
        if server.run_id:
            run_ids.append(server.run_id)
        ttfb = _pinned_probe(
            loadgen, ttfb_probe(server.port, opts.ttfb_requests, opts.token_delay_ms)
        )
        ctx.say(
            f"{label:<32} TTFB   p50 {ttfb.p50_us / 1000:,.2f} ms "
            f"(+{ttfb.extra_p50_us:,.0f} us over the first token)"
        )
    return HttpRun(
        system=system,
        cores=len(cores),
        cpus=list(cores),
        loadgen_cpus=list(loadgen),
        start_command=start_command,
        phases=phases,
        latency=latency,
        ttfb=ttfb,
        run_ids=run_ids,
    )


def _pinned_probe(cpus: list[int], probe: Coroutine[Any, Any, Probe]) -> Probe:
    """Run a probe on a fresh uvloop with this process pinned where the load generator is."""
    restore = pin(cpus)
    try:
        return uvloop.run(probe)
    finally:
        restore()


# The sweep


def run(opts: Options) -> HttpReport:
    available = sorted(os.sched_getaffinity(0))
    counts = sorted(set(opts.cores))
    skipped = [c for c in counts if c > len(available)]
    if skipped:
        rep.stderr(
            f"skipping core counts {skipped}: this process may use only {len(available)} "
            f"cores ({available})"
        )
    gateways = {"per-stage": GATEWAY, "chained": CHAINED}
    systems = [gateways[layout] for layout in opts.layouts] + ([PEER] if opts.peer else [])
    runs: list[HttpRun] = []
    leftovers: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mpipeline-bench-http-") as tmp:
        ctx = _Context(opts, Path(tmp), leftovers)
        for c in counts:
            if c in skipped:
                continue
            cores = available[:c]
            loadgen = list(opts.wrk_cpus) if opts.wrk_cpus is not None else cores
            # Side by side: the peer right after the gateway, on the same cores.
            runs += [_measure(system, cores, loadgen, ctx) for system in systems]
    return HttpReport(
        machine=rep.machine(),
        command=command_line(opts),
        settings=_settings(opts),
        runs=runs,
        skipped_cores=skipped,
        verdicts=verdicts(runs),
        leftovers=leftovers,
    )


def _settings(opts: Options) -> dict[str, float | int | str | list[int] | None]:
    return {
        "cores": list(opts.cores),
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        "connections": opts.connections,
        "loadgen_cpus": (
            list(opts.wrk_cpus) if opts.wrk_cpus is not None else "the system's own cores"
        ),
        "probe_rate": opts.probe_rate,
        "probe_duration_s": opts.probe_duration_s,
        "ttfb_requests": opts.ttfb_requests,
        "token_delay_ms": opts.token_delay_ms,
        "prompt_bytes": PROMPT_BYTES,
        "output_tokens": OUTPUT_TOKENS,
        "wrk": wrk_version(),
        "uvicorn": package_version("uvicorn"),
        "starlette": package_version("starlette"),
        "httptools": package_version("httptools"),
    }


def main(opts: Options) -> int:
    """Run the sweep, print the table, write JSON; the exit code."""
    if wrk_version() == "not installed":
        rep.stderr("--http needs wrk: apt-get install wrk (scripts/setup.sh installs it)")
        return 2
    have = len(os.sched_getaffinity(0))
    if not any(c <= have for c in opts.cores):
        rep.stderr(f"no core count in {list(opts.cores)} fits the {have} cores here")
        return 2
    if opts.wrk_cpus is not None and not set(opts.wrk_cpus) <= os.sched_getaffinity(0):
        rep.stderr(f"--wrk-cpus {list(opts.wrk_cpus)} is outside this process's affinity")
        return 2
    try:
        report = run(opts)
    except (RuntimeError, OSError) as exc:
        # A system that would not start, or wrk that failed: already stopped and cleaned.
        rep.stderr(f"mpipeline bench --http: {exc}")
        return 1
    sys.stdout.write(table(report) + "\n")
    if opts.json_path is not None:
        write_json(report, opts.json_path)
        rep.stderr(f"wrote {opts.json_path}")
    errors = sum(p.wrk.errors for r in report.runs for p in r.phases)
    errors += sum(
        probe.failed for r in report.runs for probe in (r.latency, r.ttfb) if probe is not None
    )
    if errors:
        rep.stderr(f"{errors} requests failed or errored (see the errors column)")
    empty = any(p.wrk.requests == 0 for r in report.runs for p in r.phases)
    return 0 if report.runs and not errors and not empty and not report.leftovers else 1
