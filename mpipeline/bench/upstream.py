"""``mpipeline bench --upstream``: the real job, proxying a model server, beside a peer.

It starts the fast fake OpenAI-compatible upstream shipped in
``bench.fake_upstream``, then, one after another on the same cores:

* the pipeline as ``mpipeline run`` starts it (one config file): every stage,
  one gateway replica, ``worker = "openai"`` pointed at the fake, the result
  cache and coalescing off (``--dedup`` turns them on);
* ``bench.upstream_peer``, the uvicorn+Starlette+httpx proxy, with 1 and with
  2 uvicorn workers.

Each gets a warm-up, then wrk drives ``POST /v1/chat/completions``: JSON
replies of ``json_tokens`` tokens over ``connections`` keep-alive
connections, then ``streams`` concurrent SSE streams of ``stream_tokens``
tokens each (wrk reads every chunked body to its end). Two sequential probes
follow, on the system and straight on the upstream: the end-to-end JSON
latency, and the time to the first content token of a stream. What a proxy
adds is its p50 over the upstream's own.

Everything runs on the same cores: the fake upstream, wrk and the system
under test share them, as on one box with its mock upstream. CPU is read
per process over each phase, so each system's CPU per request is its own,
and the upstream's and wrk's are shown beside it (with what other
processes took, the noise column).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mpipeline.bench import report as rep
from mpipeline.bench.cpu import CpuMeter
from mpipeline.bench.servers import HOST, Server, free_port, gateway_command, gateway_config
from mpipeline.bench.upstream_probe import MODEL, PATH, TTFB_TOKENS, chat_script, probes
from mpipeline.bench.upstream_profile import Sampler
from mpipeline.bench.upstream_report import (
    PEER,
    PIPELINE,
    LoadPhase,
    UpstreamReport,
    UpstreamRun,
    table,
    verdicts,
    write_json,
)
from mpipeline.bench.wrk import package_version, run_wrk, wrk_command, wrk_version
from mpipeline.config import PipelineConfig, dump_toml

UPSTREAM = "fake-upstream"
DEFAULT_DURATION_S = 5
DEFAULT_CONNECTIONS = 32
DEFAULT_STREAMS = 500
JSON_TOKENS = 16
STREAM_TOKENS = 64
PROBE_REQUESTS = 300
WARMUP_S = 1
QUICK_DURATION_S = 1
QUICK_STREAMS = 64
QUICK_PROBE_REQUESTS = 30


@dataclass(frozen=True)
class Options:
    cores: int = 2
    duration_s: int = DEFAULT_DURATION_S
    connections: int = DEFAULT_CONNECTIONS
    streams: int = DEFAULT_STREAMS
    json_tokens: int = JSON_TOKENS
    stream_tokens: int = STREAM_TOKENS
    probe_requests: int = PROBE_REQUESTS
    peer_workers: tuple[int, ...] = (1, 2)
    dedup: bool = False
    progress: bool = True
    json_path: Path | None = None
    # py-spy every process of each system during the load phases, raw files here.
    profile_dir: Path | None = None


def options(
    *,
    quick: bool = False,
    cores: int | None = None,
    duration_s: float | None = None,
    connections: int | None = None,
    streams: int | None = None,
    peer: bool = True,
    dedup: bool = False,
    progress: bool = True,
    json_path: Path | None = None,
    profile_dir: Path | None = None,
) -> Options:
    """Options from the command line, where None means the (``quick``) default."""
    default = QUICK_DURATION_S if quick else DEFAULT_DURATION_S
    return Options(
        cores=cores or min(2, len(os.sched_getaffinity(0))),
        duration_s=max(1, math.ceil(duration_s)) if duration_s else default,
        connections=connections or DEFAULT_CONNECTIONS,
        streams=streams or (QUICK_STREAMS if quick else DEFAULT_STREAMS),
        probe_requests=QUICK_PROBE_REQUESTS if quick else PROBE_REQUESTS,
        peer_workers=(1, 2) if peer else (),
        dedup=dedup,
        progress=progress,
        json_path=json_path,
        profile_dir=profile_dir,
    )


def command_line(opts: Options) -> list[str]:
    """The ``mpipeline bench --upstream`` command that repeats this run."""
    cmd = ["mpipeline", "bench", "--upstream", "--cores", str(opts.cores)]
    cmd += ["--duration", str(opts.duration_s), "--connections", str(opts.connections)]
    cmd += ["--streams", str(opts.streams)]
    if not opts.peer_workers:
        cmd.append("--no-baseline")
    if opts.dedup:
        cmd.append("--dedup")
    if opts.profile_dir is not None:
        cmd += ["--profile", str(opts.profile_dir)]
    return cmd


@dataclass
class _Context:
    opts: Options
    cores: list[int]
    workdir: Path
    upstream: Server
    leftovers: list[str]

    def say(self, text: str) -> None:
        if self.opts.progress:
            rep.stderr(text)

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream.port}/v1"


def pipeline_config(
    opts: Options, cores: list[int], port: int, run_dir: Path, upstream: str
) -> PipelineConfig:
    """The bench pipeline (``servers.gateway_config``) with the OpenAI worker on ``upstream``."""
    cfg = gateway_config(cores, port, run_dir)
    inference = cfg.stages.inference
    openai = msgspec.structs.replace(
        inference.openai, base_url=upstream, model=MODEL, api_key_env=""
    )
    dedup = inference.dedup
    if not opts.dedup:
        dedup = msgspec.structs.replace(dedup, coalesce=False, cache_entries=0)
    inference = msgspec.structs.replace(inference, worker="openai", openai=openai, dedup=dedup)
    stages = msgspec.structs.replace(cfg.stages, inference=inference)
    return msgspec.structs.replace(cfg, stages=stages)


def _server(system: str, workers: int, ctx: _Context) -> Server:
    port = free_port()
    if system == PIPELINE:
        run_dir = ctx.workdir / f"run-{port}"
        run_dir.mkdir(mode=0o700)  # the supervisor refuses a run dir open to others
        config = ctx.workdir / f"pipeline-{port}.toml"
        cfg = pipeline_config(ctx.opts, ctx.cores, port, run_dir, ctx.upstream_url)
        config.write_text(dump_toml(cfg), encoding="utf-8")
        return Server(system, gateway_command(config, run_dir), port, ctx.workdir, run_dir)
    cmd = [sys.executable, "-m", "mpipeline.bench.upstream_peer", "--upstream", ctx.upstream_url]
    cmd += ["--model", MODEL, "--port", str(port), "--workers", str(workers)]
    return Server(f"{system}-{workers}w", cmd, port, ctx.workdir)


def _url(server: Server) -> str:
    return f"http://{HOST}:{server.port}{PATH}"


@contextlib.contextmanager
def _running(server: Server, ctx: _Context) -> Iterator[Server]:
    try:
        server.start(ctx.cores)
        yield server
    finally:
        ctx.leftovers += server.stop()


def _script(ctx: _Context, mode: str, tokens: int) -> Path:
    path = ctx.workdir / f"chat-{mode}-{tokens}.lua"
    if not path.exists():
        path.write_text(chat_script(stream=mode == "stream", max_tokens=tokens), encoding="utf-8")
    return path


def _load_phase(server: Server, mode: str, ctx: _Context) -> LoadPhase:
    opts = ctx.opts
    stream = mode == "stream"
    tokens = opts.stream_tokens if stream else opts.json_tokens
    connections = opts.streams if stream else opts.connections
    cmd = wrk_command(
        _url(server),
        _script(ctx, mode, tokens),
        threads=1,
        connections=connections,
        duration_s=opts.duration_s,
    )
    procs = server.processes()
    up_pid = ctx.upstream.processes()
    meter = CpuMeter({**procs, **{UPSTREAM: next(iter(up_pid.values()))}}, ctx.cores)
    sampler = None
    if opts.profile_dir is not None:
        busy = {k: v for k, v in procs.items() if k != "supervisor"}
        sampler = Sampler(busy, opts.duration_s, opts.profile_dir, f"{server.system}-{mode}")
        sampler.start()
    meter.start()
    t0 = time.monotonic()
    stats, wrk_cpu_s = run_wrk(cmd, ctx.cores)
    wall = max(time.monotonic() - t0, 1e-9)
    cpu, foreign = meter.stop()
    wrk_percent = 100.0 * wrk_cpu_s / wall
    foreign = max(0.0, foreign - wrk_percent)
    mine = [p for p in cpu if p.name != UPSTREAM]
    theirs = sum(p.percent for p in cpu if p.name == UPSTREAM)
    n = stats.requests

    def per_request(percent: float) -> float:
        return percent / 100.0 * wall / n * 1e6 if n else 0.0

    return LoadPhase(
        mode=mode,
        connections=max(connections, 1),
        throughput_rps=stats.rps,
        tokens_per_s=stats.rps * tokens if stream else 0.0,
        wrk=stats,
        cpu=mine,
        cpu_us_per_request=per_request(sum(p.percent for p in mine)),
        upstream_cpu_us_per_request=per_request(theirs),
        loadgen_cpu_percent=wrk_percent,
        foreign_cpu_percent=foreign,
        profile=sampler.shares() if sampler is not None else {},
    )


def _measure(system: str, workers: int, ctx: _Context) -> UpstreamRun:
    server = _server(system, workers, ctx)
    name = PIPELINE if system == PIPELINE else f"{system} {workers}w"
    with _running(server, ctx):
        warm = wrk_command(
            _url(server),
            _script(ctx, "json", ctx.opts.json_tokens),
            threads=1,
            connections=ctx.opts.connections,
            duration_s=WARMUP_S,
        )
        run_wrk(warm, ctx.cores)
        phases = []
        for mode in ("json", "stream"):
            phase = _load_phase(server, mode, ctx)
            w = phase.wrk
            extra = f", {phase.tokens_per_s:,.0f} tokens/s" if mode == "stream" else ""
            ctx.say(
                f"{name + ':':<22} {mode:<6} {phase.throughput_rps:>8,.0f} req/s{extra}, "
                f"p50 {w.p50_us / 1000:,.2f} ms, p99 {w.p99_us / 1000:,.2f} ms, "
                f"{phase.cpu_us_per_request:,.0f} us CPU/req"
                + (f", {w.errors} errors" if w.errors else "")
            )
            phases.append(phase)
        latency, ttfb = probes(
            server.port, name, ctx.cores, ctx.opts.probe_requests, ctx.opts.json_tokens
        )
        ctx.say(
            f"{name + ':':<22} sequential p50 {latency.latency.p50_us:,.0f} us, "
            f"TTFB p50 {ttfb.latency.p50_us:,.0f} us"
        )
    return UpstreamRun(
        system=system,
        workers=workers,
        start_command=server.cmd,
        phases=phases,
        latency=latency,
        ttfb=ttfb,
        run_ids=[server.run_id] if server.run_id else [],
    )


def run(opts: Options) -> UpstreamReport:
    cores = sorted(os.sched_getaffinity(0))[: opts.cores]
    if opts.profile_dir is not None:
        opts.profile_dir.mkdir(parents=True, exist_ok=True)
    leftovers: list[str] = []
    runs: list[UpstreamRun] = []
    with tempfile.TemporaryDirectory(prefix="mpipeline-bench-upstream-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        tokens = max(opts.json_tokens, opts.stream_tokens, TTFB_TOKENS)
        cmd = [sys.executable, "-m", "mpipeline.bench.fake_upstream", "--port", str(port)]
        upstream = Server(UPSTREAM, [*cmd, "--tokens", str(tokens)], port, workdir)
        ctx = _Context(opts, cores, workdir, upstream, leftovers)
        with _running(upstream, ctx):
            direct_latency, direct_ttfb = probes(
                port, "direct", cores, opts.probe_requests, opts.json_tokens
            )
            ctx.say(
                f"{'upstream, direct:':<22} sequential p50 {direct_latency.latency.p50_us:,.0f} "
                f"us, TTFB p50 {direct_ttfb.latency.p50_us:,.0f} us"
            )
            runs.append(_measure(PIPELINE, 1, ctx))
            runs += [_measure(PEER, w, ctx) for w in opts.peer_workers]
    report = UpstreamReport(
        machine=rep.machine(),
        command=command_line(opts),
        settings=_settings(opts, cores),
        direct_latency=direct_latency,
        direct_ttfb=direct_ttfb,
        runs=runs,
        verdicts=[],
        leftovers=leftovers,
    )
    return msgspec.structs.replace(report, verdicts=verdicts(report))


def _settings(opts: Options, cores: list[int]) -> dict[str, float | int | str | list[int] | None]:
    return {
        "cores": cores,
        "duration_s": opts.duration_s,
        "warmup_s": WARMUP_S,
        "json_connections": opts.connections,
        "streams": opts.streams,
        "json_tokens": opts.json_tokens,
        "stream_tokens": opts.stream_tokens,
        "ttfb_tokens": TTFB_TOKENS,
        "probe_requests": opts.probe_requests,
        "wrk_threads": 1,
        "dedup": "on" if opts.dedup else "off (no result cache, no coalescing)",
        "wrk": wrk_version(),
        **{
            d: package_version(d) for d in ("aiohttp", "httpx", "uvicorn", "starlette", "httptools")
        },
    }


def main(opts: Options) -> int:
    """Run it, print the table, write JSON; the exit code."""
    if wrk_version() == "not installed":
        rep.stderr("--upstream needs wrk: apt-get install wrk (scripts/setup.sh installs it)")
        return 2
    have = len(os.sched_getaffinity(0))
    if opts.cores > have:
        rep.stderr(f"--cores {opts.cores}: this process may use only {have} cores")
        return 2
    try:
        report = run(opts)
    except (RuntimeError, OSError) as exc:
        rep.stderr(f"mpipeline bench --upstream: {exc}")
        return 1
    sys.stdout.write(table(report) + "\n")
    if opts.json_path is not None:
        write_json(report, opts.json_path)
        rep.stderr(f"wrote {opts.json_path}")
    errors = sum(p.wrk.errors for r in report.runs for p in r.phases)
    probes = [report.direct_latency, report.direct_ttfb]
    probes += [p for r in report.runs for p in (r.latency, r.ttfb)]
    errors += sum(p.failed for p in probes if p is not None)
    if errors:
        rep.stderr(f"{errors} requests failed or errored (see the errors column)")
    ttfbs = [report.direct_ttfb, *(r.ttfb for r in report.runs)]
    short = [p.target for p in ttfbs if p is not None and p.tokens_min != TTFB_TOKENS]
    long = [p.target for p in ttfbs if p is not None and p.tokens_max != TTFB_TOKENS]
    if short or long:
        rep.stderr(f"streams without exactly {TTFB_TOKENS} tokens: {sorted({*short, *long})}")
        errors += 1
    empty = any(p.wrk.requests == 0 for r in report.runs for p in r.phases)
    return 0 if report.runs and not errors and not empty and not report.leftovers else 1
