"""What ``mpipeline bench --upstream`` reports: result types, the issue's targets, the tables."""

from __future__ import annotations

from pathlib import Path

import msgspec

from mpipeline.bench import report as rep
from mpipeline.bench.cpu import ProcessCpu
from mpipeline.bench.upstream_probe import Sequential
from mpipeline.bench.upstream_profile import CLIENT
from mpipeline.bench.wrk import WrkStats

PIPELINE = "mpipeline"
PEER = "starlette+httpx"

# Issue 13's targets (2 cores, ratios from one run).
TARGET_RPS = 5_000.0
TARGET_PEER_RATIO = 4.0
TARGET_ADDED_P50_US = 600.0
TARGET_TTFB_EXTRA_US = 500.0


class LoadPhase(msgspec.Struct, frozen=True, kw_only=True):
    """One wrk run at full speed against one system."""

    mode: str  # "json" | "stream"
    connections: int
    throughput_rps: float
    # Streamed content tokens per second (stream mode; requests x tokens per reply).
    tokens_per_s: float
    wrk: WrkStats
    cpu: list[ProcessCpu]  # the system's processes
    cpu_us_per_request: float
    # The fake upstream's CPU per request, to show it is not what limits the run.
    upstream_cpu_us_per_request: float
    loadgen_cpu_percent: float
    # CPU that processes other than the system, the upstream and wrk took on the cores.
    foreign_cpu_percent: float
    # --profile: per process, the share of its busy samples per kind of work.
    profile: dict[str, dict[str, float]] = {}


class UpstreamRun(msgspec.Struct, frozen=True, kw_only=True):
    """Everything measured on one system."""

    system: str
    workers: int  # processes serving HTTP (gateway replicas, uvicorn workers)
    start_command: list[str]
    phases: list[LoadPhase]
    latency: Sequential | None
    ttfb: Sequential | None
    run_ids: list[str] = []

    def phase(self, mode: str) -> LoadPhase | None:
        return next((p for p in self.phases if p.mode == mode), None)


class UpstreamReport(msgspec.Struct, frozen=True, kw_only=True):
    machine: rep.Machine
    command: list[str]
    settings: dict[str, float | int | str | list[int] | None]
    # The same probes straight to the fake upstream: what a proxy adds is measured over these.
    direct_latency: Sequential | None
    direct_ttfb: Sequential | None
    runs: list[UpstreamRun]
    verdicts: list[rep.Verdict]
    leftovers: list[str]


def label(run: UpstreamRun) -> str:
    if run.system == PIPELINE:
        return PIPELINE
    return f"{run.system} {run.workers}w"


def added_us(run: UpstreamRun, direct: Sequential | None, kind: str) -> float | None:
    """The system's probe p50 over the same probe's p50 straight to the upstream."""
    probe = run.latency if kind == "latency" else run.ttfb
    if probe is None or direct is None or not probe.latency.samples:
        return None
    return probe.latency.p50_us - direct.latency.p50_us


def ratio(report: UpstreamReport, mode: str, workers: int = 2) -> float | None:
    """mpipeline over the ``workers``-worker peer: req/s (JSON) or tokens/s (stream)."""
    ours = next((r.phase(mode) for r in report.runs if r.system == PIPELINE), None)
    peer = next(
        (r.phase(mode) for r in report.runs if r.system == PEER and r.workers == workers), None
    )
    if ours is None or peer is None:
        return None
    mine, theirs = (
        (ours.throughput_rps, peer.throughput_rps)
        if mode == "json"
        else (ours.tokens_per_s, peer.tokens_per_s)
    )
    return mine / theirs if theirs > 0 else None


def verdicts(report: UpstreamReport) -> list[rep.Verdict]:
    """The issue's targets, where the run measured what they need."""
    ours = next((r for r in report.runs if r.system == PIPELINE), None)
    if ours is None:
        return []
    out = []
    json_phase = ours.phase("json")
    if json_phase is not None:
        rps = json_phase.throughput_rps
        out.append(_verdict("req/s JSON, all stages", TARGET_RPS, rps, rps >= TARGET_RPS))
    for mode, what in (("json", "x peer 2w, req/s JSON"), ("stream", "x peer 2w, tokens/s")):
        x = ratio(report, mode)
        if x is not None:
            out.append(_verdict(what, TARGET_PEER_RATIO, x, x >= TARGET_PEER_RATIO))
    added = added_us(ours, report.direct_latency, "latency")
    if added is not None:
        goal = TARGET_ADDED_P50_US
        out.append(_verdict("added p50 us, sequential", goal, added, added <= goal))
    extra = added_us(ours, report.direct_ttfb, "ttfb")
    if extra is not None:
        goal = TARGET_TTFB_EXTRA_US
        out.append(_verdict("TTFB - upstream TTFT us", goal, extra, extra <= goal))
    return out


def process_us(phase: LoadPhase, name: str) -> float:
    """CPU microseconds per request of one process of the system."""
    total = sum(c.percent for c in phase.cpu)
    mine = sum(c.percent for c in phase.cpu if c.name == name)
    return phase.cpu_us_per_request * mine / total if total > 0 else 0.0


def client_us(phase: LoadPhase) -> float | None:
    """CPU microseconds per request spent in the upstream client (--profile runs):
    each process's CPU per request times its share of samples in the client."""
    if not phase.profile:
        return None
    return sum(
        process_us(phase, name) * shares.get(CLIENT, 0.0) for name, shares in phase.profile.items()
    )


def _verdict(target: str, goal: float, measured: float, met: bool) -> rep.Verdict:
    return rep.Verdict(target=target, goal=goal, measured=measured, met=met)


def _load_rows(report: UpstreamReport) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        (
            "system",
            "mode",
            "conns",
            "req/s",
            "tokens/s",
            "p50 us",
            "p99 us",
            "errors",
            "CPU us/req",
            "upstream us/req",
            "wrk CPU",
            "noise",
        )
    ]
    for r in report.runs:
        for p in r.phases:
            w = p.wrk
            rows.append(
                (
                    label(r),
                    p.mode,
                    str(p.connections),
                    f"{p.throughput_rps:,.0f}",
                    f"{p.tokens_per_s:,.0f}" if p.mode == "stream" else "",
                    f"{w.p50_us:,.0f}",
                    f"{w.p99_us:,.0f}",
                    str(w.errors),
                    f"{p.cpu_us_per_request:,.1f}",
                    f"{p.upstream_cpu_us_per_request:,.1f}",
                    f"{p.loadgen_cpu_percent:.0f}%",
                    f"{p.foreign_cpu_percent:.0f}%",
                )
            )
    return rows


def _probe_rows(report: UpstreamReport) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        ("target", "seq p50 us", "p99 us", "added p50 us", "TTFB p50 us", "p99 us", "added p50 us")
    ]

    def cells(probe: Sequential | None, added: float | None) -> tuple[str, str, str]:
        if probe is None or not probe.latency.samples:
            return ("", "", "")
        lat = probe.latency
        return (
            f"{lat.p50_us:,.0f}",
            f"{lat.p99_us:,.0f}",
            "" if added is None else f"{added:,.0f}",
        )

    rows.append(
        ("upstream, direct", *cells(report.direct_latency, None), *cells(report.direct_ttfb, None))
    )
    rows += [
        (
            label(r),
            *cells(r.latency, added_us(r, report.direct_latency, "latency")),
            *cells(r.ttfb, added_us(r, report.direct_ttfb, "ttfb")),
        )
        for r in report.runs
    ]
    return rows


def _profile_rows(report: UpstreamReport) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("system", "mode", "process", "kinds of work")]
    for r in report.runs:
        for p in r.phases:
            busy = {c.name for c in p.cpu if c.percent >= 0.5}
            for process, shares in sorted(p.profile.items()):
                if process not in busy:
                    continue
                top = sorted(shares.items(), key=lambda kv: -kv[1])[:3]
                text = ", ".join(f"{k} {v:.0%}" for k, v in top)
                rows.append((label(r), p.mode, process, text))
    return rows


def table(report: UpstreamReport) -> str:
    """The report as text: load table, probes, CPU per process, ratios, targets."""
    lines = [rep._format_rows(_load_rows(report))]
    noisy = max((p.foreign_cpu_percent for r in report.runs for p in r.phases), default=0.0)
    if noisy > rep.NOISE_WARN_PERCENT:
        lines.append(
            f"warning: other processes took up to {noisy:.0f}% of a core from the cores "
            "under test (noise column): numbers are understated; rerun on a quiet machine"
        )
    s = report.settings
    lines += [
        "",
        f"sequential probes, one request at a time ({s['probe_requests']} each): JSON send to "
        "last byte; SSE send to the first content token; added = over the upstream direct:",
        rep._format_rows(_probe_rows(report)),
    ]
    cpu_rows: list[tuple[str, ...]] = [("system", "mode", "process", "CPU %", "us/req")]
    cpu_rows += [
        (label(r), p.mode, c.name, f"{c.percent:.0f}", f"{process_us(p, c.name):,.1f}")
        for r in report.runs
        for p in r.phases
        for c in sorted(p.cpu, key=lambda c: -c.percent)
        if c.percent >= 0.5
    ]
    lines += ["", "CPU per process at full speed:", rep._format_rows(cpu_rows)]
    profiled = _profile_rows(report)
    if len(profiled) > 1:
        lines += ["", "py-spy: share of each process's busy samples by kind of work (top 3):"]
        lines.append(rep._format_rows(profiled))
        client = [
            f"{label(r)} {p.mode} {us:,.0f} us"
            for r in report.runs
            for p in r.phases
            if (us := client_us(p)) is not None
        ]
        lines += ["", "CPU per request in the upstream client (profile share x CPU):"]
        lines.append("  " + ", ".join(client))
    ratios = [
        f"{mode} {x:.2f}x" for mode in ("json", "stream") if (x := ratio(report, mode)) is not None
    ]
    if ratios:
        lines += ["", f"{PIPELINE} / {PEER} 2 workers: " + ", ".join(ratios)]
    if report.verdicts:
        lines += ["", "targets:"]
        for v in report.verdicts:
            mark = "met" if v.met else "MISSED"
            lines.append(
                f"  {v.target:<27} goal {v.goal:>10,.2f}  measured {v.measured:>10,.2f}  {mark}"
            )
    if report.leftovers:
        lines += ["", "left behind (a bug):", *(f"  {x}" for x in report.leftovers)]
    return "\n".join(lines)


def write_json(report: UpstreamReport, path: Path) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
